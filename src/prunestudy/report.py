"""Stage 5 (analysis): the summary table, findings computed from the numbers, and the figures.

Everything here reads a run folder (or its ``results.json`` dict) and returns something the
analysis notebook displays: a DataFrame, a list of sentences / Markdown, or a matplotlib Figure.
Figures are created with pyplot (so the notebook's inline backend shows them once, at the end of
the cell that made them) and are never shown or closed here. Class and layer names are arbitrary
strings: they are always drawn as literal text (``$`` escaped) and escaped in Markdown.

The seed report's figures are kept in ``SEED_REPORT``; its test losses are not comparable with
this study's (see ``SEED_REPORT["note"]``) and are therefore never plotted.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator

from . import config, store

# --------------------------------------------------------------------------- constants

STATES = ("trained", "pruned", "retrained")
STAGE_OF = {"trained": "train", "pruned": "prune", "retrained": "retrain"}
PHASE_NAME = {"trained": "training", "pruned": "pruning", "retrained": "retraining"}

_deep = sns.color_palette("deep")
STATE_COLORS: dict[str, Any] = {
    "trained": _deep[0],        # blue
    "pruned": _deep[1],         # orange
    "retrained": _deep[2],      # green
    "seed report": "#b0b0b0",   # muted grey, drawn hatched
    "control": _deep[7],        # grey: the dense control (fine-tuned, unpruned)
}
CONTROL_LABEL = "dense control (fine-tuned, unpruned)"
RANDOM_METHOD = "random_unstructured"   # the floor of the sweep's curves
METHOD_COLORS: dict[str, Any] = {"l1_unstructured": _deep[0], "global_magnitude": _deep[3], "ln_structured": _deep[4],
                                 "channel": _deep[2], RANDOM_METHOD: "#808080"}
_METHOD_MARKERS = {"l1_unstructured": "o", "global_magnitude": "^", "ln_structured": "D", "channel": "s",
                   RANDOM_METHOD: "x"}
SEED_HATCH = "///"
SEED_EDGE = "#707070"
_SPLIT_COLORS = {"train": _deep[4], "test": _deep[5]}   # data splits are not model states

SEED_REPORT: dict[str, Any] = {
    "trained": {"test_accuracy": 0.71},
    "pruned": {"test_accuracy": 0.70},
    "source": "seed test report (COCO 2017, 10 classes, 64x64, batch 32, 10 epochs, lr 1e-4, prune rate 0.2)",
    "hardware": "GPU 3060",
    "prune_amount": 0.2,
    "batch_size": 32,
    "epochs": 10,
    # reported "average test loss": a sum of batch-mean losses divided by the number of samples
    "reported_test_loss": {"trained": 0.0269, "pruned": 0.0272},
    # batch-mean step losses as printed during training (epoch 10: range of its last steps only)
    "step_loss": {
        1: {"first": 2.285719, "min": 0.716590, "max": 1.696788, "last": 0.990119},
        2: {"first": 0.969307, "min": 0.534181, "max": 1.641705},
        10: {"first": 0.686697, "last_steps_min": 0.774062, "last_steps_max": 1.142819},
    },
    "note": ("The seed report's 'average test loss' (0.0269 after training, 0.0272 after pruning) is a sum of "
             "batch-mean losses divided by the number of test samples, i.e. about batch-size (32) times too "
             "small; it is not comparable with the true per-sample mean test loss of this study and is not "
             "plotted. Its retraining results were not reported."),
}

ACC, LOSS, SPARSITY, NONZERO, TOTAL = ("test accuracy (%)", "test loss (mean per sample)", "global sparsity (%)",
                                       "nonzero params", "total params")
SIZE, LATENCY = "size (MB, state_dict)", "latency (ms)"
SUMMARY_COLUMNS = [ACC, LOSS, SPARSITY, NONZERO, TOTAL, SIZE, LATENCY]
FIGSIZE = (10, 4)
DPI = 100


def setup_style() -> None:
    """One clean theme for every figure of the report (call once, before plotting)."""
    sns.set_theme(style="whitegrid", context="notebook", palette="deep",
                  rc={"figure.dpi": DPI, "savefig.dpi": 150, "axes.titlesize": 11, "axes.labelsize": 10,
                      "legend.fontsize": 8, "xtick.labelsize": 9, "ytick.labelsize": 9,
                      "figure.max_open_warning": 0})


# --------------------------------------------------------------------------- small helpers

def _text(s: Any) -> str:
    """A string drawn literally by matplotlib: '$' would otherwise start mathtext."""
    return str(s).replace("$", r"\$")


_MD_ESCAPE = re.compile(r"([\\`*_\[\]#|~$])")


def md_escape(s: Any) -> str:
    """Plain text -> Markdown that renders as the same text (no HTML, links, emphasis or math)."""
    s = str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_ESCAPE.sub(r"\\\1", s)


def _read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def load_results(run_dir) -> dict:
    """``run_dir/results.json`` (an empty dict when the file is missing)."""
    return _read_json(Path(run_dir) / "results.json") or {}


def _stage(results: dict, state: str) -> dict:
    return results.get(STAGE_OF[state]) or {}


def _epochs(results: dict, state: str) -> list[dict]:
    return _stage(results, state).get("epochs") or []


def _pct(fraction: float, digits: int = 1) -> str:
    return f"{100 * fraction:.{digits}f}%"


def _pts(points: float) -> str:
    """Absolute size of a change in percentage points, precise enough to show small ones."""
    return f"{abs(points):.1f}" if abs(points) >= 0.095 or points == 0 else f"{abs(points):.2f}"


def _n(x: int) -> str:
    return f"{int(x):,}"


def _test_size(results: dict) -> int | None:
    data = results.get("data") or {}
    if data.get("test_size"):
        return int(data["test_size"])
    counts = (data.get("counts") or {}).get("test")
    return int(sum(counts.values())) if counts else None


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n independent test samples (a fraction)."""
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def _figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = FIGSIZE, **kw) -> tuple[Figure, list]:
    """A constrained-layout figure and its axes as a flat list (always a list)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=size, dpi=DPI, layout="constrained", squeeze=False, **kw)
    return fig, list(axes.flat)


def _label(ax, xlabel: str, ylabel: str, title: str | None = None) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)


def _placeholder(message: str, size: tuple[float, float] = (10, 1.5)) -> Figure:
    """A small figure that says what is missing, instead of an exception in the report."""
    fig, (ax,) = _figure(size=size)
    ax.text(0.5, 0.5, _text(message), ha="center", va="center", fontsize=11, color="dimgray",
            transform=ax.transAxes)
    ax.set_axis_off()
    return fig


def _bar_values(ax, container, fmt: str) -> None:
    ax.bar_label(container, fmt=fmt, padding=2, fontsize=8)


# --------------------------------------------------------------------------- table

def _summary_row(stage: dict) -> dict:
    def get(key, scale=1.0):
        v = stage.get(key)
        return np.nan if v is None else scale * float(v)
    return {ACC: get("test_accuracy", 100), LOSS: get("test_loss"), SPARSITY: get("global_sparsity", 100),
            NONZERO: stage.get("params_nonzero"), TOTAL: stage.get("params_total")}


def latency_point(eff: dict) -> tuple[str, int] | None:
    """The (device, batch) of the summary's latency column: the first device measured, its smallest
    batch (one image: what a deployed classifier waits for)."""
    for dev, table in (eff or {}).get("latency", {}).items():
        batches = sorted({r["batch"] for r in table["rows"]})
        if batches:
            return dev, batches[0]
    return None


def _cost(eff: dict, which: str, point: tuple[str, int] | None) -> dict:
    """Size and latency of the pruned ('pruned') or dense ('dense') model of one efficiency summary."""
    size = eff["dense_state_dict_bytes" if which == "dense" else "state_dict_bytes"] / MB
    ms = np.nan
    if point:
        rows = eff.get("latency", {}).get(point[0], {}).get("rows", [])
        ms = next((r["median_ms"] for r in rows if r["batch"] == point[1] and r["model"] == which), np.nan)
    return {SIZE: size, LATENCY: ms}


def _sweep_rows(results: dict) -> dict:
    """One summary row per sweep point, after retraining where it was retrained (its latency was
    measured at another batch size: see the sweep table)."""
    rows = {}
    for p in results.get("sweep") or []:
        after = p.get("test_accuracy_after") is not None
        acc, loss = (p["test_accuracy_after"], p.get("test_loss_after")) if after else \
            (p["test_accuracy_before"], p.get("test_loss_before"))
        size = (p.get("sizes") or {}).get("state_dict_bytes")
        rows[f"sweep: {p['method']} {p['amount']:g} ({'retrained' if after else 'pruned, not retrained'})"] = {
            ACC: 100 * acc, LOSS: np.nan if loss is None else loss, SPARSITY: 100 * p["sparsity"],
            NONZERO: p.get("params_nonzero"), TOTAL: p.get("params_total"),
            SIZE: np.nan if size is None else size / MB}
    return rows


def summary_table(results: dict) -> pd.DataFrame:
    """One row per model state of this run (trained / pruned / retrained, those present), the dense
    control beside the retrained model when it ran, each sweep point, and the seed report's two rows. Accuracy and
    sparsity in % (2 decimals), loss the true per-sample mean (4 decimals; NaN for the seed, whose
    loss is not comparable), parameter counts as integers, the state_dict's size in MB and the
    median latency measured in this run (device and batch in ``df.attrs['latency']``).
    Sparsity and nonzero count are NaN/NA where the stage did not measure them (the dense model);
    the dense control's size and latency are not measured (it is the trained architecture)."""
    rows = {state: _summary_row(_stage(results, state)) for state in STATES if _stage(results, state)}
    base = _stage(results, "pruned").get("efficiency") or _stage(results, "retrained").get("efficiency")
    point = latency_point(base)
    if base and "trained" in rows:
        rows["trained"].update(_cost(base, "dense", point))
    for state in ("pruned", "retrained"):
        if state in rows and _stage(results, state).get("efficiency"):
            rows[state].update(_cost(_stage(results, state)["efficiency"], "pruned", point))
    if results.get("control"):
        rows[CONTROL_LABEL] = _summary_row(results["control"])
    rows.update(_sweep_rows(results))
    for state in ("trained", "pruned"):
        rows[f"seed report: {state}"] = {ACC: 100 * SEED_REPORT[state]["test_accuracy"]}
    df = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=SUMMARY_COLUMNS)
    df[[ACC, SPARSITY]] = df[[ACC, SPARSITY]].astype(float).round(2)
    df[LOSS] = df[LOSS].astype(float).round(4)
    df[[SIZE, LATENCY]] = df[[SIZE, LATENCY]].astype(float).round(3)
    df[[NONZERO, TOTAL]] = df[[NONZERO, TOTAL]].astype("Int64")
    df.index.name = "model state"
    df.attrs["latency"] = point
    return df


