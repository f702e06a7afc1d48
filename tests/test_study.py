"""The pruning study through the stage functions, on a tiny embedded dataset (1 training epoch):
every method through prune + retrain + export, iterative rounds, rewinding, the dense control,
the sweep's points, and what results.json holds."""

import json
import shutil

import pytest
import torch
from conftest import curve_by_hand
from test_efficiency import assert_recomputes

from prunestudy import atomic, data, efficiency, methods, models, paths, prune, report, stages, synth, train

pytestmark = pytest.mark.e2e   # the whole pruning study through the stage functions

TINY = {"seed": 3, "train_images": 30, "val_images": 15, "image_size": 160}
REWIND_STEP = 2
BATCH = 8


def quiet(*_):
    pass


@pytest.fixture(autouse=True)
def _fast_latency(monkeypatch):
    """Latency is measured for real, but once, at a small batch: the figures' plumbing is under test."""
    monkeypatch.setattr(stages, "LATENCY", {"batch_sizes": (1, 4), "repeats": 1, "warmup": 0, "devices": ("cpu",)})


def _make_run(rd, model="seed_cnn"):
    root = synth.ensure(rd.parent / "coco", **TINY)
    stages.run_data(rd, root=str(root), min_box=12, min_per_class=1, max_per_class=5, max_test_per_class=4, log=quiet)
    stages.run_train(rd, model=model, epochs=1, batch_size=BATCH, lr=1e-3, seed=0,
                     rewind_step=REWIND_STEP if model == "seed_cnn" else None, log=quiet)
    return rd


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder with data and a seed CNN trained 1 epoch (weights at step 2 kept for rewinding)."""
    return _make_run(tmp_path_factory.mktemp("study") / "run")


@pytest.fixture
def fresh(trained, tmp_path):
    """A copy of the trained run folder whose prune/ and retrain/ are this test's own."""
    rd = tmp_path / "run"
    for part in ("data", "train"):
        shutil.copytree(trained / part, rd / part)
    return rd


def _testset(rd):
    return train.to_device(*data.load_split(rd / "data", "test"), torch.device("cpu"))


def _evaluate(net, rd) -> dict:
    """The test set scored as the stages score it: in the training's memory format (auto: channels-last)."""
    return train.evaluate(net, *_testset(rd), channels_last=True)


def _weights(state):
    return {k: v for k, v in state.items() if k.endswith("weight") and v.ndim >= 2}


@pytest.mark.parametrize("method", methods.names())
def test_every_method_prunes_retrains_and_exports(trained, method):
    p_dir, r_dir = trained / f"prune-{method}", trained / f"retrain-{method}"
    p = stages.run_prune(trained, method=method, amount=0.5, out_dir=p_dir, log=quiet)
    kind = methods.get(method).kind
    assert p["method"] == method and p["kind"] == kind and p["rounds"] == 1
    eff = p["efficiency"]
    for key in ("params_total", "params_nonzero", "layer_sparsity", "global_sparsity", "compression_ratio", "macs",
                "effective_macs", "dense_macs", "theoretical_speedup", "state_dict_bytes", "masked_bytes",
                "sparse_compressed_bytes", "measured_speedup", "saves_time", "remark"):
        assert key in eff, key
    if kind == "masked":   # the dense computation: not timed, its speed is the dense model's
        assert eff["params_total"] == eff["dense_params_total"] and eff["macs"] == eff["dense_macs"]
        assert eff["latency"] == {} and eff["measured_speedup"] == 1.0 and eff["saves_time"] is False
        assert eff["latency_from"] == efficiency.DENSE_COMPUTATION and "not timed" in eff["remark"]
        if method != "ln_structured":  # the classifier keeps its rows under ln_structured
            assert p["global_sparsity"] == pytest.approx(0.5, abs=2e-3)
    else:  # physically smaller: fewer parameters and fewer MACs actually run; timed by the timing stage
        assert eff["params_total"] < eff["dense_params_total"] and eff["macs"] < eff["dense_macs"]
        assert efficiency.is_pending(eff) and eff["latency"] == {} and eff["measured_speedup"] is None
        assert p["global_sparsity"] > 0.5  # removed weights count, inputs of the next layer included
    # what the prune stage saved loads back (channel: rebuilt from architecture.json) and scores the same
    assert _evaluate(stages.load_model(p_dir, masks=True), trained)["accuracy"] == p["test_accuracy"]

    r = stages.run_retrain(trained, epochs=1, batch_size=BATCH, lr=1e-3, control=False, pruned_dir=p_dir,
                           out_dir=r_dir, log=quiet)
    assert r["global_sparsity"] == pytest.approx(p["global_sparsity"])  # masks held / shape kept
    assert not (r_dir / "control").exists() and r["control"] is False
    # the export, loaded with torch.load(weights_only=True) into a dense model or the rebuilt small one
    meta = json.loads((r_dir / "export.json").read_text())
    state = torch.load(r_dir / "export.pt", map_location="cpu", weights_only=True)
    if kind == "masked":
        net = models.build_model(meta["model"], meta["num_classes"])
        assert not any(k.endswith(("_orig", "_mask")) for k in state)
    else:
        net = prune.rebuild(meta["model"], meta["num_classes"], meta["architecture"])
        assert models.count_parameters(net) < models.count_parameters(models.build_model("seed_cnn"))
    net.load_state_dict(state)
    ev = _evaluate(net, trained)
    assert ev["accuracy"] == r["test_accuracy"] == meta["test_accuracy"]
    assert ev["loss"] == pytest.approx(r["test_loss"], rel=1e-5)
    assert _evaluate(stages.load_export(r_dir), trained)["accuracy"] == r["test_accuracy"]


