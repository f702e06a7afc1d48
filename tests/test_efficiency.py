import copy
import json

import pytest
import torch

from prunestudy import efficiency, models, prune

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
    assert table["rows"][0]["speedup_vs_dense"] == 1
    single = efficiency.latency(_net(), (1,), repeats=1, threads=1)
    assert single["threads"] == 1 and single["rows"][0]["speedup_vs_dense"] is None
    with pytest.raises(ValueError, match="repeats"):
        efficiency.latency(_net(), (1,), repeats=0)


def test_summary_is_plain_json_and_says_whether_time_is_saved():
    dense, m = _net(), _net()
    prune.apply(m, "channel", 0.5)
    s = efficiency.summary(m, dense, batch_sizes=(1, 2), repeats=2, devices=("cpu",))
    assert json.loads(json.dumps(s)) == s
    assert s["dense_macs"] == 45_487_104 and s["macs"] < s["dense_macs"]
    assert s["theoretical_speedup"] == pytest.approx(s["dense_macs"] / s["effective_macs"])
    assert isinstance(s["saves_time"], bool) and s["remark"].startswith("saves")
    assert [r["model"] for r in s["latency"]["cpu"]["rows"]] == ["dense", "dense", "pruned", "pruned"]


def test_verdict_is_judged_from_the_measured_speedup():
    saves, remark = efficiency._verdict(1.02, 64, 2.0, same_shape=True)
    assert not saves and "saves no time" in remark and "dense kernels" in remark
    saves, remark = efficiency._verdict(2.7, 64, 3.7, same_shape=False)
    assert saves and "2.70x" in remark


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