def summary_styler(results: dict):
    """``summary_table`` formatted for display (thousands separators, '—' for not measured)."""
    df = summary_table(results)
    point = df.attrs.get("latency")
    where = (f"Latency: median time for a batch of {point[1]} on {point[0]} in this run (masks folded, as "
             "deployed; details in the efficiency table). ") if point else ""
    return (df.style.format({ACC: "{:.2f}", LOSS: "{:.4f}", SPARSITY: "{:.2f}", NONZERO: "{:,}", TOTAL: "{:,}",
                             SIZE: "{:.2f}", LATENCY: "{:.2f}"}, na_rep="—")
            .set_caption(where + SEED_REPORT["note"]))


# --------------------------------------------------------------------------- findings

def _f_data(results: dict) -> str | None:
    data = results.get("data") or {}
    counts = data.get("counts") or {}
    train, test = counts.get("train"), counts.get("test")
    if not train or not test:
        return None
    small, big = min(train, key=train.get), max(train, key=train.get)
    common = max(test, key=test.get)
    n_test = sum(test.values())
    ratio = train[big] / train[small] if train[small] else float("inf")
    return (f"The data has {_n(sum(train.values()))} training and {_n(n_test)} test crops over {len(train)} classes; "
            f"training classes range from '{small}' ({_n(train[small])} crops) to '{big}' ({_n(train[big])}), "
            f"a {ratio:.1f}:1 imbalance, and always answering the commonest test class ('{common}') would score "
            f"{_pct(test[common] / n_test)}, the floor any model has to beat.")


def _f_accuracy(results: dict) -> str | None:
    train = _stage(results, "trained")
    if "test_accuracy" not in train:
        return "Training has not run in this run folder, so there is no trained model to report."
    acc, n = train["test_accuracy"], _test_size(results)
    n_epochs = len(train.get("epochs") or [])
    s = (f"After {n_epochs} training epoch{'s' * (n_epochs != 1)} the {train.get('model', 'model')} reached "
         f"{_pct(acc)} test accuracy")
    if train.get("test_loss") is not None:
        s += f" (test loss {train['test_loss']:.3f}, a true per-sample mean)"
    if n:
        s += (f"; on {_n(n)} test crops one binomial standard error of that accuracy is "
              f"±{100 * binomial_se(acc, n):.1f} points")
    return s + "."


def _f_train_loss(results: dict, state: str) -> str | None:
    rows = _epochs(results, state)
    if not rows:
        return None
    loss = [r["train_loss"] for r in rows]
    last = len(loss) - 1

    def extreme(word: str, i: int) -> str:   # the value only where the sentence has not given it yet
        return f"{word} in epoch {i + 1}" if i in (0, last) else f"{word} {loss[i]:.3f} in epoch {i + 1}"
    s = (f"During {PHASE_NAME[state]}, the per-epoch training loss (sample mean) went from {loss[0]:.3f} in epoch 1 "
         f"to {loss[-1]:.3f} in epoch {last + 1} ({extreme('lowest', int(np.argmin(loss)))}, "
         f"{extreme('highest', int(np.argmax(loss)))})")
    if all("step_loss_min" in r for r in rows):
        s += (f"; single optimizer steps ranged from {min(r['step_loss_min'] for r in rows):.3f} "
              f"to {max(r['step_loss_max'] for r in rows):.3f} (batch means)")
    return s + "."


def _f_overfit(results: dict, state: str) -> str | None:
    rows = [r for r in _epochs(results, state) if r.get("test_loss") is not None]
    if len(rows) < 2:
        return None
    test = [r["test_loss"] for r in rows]
    train = [r["train_loss"] for r in rows]
    acc = [r.get("test_accuracy", np.nan) for r in rows]
    best, last = int(np.argmin(test)), len(rows) - 1
    best_acc = int(np.nanargmax(acc)) if not np.all(np.isnan(acc)) else None
    tail = (f"; test accuracy peaked at {_pct(acc[best_acc])} in epoch {best_acc + 1} (last epoch {_pct(acc[-1])})"
            if best_acc is not None else "")
    phase = PHASE_NAME[state].capitalize()
    if best < last and test[last] > test[best] and train[last] < train[best]:
        return (f"{phase} overfits: test loss was lowest ({test[best]:.3f}) in epoch {best + 1} and rose to "
                f"{test[last]:.3f} by epoch {last + 1} while training loss kept falling ({train[best]:.3f} → "
                f"{train[last]:.3f}){tail}.")
    trend = "fell" if test[last] < test[0] else "did not fall"
    return (f"{phase}: test loss {trend} from {test[0]:.3f} to {test[last]:.3f} over {last + 1} epochs while "
            f"training loss went from {train[0]:.3f} to {train[last]:.3f}, with no rise of test loss after its "
            f"minimum, so no sign of overfitting by loss{tail}.")


def _change(points: float, what: str) -> str:
    if abs(points) < 0.005:
        return f"{what} did not change"
    return f"{what} {'fell' if points < 0 else 'rose'} by {_pts(points)} points"


def _dense_accuracy(results: dict) -> float | None:
    prune = _stage(results, "pruned")
    return prune.get("dense_test_accuracy", _stage(results, "trained").get("test_accuracy"))


def _f_prune(results: dict) -> str:
    prune = _stage(results, "pruned")
    dense = _dense_accuracy(results)
    if "test_accuracy" not in prune or dense is None:
        return "Pruning has not run in this run folder, so there is no pruned model to compare."
    acc, n = prune["test_accuracy"], _test_size(results)
    d = 100 * (acc - dense)
    amount = _amount_phrase(prune) if prune.get("amount") is not None else "?"
    s = (f"After pruning ({prune.get('method', '?')}, {amount}, targets '{prune.get('targets', '?')}'), "
         f"{_change(d, 'test accuracy')}, from {_pct(dense)} to {_pct(acc)}")
    if n:
        se = 100 * binomial_se(dense, n)
        if abs(d) <= se:
            s += (f"; that is within one binomial standard error (±{se:.1f} points on {_n(n)} test crops), "
                  f"indistinguishable from sampling noise")
        else:
            s += (f"; that is {abs(d) / se:.1f} binomial standard errors (±{se:.1f} points on {_n(n)} test crops), "
                  f"larger than sampling noise of one standard error")
    if prune.get("test_loss") is not None and prune.get("dense_test_loss") is not None:
        s += f"; test loss went from {prune['dense_test_loss']:.3f} to {prune['test_loss']:.3f}"
    return s + "."


def _amount_phrase(prune: dict) -> str:
    """What `amount` means for the method, and the schedule (e.g. '50% of the weights of each layer')."""
    method, a = prune.get("method"), _pct(prune["amount"], 0)
    s = {"global_magnitude": f"{a} of the targeted weights together (one threshold)",
         "ln_structured": f"{a} of the output channels of each layer zeroed",
         "channel": f"{a} of the output channels of each layer removed"}.get(method, f"{a} of the weights of each layer")
    rounds = prune.get("rounds") or 1
    if rounds > 1:
        s += f" in {rounds} rounds with {prune.get('epochs_per_round', 0)} epoch(s) of fine-tuning between them"
    if prune.get("rewind"):
        s += f", survivors rewound to training step {prune['rewind']['step']}"
    return s


def _f_sparsity(results: dict) -> str | None:
    prune = _stage(results, "pruned")
    if "global_sparsity" not in prune:
        return None
    layers = prune.get("layers") or {}
    s = f"Measured sparsity of the targeted weights is {_pct(prune['global_sparsity'], 2)}"
    if prune.get("amount") is not None:
        s += f" against the asked {_pct(prune['amount'], 2)}"
    if prune.get("method") == "channel":
        s += (" of channels (weights removed with their channels count as zero, and removing a layer's output "
              "channels also removes the matching inputs of the next layer, so more weights go than channels)")
    if layers:
        lo, hi = min(layers, key=layers.get), max(layers, key=layers.get)
        s += (f" (every one of the {len(layers)} layers at {_pct(layers[lo], 2)})" if layers[hi] - layers[lo] < 5e-5
              else f" (per layer from {_pct(layers[lo], 2)} in {lo} to {_pct(layers[hi], 2)} in {hi})")
    if prune.get("params_nonzero") is not None and prune.get("params_total"):
        nz, tot = prune["params_nonzero"], prune["params_total"]
        s += (f"; counting biases and untargeted tensors, {_n(nz)} of {_n(tot)} parameters ({_pct(nz / tot)}) "
              f"remain nonzero, {_n(tot - nz)} are zero")
    return s + "."


def _f_retrain(results: dict) -> str:
    re_, prune = _stage(results, "retrained"), _stage(results, "pruned")
    if "test_accuracy" not in re_:
        return "Retraining has not run in this run folder, so recovery after pruning is not measured."
    acc, dense, pruned = re_["test_accuracy"], _dense_accuracy(results), prune.get("test_accuracy")
    s = f"During retraining ({len(re_.get('epochs') or [])} epochs, pruning masks held)"
    if pruned is None:
        return s + f" the model reached {_pct(acc)} test accuracy."
    s += f", {_change(100 * (acc - pruned), 'test accuracy')} (from {_pct(pruned)} to {_pct(acc)})"
    if dense is not None:
        drop, gain, vs_dense = 100 * (dense - pruned), 100 * (acc - pruned), 100 * (acc - dense)
        if vs_dense >= 0:
            s += (f", ending {_pts(vs_dense)} points above the dense model's {_pct(dense)}"
                  + (f": the {_pts(drop)}-point pruning drop fully recovered" if drop > 0 else ""))
        elif drop > 0:
            s += (f", recovering {100 * max(gain, 0) / drop:.0f}% of the {_pts(drop)}-point pruning drop "
                  f"and ending {_pts(vs_dense)} points below the dense model's {_pct(dense)}")
        else:
            s += (f", ending {_pts(vs_dense)} points below the dense model's {_pct(dense)} although pruning "
                  f"itself cost nothing")
    if re_.get("global_sparsity") is not None and prune.get("global_sparsity") is not None:
        a, b = re_["global_sparsity"], prune["global_sparsity"]
        s += (f"; sparsity stayed at {_pct(a, 2)}, so the masks held" if abs(a - b) < 1e-9
              else f"; sparsity changed from {_pct(b, 2)} to {_pct(a, 2)}, so the masks did NOT hold")
    return s + ". The seed report gives no retraining result to compare with."


