import copy
import json
import math
import random
import statistics

import numpy as np
import pytest
import torch

from prunestudy import atomic, efficiency, kernels, models, paths, prune

torch.set_num_threads(1)

# SeedCNN, one 3x64x64 input: output elements x (in_channels * 3 * 3) per conv, in x out per linear
HAND_MACS = {"conv1": 32 * 64 * 64 * 3 * 9, "conv2": 64 * 32 * 32 * 32 * 9, "conv3": 128 * 16 * 16 * 64 * 9,
             "fc1": 128 * 8 * 8 * 512, "fc2": 512 * 10}


def _net(seed=0):
    torch.manual_seed(seed)
    return models.SeedCNN()


def test_flops_of_the_seed_cnn_match_a_hand_count():
    m = _net().train()
    f = efficiency.flops(m)
    assert {n: v["macs"] for n, v in f["layers"].items()} == HAND_MACS
    assert f["macs"] == sum(HAND_MACS.values()) == 45_487_104
    assert f["effective_macs"] == f["macs"] and f["theoretical_speedup"] == 1
    assert m.training  # mode restored


def test_effective_flops_scale_with_density_and_channels_cut_dense_flops():
    masked = _net()
    prune.apply(masked, "l1_unstructured", 0.5)
    f = efficiency.flops(masked)
    assert f["macs"] == 45_487_104 and f["effective_macs"] == pytest.approx(f["macs"] / 2)
    assert f["theoretical_speedup"] == pytest.approx(2)
    shrunk = _net()
    prune.apply(shrunk, "channel", 0.5)  # 32/64/128 conv channels -> 16/32/64, fc1 512 -> 256
    hand = 16 * 64 * 64 * 27 + 32 * 32 * 32 * 16 * 9 + 64 * 16 * 16 * 32 * 9 + 64 * 8 * 8 * 256 + 256 * 10
    assert efficiency.flops(shrunk)["macs"] == hand


