"""Tests for prunestudy.report: the summary table, computed findings and figures of a run folder.

A fake but realistic run folder is written to tmp_path (results.json, histories, tiny state_dicts
with exact zeros after pruning, predictions, data arrays); expectations are computed here from the
fixture's own numbers, independently of the module's helpers.
"""

from __future__ import annotations

import ast
import copy
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_hex, to_rgb  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle, StepPatch  # noqa: E402

from prunestudy import efficiency, kernels, methods, report, results, stages, states  # noqa: E402
from prunestudy.report import reference  # noqa: E402

# class names that would break naive rendering: mathtext, HTML, markdown
CLASSES = ["person", "car", "$\\frac$ cup", "<b>dog</b>", "traffic light", "cat", "a_b*c", "bus", "bird", "chair"]
K = len(CLASSES)
N_TRAIN, N_TEST = 60, 500
STEPS_PER_EPOCH = 12
TRAIN_EPOCHS, RETRAIN_EPOCHS = 10, 3
AMOUNT = 0.2
SHAPES = {"conv1.weight": (8, 3, 3, 3), "conv1.bias": (8,), "bn.weight": (8,), "conv2.weight": (16, 8, 3, 3),
          "fc1.weight": (32, 64), "fc1.bias": (32,), "fc2.weight": (K, 32), "fc2.bias": (K,)}
LAYERS = ["conv1", "conv2", "fc1", "fc2"]   # the >=2-D weights
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _close_figures():
    report.setup_style()
    yield
    plt.close("all")


def _epoch_rows(steps: np.ndarray, test_loss: list[float], test_acc: list[float]) -> list[dict]:
    rows = []
    for e, chunk in enumerate(np.split(steps, len(test_loss))):
        rows.append({"epoch": e + 1, "train_loss": float(chunk.mean()), "step_loss_first": float(chunk[0]),
                     "step_loss_min": float(chunk.min()), "step_loss_max": float(chunk.max()),
                     "step_loss_last": float(chunk[-1]), "test_loss": test_loss[e], "test_accuracy": test_acc[e],
                     "seconds": 2.0, "images_per_s": 30.0})
    return rows


def _l1_prune(w: torch.Tensor, amount: float) -> torch.Tensor:
    k = round(amount * w.numel())
    idx = torch.argsort(w.abs().flatten())[:k]
    out = w.clone().flatten()
    out[idx] = 0
    return out.view_as(w)


def hand_scores(labels: np.ndarray, pred: np.ndarray) -> dict:
    """Balanced accuracy and macro-F1 computed here, class by class (the classes with test samples)."""
    recall, f1 = [], []
    for k in range(K):
        tp = int(((pred == k) & (labels == k)).sum())
        fn = int(((pred != k) & (labels == k)).sum())
        fp = int(((pred == k) & (labels != k)).sum())
        if tp + fn:
            recall.append(tp / (tp + fn))
            f1.append(2 * tp / (2 * tp + fp + fn))
    return {"balanced_accuracy": float(np.mean(recall)), "macro_f1": float(np.mean(f1))}


def with_comparisons(root: Path, res: dict) -> dict:
    """What load_results adds from the saved predictions: the majority floor and the paired tests."""
    res.update(results.comparisons(root, res, np.load(root / "data" / "test_labels.npy"), CLASSES))
    return res


def _sparsity(sd: dict) -> dict:
    layers = {n: {"zeros": int((sd[f"{n}.weight"] == 0).sum()), "size": sd[f"{n}.weight"].numel()} for n in LAYERS}
    total = sum(v.numel() for v in sd.values())
    nonzero = sum(int((v != 0).sum()) for v in sd.values())
    zeros = sum(v["zeros"] for v in layers.values())
    return {"global_sparsity": zeros / sum(v["size"] for v in layers.values()),
            "layers": {n: v["zeros"] / v["size"] for n, v in layers.items()}, "layer_counts": layers,
            "params_total": total, "params_nonzero": nonzero}