def _f_seed(results: dict) -> str | None:
    dense, pruned = _dense_accuracy(results), _stage(results, "pruned").get("test_accuracy")
    if dense is None:
        return None
    seed_t, seed_p = SEED_REPORT["trained"]["test_accuracy"], SEED_REPORT["pruned"]["test_accuracy"]
    gap = 100 * (dense - seed_t)
    s = (f"This run's trained accuracy {_pct(dense)} is {_pts(gap)} points {'above' if gap >= 0 else 'below'} the "
         f"seed report's {_pct(seed_t, 0)}")
    if pruned is None:
        return s + "; the pruning comparison waits for the prune stage."
    seed_drop, drop = 100 * (seed_t - seed_p), 100 * (dense - pruned)
    amount = _stage(results, "pruned").get("amount")
    amount_s = f" at amount {amount:g}" if amount is not None else ""
    diff = drop - seed_drop
    rel = "the same as" if abs(diff) < 0.05 else f"{_pts(diff)} points {'more' if diff > 0 else 'less'} than"
    what = "dropped" if drop >= 0 else "gained"
    return (s + f"; the seed lost {seed_drop:.1f} point to pruning at rate {SEED_REPORT['prune_amount']:g} "
            f"({_pct(seed_t, 0)} → {_pct(seed_p, 0)}), this run {what} {_pts(drop)} points{amount_s} "
            f"({_pct(dense)} → {_pct(pruned)}), {rel} the seed's drop.")


def _f_loss_note(results: dict) -> str | None:
    losses = [(state, _stage(results, state).get("test_loss")) for state in STATES]
    losses = [(s, v) for s, v in losses if v is not None]
    if not losses:
        return None
    ours = ", ".join(f"{v:.3f} ({s})" for s, v in losses)
    seed = SEED_REPORT["reported_test_loss"]
    return (f"Test losses are not comparable with the seed report: its {seed['trained']} / {seed['pruned']} are "
            f"batch-mean losses divided by the number of samples (about {SEED_REPORT['batch_size']}× too small), "
            f"whereas this run's {ours} are true per-sample means; the seed's losses are therefore not plotted.")


def _f_first_steps(results: dict) -> str | None:
    rows = _epochs(results, "trained")
    if not rows or "step_loss_first" not in rows[0]:
        return None
    k = len((results.get("data") or {}).get("classes") or []) or 10
    seed = SEED_REPORT["step_loss"][1]
    r = rows[0]
    return (f"The first optimizer step's loss was {r['step_loss_first']:.3f} (chance level for {k} classes: "
            f"ln {k} = {math.log(k):.3f}; seed report {seed['first']:.3f}); epoch-1 step losses spanned "
            f"{r['step_loss_min']:.3f}–{r['step_loss_max']:.3f} here vs {seed['min']:.3f}–{seed['max']:.3f} "
            f"in the seed report.")


def _f_time(results: dict) -> str | None:
    parts = []
    for state in ("trained", "retrained"):
        st = _stage(results, state)
        if st.get("seconds") is not None:
            rates = [r["images_per_s"] for r in st.get("epochs") or [] if "images_per_s" in r]
            rate = f" ({np.mean(rates):.0f} images/s)" if rates else ""
            parts.append(f"{PHASE_NAME[state]} took {st['seconds']:.1f} s{rate}")
    if not parts:
        return None
    device = _stage(results, "trained").get("device")
    s = " and ".join(parts) + (f" on {device}" if device else "")
    return s[0].upper() + s[1:] + "."


def findings(results: dict) -> list[str]:
    """Sentences computed from the numbers of ``results`` (each one changes when its numbers do)."""
    builders = [_f_data, _f_accuracy, lambda r: _f_train_loss(r, "trained"), _f_first_steps,
                lambda r: _f_overfit(r, "trained"), _f_prune, _f_sparsity, _f_seed, _f_seeds, _f_retrain, _f_control,
                _f_efficiency, _f_sweep,
                lambda r: _f_train_loss(r, "retrained"), lambda r: _f_overfit(r, "retrained"),
                _f_loss_note, _f_time]
    return [s for s in (b(results) for b in builders) if s]


def findings_markdown(results: dict) -> str:
    """The findings as a Markdown bullet list (text escaped: no HTML, links or math)."""
    return "\n".join(f"- {md_escape(s)}" for s in findings(results))


def title_markdown(results: dict) -> str:
    """A heading naming the model, the pruning and the run's parameter hash."""
    model = _stage(results, "trained").get("model", "model")
    prune = _stage(results, "pruned")
    what = (f"{prune.get('method', 'pruning')} at {_pct(prune['amount'], 0)}" if prune.get("amount") is not None
            else "pruning not run")
    if (prune.get("rounds") or 1) > 1:
        what += f" in {prune['rounds']} rounds"
    if prune.get("rewind"):
        what += f", rewound to step {prune['rewind']['step']}"
    if results.get("sweep"):
        what += f"; sweep of {len(results['sweep'])} points"
    h = results.get("params_hash")
    return (f"# Pruning study: {md_escape(model)}, {md_escape(what)}\n\n"
            + (f"Run parameters hash {md_escape(h)}. " if h else "")
            + md_escape(f"Seed report for comparison: {SEED_REPORT['source']}."))


def data_markdown(info: dict) -> str:
    """What the data stage built: source, classes in label order, sizes and what was skipped."""
    lines = [f"Built from `{md_escape(info.get('root', '?'))}`: **{_n(info['train_size'])}** training and "
             f"**{_n(info['test_size'])}** test crops of {info.get('image_size', '?')} px, "
             f"{len(info['classes'])} classes (label order): {', '.join(md_escape(c) for c in info['classes'])}.",
             "", "| split | kept | " + " | ".join(md_escape(k) for k in _skip_keys(info)) + " |",
             "|---|---|" + "---|" * len(_skip_keys(info))]
    for split, size in (("train", info["train_size"]), ("test", info["test_size"])):
        skipped = (info.get("skipped") or {}).get(split, {})
        lines.append(f"| {split} | {_n(size)} | " + " | ".join(_n(skipped.get(k, 0)) for k in _skip_keys(info)) + " |")
    clipped = info.get("clipped") or {}
    if any(clipped.values()):
        lines += ["", "Boxes reaching outside their image, clipped to it: "
                  + ", ".join(f"{split} {_n(n)}" for split, n in clipped.items()) + "."]
    return "\n".join(lines + _rejects_lines(info))


def _rejects_lines(info: dict) -> list[str]:
    """The images skipped as unreadable, with their reason (a few examples per split)."""
    rejected = info.get("rejected") or {}
    if not any(r.get("images") for r in rejected.values()):
        return []
    lines = ["", "Images that could not be read were skipped (all listed in `<split>_rejects.csv` of the data stage):",
             "", "| split | image file | boxes | reason | detail |", "|---|---|---|---|---|"]
    for split, r in rejected.items():
        for ex in r.get("examples", [])[:10]:
            lines.append(f"| {split} | {md_escape(ex['file_name'])} | {_n(ex['boxes'])} | {md_escape(ex['reason'])} "
                         f"| {md_escape(str(ex['detail'])[:120])} |")
        if r.get("images", 0) > len(r.get("examples", [])[:10]):
            lines.append(f"| {split} | ... {_n(r['images'])} images in all | | | |")
    return lines


def _skip_keys(info: dict) -> list[str]:
    return sorted({k for v in (info.get("skipped") or {}).values() for k in v})


def stage_markdown(stage: str, metrics: dict) -> str:
    """One paragraph of a stage's outcome, computed from its metrics."""
    acc = f"test accuracy **{_pct(metrics['test_accuracy'])}**, test loss {metrics['test_loss']:.4f} (per-sample mean)"
    if stage == "prune":
        change = 100 * (metrics["test_accuracy"] - metrics["dense_test_accuracy"])
        total = metrics.get("dense_params_total", metrics["params_total"])
        s = (f"{md_escape(metrics['method'])}: {md_escape(_amount_phrase(metrics))}, targets "
             f"{md_escape(metrics['targets'])}: global sparsity **{_pct(metrics['global_sparsity'], 2)}** of the targeted "
             f"weights (zero or removed), {_n(metrics['params_nonzero'])} of the dense model's {_n(total)} parameters "
             f"nonzero. Before retraining: {acc}; {_change(change, 'accuracy')} from the dense model's "
             f"{_pct(metrics['dense_test_accuracy'])}.")
        if metrics.get("rewind"):
            r = metrics["rewind"]
            s += (f" Rewound to training step {r['step']} (masks kept), the model scores {_pct(r['test_accuracy'])}: "
                  f"retraining starts from there.")
        return s
    epochs = len(metrics.get("epochs") or [])
    sp = (f"; global sparsity {_pct(metrics['global_sparsity'], 2)}" if "global_sparsity" in metrics else "")
    s = (f"After {epochs} epoch{'s' * (epochs != 1)} in {metrics['seconds']:.0f} s on "
         f"{md_escape(metrics['device'])}: {acc}{sp}.")
    if metrics.get("export"):
        e = metrics["export"]
        shape = ("the small channel-pruned model (rebuild it with prune.rebuild and export.json)"
                 if e["kind"] == "structural" else "a plain dense state_dict, pruned weights exactly zero")
        s += (f" Exported to `{md_escape(e['file'])}` + `{md_escape(e['meta'])}`: {shape}, {_n(e['params_nonzero'])} "
              f"nonzero of {_n(e['params_total'])} parameters, {e['bytes'] / 1e6:.2f} MB; it loads with "
              f"torch.load(weights_only=True).")
    return s