def test_channel_on_resnet18_prunes_retrains_and_exports(tmp_path):
    rd = _make_run(tmp_path / "run", model="resnet18")
    p = stages.run_prune(rd, method="channel", amount=0.5, log=quiet)
    assert p["efficiency"]["params_total"] < p["efficiency"]["dense_params_total"]
    r = stages.run_retrain(rd, epochs=1, batch_size=BATCH, lr=1e-3, control=False, log=quiet)
    net = stages.load_export(rd / "retrain")
    assert isinstance(net, type(models.build_model("resnet18")))
    assert _evaluate(net, rd)["accuracy"] == r["test_accuracy"]
    assert _evaluate(stages.load_model(rd / "retrain"), rd)["accuracy"] == r["test_accuracy"]


def test_iterative_rounds_reach_the_target_and_the_control_matches_the_epochs(fresh):
    p = stages.run_prune(fresh, method="l1_unstructured", amount=0.6, rounds=2, epochs_per_round=1,
                         batch_size=BATCH, lr=1e-3, log=quiet)
    rounds = p["rounds_detail"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["global_sparsity"] == pytest.approx(1 - 0.4 ** 0.5, abs=2e-3)  # the same share of the rest
    assert p["global_sparsity"] == pytest.approx(0.6, abs=2e-3)
    assert len(rounds[0]["epochs"]) == 1 and "epochs" not in rounds[1]  # fine-tuned between rounds only
    assert p["between_round_epochs"] == 1 and (fresh / "prune" / "history.json").is_file()
    r = stages.run_retrain(fresh, epochs=1, batch_size=BATCH, lr=1e-3, control=True, log=quiet)
    assert r["global_sparsity"] == pytest.approx(p["global_sparsity"])

    # the dense control: trained model + as many fine-tuning epochs (1 between rounds + 1), unpruned
    c = atomic.read_json(fresh / "retrain" / "control" / "metrics.json")
    assert c["fine_tune_epochs"] == 2 and len(c["epochs"]) == 2 and r["control_epochs"] == 2
    assert c["global_sparsity"] == 0 and c["params_nonzero"] == c["params_total"] == c["dense_params_total"]
    dense = atomic.load_tensors(fresh / "train" / "model.pt")
    control = atomic.load_tensors(fresh / "retrain" / "control" / "model.pt")
    assert {k: v.shape for k, v in control.items()} == {k: v.shape for k, v in dense.items()}
    assert all((w != 0).all() for w in _weights(control).values())  # unpruned
    assert not torch.equal(control["fc1.weight"], dense["fc1.weight"])  # it did train
    res = stages.load_results(fresh)
    assert res["control"]["test_accuracy"] == c["test_accuracy"]
    assert report.CONTROL_LABEL in report.summary_table(res).index


def test_rewind_resets_surviving_weights_to_the_saved_step_and_keeps_masks(trained, tmp_path):
    # train/rewind.pt holds the weights after optimizer step 2: replay the training up to there
    saved = atomic.load_tensors(trained / "train" / "rewind.pt")
    trainset, testset = stages._load_data(trained / "data", torch.device("cpu"))
    torch.manual_seed(0)
    replay = models.build_model("seed_cnn", len(data.read_info(trained / "data")["classes"]))
    at_step = {}

    class Stop(Exception):
        pass

    def capture(step, model):
        if step == REWIND_STEP:
            at_step.update({k: v.detach().clone() for k, v in model.state_dict().items()})
            raise Stop

    with pytest.raises(Stop):
        speed = atomic.read_json(trained / "train" / "metrics.json")["speed_params"]  # the same kernels
        train.fit(replay, trainset, testset, epochs=1, batch_size=BATCH, lr=1e-3, seed=0, log=quiet,
                  progress=False, on_step=capture, **speed)
    assert saved.keys() == at_step.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], at_step[k], rtol=0, atol=1e-6)

    p_dir = tmp_path / "prune"
    p = stages.run_prune(trained, method="global_magnitude", amount=0.5, rewind_step=REWIND_STEP, out_dir=p_dir,
                         log=quiet)
    assert p["rewind"]["step"] == REWIND_STEP
    masks = atomic.load_tensors(p_dir / "masks.pt")
    pruned = atomic.load_tensors(p_dir / "model.pt")
    rewound = atomic.load_tensors(p_dir / "rewound.pt")
    final = atomic.load_tensors(trained / "train" / "model.pt")
    for name, keep in masks.items():
        w = f"{name}.weight"
        assert torch.equal(rewound[w][keep], saved[w][keep])      # survivors: their step-2 values
        assert (rewound[w][~keep] == 0).all() and (pruned[w][~keep] == 0).all()  # pruned: still zero
        assert torch.equal(pruned[w][keep], final[w][keep])       # before rewinding: the trained values
    assert torch.equal(rewound["conv1.bias"], saved["conv1.bias"])
    assert not torch.equal(saved["fc1.weight"], final["fc1.weight"])

    r = stages.run_retrain(trained, epochs=1, batch_size=BATCH, lr=1e-3, control=False, pruned_dir=p_dir,
                           out_dir=tmp_path / "retrain", log=quiet)
    assert r["start"]["weights"] == "rewound" and r["start"]["test_accuracy"] == p["rewind"]["test_accuracy"]
    assert r["global_sparsity"] == pytest.approx(p["global_sparsity"])
    after_masks = atomic.load_tensors(tmp_path / "retrain" / "masks.pt")
    assert all(torch.equal(after_masks[k], masks[k]) for k in masks)

    with pytest.raises(FileNotFoundError, match="02_train"):
        stages.run_prune(trained, rewind_step=REWIND_STEP + 1, out_dir=tmp_path / "other", log=quiet)