def test_parameters_and_compression_ratio():
    dense, m = _net(), _net()
    prune.apply(m, "global_magnitude", 0.5)
    p = efficiency.parameters(m, dense)
    assert p["params_total"] == p["dense_params_total"] == 4_293_194
    assert p["global_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert p["compression_ratio"] == pytest.approx(p["params_total"] / p["params_nonzero"])
    assert 1.99 < p["compression_ratio"] < 2.0  # biases are not pruned
    shrunk = _net()
    prune.apply(shrunk, "channel", 0.5)
    assert efficiency.parameters(shrunk, dense)["compression_ratio"] > 3.9


def test_sparse_compressed_size_is_smaller_at_half_sparsity():
    dense, m = _net(), _net()
    prune.apply(m, "l1_unstructured", 0.5)
    s, d = efficiency.sizes(m), efficiency.sizes(dense)
    assert s["sparse_compressed_bytes"] < 0.6 * s["state_dict_bytes"]
    assert s["masked_bytes"] > s["state_dict_bytes"] == pytest.approx(d["state_dict_bytes"], rel=1e-3)
    assert d["masked_bytes"] == d["state_dict_bytes"]  # nothing to mask


def test_latency_table_gives_positive_medians_and_ratios_to_dense():
    threads = torch.get_num_threads()
    m = _net()
    prune.apply(m, "l1_unstructured", 0.2)
    table = efficiency.latency_table({"dense": _net(), "masked": efficiency.deployable(m)}, (1, 2), repeats=2)
    assert torch.get_num_threads() == threads
    assert (table["repeats"], table["threads"], table["device"]) == (2, threads, "cpu")
    assert [(r["model"], r["batch"]) for r in table["rows"]] == [("dense", 1), ("dense", 2),
                                                                 ("masked", 1), ("masked", 2)]
    assert all(r["median_ms"] > 0 and r["speedup_vs_dense"] > 0 for r in table["rows"])
    assert table["rows"][0]["speedup_vs_dense"] == 1 and table["rows"][0]["speedup_ci_low"] == 1
    assert all(r["speedup_ci_low"] <= r["speedup_vs_dense"] <= r["speedup_ci_high"] for r in table["rows"])
    single = efficiency.latency(_net(), (1,), repeats=1, threads=1)
    assert single["threads"] == 1 and single["rows"][0]["speedup_vs_dense"] is None
    with pytest.raises(ValueError, match="repeats"):
        efficiency.latency(_net(), (1,), repeats=0)


def test_latency_is_timed_channels_last_and_says_so(monkeypatch):
    """Models and inputs are timed in the channels-last format CNNs are deployed in (NCHW max-pooling
    is a slow path on the CPU); the table records the format; the caller's models are left as they
    were; NCHW on request; an unknown format is refused, naming the ones there are."""
    seen = []
    real = efficiency._time_once

    def spy(model, x, dev):
        seen.append((x.is_contiguous(memory_format=torch.channels_last),
                     model.conv2.weight.is_contiguous(memory_format=torch.channels_last)))
        return real(model, x, dev)
    monkeypatch.setattr(efficiency, "_time_once", spy)
    dense = _net()
    table = efficiency.latency_table({"dense": dense}, (2,), repeats=2, warmup=0)
    assert table["memory_format"] == efficiency.MEMORY_FORMAT == "channels_last"
    assert seen == [(True, True)] * 2
    assert dense.conv2.weight.is_contiguous()   # not converted in place
    seen.clear()
    table = efficiency.latency_table({"dense": dense}, (2,), repeats=2, warmup=0, memory_format="contiguous")
    assert table["memory_format"] == "contiguous" and seen == [(False, False)] * 2
    with pytest.raises(ValueError, match="memory_format 'nhwc': choose one of channels_last, contiguous"):
        efficiency.latency_table({"dense": dense}, (2,), repeats=1, memory_format="nhwc")
    shrunk = _net(1)
    prune.apply(shrunk, "channel", 0.5)
    s = efficiency.summary(shrunk, dense, batch_sizes=(2,), repeats=2, devices=("cpu",))
    assert s["latency"]["cpu"]["memory_format"] == "channels_last" and "channels last)" in s["remark"]


def test_summary_is_plain_json_and_says_whether_time_is_saved():
    dense, m = _net(), _net()
    prune.apply(m, "channel", 0.5)
    s = efficiency.summary(m, dense, batch_sizes=(1, 2), repeats=2, devices=("cpu",))
    assert json.loads(json.dumps(s)) == s
    assert s["dense_macs"] == 45_487_104 and s["macs"] < s["dense_macs"]
    assert s["theoretical_speedup"] == pytest.approx(s["dense_macs"] / s["effective_macs"])
    assert isinstance(s["saves_time"], bool) and s["remark"].startswith("saves")
    assert [r["model"] for r in s["latency"]["cpu"]["rows"]] == ["dense", "dense", "pruned", "pruned"]


def test_a_retrained_model_takes_over_the_latency_of_the_same_computation(monkeypatch):
    """The retrained model (masks held: the pruned model's zeros, other values) is not timed again:
    its latency is the pruned model's. A model with another zero pattern, or other latency settings,
    is timed."""
    dense, pruned = _net(), _net()
    prune.apply(pruned, "channel", 0.5)
    first = efficiency.summary(pruned, dense, batch_sizes=(1, 2), repeats=2, devices=("cpu",))
    assert first["latency_from"] is None
    retrained = copy.deepcopy(pruned)
    with torch.no_grad():   # new values, the same layers
        for p in retrained.parameters():
            p.mul_(1.5)
    timed = []
    real = efficiency.latency_table
    monkeypatch.setattr(efficiency, "latency_table", lambda *a, **k: timed.append(1) or real(*a, **k))
    again = efficiency.summary(retrained, dense, batch_sizes=(1, 2), repeats=2, devices=("cpu",), same_as=first)
    assert timed == [] and "pruned model" in again["latency_from"]
    for field in ("latency", "measured_speedup", "speedup_ci", "saves_time", "remark"):
        assert again[field] == first[field]
    assert again["state_dict_bytes"] == first["state_dict_bytes"]   # sizes measured on this model
    assert again["sparse_compressed_bytes"] != first["sparse_compressed_bytes"]
    more = copy.deepcopy(pruned)
    prune.apply(more, "channel", 0.5)   # fewer channels again: another computation
    other = efficiency.summary(more, dense, batch_sizes=(1, 2), repeats=2, devices=("cpu",), same_as=first)
    assert timed == [1] and other["latency_from"] is None
    efficiency.summary(retrained, dense, batch_sizes=(1, 2), repeats=3, devices=("cpu",), same_as=first)
    assert timed == [1, 1]   # other repeats: timed
    nchw = copy.deepcopy(first)   # a summary from before the format was recorded: timed NCHW
    for table in nchw["latency"].values():
        del table["memory_format"]
    efficiency.summary(retrained, dense, batch_sizes=(1, 2), repeats=2, devices=("cpu",), same_as=nchw)
    assert timed == [1, 1, 1]   # another format: timed
    efficiency.summary(retrained, dense, batch_sizes=(1, 2), repeats=2, devices=("cpu",), same_as=nchw,
                       memory_format="contiguous")
    assert timed == [1, 1, 1]   # the same format: taken over
    assert first["latency"]["cpu"]["allocator"] == efficiency.allocator()
    tuned = copy.deepcopy(first)   # timed in a process with other malloc settings: timed again
    for table in tuned["latency"].values():
        table["allocator"] = "glibc.malloc.mmap_threshold=1" if efficiency.allocator() == "default" else "default"
    efficiency.summary(retrained, dense, batch_sizes=(1, 2), repeats=2, devices=("cpu",), same_as=tuned)
    assert timed == [1, 1, 1, 1]
    monkeypatch.setenv("GLIBC_TUNABLES", kernels.MALLOC_TUNABLES)   # what the project's kernels run with
    assert efficiency.allocator() == kernels.MALLOC_TUNABLES
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert efficiency.allocator() == "default"


def test_speed_ratio_is_the_t_interval_of_paired_log_ratios():
    from scipy import stats

    dense = [10.0, 11.0, 9.5, 10.4, 12.0, 9.9]
    pruned = [5.2, 5.9, 4.8, 5.0, 6.5, 5.1]
    logs = [math.log(d / p) for d, p in zip(dense, pruned)]
    half = stats.t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    r = efficiency.speed_ratio(dense, pruned)
    assert r["speedup"] == pytest.approx(math.exp(statistics.fmean(logs)))
    assert (r["low"], r["high"]) == pytest.approx((math.exp(statistics.fmean(logs) - half),
                                                    math.exp(statistics.fmean(logs) + half)))
    assert efficiency.speed_ratio([10.0], [5.0]) == {"speedup": 2.0, "low": None, "high": None}


def recomputed(times: dict, confidence: float) -> dict:
    """(model, batch) -> median, minimum, speedup over the dense model and its interval, from one
    latency table's stored repeats alone (batch -> model -> ms, repeat i paired across models), with
    numpy and scipy: the recipe of docs/results.md, written apart from the package's own code."""
    from scipy import stats

    out = {}
    for batch, by_model in times.items():
        dense = np.asarray(by_model["dense"])
        for model, ms in by_model.items():
            logs = np.log(dense / np.asarray(ms))
            half = stats.t.ppf(0.5 + confidence / 2, len(logs) - 1) * logs.std(ddof=1) / np.sqrt(len(logs))
            out[model, int(batch)] = {"median_ms": np.median(ms), "min_ms": np.min(ms),
                                      "speedup_vs_dense": np.exp(logs.mean()),
                                      "speedup_ci_low": np.exp(logs.mean() - half),
                                      "speedup_ci_high": np.exp(logs.mean() + half)}
    return out


def assert_recomputes(fields: dict, times: dict) -> None:
    """Every stored row of an efficiency summary's latency tables, and its verdict's speedup and
    interval, are what its stored repeats (`times`: device -> batch -> model -> ms) give."""
    for dev, table in fields["latency"].items():
        again = recomputed(times[dev], table["confidence"])
        assert {(r["model"], r["batch"]) for r in table["rows"]} == set(again)
        assert all(len(ms) == table["repeats"] for by_model in times[dev].values() for ms in by_model.values())
        for row in table["rows"]:
            for field, value in again[row["model"], row["batch"]].items():
                assert row[field] == pytest.approx(value, rel=1e-9), (dev, row, field)
    cpu = again if "cpu" not in fields["latency"] else recomputed(times["cpu"], fields["latency"]["cpu"]["confidence"])
    verdict = cpu["pruned", fields["verdict_batch"]]
    assert fields["measured_speedup"] == pytest.approx(verdict["speedup_vs_dense"], rel=1e-9)
    assert fields["speedup_ci"] == pytest.approx([verdict["speedup_ci_low"], verdict["speedup_ci_high"]], rel=1e-9)


def test_stored_repeats_recompute_the_speedup_and_its_interval(tmp_path):
    """Every paired repeat is kept (the timing stage: apart from its metrics, in paths.TIMES), and
    the medians, speedups and intervals stored are what those repeats give, recomputed from the
    JSON files alone."""
    dense, small = _net(), _net()
    prune.apply(small, "channel", 0.5)
    costs = efficiency.summary(small, dense, measure=False)
    fields = efficiency.measured(small, dense, costs, batch_sizes=(1, 4), repeats=6, devices=("cpu",),
                                 warmup=1)
    metrics, times = efficiency.split_times({"models": {"prune": fields}, "device": "cpu"})
    assert metrics["device"] == "cpu" and efficiency.TIMES not in json.dumps(metrics)   # metrics stay short
    atomic.write_json(tmp_path / paths.METRICS, metrics)
    atomic.write_json(tmp_path / paths.TIMES, times)
    stored = atomic.read_json(tmp_path / paths.METRICS)["models"]["prune"]
    assert_recomputes(stored, atomic.read_json(tmp_path / paths.TIMES)["prune"])


def _fake_timer(monkeypatch, ratio: float, noise: float = 0.05, seed: int = 0) -> list:
    """Replace the clock: the dense model takes ~10 ms, the other ~10/ratio ms, each with lognormal noise;
    returns the list the order of the timed models is appended to."""
    rng, order = random.Random(seed), []

    def fake(model, x, dev):
        order.append(model.tag)
        base = 10.0 if model.tag == "dense" else 10.0 / ratio
        return base * math.exp(rng.gauss(0, noise)) / 1e3
    monkeypatch.setattr(efficiency, "_time_once", fake)
    return order


def _tagged(tag: str):
    m = _net()
    m.tag = tag
    return m


def test_models_are_timed_in_random_order_every_repeat(monkeypatch):
    order = _fake_timer(monkeypatch, 1.0)
    efficiency.latency_table({"dense": _tagged("dense"), "pruned": _tagged("pruned")}, (1,), repeats=40, warmup=0)
    pairs = [tuple(order[i:i + 2]) for i in range(0, len(order), 2)]
    assert all(sorted(p) == ["dense", "pruned"] for p in pairs)            # each model once per repeat
    firsts = {p[0] for p in pairs}
    assert firsts == {"dense", "pruned"}                                    # neither always first
    again = _fake_timer(monkeypatch, 1.0)
    efficiency.latency_table({"dense": _tagged("dense"), "pruned": _tagged("pruned")}, (1,), repeats=40, warmup=0)
    assert again == order                                                   # seeded: the same order again


def test_verdict_needs_the_interval_of_the_speedup_above_1(monkeypatch):
    dense = _net()
    fast = _net()
    prune.apply(fast, "channel", 0.5)
    dense.tag, fast.tag = "dense", "pruned"
    monkeypatch.setattr(efficiency, "deployable", lambda m: m)
    _fake_timer(monkeypatch, 2.0)
    s = efficiency.summary(fast, dense, batch_sizes=(1, 64), repeats=12, devices=("cpu",))
    assert s["saves_time"] and s["speedup_ci"][0] > 1 and s["remark"].startswith("saves time")
    assert s["verdict_batch"] == 64 and "at batch 64" in s["remark"] and "at batch 1:" in s["remark"]
    assert s["measured_speedup"] == pytest.approx(2.0, rel=0.05)
    _fake_timer(monkeypatch, 1.0)
    s = efficiency.summary(fast, dense, batch_sizes=(64,), repeats=12, devices=("cpu",))
    lo, hi = s["speedup_ci"]
    assert lo < 1 < hi and not s["saves_time"]
    assert s["remark"].startswith("saves no time that this measurement can show") and "holds 1" in s["remark"]
    _fake_timer(monkeypatch, 0.8)
    s = efficiency.summary(fast, dense, batch_sizes=(64,), repeats=12, devices=("cpu",))
    assert not s["saves_time"] and "it is slower" in s["remark"]
    # faster for sure, but by less than the margin: the drift between two models of the same
    # computation (measured 1.02x, 95% CI 1.01-1.03x on real photos) is no saving
    _fake_timer(monkeypatch, 1.02, noise=0.005)
    s = efficiency.summary(fast, dense, batch_sizes=(64,), repeats=20, devices=("cpu",))
    assert 1 < s["speedup_ci"][0] <= efficiency.MIN_SPEEDUP and not s["saves_time"]
    assert s["remark"].startswith("saves no time that counts") and "not above 1.05x" in s["remark"]
    _fake_timer(monkeypatch, 1.2, noise=0.005)   # channel pruning's kind of gain passes the margin
    s = efficiency.summary(fast, dense, batch_sizes=(64,), repeats=20, devices=("cpu",))
    assert s["speedup_ci"][0] > efficiency.MIN_SPEEDUP and s["saves_time"]
    _fake_timer(monkeypatch, 3.0)
    s = efficiency.summary(fast, dense, batch_sizes=(64,), repeats=1, devices=("cpu",))
    assert not s["saves_time"] and "no verdict" in s["remark"]              # one run: no interval, no verdict


@pytest.mark.parametrize("method", ["l1_unstructured", "random_unstructured", "global_magnitude", None])
def test_a_model_of_the_dense_computation_is_not_timed(monkeypatch, method):
    """Masked pruning (or none) leaves every layer's shape: the model multiplies its zeros by the
    dense kernels, its speed is the dense model's. It is not timed, and says so; a model with fewer
    channels is."""
    dense, m = _net(), _net(1)
    if method:
        prune.apply(m, method, 0.5)
    timed = []
    real = efficiency.latency_table
    monkeypatch.setattr(efficiency, "latency_table", lambda *a, **k: timed.append(1) or real(*a, **k))
    s = efficiency.summary(m, dense, batch_sizes=(1, 2), repeats=2, devices=("cpu",))
    assert timed == [] and json.loads(json.dumps(s)) == s
    assert s["latency"] == {} and not efficiency.timed(s) and s["measured_speedup"] == 1.0
    assert s["speedup_ci"] is None and s["verdict_batch"] is None and s["saves_time"] is False
    assert s["latency_from"] == efficiency.DENSE_COMPUTATION
    assert s["remark"].startswith("saves no time: it runs the dense model's computation") and "not timed" in s["remark"]
    assert "dense kernels" in s["remark"]
    assert s["theoretical_speedup"] > 1.1 if method else s["theoretical_speedup"] == 1   # fewer MACs on paper only
    again = efficiency.summary(m, dense, batch_sizes=(1, 2), repeats=2, devices=("cpu",), same_as=s)
    assert timed == [] and again["latency_from"] == efficiency.DENSE_COMPUTATION   # the retrained one: neither
    shrunk = _net()
    prune.apply(shrunk, "channel", 0.25)
    s = efficiency.summary(shrunk, dense, batch_sizes=(1, 2), repeats=2, devices=("cpu",))
    assert timed == [1] and efficiency.timed(s) and s["latency_from"] is None

def test_masked_models_are_timed_with_masks_folded_and_left_unchanged():
    m = _net()
    prune.apply(m, "l1_unstructured", 0.5)
    folded = efficiency.deployable(m)
    assert prune.masks(m) and not prune.masks(folded)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(folded.eval()(x), m.eval()(x))
    dense = _net()
    assert efficiency.deployable(dense) is dense
    copy.deepcopy(folded)