def provenance_markdown(results: dict) -> str:
    """Parameter hash, commit, platform, device, seeds, the data's manifest hash and class counts,
    versions, stage timings and keys, and every parameter, as a Markdown table; then links to
    every stage's executed notebook (the repeats' too)."""
    prov = results.get("provenance") or {}
    rows = [("parameters hash", results.get("params_hash")), ("git commit", prov.get("git_commit")),
            ("python", prov.get("python")), ("platform", prov.get("platform")),
            ("processor", prov.get("processor")), ("cuda", prov.get("cuda"))]
    train = _stage(results, "trained")
    params = results.get("params") or {}
    seeds = [params.get("seed"), *[r["seed"] for r in results.get("repeats") or []]]
    rows += [("device (training)", train.get("device")),
             ("seeds", ", ".join(str(s) for s in seeds if s is not None) or None),
             ("data manifest sha256", (results.get("data") or {}).get("manifest_sha256"))]
    counts = (results.get("data") or {}).get("counts") or {}
    for split, by_class in counts.items():
        rows.append((f"{split} crops per class", ", ".join(f"{c}: {n}" for c, n in by_class.items())))
    rows += [(pkg, v) for pkg, v in (prov.get("versions") or {}).items()]
    rows += [(f"time: {stage}", f"{s:.1f} s") for stage, s in (results.get("timings_s") or {}).items()]
    rows += [(f"stage key: {stage}", key) for stage, key in (results.get("stage_keys") or {}).items()]
    rows += [(f"parameter: {k}", json.dumps(v)) for k, v in config.flatten(params).items()]
    lines = ["| item | value |", "|---|---|"] + [f"| {md_escape(k)} | {md_escape(v if v is not None else '—')} |"
                                                 for k, v in rows]
    pages = " · ".join(f"[{name}](notebooks/{name}.html)" for name in STAGE_PAGES)
    lines += ["", f"Each stage's executed notebook, with its code and outputs: {pages}."]
    for r in results.get("repeats") or []:
        seed = int(r["seed"])   # an int (config checks it): safe in a link
        links = " · ".join(f"[{name}](repeats/seed-{seed}/notebooks/{name}.html)" for name in REPEAT_PAGES)
        lines.append(f"Repeat with seed {seed} (folder repeats/seed-{seed}): {links}.")
    return "\n".join(lines)


#: the executed stage notebooks rendered beside report.html (notebooks/<name>.html)
STAGE_PAGES = ("01_data", "02_train", "03_prune", "04_retrain", "05_analysis")
REPEAT_PAGES = ("02_train", "03_prune", "04_retrain")   # a repeat shares the data and the analysis


# --------------------------------------------------------------------------- efficiency, control, sweep

EFFICIENCY_STATES = ("trained", "pruned", "retrained")
MB = 1e6


def _eff_row(eff: dict, which: str) -> dict:
    """One efficiency-table row from an efficiency.summary dict: of the pruned model, or ('dense')
    of the dense model it was measured against."""
    dense = which == "dense"
    row = {"params (total)": eff["dense_params_total"] if dense else eff["params_total"],
           "params (nonzero)": eff["dense_params_total"] if dense else eff["params_nonzero"],
           "zero or removed (% of dense params)": 0.0 if dense else
           100 * (1 - eff["params_nonzero"] / max(eff["dense_params_total"], 1)),
           "MMACs run": (eff["dense_macs"] if dense else eff["macs"]) / 1e6,
           "MMACs nonzero": (eff["dense_macs"] if dense else eff["effective_macs"]) / 1e6,
           "theoretical speedup (×)": 1.0 if dense else eff["theoretical_speedup"],
           "state_dict (MB)": (eff["dense_state_dict_bytes"] if dense else eff["state_dict_bytes"]) / MB,
           "with masks (MB)": np.nan if dense else eff["masked_bytes"] / MB,
           "sparse + zlib (MB)": np.nan if dense else eff["sparse_compressed_bytes"] / MB}
    for dev, table in eff.get("latency", {}).items():
        for r in table["rows"]:
            if r["model"] == ("dense" if dense else "pruned"):
                row[f"{dev} latency, batch {r['batch']} (ms)"] = r["median_ms"]
    largest = max((r["batch"] for t in eff.get("latency", {}).values() for r in t["rows"]), default=None)
    row[f"measured speedup, batch {largest} (×)"] = 1.0 if dense else eff["measured_speedup"]
    row["saves time"] = "reference" if dense else ("yes" if eff["saves_time"] else "NO")
    return row


def efficiency_table(results: dict) -> pd.DataFrame:
    """What each model state costs, measured in this run: parameters (total, nonzero, % zero or
    removed), MACs per image (run by dense kernels, and nonzero only), theoretical speedup, bytes
    on disk (plain state_dict, with masks, sparse + zlib), median CPU (and CUDA) latency per batch
    and the measured speedup against the dense model, and whether time is saved. The dense row
    comes from the pruned model's measurement (both timed in the same interleaved run)."""
    rows = {}
    base = _stage(results, "pruned").get("efficiency") or _stage(results, "retrained").get("efficiency")
    if base:
        rows["trained (dense)"] = _eff_row(base, "dense")
    for state in ("pruned", "retrained"):
        eff = _stage(results, state).get("efficiency")
        if eff:
            rows[state] = _eff_row(eff, "pruned")
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "model state"
    return df


def efficiency_styler(results: dict):
    """``efficiency_table`` formatted for display."""
    df = efficiency_table(results)
    fmt = {c: "{:,.0f}" for c in df.columns if c.startswith("params")}
    fmt.update({c: "{:.2f}" for c in df.columns if df[c].dtype.kind == "f" and c not in fmt})
    return (df.style.format(fmt, na_rep="—")
            .set_caption("Latency: median of interleaved runs on this machine (masks folded, as deployed); "
                         "'saves time' needs a measured speedup of at least 1.1×. MMACs: multiply-accumulates of the "
                         "conv and linear layers per image. Sizes in MB of 10^6 bytes; 'sparse + zlib' is a size "
                         "estimate (nonzero values + bitmask, zlib), not a format any runtime loads."))


def efficiency_markdown(results: dict) -> str:
    """Plain sentences: does the pruned (and retrained) model save time, and why not when it does not."""
    lines = []
    for state in ("pruned", "retrained"):
        eff = _stage(results, state).get("efficiency")
        if not eff:
            continue
        lines.append(f"- **{state}**: {md_escape(eff['remark'])} On disk: {eff['state_dict_bytes'] / MB:.2f} MB as a "
                     f"plain state_dict (dense model {eff['dense_state_dict_bytes'] / MB:.2f} MB), "
                     f"{eff['sparse_compressed_bytes'] / MB:.2f} MB stored sparse and compressed.")
    return "\n".join(lines) or "No efficiency figures: the prune stage has not run in this run folder."


def _f_efficiency(results: dict) -> str | None:
    eff = _stage(results, "pruned").get("efficiency")
    if not eff:
        return None
    method = _stage(results, "pruned").get("method", "the pruning")
    s = (f"Efficiency of {method}: {eff['remark']} Nonzero MACs per image fell from {eff['dense_macs'] / 1e6:.1f} M "
         f"to {eff['effective_macs'] / 1e6:.1f} M (theoretical {eff['theoretical_speedup']:.2f}×), while the kernels "
         f"still run {eff['macs'] / 1e6:.1f} M")
    return s + "."


def _f_control(results: dict) -> str | None:
    control, re_ = results.get("control") or {}, _stage(results, "retrained")
    if "test_accuracy" not in control or "test_accuracy" not in re_:
        return None
    c, r, dense, n = control["test_accuracy"], re_["test_accuracy"], _dense_accuracy(results), _test_size(results)
    epochs = control.get("fine_tune_epochs", len(control.get("epochs") or []))
    s = (f"The dense control (the trained model fine-tuned {epochs} more epoch{'s' * (epochs != 1)} with the same "
         f"settings, unpruned) reached {_pct(c)}")
    if dense is not None:
        s += f" ({_change(100 * (c - dense), 'accuracy')} from the dense model's {_pct(dense)})"
    d = 100 * (r - c)
    s += f"; the retrained pruned model's {_pct(r)} is {_pts(d)} points {'above' if d >= 0 else 'below'} the control"
    if n:
        se = 100 * math.sqrt(binomial_se(r, n) ** 2 + binomial_se(c, n) ** 2)
        s += f" (±{se:.1f} points, one standard error of the difference)"
        if abs(d) <= se:
            s += ", indistinguishable from it"
    if d < 0:
        s += f"; counting the extra training, pruning cost {_pts(d)} points"
        if dense is not None and r > dense:
            s += ", and the retrained model's gain over the dense model came from the extra training, not from pruning"
    else:
        s += "; counting the extra training, pruning cost nothing measurable"
    return s + "."


def control_markdown(results: dict) -> str:
    """The retrained pruned model beside the dense control, as Markdown."""
    s = _f_control(results)
    if s is None:
        return ("No dense control in this run (retrain.control is false, or retraining has not run): gains of "
                "retraining cannot be told apart from effects of pruning.")
    return md_escape(s)


def _sweep(results: dict) -> list[dict]:
    return [e for e in results.get("sweep") or [] if e.get("test_accuracy_before") is not None]


def sweep_table(results: dict) -> pd.DataFrame:
    """One row per sweep point: method, amount and sparsity (%), test accuracy (%) before and after
    retraining, measured and theoretical speedup, latency, sizes."""
    rows = []
    for e in _sweep(results):
        after = e.get("test_accuracy_after")
        rows.append({"method": e["method"], "amount (%)": 100 * e["amount"], "sparsity (%)": 100 * e["sparsity"],
                     "accuracy before retraining (%)": 100 * e["test_accuracy_before"],
                     "accuracy after retraining (%)": np.nan if after is None else 100 * after,
                     f"latency, batch {e['latency_batch']} (ms)": e["latency_ms"],
                     "measured speedup (×)": e["speedup_measured"], "theoretical speedup (×)": e["speedup_theoretical"],
                     "sparse + zlib (MB)": e["sizes"]["sparse_compressed_bytes"] / MB,
                     "saves time": "yes" if e["saves_time"] else "NO"})
    return pd.DataFrame(rows)