def test_sweep_points_fill_results_before_and_after_retraining(fresh):
    """Curve points laid out as the runner lays them out (curve/<point>/, each a run folder of its
    own with the study's data and training): results.json holds one entry per point, before
    retraining as soon as it is pruned, after retraining only from that very pruning."""
    amounts, methods = [0.3, 0.7], ["l1_unstructured", "channel"]
    stages.run_prune(fresh, method="l1_unstructured", amount=0.2, log=quiet)
    stages.run_retrain(fresh, epochs=1, batch_size=BATCH, lr=1e-3, control=True, log=quiet)
    names = curve_by_hand(fresh, methods, amounts, latency_repeats=5)
    assert names == ["l1_unstructured-0.3", "l1_unstructured-0.7", "channel-0.3", "channel-0.7"]
    res = stages.collect_results(fresh)
    assert [e["name"] for e in res["curve"]] == sorted(names) and all(e["test_accuracy_after"] is None
                                                                      for e in res["curve"])
    retrain = dict(epochs=1, batch_size=BATCH, lr=1e-3, control=False)
    curve_by_hand(fresh, methods, amounts, retrain=retrain, latency_repeats=5)
    # a point pruned again after its retraining: its retrained figures are not this pruning's
    stale = paths.curve_point_dir(fresh, "channel-0.7")
    stages.run_prune(stale, method="channel", amount=0.7, seed=1, latency_repeats=5, data_dir=fresh / "data",
                     model_dir=fresh / "train", log=quiet)
    res = stages.collect_results(fresh)
    after = {e["name"]: e["test_accuracy_after"] for e in res["curve"]}
    assert after["channel-0.7"] is None and all(v is not None for n, v in after.items() if n != "channel-0.7")
    stages.run_retrain(stale, **retrain, data_dir=fresh / "data", model_dir=fresh / "train", log=quiet)

    timed = stages.run_timing(fresh, log=quiet)   # the channel points' latency, on this machine
    assert set(timed) == {str(paths.curve_point_dir(fresh, n)) for n in ("channel-0.3", "channel-0.7")}
    for folder in timed:
        table = timed[folder]["models"]["prune"]["latency"]["cpu"]
        assert table["memory_format"] == "channels_last" and table["threads"] == timed[folder]["machine"]["threads"]
        assert {(r["model"], r["batch"]) for r in table["rows"]} == {(m, b) for m in ("dense", "pruned")
                                                                     for b in (1, 4)}
        kept = paths.timing_dir(folder)   # every paired repeat, beside the metrics: they recompute them
        times, stored = atomic.read_json(kept / paths.TIMES), atomic.read_json(kept / paths.METRICS)
        assert stored == timed[folder] and set(times) == set(stored["models"]) == {"prune", "retrain"}
        for stage, fields in stored["models"].items():
            assert_recomputes(fields, times[stage])
    assert stages.run_timing(fresh, log=quiet) == timed   # reused while the key holds
    res = stages.collect_results(fresh)
    json.dumps(res)  # plain JSON
    assert res["control"]["global_sparsity"] == 0
    assert {(e["method"], e["amount"]) for e in res["curve"]} == {(m, a) for m in methods for a in amounts}
    for e in res["curve"]:
        assert 0 <= e["test_accuracy_before"] <= 1 and 0 <= e["test_accuracy_after"] <= 1
        assert e["retrain_epochs"] == 1 and e["speedup_measured"] > 0 and e["speedup_theoretical"] >= 1
        if e["kind"] == "masked":   # not timed (the dense computation)
            assert not e["timed"] and e["speedup_measured"] == 1.0 and e["latency_batch"] is None
            assert e["latency_ms"] is None and e["dense_latency_ms"] is None and not e["saves_time"]
            assert e["times"] is None
        else:
            assert e["timed"] and e["latency_batch"] == 4 and e["latency_ms"] > 0 and e["dense_latency_ms"] > 0
            assert e["times"] == f"{paths.CURVE}/{e['name']}/{paths.TIMING}/{paths.TIMES}"
        assert set(e["sizes"]) == {"state_dict_bytes", "masked_bytes", "sparse_compressed_bytes",
                                   "dense_state_dict_bytes"}
        assert 0 < e["sparsity"] < 1 and isinstance(e["saves_time"], bool) and e["remark"]
    l1 = {e["amount"]: e for e in res["curve"] if e["method"] == "l1_unstructured"}
    assert l1[0.7]["sparsity"] == pytest.approx(0.7, abs=2e-3) and l1[0.7]["macs"] == l1[0.7]["dense_macs"]
    fig = report.plot_tradeoff(res)
    assert len(fig.axes) == 3 and len(fig.axes[0].get_lines()) >= 2 * len(methods)   # accuracy, balanced, speedup
    assert "batch 4" in fig.axes[2].get_xlabel() and "masked points at 1×, not timed" in fig.axes[2].get_xlabel()
    table = report.curve_table(res)
    assert len(table) == len(names)
    masked = table[table["method"] == "l1_unstructured"]   # the dense computation: not timed, saves no time
    assert (masked["saves time"] == "NO").all() and masked["latency, batch 4 (ms)"].isna().all()
    assert (masked["measured speedup (×)"] == 1.0).all() and (masked["speedup 95% CI (×)"] == "—").all()
    assert table[table["method"] == "channel"]["latency, batch 4 (ms)"].gt(0).all()
    assert "l1\\_unstructured 1.00× (not timed: the dense computation)" in report.curve_markdown(res)   # md-escaped