def build_run(root: Path) -> dict:
    """Write a complete run folder; returns the facts the tests check against."""
    rng = np.random.default_rng(0)
    # data
    data_dir = root / "data"
    data_dir.mkdir(parents=True)
    train_labels = np.repeat(np.arange(K), N_TRAIN // K)
    train_labels[-1] = 0                                     # class 0 gets one more
    test_labels = rng.integers(0, K, N_TEST)
    np.save(data_dir / "train_images.npy", rng.integers(0, 256, (N_TRAIN, 64, 64, 3), dtype=np.uint8))
    np.save(data_dir / "train_labels.npy", train_labels.astype(np.int64))
    np.save(data_dir / "test_labels.npy", test_labels.astype(np.int64))
    counts = {split: {c: int((lab == i).sum()) for i, c in enumerate(CLASSES)}
              for split, lab in (("train", train_labels), ("test", test_labels))}
    info = {"classes": CLASSES, "train_size": N_TRAIN, "test_size": N_TEST, "counts": counts,
            "skipped": {"train": {"small": 3}}, "root": "/nowhere"}
    (data_dir / "data.json").write_text(json.dumps(info))

    # weights
    torch.manual_seed(0)
    dense = {k: torch.randn(s) * 0.05 for k, s in SHAPES.items()}
    pruned = {k: (_l1_prune(v, AMOUNT) if v.ndim >= 2 else v.clone()) for k, v in dense.items()}
    retrained = {k: torch.where(v == 0, v, v * 1.1) for k, v in pruned.items()}
    # predictions: trained 63.0%, pruned 61.8%, retrained 64.4%, dense control 66.0% correct; each gets
    # the first n test crops right, so pruning loses crops 309..314 and gains none
    preds = {}
    for stage, n_right in (("train", 315), ("prune", 309), ("retrain", 322), ("retrain/control", 330)):
        p = (test_labels + 1) % K
        p[:n_right] = test_labels[:n_right]
        preds[stage] = p.astype(np.int64)
    for stage, sd in (("train", dense), ("prune", pruned), ("retrain", retrained)):
        (root / stage).mkdir()
        torch.save(sd, root / stage / "model.pt")
        np.save(root / stage / "predictions.npy", preds[stage])
    (root / "retrain" / "control").mkdir()
    np.save(root / "retrain" / "control" / "predictions.npy", preds["retrain/control"])
    scores = {stage: hand_scores(test_labels, p) for stage, p in preds.items()}

    # histories
    train_steps = np.concatenate([2.3 * np.exp(-0.15 * e) + 0.2 * rng.random(STEPS_PER_EPOCH)
                                  for e in range(TRAIN_EPOCHS)])
    train_steps[0] = 2.31
    retrain_steps = 0.7 + 0.2 * rng.random(STEPS_PER_EPOCH * RETRAIN_EPOCHS)
    train_test_loss = [1.8, 1.5, 1.3, 1.2, 1.1, 1.05, 1.02, 1.03, 1.06, 1.09]   # min at epoch 7, then up
    train_acc = [0.35, 0.44, 0.5, 0.54, 0.57, 0.6, 0.62, 0.63, 0.625, 0.63]
    train_rows = _epoch_rows(train_steps, train_test_loss, train_acc)
    re_rows = _epoch_rows(retrain_steps, [1.04, 1.01, 1.0], [0.635, 0.64, 0.644])
    for stage, steps, rows in (("train", train_steps, train_rows), ("retrain", retrain_steps, re_rows)):
        (root / stage / "history.json").write_text(json.dumps({"steps": steps.tolist(), "epochs": rows}))

    res = {
        "data": info,
        "train": {"model": "seed_cnn", "params_total": sum(v.numel() for v in dense.values()), "test_accuracy": 0.63,
                  **scores["train"], "test_loss": 1.09, "epochs": train_rows, "seconds": 20.0, "device": "cpu"},
        "prune": {"method": "l1_unstructured", "amount": AMOUNT, "targets": "all", **_sparsity(pruned),
                  "test_accuracy": 0.618, **scores["prune"], "test_loss": 1.12, "dense_test_accuracy": 0.63,
                  "dense_test_loss": 1.09},
        "retrain": {"test_accuracy": 0.644, **scores["retrain"], "test_loss": 1.0, **_sparsity(retrained),
                    "epochs": re_rows, "seconds": 6.0},
        "params": {"train": {"epochs": TRAIN_EPOCHS}}, "params_hash": "abc123", "timings_s": {"data": 3.1},
        "provenance": {"versions": {"torch": "2.14.1"}, "python": "3.11.7", "platform": "Linux",
                       "git_commit": "deadbeef"},
    }
    with_comparisons(root, res)
    (root / "results.json").write_text(json.dumps(res))
    return {"results": res, "dense": dense, "pruned": pruned, "test_labels": test_labels, "preds": preds,
            "train_labels": train_labels, "train_steps": train_steps, "retrain_steps": retrain_steps,
            "scores": scores}


@pytest.fixture
def run(tmp_path):
    facts = build_run(tmp_path / "run")
    facts["dir"] = tmp_path / "run"
    return facts


def _only_train(res: dict) -> dict:
    out = {k: copy.deepcopy(v) for k, v in res.items() if k in ("data", "train", "floor")}
    out["floor"]["states"] = {k: v for k, v in out["floor"]["states"].items() if k == "trained"}
    return out


@pytest.fixture
def coco_like(tmp_path, monkeypatch):
    """A run on "the full COCO 2017 at the seed's settings": a root whose image folders hold as many
    files as COCO2017_IMAGES says (made small here), and parameters matching params/seed_report.yaml."""
    root = tmp_path / "coco"
    for folder, n in (("train2017", 3), ("val2017", 2)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            (root / folder / f"{i:012d}.jpg").write_bytes(b"x")
    monkeypatch.setattr(reference, "COCO2017_IMAGES", {"train": 3, "test": 2})
    seed = reference.seed_report()["settings"]
    params = {"data": {"root": str(root), "image_size": seed["image_size"], "min_test_per_class": 20},
              "train": {"batch_size": seed["batch_size"], "epochs": seed["epochs"], "lr": float(seed["lr"]),
                        "model": seed["model"]},
              "prune": {"amount": seed["prune_amount"]}}
    return root, params


def _comparable(res: dict, coco_like) -> dict:
    root, params = coco_like
    out = copy.deepcopy(res)
    out["params"] = copy.deepcopy(params)
    out["data"]["root"] = str(root)
    return out


def _bars(ax) -> list[Rectangle]:
    return [p for c in ax.containers if isinstance(c, BarContainer) for p in c.patches]


def _assert_labelled(ax):
    assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), (ax.get_xlabel(), ax.get_ylabel())


# --------------------------------------------------------------------------- table

def test_summary_table_rows_and_values(run):
    res = run["results"]
    df = report.summary_table(res)
    test_counts = res["data"]["counts"]["test"]
    common = max(test_counts, key=test_counts.get)
    floor = f"majority floor (always '{common}')"
    assert list(df.index) == ["trained", "pruned", "retrained", floor]   # not COCO: no seed report rows
    assert df.loc["trained", report.ACC] == 63.0
    assert df.loc["pruned", report.ACC] == 61.8
    assert df.loc["retrained", report.ACC] == 64.4
    for state, stage in (("trained", "train"), ("pruned", "prune"), ("retrained", "retrain")):
        assert df.loc[state, report.BALANCED] == round(100 * run["scores"][stage]["balanced_accuracy"], 2)
        assert df.loc[state, report.MACRO_F1] == round(100 * run["scores"][stage]["macro_f1"], 2)
    share = test_counts[common] / N_TEST
    assert df.loc[floor, report.ACC] == round(100 * share, 2) and df.loc[floor, report.BALANCED] == 10.0
    assert df.loc[floor, report.MACRO_F1] == round(100 * 2 * share / (1 + share) / K, 2)
    assert df.loc["pruned", report.LOSS] == 1.12
    assert np.isnan(df.loc[floor, report.LOSS])
    assert df.loc["pruned", report.SPARSITY] == round(100 * res["prune"]["global_sparsity"], 2)
    assert 19.5 < df.loc["pruned", report.SPARSITY] < 20.5
    assert df.loc["pruned", report.NONZERO] == res["prune"]["params_nonzero"]
    assert df.loc["retrained", report.TOTAL] == sum(t.numel() for t in run["dense"].values())
    assert df[report.NONZERO].isna().tolist() == [True, False, False, True]
    html = report.summary_styler(res).to_html()
    assert "61.80" in html and "—" in html and "not set beside this run" in html


def test_summary_sets_the_seed_report_beside_a_run_on_coco_at_its_settings_only(run, coco_like):
    res = _comparable(run["results"], coco_like)
    assert reference.data_source(res)["comparable"]
    df = report.summary_table(res)
    assert list(df.index)[-2:] == ["seed report (COCO 2017): trained", "seed report (COCO 2017): pruned"]
    assert df.loc["seed report (COCO 2017): trained", report.ACC] == 71.0
    assert np.isnan(df.loc["seed report (COCO 2017): pruned", report.LOSS])
    assert "cannot be a mean cross-entropy" in report.summary_styler(res).to_html()
    res["params"]["train"]["epochs"] = 1          # COCO 2017, but not at the seed's settings: reference only
    src = reference.data_source(res)
    assert src["kind"] == reference.COCO and not src["comparable"] and "train.epochs 1, seed 10" in src["text"]
    assert not any(i.startswith("seed report") for i in report.summary_table(res).index)


def test_summary_table_only_train(run):
    df = report.summary_table(_only_train(run["results"]))
    assert list(df.index)[0] == "trained" and list(df.index)[1].startswith("majority floor") and len(df) == 2
    assert df.loc["trained", report.ACC] == 63.0


# --------------------------------------------------------------------------- findings

def _sentence(findings: list[str], word: str) -> str:
    hits = [s for s in findings if word in s]
    assert hits, f"no finding mentions {word!r}: {findings}"
    return hits[0]


def test_findings_pruning_change_is_a_paired_test(run):
    from scipy.stats import binomtest

    res = run["results"]
    f = report.findings(res)
    s = _sentence(f, "After pruning (")
    assert "fell by 1.2 points" in s and "63.0%" in s and "61.8%" in s
    # the pruned model loses crops 309..314 and gains none: 6 discordant crops, all one way
    p = binomtest(0, 6, 0.5).pvalue
    assert "0 crops gained, 6 lost" in s and f"exact McNemar p = {p:.3f}" in s and p < 0.05
    assert "a significant drop at 5%" in s and "95% CI" in s and "agree on 98.8% of them" in s
    assert "binomial standard error" not in s
    # with only 5 crops changed even all one way cannot reach 5%: no verdict
    res2 = copy.deepcopy(res)
    preds = dict(run["preds"])
    preds["prune"] = preds["train"].copy()
    preds["prune"][310:315] = (run["test_labels"][310:315] + 1) % K
    np.save(run["dir"] / "prune" / "predictions.npy", preds["prune"])
    with_comparisons(run["dir"], res2)
    s2 = _sentence(report.findings(res2), "After pruning (")
    assert "only 5 crops changed answer (0 gained, 5 lost): too few for any verdict at 5%" in s2


def test_findings_change_with_numbers(run, coco_like):
    res = _comparable(run["results"], coco_like)
    res2 = copy.deepcopy(res)
    res2["train"]["test_accuracy"] = res2["prune"]["dense_test_accuracy"] = 0.75
    res2["prune"]["test_accuracy"] = 0.70
    res2["retrain"]["test_accuracy"] = 0.74
    f1, f2 = report.findings(res), report.findings(res2)
    changed = [a != b for a, b in zip(f1, f2)]
    assert len(f1) == len(f2) and sum(changed) >= 4
    seed1, seed2 = _sentence(f1, "seed lost"), _sentence(f2, "seed lost")
    assert "scored 63.0% against the seed's 71% (a rounded figure: 70.5–71.5%)" in seed1
    assert "anywhere between 0 and 2 points" in seed1 and "this run's change is -1.2 points (95% CI" in seed1
    assert "majority floor is" in seed1 and "points below" not in seed1
    assert "scored 75.0%" in seed2


def test_findings_retraining_paired_and_masks(run):
    from scipy.stats import binomtest

    res = run["results"]
    s = _sentence(report.findings(res), "During retraining (3 epochs")
    assert "rose by 2.6 points" in s and "masks held" in s
    # retrained (first 322 right) against pruned (first 309): 13 gained, none lost
    assert binomtest(13, 13, 0.5).pvalue < 0.001 and "13 crops gained, 0 lost, exact McNemar p < 0.001" in s
    assert "The retrained model is 1.4 points above the dense model's 63.0%: 7 crops gained, 0 lost" in s
    assert "recover" not in s          # no recovery arithmetic on changes the tests do not support
    res2 = copy.deepcopy(res)
    res2["retrain"]["global_sparsity"] = 0.1
    assert "did NOT hold" in _sentence(report.findings(res2), "During retraining (3 epochs")


def test_findings_sparsity_and_losses(run):
    res = run["results"]
    f = report.findings(res)
    sp = _sentence(f, "Measured sparsity")
    assert f"{100 * res['prune']['global_sparsity']:.2f}%" in sp and "asked 20.00%" in sp
    nz, tot = res["prune"]["params_nonzero"], res["prune"]["params_total"]
    assert f"{nz:,} of {tot:,} parameters" in sp
    over = _sentence(f, "Training overfits")
    assert "epoch 7" in over and "1.020" in over and "1.090" in over
    loss = _sentence(f, "per-epoch training loss")
    first, last = run["train_steps"][:STEPS_PER_EPOCH].mean(), run["train_steps"][-STEPS_PER_EPOCH:].mean()
    assert f"{first:.3f} in epoch 1" in loss and f"{last:.3f} in epoch 10" in loss
    assert "not comparable" in _sentence(f, "0.0269")
    # no overfitting once test loss keeps falling
    res2 = copy.deepcopy(res)
    for i, r in enumerate(res2["train"]["epochs"]):
        r["test_loss"] = 2.0 - 0.1 * i
    assert not any("overfits" in s and "Training" in s for s in report.findings(res2))
    assert "no sign of overfitting" in _sentence(report.findings(res2), "Training: test loss fell")
    # a rising test loss is not overfitting while training loss stays above it (the model has not
    # fit its training data: 2 epochs on ../shared/coco-sample, at the floor, read "Training overfits")
    res3 = copy.deepcopy(res)
    for i, r in enumerate(res3["train"]["epochs"]):
        r["train_loss"] = 3.0 - 0.01 * i
    assert not any("overfits" in s and "Training" in s for s in report.findings(res3))
    under = _sentence(report.findings(res3), "Training: test loss was lowest")
    assert "epoch 7" in under and "still above test loss" in under and "no sign of overfitting" in under


def test_findings_data_sentence(run):
    s = _sentence(report.findings(run["results"]), "imbalance")
    test_counts = run["results"]["data"]["counts"]["test"]
    common = max(test_counts, key=test_counts.get)
    assert f"'{common}'" in s and f"{100 * test_counts[common] / N_TEST:.1f}%" in s
    assert "from 'chair' (5 crops) to 'person' (7)" in s and "1.4:1" in s


def test_findings_markdown_escapes_names(run):
    md = report.findings_markdown(run["results"])
    lines = md.splitlines()
    assert len(lines) == len(report.findings(run["results"])) and all(l.startswith("- ") for l in lines)
    assert "seed\\_cnn" in md                       # '_' would start emphasis
    res = copy.deepcopy(run["results"])
    res["data"]["counts"]["train"]["<b>dog</b>"] = 1          # smallest class: named in the data finding
    res["data"]["counts"]["train"]["$\\frac$ cup"] = 99       # largest class: would be MathJax
    md = report.findings_markdown(res)
    assert "'&lt;b&gt;dog&lt;/b&gt;' (1 crops)" in md and "<" not in md
    assert "'\\$\\\\frac\\$ cup' (99)" in md


def test_missing_stages(run):
    res = _only_train(run["results"])
    f = report.findings(res)
    assert any("Pruning has not run" in s for s in f) and any("Retraining has not run" in s for s in f)
    assert "is a reference only" in _sentence(f, "seed report's 71%")
    assert report.findings({}) == [
        "Training has not run in this run folder, so there is no trained model to report.",
        "Pruning has not run in this run folder, so there is no pruned model to compare.",
        "Retraining has not run in this run folder, so recovery after pruning is not measured."]
    bars = _bars(report.plot_accuracy(res).axes[0])
    assert [round(b.get_height(), 1) for b in bars] == [63.0]
    for fig in (report.plot_layer_sparsity(res), report.plot_epoch_metrics(res), report.plot_epoch_metrics({})):
        assert isinstance(fig, Figure)
    # a run folder holding only the data and train stages
    for stage in ("prune", "retrain"):
        for p in sorted((run["dir"] / stage).rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (run["dir"] / stage).rmdir()
    assert len(report.plot_confusion(run["dir"]).axes) == 1
    assert len(report.plot_weight_histograms(run["dir"]).axes) == len(LAYERS)
    ax = report.plot_step_loss(run["dir"]).axes[0]
    assert ax.get_lines()[0].get_xdata()[-1] == len(run["train_steps"])
    assert report.plot_step_loss(run["dir"] / "nothing").axes[0].texts  # placeholder says what is missing


# --------------------------------------------------------------------------- figures

def test_plot_accuracy_bars(run, coco_like):
    fig = report.plot_accuracy(run["results"])
    ax = fig.axes[0]
    _assert_labelled(ax)
    bars = _bars(ax)
    assert [round(b.get_height(), 1) for b in bars] == [63.0, 61.8, 64.4]     # not COCO: no seed bars
    assert [tuple(b.get_facecolor()[:3]) for b in bars[:3]] == [to_rgb(states.get(s).color) for s in states.MAIN]
    floor = run["results"]["floor"]
    dashed = [l for l in ax.get_lines() if l.get_linestyle() == "--"]
    assert [round(l.get_ydata()[0], 2) for l in dashed] == [round(100 * floor["share"], 2)]
    texts = {t.get_text() for t in ax.texts}
    assert {"63.0%", "61.8%", "64.4%"} <= texts and "71%" not in texts
    # on COCO 2017 at the seed's settings the seed report's bars stand beside them
    ax = report.plot_accuracy(_comparable(run["results"], coco_like)).axes[0]
    bars = _bars(ax)
    assert [round(b.get_height(), 1) for b in bars] == [63.0, 61.8, 64.4, 71.0, 70.0]
    assert [b.get_hatch() for b in bars] == [None, None, None, report.SEED_HATCH, report.SEED_HATCH]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[:3] == ["trained", "pruned", "retrained"] and all("seed report" in t for t in ticks[3:])


def test_plot_step_loss_continuous_axis(run):
    fig = report.plot_step_loss(run["dir"])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "cross-entropy loss (batch mean)"
    n_train, n_re = len(run["train_steps"]), len(run["retrain_steps"])
    lines = {l.get_label(): l for l in ax.get_lines()}
    train, re_ = lines["training: every step"], lines["retraining: every step"]
    assert np.array_equal(train.get_xdata(), np.arange(1, n_train + 1))
    assert np.array_equal(re_.get_xdata(), np.arange(n_train + 1, n_train + n_re + 1))
    assert np.allclose(re_.get_ydata(), run["retrain_steps"])
    means = lines["training: epoch mean"].get_ydata()
    assert np.allclose(means, run["train_steps"].reshape(TRAIN_EPOCHS, -1).mean(axis=1))
    assert len(lines["retraining: epoch mean"].get_ydata()) == RETRAIN_EPOCHS
    assert len(ax.collections) >= 2 and fig.legends
    assert "retrained" not in lines and lines["retraining: every step"].get_color() == states.RETRAINED.color


def test_plot_epoch_metrics(run, coco_like):
    assert not any(l.get_label().startswith("seed report") for ax in report.plot_epoch_metrics(run["results"]).axes
                   for l in ax.get_lines())             # not COCO: the seed's accuracies are not drawn
    fig = report.plot_epoch_metrics(_comparable(run["results"], coco_like))
    acc_ax, loss_ax = fig.axes
    for ax in fig.axes:
        _assert_labelled(ax)
    acc = {l.get_label(): l for l in acc_ax.get_lines()}
    train_acc = [100 * r["test_accuracy"] for r in run["results"]["train"]["epochs"]]
    assert np.allclose(acc["training: test accuracy"].get_ydata(), train_acc)
    assert list(acc["retraining: test accuracy"].get_xdata()) == [11, 12, 13]
    assert acc["pruned (no training)"].get_ydata()[0] == pytest.approx(61.8)
    assert list(acc["seed report: trained / pruned"].get_ydata()) == pytest.approx([71, 70])
    loss_labels = {l.get_label() for l in loss_ax.get_lines()}
    assert {"training: test loss", "training: train loss", "retraining: test loss"} <= loss_labels
    assert not any(np.isclose(y, 0.0269) for l in loss_ax.get_lines() for y in l.get_ydata())


def test_plot_layer_sparsity(run):
    res = run["results"]
    ax = report.plot_layer_sparsity(res).axes[0]
    _assert_labelled(ax)
    bars = _bars(ax)
    assert len(bars) == 2 * len(LAYERS)
    expected = [100 * res[s]["layers"][l] for s in ("prune", "retrain") for l in LAYERS]
    assert [b.get_height() for b in bars] == pytest.approx(expected)
    assert [t.get_text() for t in ax.get_xticklabels()] == LAYERS
    asked = [l for l in ax.get_lines() if "asked" in l.get_label()]
    assert len(asked) == 1 and asked[0].get_ydata()[0] == pytest.approx(20.0)


def test_plot_weight_histograms_threshold(run):
    fig = report.plot_weight_histograms(run["dir"])
    assert len(fig.axes) == len(LAYERS)          # the 1-D bn.weight and biases are not layers
    for ax, layer in zip(fig.axes, LAYERS):
        _assert_labelled(ax)
        assert ax.get_xscale() == "log" and ax.get_title().startswith(layer)
        dense, pruned = run["dense"][f"{layer}.weight"], run["pruned"][f"{layer}.weight"]
        cut = dense.abs()[pruned == 0].max().item()
        vlines = [l for l in ax.get_lines() if l.get_label() == "cut threshold"]
        assert len(vlines) == 1 and vlines[0].get_xdata()[0] == pytest.approx(cut, rel=1e-6)
        # the filled 'before' histogram counts every weight, the 'after' outline only the nonzero ones
        filled = [p for p in ax.patches if isinstance(p, StepPatch) and p.get_fill()]
        outlines = [p for p in ax.patches if isinstance(p, StepPatch) and not p.get_fill()]
        assert len(filled) == 1 and filled[0].get_data().values.sum() == dense.numel()
        assert outlines[0].get_data().values.sum() == (pruned != 0).sum().item()
    assert fig.legends


def test_plot_confusion(run):
    fig = report.plot_confusion(run["dir"])
    assert len(fig.axes) == 3
    labels = run["test_labels"]
    for ax, stage in zip(fig.axes, ("train", "prune", "retrain")):
        assert ax.get_xlabel() == "predicted class"
        mesh = ax.collections[0]
        values = np.asarray(mesh.get_array()).reshape(K, K)
        expected = np.zeros((K, K))
        for t, p in zip(labels, run["preds"][stage]):
            expected[t, p] += 1
        expected = 100 * expected / expected.sum(axis=1, keepdims=True)
        assert np.allclose(values, expected)
    assert fig.axes[0].get_ylabel()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [report.literal(c) for c in CLASSES]
    assert "63.0% correct" in fig.axes[0].get_title() and "61.8% correct" in fig.axes[1].get_title()
    fig.canvas.draw()    # '$\frac$ cup' is drawn as text, not (broken) mathtext


def test_plot_class_counts(run):
    info = json.loads((run["dir"] / "data" / "data.json").read_text())
    fig = report.plot_class_counts(info)
    assert len(fig.axes) == 2
    for ax, split in zip(fig.axes, ("train", "test")):
        assert ax.get_xlabel().startswith(split)
        assert [b.get_width() for b in _bars(ax)] == [info["counts"][split][c] for c in CLASSES]
    assert fig.axes[0].get_ylabel() == "class"
    fig.canvas.draw()


def test_plot_samples(run):
    fig = report.plot_samples(run["dir"], per_class=4)
    ax = fig.axes[0]
    _assert_labelled(ax)
    img = ax.get_images()[0].get_array()
    assert img.shape == (K * 66 - 2, 4 * 66 - 2, 3)
    images = np.load(run["dir"] / "data" / "train_images.npy")
    first_car = np.flatnonzero(run["train_labels"] == 1)[0]
    assert np.array_equal(img[66:66 + 64, :64], images[first_car])
    assert [t.get_text() for t in ax.get_yticklabels()] == [report.literal(c) for c in CLASSES]
    fig.canvas.draw()


def test_save_figures(run, tmp_path):
    figs = {"accuracy": report.plot_accuracy(run["results"]), "samples": report.plot_samples(run["dir"])}
    paths = report.save_figures(run["dir"], figs)
    out = run["dir"] / "analysis" / "figures"
    assert paths == [out / "accuracy.png", out / "samples.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(x.name for x in out.iterdir()) == ["accuracy.png", "samples.png"]   # no temp files left
    with pytest.raises(ValueError):
        report.save_figures(run["dir"], {"../evil": figs["accuracy"]})


def test_show_figure_writes_the_png_once_and_shows_those_bytes(run, tmp_path):
    import matplotlib.pyplot as plt
    from PIL import Image as PILImage

    fig = report.plot_accuracy(run["results"])
    shown = report.show_figure(tmp_path, "accuracy", fig)
    saved = tmp_path / "analysis" / "figures" / "accuracy.png"
    assert shown.data == saved.read_bytes()                # the file is what the notebook shows
    assert not plt.fignum_exists(fig.number)               # closed: the inline backend draws it no second time
    width = PILImage.open(saved).size[0]
    assert width > 0 and shown.width == round(width * report.DPI / 150)   # shown at the notebook's size
    with pytest.raises(ValueError):
        report.show_figure(tmp_path, "../evil", report.plot_accuracy(run["results"]))


def test_title_and_provenance(run):
    res = run["results"]
    assert "seed\\_cnn" in report.title_markdown(res) and "abc123" in report.title_markdown(res)
    prov = report.provenance_markdown(res)
    assert "deadbeef" in prov and "| torch | 2.14.1 |" in prov and "3.1 s" in prov
    assert "| parameter: train.epochs | 10 |" in prov
    assert "| device (training) | cpu |" in prov
    hashed = {**res, "data": {**res["data"], "manifest_sha256": {"train": "f9b4", "test": "0d39"}}}
    assert "| data manifest sha256 | train: f9b4, test: 0d39 |" in report.provenance_markdown(hashed)   # not a dict
    on_gpu = {**res, "train": {**res["train"], "device": "cuda:0", "gpu": "NVIDIA H200",
                                 "cuda_visible_devices": "3"}}   # a pinned sweep worker's training
    assert "| device (training) | cuda:0 (NVIDIA H200), CUDA\\_VISIBLE\\_DEVICES=3 |" in \
        report.provenance_markdown(on_gpu)
    # the instruction set of PyTorch's CPU kernels: the same code computes other floats with others
    forced = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    on_cpu = {**res, "train": {**res["train"], "cpu_capability": "AVX512", "cpu_dispatch": forced},
              "provenance": {**res["provenance"], "cpu": "AMD EPYC", "processor": "x86_64",
                             "cpu_capability": "AVX512"}}
    prov_cpu = report.provenance_markdown(on_cpu)
    assert "| device (training) | cpu (AVX512 kernels, ONEDNN\\_MAX\\_CPU\\_ISA=AVX2) |" in prov_cpu
    assert "| processor | AMD EPYC (x86\\_64), PyTorch's CPU kernels: AVX512 |" in prov_cpu
    counts = res["data"]["counts"]["test"]
    assert f"person: {counts['person']}" in prov and "&lt;b&gt;dog&lt;/b&gt;" in prov   # class names escaped


# --------------------------------------------------------------------------- efficiency, control, sweep

def _eff(params, nonzero, macs, eff_macs, ms_dense, ms, saves, remark, ci=(0.95, 1.04)):
    rows = [{"model": m, "batch": b, "median_ms": v * (b / 64), "min_ms": v, "per_sample_ms": v / b,
             "speedup_vs_dense": ms_dense / v, "speedup_ci_low": ci[0], "speedup_ci_high": ci[1]}
            for m, v in (("dense", ms_dense), ("pruned", ms)) for b in (1, 64)]
    return {"params_total": params, "params_nonzero": nonzero, "dense_params_total": 1000, "macs": macs,
            "effective_macs": eff_macs, "dense_macs": 8e6, "theoretical_speedup": 8e6 / eff_macs,
            "state_dict_bytes": 4200, "masked_bytes": 5200, "sparse_compressed_bytes": 2100,
            "dense_state_dict_bytes": 4200, "measured_speedup": ms_dense / ms, "speedup_ci": list(ci),
            "verdict_batch": 64, "saves_time": saves, "remark": remark,
            "latency": {"cpu": {"device": "cpu", "threads": 2, "rows": rows}}}


def _point(method, amount, sparsity, before, after, speedup):
    return {"name": f"{method}-{amount}", "method": method, "amount": amount, "sparsity": sparsity,
            "param_sparsity": sparsity, "test_accuracy_before": before, "test_accuracy_after": after,
            "speedup_measured": speedup, "speedup_theoretical": 1 / (1 - sparsity), "latency_device": "cpu",
            "latency_batch": 64, "latency_threads": 2, "latency_ms": 10 / speedup, "dense_latency_ms": 10.0,
            "speedup_ci": [speedup * 0.9, speedup * 1.1], "saves_time": speedup * 0.9 > 1, "remark": "...",
            "sizes": {"sparse_compressed_bytes": 1000}}


SWEEP = [_point("l1_unstructured", 0.5, 0.5, 0.60, 0.64, 1.0), _point("l1_unstructured", 0.9, 0.9, 0.30, 0.55, 0.98),
         _point("random_unstructured", 0.5, 0.5, 0.40, 0.58, 1.01),
         _point("random_unstructured", 0.9, 0.9, 0.10, 0.35, 1.0),
         _point("channel", 0.5, 0.74, 0.20, 0.50, 2.6), _point("channel", 0.9, 0.99, 0.10, 0.20, 9.0)]


@pytest.fixture
def study(run):
    res = copy.deepcopy(run["results"])
    res["prune"]["efficiency"] = _eff(1000, 800, 8e6, 6.4e6, 10.0, 10.2, False,
                                      "saves no time: measured 0.98x the dense model's speed at batch 64.")
    res["retrain"]["efficiency"] = _eff(1000, 800, 8e6, 6.4e6, 10.0, 10.1, False, "saves no time: retrained.")
    res["control"] = {"test_accuracy": 0.66, **run["scores"]["retrain/control"], "test_loss": 0.95,
                      "global_sparsity": 0.0, "fine_tune_epochs": 3, "params_nonzero": 1000, "params_total": 1000}
    res["curve"] = copy.deepcopy(SWEEP)
    return with_comparisons(run["dir"], res)


def test_tradeoff_curves_per_method_with_references_and_the_random_floor(study):
    fig = report.plot_tradeoff(study)
    ax_s, ax_b, ax_t = fig.axes[:3]
    assert "balanced accuracy" in ax_b.get_ylabel()
    for ax in (ax_s, ax_t):
        _assert_labelled(ax)
        assert "(%)" in ax.get_ylabel()
        labels = [l.get_label() for l in ax.get_lines()]
        for m in ("l1_unstructured", "random_unstructured", "channel"):
            assert any(l.startswith(m) and l.endswith("after retraining") for l in labels), (m, labels)
            assert any(l.startswith(m) and l.endswith("before retraining") for l in labels), (m, labels)
        refs = {l.get_label(): l for l in ax.get_lines() if l.get_label().startswith(("dense model", "dense control"))}
        assert sorted(round(l.get_ydata()[0], 1) for l in refs.values()) == [63.0, 66.0]
    assert "(%" in ax_s.get_xlabel() and "(×" in ax_t.get_xlabel() and "batch 64" in ax_t.get_xlabel()
    assert ax_t.get_xscale() == "log"
    chan = next(l for l in ax_t.get_lines() if l.get_label() == "channel: after retraining")
    assert list(chan.get_xdata()) == [2.6, 9.0] and list(chan.get_ydata()) == [50.0, 20.0]
    l1 = next(l for l in ax_s.get_lines() if l.get_label() == "l1_unstructured: before retraining")
    assert list(l1.get_xdata()) == [50.0, 90.0] and list(l1.get_ydata()) == [60.0, 30.0]
    assert len(ax_s.collections) == 1  # the shaded area at or below random pruning
    assert fig.legends and any("floor" in t.get_text() for t in fig.legends[0].get_texts())
    # before the retrain stage ran: dashed curves only
    for e in study["curve"]:
        e["test_accuracy_after"] = None
    assert not any("after" in l.get_label() for l in report.plot_tradeoff(study).axes[0].get_lines())
    assert report.plot_tradeoff(_only_train(study)).axes[0].texts  # no sweep: a placeholder


def test_efficiency_table_says_when_no_time_is_saved(study):
    df = report.efficiency_table(study)
    assert list(df.index) == ["trained (dense)", "pruned", "retrained"]
    assert df.loc["pruned", "params (nonzero)"] == 800
    assert df.loc["pruned", "zero or removed (% of dense params)"] == pytest.approx(20)
    assert df.loc["pruned", "saves time"] == "NO" and df.loc["trained (dense)", "saves time"] == "reference"
    assert df.loc["pruned", "speedup 95% CI (×)"] == "0.95–1.04"
    assert df.loc["pruned", "cpu latency, batch 64 (ms)"] == 10.2
    assert df.loc["pruned", "theoretical speedup (×)"] == pytest.approx(1.25)
    md = report.efficiency_markdown(study)
    assert "saves no time" in md and "**pruned**" in md and "**retrained**" in md
    assert "No efficiency figures" in report.efficiency_markdown(_only_train(study))
    assert any("saves no time" in s for s in report.findings(study))
    assert "random order" in report.efficiency_styler(study).caption and "1.1" not in report.efficiency_styler(
        study).caption
    # the memory format the latencies were timed in: tables without one are from before it was recorded (NCHW)
    assert "NCHW tensors" in report.efficiency_styler(study).caption
    nhwc = copy.deepcopy(study)
    for state in ("prune", "retrain"):
        nhwc[state]["efficiency"]["latency"]["cpu"]["memory_format"] = "channels_last"
    caption = report.efficiency_styler(nhwc).caption
    assert "channels-last (NHWC) tensors" in caption and "NCHW" not in caption
    assert "glibc's default malloc" in caption   # tables from before the allocator was recorded
    for state in ("prune", "retrain"):
        nhwc[state]["efficiency"]["latency"]["cpu"]["allocator"] = kernels.MALLOC_TUNABLES
    caption = report.efficiency_styler(nhwc).caption
    assert f"malloc with GLIBC_TUNABLES={kernels.MALLOC_TUNABLES}" in caption and "default malloc" not in caption
    # a run measured before verdicts had an interval gets none
    old = copy.deepcopy(study)
    del old["prune"]["efficiency"]["speedup_ci"]
    assert report.efficiency_table(old).loc["pruned", "saves time"] == "not judged"
    assert "no verdict" in report.efficiency_markdown(old) and "saves no time" not in report.efficiency_markdown(
        old).split("**retrained**")[0]


def test_control_beside_the_retrained_model(study):
    from scipy.stats import binomtest

    df = report.summary_table(study)
    assert list(df.index)[:4] == ["trained", "pruned", "retrained", report.CONTROL_LABEL]
    assert df.loc[report.CONTROL_LABEL, report.ACC] == 66.0
    s = _sentence(report.findings(study), "dense control")
    assert "3 more epochs" in s and "66.0%" in s and "1.6 points below it" in s
    # control: first 330 right, retrained: first 322: 8 crops only the control gets right
    assert f"0 crops gained, 8 lost, exact McNemar p = {binomtest(0, 8, 0.5).pvalue:.3f}: a significant drop" in s
    assert "pruning cost accuracy" in s
    assert "dense control" in report.control_markdown(study)
    assert "No dense control" in report.control_markdown(_only_train(study))
    bars = _bars(report.plot_accuracy(study).axes[0])
    assert [round(b.get_height(), 1) for b in bars] == [63.0, 61.8, 64.4, 66.0]


def test_summary_shows_size_and_latency_measured_in_the_run(study):
    df = report.summary_table(study)
    assert df.attrs["latency"] == ("cpu", 1)   # the first device measured, at its smallest batch
    assert df.loc["trained", report.SIZE] == pytest.approx(4200 / 1e6, abs=1e-3)
    assert df.loc["trained", report.LATENCY] == pytest.approx(round(10.0 / 64, 3))   # the dense row of the pruned run
    assert df.loc["pruned", report.LATENCY] == pytest.approx(round(10.2 / 64, 3))
    assert df.loc["retrained", report.LATENCY] == pytest.approx(round(10.1 / 64, 3))
    assert np.isnan(df.loc[report.CONTROL_LABEL, report.LATENCY])   # not measured: not made up
    html = report.summary_styler(study).to_html()
    assert "batch of 1 on cpu" in html and "judged at batch 64" in html


def test_summary_time_cell_carries_the_interval_or_nothing(study):
    """The first screen's time cell of a pruned model sets its median beside the dense one's with the
    speedup and its interval at that batch; one repeat (no interval) gives the medians only, no
    timing gives '—', and a run whose repeats were not kept says so rather than fail."""
    from prunestudy.report import efficiency as report_efficiency

    html = report.summary_styler(study).to_html()
    assert "0.156 vs 0.159 ms, 0.98× [0.95, 1.04]" in html and "0.156 vs 0.158 ms, 0.99× [0.95, 1.04]" in html
    assert ">0.156 ms<" in html and "repeats not stored" in html   # the dense reference; no times file
    study["timing"] = {"times": "timing/times.json"}
    assert "every paired repeat behind them is kept in timing/times.json" in report.summary_styler(study).to_html()
    point = report.latency_point(study["prune"]["efficiency"])
    one = copy.deepcopy(study["prune"]["efficiency"])
    for row in one["latency"]["cpu"]["rows"]:
        row["speedup_ci_low"] = row["speedup_ci_high"] = None
    assert report_efficiency.time_cell(one, "pruned", point) == "0.156 vs 0.159 ms (no interval)"
    assert np.isnan(report_efficiency.time_cell(efficiency.pending(), "pruned", point))
    assert np.isnan(report_efficiency.time_cell(study["prune"]["efficiency"], "pruned", None))
    study["prune"]["efficiency"].update(efficiency.pending())
    study["retrain"]["efficiency"].update(efficiency.pending())
    html = report.summary_styler(study).to_html()
    assert "not timed yet" in html and " vs " not in html and "No latency column" not in html


def test_a_study_of_masked_pruning_says_its_models_were_not_timed(study):
    """Masked pruning runs the dense computation: no latency (efficiency.untimed). The summary drops
    its empty latency column and says why; the efficiency table gives 1.00x and 'NO' without an
    interval, and its text does not claim a timing was taken over."""
    res = copy.deepcopy(study)
    for stage in ("prune", "retrain"):
        eff = res[stage]["efficiency"]
        eff.update({"macs": eff["dense_macs"], "params_total": eff["dense_params_total"],
                    **efficiency.untimed(eff["theoretical_speedup"])})
    res.pop("curve", None)
    df = report.summary_table(res)
    assert df.attrs["latency"] is None and df[report.LATENCY].isna().all()
    html = report.summary_styler(res).to_html()
    assert "No latency column" in html and report.LATENCY not in html and "batch of 1 on cpu" not in html
    table = report.efficiency_table(res)
    assert not any("latency" in c for c in table.columns)
    assert list(table["measured speedup (×; not timed)"]) == [1.0, 1.0, 1.0]
    assert list(table["saves time"]) == ["reference", "NO", "NO"] and list(table["speedup 95% CI (×)"])[1:] == ["—"] * 2
    caption = report.efficiency_styler(res).to_html()
    assert "Latency: not timed" in caption and "interleaved runs" not in caption
    text = report.efficiency_markdown(res)
    assert text.count("not timed") == 2 and "Not timed again" not in text


def test_summary_lists_every_sweep_point_after_the_control(study):
    df = report.summary_table(study)
    sweep = [i for i in df.index if i.startswith("curve: ")]
    assert len(sweep) == len(SWEEP) and list(df.index).index(sweep[0]) == 4   # after the control
    name = "curve: l1_unstructured 0.5 (retrained)"
    assert df.loc[name, report.ACC] == 64.0 and df.loc[name, report.SPARSITY] == 50.0
    assert np.isnan(df.loc[name, report.LATENCY])
    study["curve"][0]["test_accuracy_after"] = None       # a point the retrain stage has not reached
    assert report.summary_table(study).loc["curve: l1_unstructured 0.5 (pruned, not retrained)", report.ACC] == 60.0


def test_sweep_table_and_finding(study):
    df = report.curve_table(study)
    assert len(df) == len(SWEEP) and list(df["method"])[:2] == ["l1_unstructured"] * 2
    assert list(df["accuracy after retraining (%)"])[:2] == pytest.approx([64.0, 55.0])
    assert list(df["saves time"]) == ["NO", "NO", "NO", "NO", "yes", "yes"]   # intervals above 1: channel only
    s = _sentence(report.findings(study), "On the curve")
    assert "Random pruning, the floor, scored 35.0% there" in s
    # a point at the majority-class floor is called so, and random pruning there is no floor
    below = copy.deepcopy(study)
    for e in below["curve"]:
        if e["method"] == "random_unstructured" and e["amount"] == max(x["amount"] for x in below["curve"]):
            e["floor_after"] = {**(e.get("floor_after") or {}), "at_floor": True, "collapsed": False}
    s = _sentence(report.findings(below), "On the curve")
    assert "Random pruning, the floor" not in s and "not above the majority-class floor" in s
    assert "none is compared against it" in s
    assert "; only channel saved time (speedup interval above 1.05×)" in s
    for e in study["curve"]:   # every method saved time: no "only"
        e["saves_time"], e["speedup_ci"] = True, [1.2, 1.3]
    s = _sentence(report.findings(study), "On the curve")
    assert "; l1_unstructured, random_unstructured, channel saved time (speedup interval above 1.05×)" in s
    assert "No curve" in report.curve_markdown(_only_train(study))
    # with `seeds` repeats the sweep section says the sweep was not repeated, and where the bands are
    assert "repeats" not in report.curve_markdown(study)
    study["params"] = {**study.get("params", {}), "seed": 0}
    study["repeats"] = [{"seed": 1}, {"seed": 2}]
    text = report.curve_markdown(study)
    assert "The curve ran on the study's seed (0) only: the repeats (seeds 1, 2) do not repeat it" in text
    assert "`seed` as a grid key (`prunestudy sweep`" in text


def test_compare_shows_balanced_accuracy_and_macro_f1_of_every_run(run, tmp_path):
    import shutil

    from prunestudy import compare

    other = tmp_path / "other"
    shutil.copytree(run["dir"], other)
    res = json.loads((other / "results.json").read_text())
    res["train"]["balanced_accuracy"] = 0.5
    runs = [compare.Run(run["dir"], "run", run["results"], run["results"]), compare.Run(other, "other", res, res)]
    table = compare.summary_rows(runs)
    assert report.BALANCED in table and report.MACRO_F1 in table
    assert table.loc[("trained", "run"), report.BALANCED] == round(100 * run["scores"]["train"]["balanced_accuracy"], 2)
    assert table.loc[("trained", "other"), report.BALANCED] == 50.0
    assert table.loc[("pruned", "run"), report.MACRO_F1] == round(100 * run["scores"]["prune"]["macro_f1"], 2)


# --------------------------------------------------------------------------- per class

def test_per_class_accuracy_and_paired_change(run):
    from scipy.stats import binomtest

    labels, preds = run["test_labels"], run["preds"]
    df = report.per_class_table(run["dir"])
    assert sorted(df.index) == sorted(CLASSES) and df["test samples"].sum() == N_TEST
    pvalues = {}
    for k, name in enumerate(CLASSES):
        sel = labels == k
        n = int(sel.sum())
        row = df.loc[name]
        assert row["trained (%)"] == pytest.approx(100 * (preds["train"][sel] == k).mean())
        assert row["retrained (%)"] == pytest.approx(100 * (preds["retrain"][sel] == k).mean())
        # the fixture's pruned model gets samples 309..314 wrong that the trained one got right, and gains none
        lost = int(sel[309:315].sum())
        assert row["pruned − trained (points)"] == pytest.approx(-100 * lost / n)
        assert row["pruned: gained / lost"] == f"0 / {lost}"
        assert row["pruned: p"] == pytest.approx(binomtest(0, lost, 0.5).pvalue if lost else 1.0)
        pvalues[name] = row["pruned: p"]
        assert row["note"] == ("" if n >= 20 else "too few to read (under 20 test crops)")
    # Holm over the classes read (those with at least 20 test crops), by hand
    read = sorted((p, name) for name, p in pvalues.items() if df.loc[name, "test samples"] >= 20)
    running = 0.0
    for i, (p, name) in enumerate(read):
        running = max(running, min(1.0, (len(read) - i) * p))
        assert df.loc[name, "pruned: p (Holm)"] == pytest.approx(running)
    changes = list(df["pruned − trained (points)"])
    assert changes == sorted(changes)   # the classes that pay most come first
    md = report.per_class_markdown(run["dir"])
    assert "Per class (pruning against the trained model" in md and "no class changed significantly" in md
    assert "too few for any verdict" in md or "too few changes" in md   # at most 6 crops moved per class


def test_per_class_table_with_no_change_renders_without_warnings(run):
    """Pruning and retraining that change no prediction (a model at the floor often does): the
    change columns are all zero, and the table renders without a RuntimeWarning in the report."""
    import warnings

    for stage in ("prune", "retrain"):
        np.save(run["dir"] / stage / "predictions.npy", run["preds"]["train"])
    df = report.per_class_table(run["dir"])
    assert (df["pruned − trained (points)"] == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        html = report.per_class_styler(run["dir"]).to_html()
    assert "0.0" in html


def test_p_values_read_the_same_in_the_tables_as_in_the_sentences(run):
    """A p-value below 0.001 reads '< 0.001' in the per-class table (escaped in its HTML), as the
    sentences say 'p < 0.001', not '0.000'; tables and prose use the one formatter (common.p_figure)."""
    from scipy.stats import binomtest

    from prunestudy.report.common import p_cell, p_figure, pvalue

    labels, train = run["test_labels"], run["preds"]["train"]
    pruned = train.copy()
    lost = (labels == 0) & (train == 0)     # the pruned model now misses every person the trained one got
    pruned[lost] = 1
    np.save(run["dir"] / "prune" / "predictions.npy", pruned)
    assert binomtest(0, int(lost.sum()), 0.5).pvalue < 0.001
    df = report.per_class_table(run["dir"])
    assert df.loc["person", "pruned: p"] < 0.001 and df.loc["person", "pruned: p (Holm)"] < 0.001
    html = report.per_class_styler(run["dir"]).to_html()
    assert "&lt; 0.001" in html and "0.000<" not in html
    assert p_figure(0.0004) == "< 0.001" and pvalue(0.0004) == "p < 0.001" and p_cell(0.0004) == "&lt; 0.001"
    assert p_figure(0.03125) == "0.031" and pvalue(0.03125) == "p = 0.031" and p_figure(1.0) == "1.000"
    md = report.per_class_markdown(run["dir"])
    assert "p < 0.001 after correction" in md and "p = 0.000" not in md


def test_per_class_table_escapes_class_names_in_html(run):
    html = report.per_class_styler(run["dir"]).to_html()
    assert "&lt;b&gt;dog&lt;/b&gt;" in html and "<b>dog</b>" not in html


def test_small_classes_are_named_and_get_no_verdict(run):
    df = report.per_class_table(run["dir"], min_test=60)   # every class of the fixture has fewer
    assert (df["note"] != "").all() and df["pruned: verdict"].eq("—").all()
    md = report.per_class_markdown(run["dir"])
    res = copy.deepcopy(run["results"])
    res["params"]["data"] = {"min_test_per_class": 60}
    assert "fewer than 60 test crops (data.min_test_per_class)" in _sentence(report.findings(res), "imbalance")
    assert "too few to read per class" not in md      # the run's own threshold (the default 20): all read
    info = json.loads((run["dir"] / "data" / "data.json").read_text())
    assert "Too few test crops to read per class" in report.data_markdown(info, 60)
    assert "Too few test crops" not in report.data_markdown(info, 1)


def test_the_data_table_says_what_each_skip_column_counts(run):
    """Under the data table, one line names every reject column (capped, iscrowd, other_class,
    small, ...) with what it counts, read from data.SKIP_REASONS (the one place they are said)."""
    from prunestudy import data
    from prunestudy.report.style import md_escape

    info = json.loads((run["dir"] / "data" / "data.json").read_text())
    info["skipped"] = {"train": {"capped": 7, "iscrowd": 2, "other_class": 40, "small": 3},
                       "test": {"iscrowd": 1, "small": 1, "corrupt_image": 2}}
    md = report.data_markdown(info)
    lines = md.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| split | kept |"))
    columns = [c.strip() for c in lines[header].strip("|").split("|")][2:]
    assert columns == [md_escape(k) for k in ("capped", "corrupt_image", "iscrowd", "other_class", "small")]
    legend = next(line for line in lines[header + 4:] if line)   # the first line after the table's rows
    for k, column in zip(sorted(info["skipped"]["train"] | info["skipped"]["test"]), columns):
        assert f"*{column}*: {md_escape(data.SKIP_REASONS[k])}" in legend
    assert "data.max\\_per\\_class" in legend and "data.min\\_box" in legend   # the parameters named
    # every reason the selection counts has its words (the reasons coco.py and crops.py add too)
    assert {"iscrowd", "small", "other_class", "capped", "not_largest", "no_image", "invalid_box", "malformed",
            "unknown_category", "bad_image_record", "missing_file", "corrupt_image", "size_mismatch"} \
        <= set(data.SKIP_REASONS)
    info["skipped"] = {}
    assert "by reason" not in report.data_markdown(info)


def test_table_captions_link_their_terms_to_the_glossary(run):
    """The per-class caption's Holm (and McNemar, Newcombe) and the efficiency caption's MMACs link to
    their glossary entries, which exist."""
    caption = report.per_class_styler(run["dir"]).caption
    assert '<a href="#glossary-holm">Holm</a>' in caption and '<a href="#glossary-mcnemar">' in caption
    caption = report.linked_caption(report.efficiency_styler(run["results"])).caption
    assert '<a href="#glossary-macs">MMACs</a>' in caption
    anchors = report.glossary_markdown()
    assert 'id="glossary-holm"' in anchors and 'id="glossary-macs"' in anchors


# --------------------------------------------------------------------------- seeds

def _repeat(seed, trained, pruned, retrained, control):
    return {"seed": seed, "dir": f"repeats/seed-{seed}", "trained": {"test_accuracy": trained},
            "pruned": {"test_accuracy": pruned}, "retrained": {"test_accuracy": retrained},
            "control": {"test_accuracy": control}}


@pytest.fixture
def seeded(study):
    res = copy.deepcopy(study)       # seed 0: trained 63.0, pruned 61.8, retrained 64.4, control 66.0
    res["params"]["seed"] = 0
    res["repeats"] = [_repeat(1, 0.60, 0.585, 0.61, 0.62), _repeat(2, 0.65, 0.64, 0.66, 0.655)]
    return res


def test_seeds_table_and_paired_confidence_interval(seeded):
    from scipy import stats

    df = report.seeds_table(seeded)
    assert list(df.index) == ["trained", "pruned", "retrained", "dense control"]
    trained = np.array([63.0, 60.0, 65.0])
    assert df.loc["trained", "mean (%)"] == pytest.approx(trained.mean())
    assert df.loc["trained", "SD (points)"] == pytest.approx(trained.std(ddof=1))
    assert df.loc["trained", "seed 2 (%)"] == pytest.approx(65.0) and df.loc["pruned", "min (%)"] == pytest.approx(58.5)
    paired = report.paired_table(seeded)
    drop = np.array([61.8 - 63.0, 58.5 - 60.0, 64.0 - 65.0])     # each seed against its own trained model
    half = stats.t.ppf(0.975, 2) * drop.std(ddof=1) / math.sqrt(3)
    row = paired.loc["pruned − trained"]
    assert row["mean (points)"] == pytest.approx(drop.mean())
    assert (row["95% CI low"], row["95% CI high"]) == pytest.approx((drop.mean() - half, drop.mean() + half))
    assert row["seed 1"] == pytest.approx(-1.5)
    assert paired.loc["retrained − dense control", "seed 0"] == pytest.approx(64.4 - 66.0)
    # every seed lost accuracy to pruning, by 1.0 to 1.5 points: beyond the noise although 1 point is small
    md = report.seeds_markdown(seeded)
    assert "3 seeds (0, 1, 2)" in md and "pruned − trained: -1.23 points" in md
    assert "beyond" not in md and "the spread of training only: all seeds share one test set" in md
    assert "the per-crop pairs of the seeds were not found, so no test over seeds was made" in md
    assert any(s.startswith("Over 3 seeds, pruning changed test accuracy by -1.23 points")
               for s in report.findings(seeded))
    html = report.paired_styler(seeded).to_html() + report.seeds_styler(seeded).to_html()
    assert "95% Student-t interval" in html and "not the noise of the test set" in html


def test_one_seed_reports_no_spread_and_says_how_to_get_one(study):
    df = report.seeds_table(study)
    assert df["seeds"].tolist() == [1, 1, 1, 1] and df["SD (points)"].isna().all()
    assert report.paired_table(study)["95% CI low"].isna().all()
    assert "One seed only" in report.seeds_markdown(study) and "seeds: [0, 1, 2]" in report.seeds_markdown(study)
    assert not any("Over " in s and "seeds" in s for s in report.findings(study))


def test_plot_seeds_pairs_each_seeds_models(seeded):
    fig = report.plot_seeds(seeded)
    ax = fig.axes[0]
    _assert_labelled(ax)
    lines = [l for l in ax.get_lines() if l.get_color() == "#9a9a9a" and len(l.get_xdata()) == 4]
    assert len(lines) == 3   # one per seed, joining its trained, pruned, retrained and control accuracies
    assert sorted(l.get_ydata()[1] for l in lines) == pytest.approx([58.5, 61.8, 64.0])


def test_plot_seeds_never_magnifies_a_change_within_the_test_sets_noise(study):
    """One seed, a 0.5-point dip between two models on 474 test crops (one accuracy's standard error is
    2.3 points): the axis spans at least two standard errors beyond the values, not 54-60."""
    res = copy.deepcopy(study)
    res["data"]["test_size"] = 474
    for state, acc in (("train", 0.559), ("prune", 0.554), ("retrain", 0.559)):
        res[state]["test_accuracy"] = acc
    ax = report.plot_seeds(res).axes[0]
    se = 100 * math.sqrt(0.557 * 0.443 / 474)
    low, high = ax.get_ylim()
    assert low <= 55.4 - 2 * se + 0.05 and high >= 55.9 + 2 * se - 0.05 and high - low > 4 * se
    assert "two standard errors" in ax.get_title()


def test_interval_holding_zero_is_called_noise(seeded):
    seeded["repeats"][0]["pruned"]["test_accuracy"] = 0.62   # seed 1 gains 2 points: the signs disagree
    md = report.seeds_markdown(seeded)
    assert "pruned − trained" in md and "beyond" not in md and "spread of training only" in md


# --------------------------------------------------------------------------- one source of truth

def test_seed_report_figures_come_from_their_data_file(run, tmp_path, monkeypatch, coco_like):
    seed = report.seed_report()
    assert report.SEED_REPORT_FILE.name == "seed_report.yaml"
    assert seed["test_accuracy"] == {"trained": 0.71, "pruned": 0.70}
    assert seed["source"].startswith("seed test report (COCO 2017, 10 classes, 64x64, batch 32")
    assert "(0.0269 after training, 0.0272 after pruning)" in seed["note"] and "batch-size (32)" in seed["note"]
    assert "most likely" in seed["note"]          # the cause is an inference, worded as one
    # another checkout's file (PRUNESTUDY_HOME) is read instead: nothing about the seed is spelt in the code
    import yaml

    other = yaml.safe_load((ROOT / report.SEED_REPORT_FILE).read_text())
    other["test_accuracy"]["trained"] = 0.75
    other["settings"]["batch_size"] = 64
    (tmp_path / "params").mkdir()
    (tmp_path / report.SEED_REPORT_FILE).write_text(yaml.safe_dump(other))
    monkeypatch.setenv("PRUNESTUDY_HOME", str(tmp_path))
    res = _comparable(run["results"], coco_like)
    res["params"]["train"]["batch_size"] = 64
    df = report.summary_table(res)
    assert df.loc["seed report (COCO 2017): trained", report.ACC] == 75.0
    assert "batch 64" in report.summary_styler(res).to_html() and "batch-size (64)" in report.seed_report()["note"]
    assert "against the seed's 75% (a rounded figure: 74.5–75.5%)" in _sentence(report.findings(res), "seed's 75%")


def test_method_wording_colour_and_marker_come_from_the_registry(study):
    res = copy.deepcopy(study)
    res["prune"]["method"] = "random_unstructured"
    phrase = methods.get("random_unstructured").describe(AMOUNT)
    assert phrase.endswith("chosen at random") and f"random_unstructured, {phrase}, targets" in _sentence(
        report.findings(res), "After pruning (")
    res["prune"]["method"] = "channel"
    assert methods.get("channel").notes in _sentence(report.findings(res), "Measured sparsity")
    fig = report.plot_tradeoff(study)
    for line in fig.axes[0].get_lines():
        name = line.get_label().split(":")[0].removesuffix(" (random: the floor)")
        if name in methods.REGISTRY:
            assert to_hex(line.get_color()) == methods.get(name).color and line.get_marker() == methods.get(name).marker
    assert any("(random: the floor)" in l.get_label() for l in fig.axes[0].get_lines())
    # a method the registry does not know is drawn and described, not an error
    res["prune"]["method"] = "mystery"
    res["curve"].append({**study["curve"][0], "method": "mystery"})
    assert "mystery, 20% of the weights of each layer, targets" in _sentence(report.findings(res), "After pruning (")
    lines = [l for l in report.plot_tradeoff(res).axes[0].get_lines() if l.get_label().startswith("mystery")]
    assert lines and all(l.get_color() == "black" and l.get_marker() == "o" for l in lines)


def test_provenance_links_every_executed_notebook_of_the_run_and_its_repeats(run):
    res = copy.deepcopy(run["results"])
    res["repeats"] = [{"seed": 1, "dir": "repeats/seed-1"}]
    prov = report.provenance_markdown(res)
    for name in ("01_data", "02_train", "03_prune", "04_retrain", "05_analysis"):
        assert f"[{name}](notebooks/{name}.html)" in prov
    assert "(folder repeats/seed-1)" in prov and "[02_train](repeats/seed-1/notebooks/02_train.html)" in prov
    assert "repeats/seed-1/notebooks/01_data" not in prov   # a repeat shares the data stage


def _notebook_calls() -> list[tuple[str, str, str]]:
    """(notebook, module, attribute) of every `module.attribute` a notebook's code reads, for the modules it
    imports with `from prunestudy import ...`."""
    found = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        tree = ast.parse("\n".join(l for l in source.splitlines() if not l.lstrip().startswith(("%", "!"))))
        modules = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   and n.module == "prunestudy" for a in n.names}
        found += [(path.name, n.value.id, n.attr) for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                  and isinstance(n.value, ast.Name) and n.value.id in modules]
    return found


def test_every_report_and_stages_name_a_notebook_calls_exists():
    calls = _notebook_calls()
    modules = {"report": report, "stages": stages}
    assert {m for _, m, _ in calls} >= set(modules) and len(calls) > 40
    missing = [f"{nb}: {m}.{attr}" for nb, m, attr in calls if m in modules and not hasattr(modules[m], attr)]
    assert not missing, missing
    analysis = {attr for nb, m, attr in calls if nb == "05_analysis.ipynb" and m == "report"}
    assert analysis <= set(report.__all__)   # the analysis notebook's names are the package's public ones


# --------------------------------------------------------------------------- the verdict (issue 32)

def _verdict_results(*, change=-0.004, lo=-0.014, hi=0.006, p=0.52, verdict="no significant change",
                     at_floor=False, channel=False, timed=False, saves=False) -> dict:
    """A hand-made results dict: dense 57.3%, a retrained model `change` away, one paired test, the floor
    flag of the trained model, and a masked (untimed) or channel (smaller, timed) efficiency summary."""
    dense = 0.573
    pair = {"after": "retrained", "before": "trained", "n": 1000, "change": change, "ci_low": lo, "ci_high": hi,
            "p_value": p, "verdict": verdict, "gains": 20, "losses": 24, "confidence": 0.95, "level": 0.05,
            "agree": 0.956}
    eff = {"dense_params_total": 4_000_000, "params_total": 2_000_000 if channel else 4_000_000,
           "params_nonzero": 2_000_000, "dense_state_dict_bytes": 16_000_000,
           "state_dict_bytes": 8_000_000 if channel else 16_000_100, "sparse_compressed_bytes": 9_000_000,
           "dense_macs": 40_000_000, "macs": 20_000_000 if channel else 40_000_000, "effective_macs": 20_000_000,
           "theoretical_speedup": 2.0}
    if timed:
        eff.update({"measured_speedup": 1.8, "speedup_ci": [1.7, 1.9] if saves else [0.9, 1.2], "saves_time": saves,
                    "latency": {"cpu": {"rows": [{"batch": 1, "model": "pruned", "median_ms": 5.0}]}}})
    else:
        eff.update(efficiency.untimed(2.0))
    floor = {"class": "person", "share": 0.55, "n": 1000, "level": 0.05,
             "states": {"trained": {"accuracy": dense, "at_floor": at_floor, "collapsed": False, "p_value": 0.3,
                                    "top_class": "person", "top_share": 0.6, "top_test_share": 0.55}}}
    return {"train": {"test_accuracy": dense}, "prune": {"test_accuracy": dense - 0.01, "efficiency": eff},
            "retrain": {"test_accuracy": dense + change}, "paired": [pair], "floor": floor}


def test_the_verdict_at_the_floor_says_nothing_can_be_concluded():
    v = report.verdict(_verdict_results(at_floor=True, verdict="drop", p=0.001))
    assert v.startswith("Nothing can be concluded about pruning: the trained (57.3%) model is at the majority")
    assert "'person' scores 55.0%" in v and "beyond noise" not in v and "McNemar" not in v


def test_the_verdict_of_a_change_within_noise_gives_its_interval_and_test_and_what_was_bought():
    v = report.verdict(_verdict_results())
    assert "after retraining cannot be told from noise (57.3% → 56.9%, -0.4 points, 95% CI -1.4 to +0.6 points, " \
           "exact McNemar p = 0.520)" in v
    assert "the drop is at most 1.4 points" in v
    assert "50.0% of the 4,000,000 parameters zeroed or removed" in v and "the same 16.00 MB on disk" in v
    assert "9.00 MB as a sparse estimate" in v and "all of them still run" in v
    assert "no time (it runs the dense model's computation)" in v


def test_the_verdict_of_a_gain_beyond_noise():
    v = report.verdict(_verdict_results(change=0.021, lo=0.008, hi=0.034, p=0.0004, verdict="gain"))
    assert "Test accuracy rose by 2.1 points after retraining" in v and "p < 0.001" in v and "beyond noise" in v


def test_the_verdict_of_channel_pruning_that_saves_time():
    v = report.verdict(_verdict_results(channel=True, timed=True, saves=True, change=-0.03, lo=-0.045, hi=-0.015,
                                        p=0.0001, verdict="drop"))
    assert "Pruning cost 3.0 points of test accuracy after retraining" in v
    assert "16.00 → 8.00 MB on disk" in v and "40.0 → 20.0 M MACs run" in v
    assert "1.80× the dense speed (95% CI 1.70–1.90×): saves time" in v
    v = report.verdict(_verdict_results(channel=True, timed=True, saves=False))
    assert "(95% CI 0.90–1.20×): no time saved beyond noise" in v


def test_the_verdict_leads_the_title_and_the_floor_is_said_once():
    res = _verdict_results(at_floor=True)
    title = report.title_markdown(res)
    assert title.index("**Verdict.**") < 200 and title.count("majority") == 1
    assert "[majority-class floor](#glossary-floor)" in title   # linked to the glossary
    assert 'id="glossary-floor"' in report.glossary_markdown()