def sweep_styler(results: dict):
    df = sweep_table(results)
    fmt = {c: "{:.2f}" for c in df.columns if df[c].dtype.kind == "f"}
    return df.style.format(fmt, na_rep="—").hide(axis="index")


def _f_sweep(results: dict) -> str | None:
    sweep = _sweep(results)
    if not sweep:
        return None
    methods = list(dict.fromkeys(e["method"] for e in sweep))
    top = max(e["amount"] for e in sweep)
    at_top = {e["method"]: e for e in sweep if e["amount"] == top}
    stage = "after" if all(e.get("test_accuracy_after") is not None for e in at_top.values()) else "before"
    acc = {m: e[f"test_accuracy_{stage}"] for m, e in at_top.items()}
    parts = ", ".join(f"{m} {_pct(a)} (sparsity {_pct(at_top[m]['sparsity'], 0)})" for m, a in acc.items())
    n_amounts = len({e["amount"] for e in sweep})
    s = (f"In the sweep ({len(methods)} method{'s' * (len(methods) != 1)} × {n_amounts} "
         f"amount{'s' * (n_amounts != 1)}), at the largest "
         f"amount ({_pct(top, 0)}) test accuracy {stage} retraining was: {parts}")
    if RANDOM_METHOD in acc:
        floor = acc[RANDOM_METHOD]
        below = [m + (f" (at {_pct(at_top[m]['sparsity'], 0)} sparsity against random's "
                      f"{_pct(at_top[RANDOM_METHOD]['sparsity'], 0)})"
                      if abs(at_top[m]["sparsity"] - at_top[RANDOM_METHOD]["sparsity"]) > 0.01 else "")
                 for m, a in acc.items() if m != RANDOM_METHOD and a <= floor]
        s += (f"; random pruning, the floor, scored {_pct(floor)}"
              + (f", and {', '.join(below)} did no better than random there" if below else
                 ", and every other method beat it"))
    fast = {m: max(e["speedup_measured"] for e in sweep if e["method"] == m) for m in methods}
    saving = [m for m in methods if any(e["saves_time"] for e in sweep if e["method"] == m)]
    s += (f". Measured speedup at batch {sweep[0]['latency_batch']}: "
          + ", ".join(f"{m} up to {v:.2f}×" for m, v in fast.items())
          + ("; only " + ", ".join(saving) + " saved time" if saving else "; no method saved time"))
    return s + "."


def sweep_markdown(results: dict) -> str:
    s = _f_sweep(results)
    return md_escape(s) if s else "No sweep in this run (prune.amounts is null), so there are no trade-off curves."


def plot_tradeoff(results: dict) -> Figure:
    """The sweep's trade-off curves: test accuracy (%) against sparsity (% of the targeted weights
    zero or removed) and against the measured CPU speedup over the dense model, one colour per
    method; solid = after retraining, dashed = before; random pruning (grey) shaded below as the
    floor; the dense model and the dense control as horizontal reference lines."""
    sweep = _sweep(results)
    if not sweep:
        return _placeholder("No sweep in this run (prune.amounts is null): no trade-off curves.")
    fig, (ax_s, ax_t) = _figure(2, size=(12, 4.6))
    methods = list(dict.fromkeys(e["method"] for e in sweep))
    tops = []
    for m in methods:
        pts = sorted((e for e in sweep if e["method"] == m), key=lambda e: e["sparsity"])
        color, marker = METHOD_COLORS.get(m, "black"), _METHOD_MARKERS.get(m, "o")
        before = [100 * e["test_accuracy_before"] for e in pts]
        after = [np.nan if e.get("test_accuracy_after") is None else 100 * e["test_accuracy_after"] for e in pts]
        tops += before + [a for a in after if not np.isnan(a)]
        name = _text(m) + (" (random: the floor)" if m == RANDOM_METHOD else "")
        for ax, x in ((ax_s, [100 * e["sparsity"] for e in pts]), (ax_t, [e["speedup_measured"] for e in pts])):
            if not np.all(np.isnan(after)):
                ax.plot(x, after, marker=marker, ls="-", color=color, lw=1.8, label=f"{name}: after retraining")
            ax.plot(x, before, marker=marker, ls="--", color=color, lw=1.2, alpha=0.75, mfc="none",
                    label=f"{name}: before retraining")
        if m == RANDOM_METHOD:
            floor = [a if not np.isnan(a) else b for a, b in zip(after, before)]
            ax_s.fill_between([100 * e["sparsity"] for e in pts], 0, floor, color=METHOD_COLORS[m], alpha=0.12,
                              lw=0, label="at or below random pruning")
    dense = _stage(results, "trained").get("test_accuracy")
    control = (results.get("control") or {}).get("test_accuracy")
    for ax in (ax_s, ax_t):
        if dense is not None:
            ax.axhline(100 * dense, color="black", lw=1.2, label=f"dense model ({_pct(dense)})")
            tops.append(100 * dense)
        if control is not None:
            ax.axhline(100 * control, color=STATE_COLORS["control"], lw=1.4, ls=":",
                       label=f"{CONTROL_LABEL} ({_pct(control)})")
            tops.append(100 * control)
        ax.set_ylim(0, min(100, max(tops) + 8))
    ax_t.axvline(1.0, color="dimgray", ls="-.", lw=1, label="no speedup (1×)")
    ax_t.set_xscale("log", base=2)  # masked methods sit at 1×, channel pruning spreads over octaves
    ax_t.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    batch, threads = sweep[0]["latency_batch"], sweep[0].get("latency_threads")
    _label(ax_s, "sparsity: targeted weights zero or removed (% of the dense model's)", "test accuracy (%)",
           "Accuracy vs sparsity")
    device = sweep[0]["latency_device"]
    ax_s.set_xlim(0, 100)
    ax_t.set_xlim(left=min(0.9, 0.95 * min(e["speedup_measured"] for e in sweep)))
    _label(ax_t, f"measured {device.upper() if device == 'cpu' else device} speedup over the dense model, batch {batch}"
           + (f", {threads} threads" if threads else "") + " (×, log scale)", "test accuracy (%)",
           "Accuracy vs measured speedup")
    handles, labels = {}, []
    for ax in (ax_s, ax_t):
        for h, l in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(l, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=3, fontsize=8)
    return fig


# --------------------------------------------------------------------------- seeds

SEED_STATES = ("trained", "pruned", "retrained", "control")
SEED_STATE_LABEL = {"trained": "trained", "pruned": "pruned", "retrained": "retrained", "control": "dense control"}
PAIRS = (("pruned", "trained"), ("retrained", "trained"), ("retrained", "control"))
CONFIDENCE = 0.95
CI_LOW, CI_HIGH = f"{CONFIDENCE:.0%} CI low", f"{CONFIDENCE:.0%} CI high"
PRUNING_CHANGE = "pruned − trained"   # paired_table's row of the change pruning made


def seed_runs(results: dict) -> list[dict]:
    """Test accuracy (and loss, sparsity) of every model state per seed: this run's first, then the
    repeats' (`seeds`), as stages.seed_results gives them."""
    main = {"seed": (results.get("params") or {}).get("seed"), "dir": "."}
    for state in SEED_STATES:
        m = results.get("control") if state == "control" else _stage(results, state)
        if m and m.get("test_accuracy") is not None:
            main[state] = {k: m.get(k) for k in ("test_accuracy", "test_loss", "global_sparsity")}
    return [main, *(results.get("repeats") or [])]


def _accuracies(runs: list[dict], state: str) -> dict:
    """seed -> test accuracy (%) of `state`, for the seeds where it was measured."""
    return {r["seed"]: 100 * r[state]["test_accuracy"] for r in runs if (r.get(state) or {}).get("test_accuracy")
            is not None}


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """Mean, sample standard deviation and the two ends of the Student-t confidence interval of the
    mean (NaN where fewer than two values: one seed says nothing about the spread)."""
    from scipy import stats

    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return (np.nan,) * 4
    mean = float(v.mean())
    if v.size < 2:
        return mean, np.nan, np.nan, np.nan
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1)) * sd / np.sqrt(v.size)
    return mean, sd, mean - half, mean + half


def seeds_table(results: dict) -> pd.DataFrame:
    """Test accuracy (%) of each model state per seed, with the mean, standard deviation (points),
    min and max over seeds."""
    runs = seed_runs(results)
    rows = {}
    for state in SEED_STATES:
        acc = _accuracies(runs, state)
        if not acc:
            continue
        mean, sd, _, _ = t_interval(acc.values())
        rows[SEED_STATE_LABEL[state]] = {"seeds": len(acc), "mean (%)": mean, "SD (points)": sd,
                                         "min (%)": min(acc.values()), "max (%)": max(acc.values()),
                                         **{f"seed {s} (%)": a for s, a in acc.items()}}
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "model state"
    return df


def paired_table(results: dict) -> pd.DataFrame:
    """The paired change of test accuracy (points) per seed: pruned − trained, retrained − trained,
    retrained − dense control, each over the seeds where both were measured, with its mean, SD and
    95% Student-t confidence interval."""
    runs = seed_runs(results)
    rows = {}
    for a, b in PAIRS:
        xa, xb = _accuracies(runs, a), _accuracies(runs, b)
        diff = {s: xa[s] - xb[s] for s in xa if s in xb}
        if not diff:
            continue
        mean, sd, lo, hi = t_interval(diff.values())
        rows[f"{SEED_STATE_LABEL[a]} − {SEED_STATE_LABEL[b]}"] = {
            "seeds": len(diff), "mean (points)": mean, "SD (points)": sd, CI_LOW: lo, CI_HIGH: hi, **{f"seed {s}": d for s, d in diff.items()}}
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "paired change"
    return df


def seeds_styler(results: dict):
    df = seeds_table(results)
    return (df.style.format({c: "{:.2f}" for c in df.columns if c != "seeds"}, na_rep="—")
            .set_caption("Test accuracy per seed. SD: sample standard deviation over seeds, in points (— with "
                         "one seed). All seeds share the same data; a seed sets initialisation, batch order, "
                         "augmentation and random pruning."))


def paired_styler(results: dict):
    df = paired_table(results)
    return (df.style.format({c: "{:.2f}" if c.startswith("SD") else "{:+.2f}" for c in df.columns if c != "seeds"},
                            na_rep="—")
            .set_caption(f"Paired change of test accuracy in points, per seed (the same seed's models compared). "
                         f"CI: {CONFIDENCE:.0%} Student-t confidence interval of the mean change over seeds; an "
                         "interval that holds 0 means the change is not distinguishable from seed-to-seed noise."))


def seeds_markdown(results: dict) -> str:
    """The uncertainty over seeds in sentences: spread, and whether each paired change is noise."""
    runs = seed_runs(results)
    seeds = [r["seed"] for r in runs]
    if len(runs) < 2:
        return (f"One seed only ({md_escape(seeds[0])}): no spread can be measured, so the changes above are single "
                "measurements. Set `seeds: [0, 1, 2]` (or more) to repeat training, pruning and retraining with "
                "other seeds on the same data and read every change against the noise.")
    lines = [f"- {len(runs)} seeds ({', '.join(md_escape(s) for s in seeds)}), the same data for all."]
    trained = _accuracies(runs, "trained")
    if trained:
        mean, sd, lo, hi = t_interval(trained.values())
        lines.append(f"- Trained test accuracy: mean {mean:.1f}%, SD {sd:.1f} points over seeds "
                     f"({min(trained.values()):.1f}–{max(trained.values()):.1f}%).")
    paired = paired_table(results)
    for name, r in paired.iterrows():
        if r["seeds"] < 2:
            continue
        lo, hi = r[CI_LOW], r[CI_HIGH]
        verdict = ("the interval holds 0: not distinguishable from seed-to-seed noise" if lo <= 0 <= hi
                   else f"the interval excludes 0: a {'loss' if hi < 0 else 'gain'} beyond seed-to-seed noise")
        lines.append(f"- {md_escape(name)}: {r['mean (points)']:+.2f} points on average over {int(r['seeds'])} seeds, "
                     f"{CONFIDENCE:.0%} CI [{lo:+.2f}, {hi:+.2f}]; {verdict}.")
    seed_drop = 100 * (SEED_REPORT["pruned"]["test_accuracy"] - SEED_REPORT["trained"]["test_accuracy"])
    pruning = _pruning_change(paired)
    if pruning is not None:
        lo, hi = pruning[CI_LOW], pruning[CI_HIGH]
        lines.append(f"- The seed report's change after pruning ({seed_drop:+.0f} point, one seed) lies "
                     f"{'inside' if lo <= seed_drop <= hi else 'outside'} this study's interval for it.")
    return "\n".join(lines)


def _pruning_change(paired: pd.DataFrame) -> pd.Series | None:
    """paired_table's pruned − trained row, where at least two seeds measured it."""
    if PRUNING_CHANGE not in paired.index or paired.loc[PRUNING_CHANGE, "seeds"] < 2:
        return None
    return paired.loc[PRUNING_CHANGE]


def _f_seeds(results: dict) -> str | None:
    r = _pruning_change(paired_table(results))
    if r is None:
        return None
    lo, hi = r[CI_LOW], r[CI_HIGH]
    return (f"Over {int(r['seeds'])} seeds, pruning changed test accuracy by {r['mean (points)']:+.2f} points "
            f"({CONFIDENCE:.0%} CI {lo:+.2f} to {hi:+.2f}): "
            + ("within seed-to-seed noise." if lo <= 0 <= hi else "beyond seed-to-seed noise."))


def plot_seeds(results: dict) -> Figure:
    """Test accuracy of each model state per seed, one line per seed joining its own models (the
    pairing), and the mean over seeds with its 95% confidence interval."""
    runs = seed_runs(results)
    states = [s for s in SEED_STATES if _accuracies(runs, s)]
    if not states:
        return _placeholder("No test accuracy yet: run the train stage.")
    fig, (ax,) = _figure(size=(8, 4))
    x = {s: i for i, s in enumerate(states)}
    shown = []   # every value drawn, for the y range (accuracy stays within 0-100%, a CI may not)
    for r in runs:
        pts = [(x[s], 100 * r[s]["test_accuracy"]) for s in states if (r.get(s) or {}).get("test_accuracy") is not None]
        ax.plot(*zip(*pts), color="#9a9a9a", lw=1, alpha=0.8, zorder=1)
    for s in states:
        acc = _accuracies(runs, s)
        ax.scatter([x[s]] * len(acc), list(acc.values()), color=STATE_COLORS[s], s=22, alpha=0.7, zorder=2)
        mean, _, lo, hi = t_interval(acc.values())
        yerr = None if np.isnan(lo) else [[mean - lo], [hi - mean]]
        shown += [*acc.values(), *([] if np.isnan(lo) else [lo, hi])]
        ax.errorbar(x[s] + 0.12, mean, yerr=yerr, fmt="D", color=STATE_COLORS[s], mec="black", ms=7, capsize=5,
                    ecolor="black", zorder=3)
    ax.set_xticks(list(x.values()), [SEED_STATE_LABEL[s] for s in states])
    ax.set_xlim(-0.4, len(states) - 0.4)
    ax.set_ylim(max(0.0, min(shown) - 3), min(100.0, max(shown) + 3))   # a wide CI runs off the axes
    handles = [Line2D([], [], color="#9a9a9a", lw=1, label="one seed (its models joined)"),
               Line2D([], [], marker="D", color="black", ls="none", mfc="white",
                      label=f"mean, {CONFIDENCE:.0%} CI over seeds" if len(runs) > 1 else "mean (one seed: no CI)")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    _label(ax, "model state", "test accuracy (%)", f"Test accuracy per seed ({len(runs)} seed{'s' * (len(runs) != 1)})")
    return fig


def epoch_table(metrics: dict) -> pd.DataFrame:
    """A stage's per-epoch figures (empty when it trained 0 epochs)."""
    rows = metrics.get("epochs") or []
    return pd.DataFrame(rows).set_index("epoch").round(4) if rows else pd.DataFrame()


# --------------------------------------------------------------------------- figures: curves

def _history(run_dir: Path, state: str) -> dict | None:
    h = _read_json(Path(run_dir) / STAGE_OF[state] / "history.json")
    return h if h and h.get("steps") else None


def _epoch_chunks(n_steps: int, n_epochs: int) -> list[np.ndarray]:
    """Step indices of each epoch (steps per epoch = n_steps / n_epochs)."""
    return np.array_split(np.arange(n_steps), max(n_epochs, 1))


def _seed_step_ranges(ax, train_chunks: list[np.ndarray]) -> None:
    """The seed report's printed step-loss ranges at the matching epochs of this run (if it has them)."""
    drawn = False
    for epoch, r in SEED_REPORT["step_loss"].items():
        if epoch > len(train_chunks):
            continue
        lo, hi = r.get("min", r.get("last_steps_min")), r.get("max", r.get("last_steps_max"))
        chunk = train_chunks[epoch - 1]
        x = chunk[0] + 1 + (0.5 if "min" in r else 0.9) * len(chunk)
        ax.errorbar([x], [(lo + hi) / 2], yerr=[[(hi - lo) / 2]], fmt="none", ecolor=SEED_EDGE, elinewidth=2.5,
                    capsize=5, zorder=5, label=None if drawn else "seed report: step-loss range (epochs 1, 2; end of 10)")
        drawn = True


def plot_step_loss(run_dir) -> Figure:
    """Every optimizer step's loss, per-epoch mean and min-max band; retraining continues the step axis."""
    phases = [(s, h) for s in ("trained", "retrained") if (h := _history(Path(run_dir), s))]
    if not phases:
        return _placeholder("No training history (train/history.json) in this run folder.")
    fig, (ax,) = _figure()
    offset = 0
    for state, hist in phases:
        steps, color, name = np.asarray(hist["steps"], float), STATE_COLORS[state], PHASE_NAME[state]
        chunks = _epoch_chunks(len(steps), len(hist.get("epochs") or []))
        ax.plot(offset + np.arange(1, len(steps) + 1), steps, lw=0.6, alpha=0.35, color=color, label=f"{name}: every step")
        edges = [offset + c[0] + 0.5 for c in chunks] + [offset + len(steps) + 0.5]
        lo, hi = [steps[c].min() for c in chunks], [steps[c].max() for c in chunks]
        ax.fill_between(edges, lo + lo[-1:], hi + hi[-1:], step="post", color=color, alpha=0.15, lw=0,
                        label=f"{name}: epoch min–max")
        ax.plot([offset + c.mean() + 1 for c in chunks], [steps[c].mean() for c in chunks], "o-", color=color,
                lw=1.8, ms=4, label=f"{name}: epoch mean")
        if state == "trained":
            _seed_step_ranges(ax, chunks)
        elif offset:
            ax.axvline(offset + 0.5, color="dimgray", ls="--", lw=1)
            ax.text(offset + 0.5, 0.98, " retraining starts", transform=ax.get_xaxis_transform(), va="top",
                    fontsize=8, color="dimgray")
        offset += len(steps)
    ax.set_xlim(0.5, offset + 0.5)
    _label(ax, "optimizer step", "cross-entropy loss (batch mean)", "Loss of every optimizer step")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=4)
    return fig


def plot_epoch_metrics(results: dict) -> Figure:
    """Test accuracy (%) and test/train loss per epoch; retraining continues the epoch count, the pruned
    model sits half an epoch after training, the seed report's accuracies are grey stars."""
    train_rows, re_rows = _epochs(results, "trained"), _epochs(results, "retrained")
    if not train_rows and not re_rows:
        return _placeholder("No per-epoch metrics (train / retrain stages) in results.json.")
    fig, (acc_ax, loss_ax) = _figure(2)
    n_train = len(train_rows)
    for state, rows, start in (("trained", train_rows, 1), ("retrained", re_rows, n_train + 1)):
        if not rows:
            continue
        x, c, name = np.arange(start, start + len(rows)), STATE_COLORS[state], PHASE_NAME[state]
        acc_ax.plot(x, [100 * r["test_accuracy"] for r in rows], "o-", color=c, label=f"{name}: test accuracy")
        loss_ax.plot(x, [r["test_loss"] for r in rows], "o-", color=c, label=f"{name}: test loss")
        loss_ax.plot(x, [r["train_loss"] for r in rows], "s--", color=c, alpha=0.6, ms=4, label=f"{name}: train loss")
    prune = _stage(results, "pruned")
    if "test_accuracy" in prune:
        x = n_train + 0.5
        acc_ax.plot([x], [100 * prune["test_accuracy"]], "D", color=STATE_COLORS["pruned"], ms=8,
                    label="pruned (no training)")
        if prune.get("test_loss") is not None:
            loss_ax.plot([x], [prune["test_loss"]], "D", color=STATE_COLORS["pruned"], ms=8, label="pruned: test loss")
    if n_train:
        acc_ax.plot([n_train, n_train + 0.5], [100 * SEED_REPORT[s]["test_accuracy"] for s in ("trained", "pruned")],
                    "*", color=STATE_COLORS["seed report"], mec=SEED_EDGE, ms=13, ls="none",
                    label="seed report: trained / pruned")
    _label(acc_ax, "epoch (retraining continues the count)", "test accuracy (%)", "Test accuracy per epoch")
    _label(loss_ax, "epoch (retraining continues the count)", "cross-entropy loss (mean per sample)",
           "Loss per epoch (seed report's loss not comparable)")
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best")
    return fig


# --------------------------------------------------------------------------- figures: bars

def plot_accuracy(results: dict) -> Figure:
    """Test accuracy of this run's model states (and the dense control, when it ran) beside the seed
    report's 71% / 70% (hatched grey bars)."""
    ours = [(s, _stage(results, s)["test_accuracy"]) for s in STATES if "test_accuracy" in _stage(results, s)]
    if (results.get("control") or {}).get("test_accuracy") is not None:
        ours.append(("control", results["control"]["test_accuracy"]))
    n = _test_size(results)
    fig, (ax,) = _figure()
    x = np.arange(len(ours), dtype=float)
    if ours:
        bars = ax.bar(x, [100 * a for _, a in ours], color=[STATE_COLORS[s] for s, _ in ours], width=0.7,
                      yerr=[100 * binomial_se(a, n) for _, a in ours] if n else None, capsize=4, ecolor="black")
        _bar_values(ax, bars, "%.1f%%")
    seed_x = np.arange(2) + len(ours) + 0.5
    seed = ax.bar(seed_x, [100 * SEED_REPORT[s]["test_accuracy"] for s in ("trained", "pruned")], width=0.7,
                  color=STATE_COLORS["seed report"], hatch=SEED_HATCH, edgecolor=SEED_EDGE)
    _bar_values(ax, seed, "%.0f%%")
    ax.set_xticks(np.concatenate([x, seed_x]), [{"control": "dense control\n(fine-tuned)"}.get(s, s) for s, _ in ours]
                  + ["seed report:\ntrained", "seed report:\npruned"])
    ax.set_ylim(0, min(100, max([71] + [100 * a for _, a in ours]) + 15))
    handles = [Patch(color=STATE_COLORS[s], label=f"this run: {CONTROL_LABEL if s == 'control' else s}") for s, _ in ours]
    handles.append(Patch(facecolor=STATE_COLORS["seed report"], hatch=SEED_HATCH, edgecolor=SEED_EDGE,
                         label="seed report (COCO 2017; retraining not reported)"))
    if n:
        handles.append(Line2D([], [], color="black", marker="_", ls="none", ms=10,
                              label=f"±1 binomial SE ({_n(n)} test crops)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    _label(ax, "model state", "test accuracy (%)", "Test accuracy: this run beside the seed report")
    return fig


def plot_layer_sparsity(results: dict) -> Figure:
    """Per-layer sparsity (%) after pruning and after retraining, the asked amount as a dashed line."""
    series = [(s, _stage(results, s)["layers"]) for s in ("pruned", "retrained") if _stage(results, s).get("layers")]
    if not series:
        return _placeholder("No per-layer sparsity: the prune stage has not run.")
    layers = list(dict.fromkeys(name for _, sp in series for name in sp))
    fig, (ax,) = _figure(size=(min(20, max(10, 0.45 * len(layers) * len(series))), 4))
    x, width = np.arange(len(layers)), 0.8 / len(series)
    for i, (state, sp) in enumerate(series):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, [100 * sp.get(l, np.nan) for l in layers], width,
                      color=STATE_COLORS[state], label=f"after {PHASE_NAME[state]}")
        if len(layers) <= 12:
            _bar_values(ax, bars, "%.2f")
    amount = _stage(results, "pruned").get("amount")
    top = max(100 * v for _, sp in series for v in sp.values())
    if amount is not None:
        ax.axhline(100 * amount, color="black", ls="--", lw=1, label=f"asked amount ({_pct(amount, 0)})")
        top = max(top, 100 * amount)
    ax.set_xticks(x, [_text(l) for l in layers], rotation=0 if len(layers) <= 8 else 60,
                  ha="center" if len(layers) <= 8 else "right")
    ax.set_ylim(0, max(top * 1.3, 1))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    _label(ax, "layer", "sparsity (% of the dense layer's weights zero or removed)", "Sparsity per pruned layer")
    return fig


def plot_class_counts(info: dict) -> Figure:
    """Training and test crops per class (``info`` = data.json, or results['data'])."""
    classes, counts = info.get("classes") or [], info.get("counts") or {}
    splits = [s for s in ("train", "test") if counts.get(s)]
    if not classes or not splits:
        return _placeholder("No class counts (data.json) available.")
    fig, axes = _figure(len(splits), size=(10, max(3, 0.32 * len(classes) + 1)), sharey=True)
    y = np.arange(len(classes))
    for ax, split in zip(axes, splits):
        values = [counts[split].get(c, 0) for c in classes]
        bars = ax.barh(y, values, color=_SPLIT_COLORS[split])
        _bar_values(ax, bars, "%d")
        ax.set_xlim(0, max(values + [1]) * 1.15)
        _label(ax, f"{split} crops (count)", "class" if ax is axes[0] else "", f"{split}: {_n(sum(values))} crops")
    axes[0].set_yticks(y, [_text(c) for c in classes])
    axes[0].invert_yaxis()
    return fig


# --------------------------------------------------------------------------- figures: weights, images, errors

def _layer_weights(path: Path) -> dict[str, np.ndarray] | None:
    """Every conv/linear weight (key ending in '.weight', ndim >= 2) of a saved state_dict, flattened."""
    if not Path(path).is_file():
        return None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().double().flatten().numpy() for k, v in sd.items()
            if k.endswith(".weight") and torch.is_tensor(v) and v.ndim >= 2}


def cut_threshold(dense: np.ndarray, pruned: np.ndarray) -> float | None:
    """The largest |w| of the dense model that pruning set to zero (None when nothing was pruned)."""
    cut = (pruned == 0) & (dense != 0)
    return float(np.abs(dense[cut]).max()) if cut.any() else None


def _pick_layers(weights: dict[str, np.ndarray], max_layers: int) -> list[str]:
    """All layers in network order, or the ``max_layers`` largest ones (still in network order)."""
    names = list(weights)
    if len(names) <= max_layers:
        return names
    keep = set(sorted(names, key=lambda k: -weights[k].size)[:max_layers])
    return [k for k in names if k in keep]


def _weight_panel(ax, name: str, dense: np.ndarray, pruned: np.ndarray | None, retrained: np.ndarray | None,
                  bins: int) -> None:
    before = np.abs(dense[dense != 0])
    after = None if pruned is None or pruned.shape != dense.shape else np.abs(pruned[pruned != 0])
    again = None if retrained is None or retrained.shape != dense.shape else np.abs(retrained[retrained != 0])
    present = [a for a in (before, after, again) if a is not None and a.size]
    if not present:
        ax.text(0.5, 0.5, "all weights are zero", ha="center", transform=ax.transAxes)
        return
    # the smallest 0.1% of magnitudes are gathered in the first bin, so that a few tiny weights do not
    # stretch the log axis over decades of empty bins
    lo = float(np.quantile(np.concatenate(present), 0.001))
    hi = max(max(a.max() for a in present), lo * 1.001)
    edges = np.logspace(np.log10(lo), np.log10(hi), bins + 1)
    edges[0], edges[-1] = lo, hi          # exactly: log/exp round-off would drop the extreme weights

    def hist(values, **kw):
        ax.hist(np.clip(values, lo, hi), edges, **kw)
    hist(before, color=STATE_COLORS["trained"], alpha=0.45, label="before pruning (all)")
    if after is not None:
        hist(after, histtype="step", lw=1.6, color=STATE_COLORS["pruned"], label="after pruning (nonzero)")
    if again is not None:
        hist(again, histtype="step", lw=1.2, ls="--", color=STATE_COLORS["retrained"], label="after retraining (nonzero)")
    ax.set_xscale("log")
    cut = cut_threshold(dense, pruned) if after is not None else None
    title = _text(name.removesuffix(".weight"))
    if cut is not None:
        ax.axvline(cut, color="black", ls=":", lw=1.2, label="cut threshold")
        ax.text(cut, 0.97, f" cut {cut:.2g}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        title += f" ({100 * (pruned == 0).mean():.1f}% zero)"
    elif after is not None:
        title += " (not pruned)"
    _label(ax, "|w| (log scale)", "weights per bin", title)


def plot_weight_histograms(run_dir, max_layers: int = 12, bins: int = 60) -> Figure:
    """Per layer: |w| before pruning (train/model.pt) vs the nonzero |w| after pruning (and after
    retraining), log-scale x, with the cut threshold (the largest |w| that was set to zero)."""
    run_dir = Path(run_dir)
    dense = _layer_weights(run_dir / "train" / "model.pt")
    if not dense:
        return _placeholder("No trained weights (train/model.pt) in this run folder.")
    pruned = _layer_weights(run_dir / "prune" / "model.pt") or {}
    retrained = _layer_weights(run_dir / "retrain" / "model.pt") or {}
    names = _pick_layers(dense, max_layers)
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = _figure(ncols, nrows, size=(10, 2.7 * nrows + 0.6))
    for ax, name in zip(axes, names):
        _weight_panel(ax, name, dense[name], pruned.get(name), retrained.get(name), bins)
    for ax in axes[len(names):]:
        ax.remove()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    shown = f"the {len(names)} largest of {len(dense)} weight tensors; " if len(names) < len(dense) else ""
    fig.suptitle(f"{shown}the first bin of each panel also holds the smallest 0.1% of |w|", fontsize=9,
                 color="dimgray")
    return fig


def _data_info(run_dir: Path) -> dict:
    info = _read_json(Path(run_dir) / "data" / "data.json")
    if info is None:
        raise FileNotFoundError(f"{Path(run_dir) / 'data' / 'data.json'} not found: the data stage has not run")
    return info


def sample_mosaic(images: np.ndarray, labels: np.ndarray, n_classes: int, per_class: int, gap: int = 2) -> np.ndarray:
    """One row per class of its first ``per_class`` images (white where a class has fewer)."""
    size = images.shape[1]
    step = size + gap
    mosaic = np.full((n_classes * step - gap, per_class * step - gap, 3), 255, np.uint8)
    for c in range(n_classes):
        for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            img = np.asarray(images[i])
            mosaic[c * step:c * step + size, j * step:j * step + size] = img[..., None] if img.ndim == 2 else img[..., :3]
    return mosaic


def plot_samples(run_dir, per_class: int = 8) -> Figure:
    """A grid of the first ``per_class`` training crops of every class, class names as row labels."""
    run_dir = Path(run_dir)
    classes = _data_info(run_dir)["classes"]
    images = np.load(run_dir / "data" / "train_images.npy", mmap_mode="r")
    labels = np.load(run_dir / "data" / "train_labels.npy")
    mosaic = sample_mosaic(images, labels, len(classes), per_class)
    step = images.shape[1] + 2
    fig, (ax,) = _figure(size=(0.75 * per_class + 2.2, 0.75 * len(classes) + 0.9))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks(np.arange(len(classes)) * step + images.shape[1] / 2, [_text(c) for c in classes])
    ax.set_xticks(np.arange(per_class) * step + images.shape[1] / 2, np.arange(1, per_class + 1))
    ax.grid(False)
    _label(ax, f"training crop ({images.shape[1]}×{images.shape[2]} px, first {per_class} of each class)", "class")
    return fig


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts: rows = true class, columns = predicted class."""
    labels, predictions = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"{predictions.size} predictions for {labels.size} test labels")
    return np.bincount(labels * n_classes + predictions, minlength=n_classes ** 2).reshape(n_classes, n_classes)


def row_normalised(cm: np.ndarray) -> np.ndarray:
    """Each row in % of its true class (rows without samples stay 0)."""
    totals = cm.sum(axis=1, keepdims=True)
    return np.divide(100.0 * cm, totals, out=np.zeros(cm.shape), where=totals > 0)


def _predictions(run_dir: Path) -> dict[str, np.ndarray]:
    """The test predictions of each model state saved in the run (and of the dense control)."""
    found = {s: np.load(p) for s in STATES if (p := run_dir / STAGE_OF[s] / "predictions.npy").is_file()}
    if (p := run_dir / "retrain" / "control" / "predictions.npy").is_file():
        found["control"] = np.load(p)
    return found


def paired_change(labels: np.ndarray, before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    """Change of accuracy (points) from `before` to `after` predictions of the same samples, and its
    standard error for paired samples: sqrt(b + c - (b - c)^2 / n) / n, with b (c) the samples only
    `after` (only `before`) gets right (the normal approximation behind McNemar's test)."""
    n = len(labels)
    if n == 0:
        return np.nan, np.nan
    gain = int(((after == labels) & (before != labels)).sum())
    loss = int(((after != labels) & (before == labels)).sum())
    return 100 * (gain - loss) / n, 100 * np.sqrt(max(gain + loss - (gain - loss) ** 2 / n, 0.0)) / n


STATE_COLUMN = {"trained": "trained (%)", "pruned": "pruned (%)", "retrained": "retrained (%)",
                "control": "dense control (%)"}


def per_class_table(run_dir) -> pd.DataFrame:
    """Per-class test accuracy of every model state, and the paired change (points, ± one standard
    error) of the pruned and retrained models against the trained one; most hurt by pruning first."""
    run_dir = Path(run_dir)
    classes = _data_info(run_dir).get("classes") or []
    labels = np.load(run_dir / "data" / "test_labels.npy") if (run_dir / "data" / "test_labels.npy").is_file() else None
    preds = _predictions(run_dir) if labels is not None else {}
    if not preds or not classes:
        return pd.DataFrame()
    rows = {}
    for k, name in enumerate(classes):
        sel = labels == k
        row = {"test samples": int(sel.sum())}
        for state, pred in preds.items():
            row[STATE_COLUMN[state]] = 100 * float((pred[sel] == k).mean()) if sel.any() else np.nan
        for state in ("pruned", "retrained"):
            if state in preds and "trained" in preds:
                change, se = paired_change(labels[sel], preds["trained"][sel], preds[state][sel])
                row[f"{state} − trained (points)"], row[f"{state}: ± 1 SE"] = change, se
        rows[str(name)] = row
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "class"
    if "pruned − trained (points)" in df:
        df = df.sort_values("pruned − trained (points)", kind="stable")
    return df


def per_class_styler(run_dir):
    """``per_class_table`` for display: changes below zero in the pruned colour, above in the retrained."""
    df = per_class_table(run_dir)
    if df.empty:
        return df
    fmt = {c: "{:.1f}" for c in df.columns if c != "test samples"}
    change = [c for c in df.columns if c.endswith("(points)")]
    return (df.style.format(fmt, na_rep="—").format_index(escape="html")   # class names are untrusted text
            .bar(subset=change, align="zero", color=[to_hex(STATE_COLORS["pruned"]), to_hex(STATE_COLORS["retrained"])])
            .set_caption("Per-class test accuracy (%). Changes are paired (the same test crops before and after), "
                         "in points, with one standard error; a change smaller than about two standard errors is "
                         "within the noise of this test set. Sorted by the change after pruning, largest loss first."))


def per_class_markdown(run_dir) -> str:
    """Which classes pay for pruning, in sentences computed from ``per_class_table``."""
    df = per_class_table(run_dir)
    col, se = "pruned − trained (points)", "pruned: ± 1 SE"
    if df.empty or col not in df:
        return "No per-class comparison: the train and prune stages' predictions are not both in this run folder."
    worst = df[df[col] < 0].head(3)
    if worst.empty:
        return "Pruning lowered the test accuracy of no class."
    named = "; ".join(f"{md_escape(name)} {r[col]:+.1f} ± {r[se]:.1f} points on {int(r['test samples'])} crops"
                      for name, r in worst.iterrows())
    beyond = df[(df[col] < 0) & (df[col].abs() > 2 * df[se])]
    tail = (f" {len(beyond)} of {len(df)} classes lost more than two standard errors." if len(beyond)
            else " No class lost more than two standard errors: the per-class losses are within the noise.")
    lines = [f"- Pruning cost most in: {named}.{tail}"]
    rcol = "retrained − trained (points)"
    if rcol in df:
        back = df[(df[col] < 0) & (df[rcol] >= 0)]
        lines.append(f"- After retraining, {len(back)} of the {int((df[col] < 0).sum())} classes that lost "
                     "accuracy to pruning are back at or above their trained accuracy.")
    return "\n".join(lines)


def plot_confusion(run_dir) -> Figure:
    """Row-normalised confusion matrices (%) of the trained / pruned / retrained models side by side."""
    run_dir = Path(run_dir)
    classes = _data_info(run_dir)["classes"]
    labels = np.load(run_dir / "data" / "test_labels.npy")
    states = [(s, p) for s, p in _predictions(run_dir).items() if s in STATES]
    if not states:
        return _placeholder("No predictions (train/prune/retrain predictions.npy) in this run folder.")
    k = len(classes)
    side = min(6.0, max(3.6, 0.34 * k + 0.8))
    fig, axes = _figure(len(states), size=(side * len(states) + 0.8, side + 0.6))
    names = [_text(c) for c in classes]
    for i, (ax, (state, pred)) in enumerate(zip(axes, states)):
        cm = confusion_matrix(labels, pred, k)
        pct = row_normalised(cm)
        annot = np.where(cm > 0, np.char.mod("%.0f", pct), "") if k <= 15 else False   # empty cells stay blank
        sns.heatmap(pct, ax=ax, vmin=0, vmax=100, square=True, cbar=False,
                    cmap=sns.light_palette(STATE_COLORS[state], as_cmap=True), annot=annot, fmt="",
                    annot_kws={"fontsize": 7}, xticklabels=names, yticklabels=names if i == 0 else False,
                    linewidths=0.5, linecolor="white")
        ax.set_title(f"{state}: {100 * np.trace(cm) / max(cm.sum(), 1):.1f}% correct",
                     color=STATE_COLORS[state], fontweight="bold")
        _label(ax, "predicted class", "true class (each row sums to 100%)" if i == 0 else "")
        ax.tick_params(axis="x", labelrotation=60)
        for t in ax.get_xticklabels():
            t.set_ha("right")
            t.set_rotation_mode("anchor")
    return fig


# --------------------------------------------------------------------------- saving

_FIG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def save_figures(run_dir, figures: dict[str, Figure], dpi: int = 150) -> list[Path]:
    """Write each figure to run_dir/analysis/figures/<name>.png atomically (temp file + os.replace)."""
    out = Path(run_dir) / "analysis" / "figures"
    paths = []
    for name, fig in figures.items():
        name = str(name).removesuffix(".png")
        if not _FIG_NAME.fullmatch(name):
            raise ValueError(f"figure name {name!r} is not a plain file name (letters, digits, '_', '-', '.')")
        paths.append(store.atomic_write(out / f"{name}.png",
                                        lambda f, fig=fig: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")))
    return paths


def all_figures(run_dir, results: dict | None = None) -> dict[str, Figure]:
    """Every figure of the report by name (the names ``save_figures`` writes)."""
    results = load_results(run_dir) if results is None else results
    return {"accuracy": plot_accuracy(results), "step_loss": plot_step_loss(run_dir),
            "epoch_metrics": plot_epoch_metrics(results), "layer_sparsity": plot_layer_sparsity(results),
            "weight_histograms": plot_weight_histograms(run_dir),
            "class_counts": plot_class_counts(_read_json(Path(run_dir) / "data" / "data.json")
                                              or results.get("data") or {}),
            "samples": plot_samples(run_dir), "confusion": plot_confusion(run_dir), "seeds": plot_seeds(results),
            "tradeoff": plot_tradeoff(results)}
