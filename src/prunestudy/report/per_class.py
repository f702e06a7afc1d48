"""Which classes pay for pruning: per-class test accuracy of every model state, the paired change
against the trained model (exact McNemar test, Holm-corrected over the classes, Newcombe
interval), the classes too small to read, and the confusion matrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .. import atomic, metrics, paths, states
from . import glossary
from .common import data_info, min_test, p_cell, pvalue, signed, where
from .style import figure, label, literal, md_escape, placeholder


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
    return {s: np.load(p) for s in states.KEYS if (p := where(run_dir, s, paths.PREDICTIONS)).is_file()}


def _test_labels_file(run_dir: Path) -> Path:
    return paths.stage_dir(run_dir, "data") / paths.labels("test")


CHANGED = ("pruned", "retrained")   # the states whose per-class change against the trained model is tested
NOTE = "note"
SAMPLES = "test samples"


def _column(state: str, what: str) -> str:
    return f"{state} − trained (points)" if what == "change" else f"{state}: {what}"


def per_class_table(run_dir, min_test: int | None = None) -> pd.DataFrame:
    """Per-class test accuracy of every model state and, for the pruned and retrained models against
    the trained one, the paired change on each class's test crops (points) with its 95% Newcombe
    interval, the crops gained / lost, the exact McNemar p-value, Holm-corrected over the classes
    read, and the verdict at 5% (prunestudy.metrics). A class with fewer than `min_test` test crops
    (data.min_test_per_class of the run) is marked too few to read and gets no verdict. Most hurt
    by pruning first."""
    run_dir = Path(run_dir)
    classes = data_info(run_dir).get("classes") or []
    labels = np.load(_test_labels_file(run_dir)) if _test_labels_file(run_dir).is_file() else None
    preds = _predictions(run_dir) if labels is not None else {}
    if not preds or not classes:
        return pd.DataFrame()
    min_test = run_min_test(run_dir) if min_test is None else min_test
    rows = {}
    tests: dict[str, list[tuple[str, dict]]] = {state: [] for state in CHANGED}
    for k, name in enumerate(classes):
        sel = labels == k
        n = int(sel.sum())
        row = {SAMPLES: n}
        for state, pred in preds.items():
            row[f"{states.get(state).label} (%)"] = 100 * float((pred[sel] == k).mean()) if n else np.nan
        for state in CHANGED:
            if state in preds and "trained" in preds and n:
                c = metrics.paired(labels[sel], preds["trained"][sel], preds[state][sel])
                row[_column(state, "change")] = 100 * c["change"]
                row[_column(state, "95% CI")] = f"{signed(100 * c['ci_low'])} to {signed(100 * c['ci_high'])}"
                row[_column(state, "gained / lost")] = f"{c['gains']} / {c['losses']}"
                row[_column(state, "p")] = c["p_value"]
                if n >= min_test:
                    tests[state].append((str(name), c))
        row[NOTE] = ("" if n >= min_test else f"too few to read (under {min_test} test crops)" if n
                     else "no test crops")
        rows[str(name)] = row
    for state, family in tests.items():
        metrics.correct([c for _, c in family])
        for name, c in family:
            rows[name][_column(state, "p (Holm)")] = c["p_holm"]
            rows[name][_column(state, "verdict")] = c["verdict"]
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "class"
    order = [SAMPLES, *(c for c in df.columns if c.endswith("(%)"))]
    for state in CHANGED:
        if _column(state, "change") in df:   # a class too small to read has no verdict
            df[_column(state, "verdict")] = df.get(_column(state, "verdict"), pd.Series(dtype=object)).reindex(
                df.index).fillna("—")
            order += [_column(state, w) for w in ("change", "95% CI", "gained / lost", "p", "p (Holm)", "verdict")
                      if _column(state, w) in df]
    df = df[order + [NOTE]]
    if _column("pruned", "change") in df:
        df = df.sort_values(_column("pruned", "change"), kind="stable")
    df.attrs["tests"], df.attrs["min_test"] = tests, min_test
    return df


def run_min_test(run_dir: Path) -> int:
    """data.min_test_per_class of a run folder (its params.json; the schema's default without one)."""
    params = Path(run_dir) / paths.PARAMS
    return min_test({"params": atomic.read_json(params)} if params.is_file() else {})


def per_class_styler(run_dir):
    """``per_class_table`` for display: changes below zero in the pruned colour, above in the retrained."""
    df = per_class_table(run_dir)
    if df.empty:
        return df
    fmt = {c: "{:.1f}" for c in df.columns if df[c].dtype.kind == "f"}
    fmt.update({c: p_cell for c in df.columns if c.endswith(": p") or c.endswith("(Holm)")})
    # bars only where a change is not zero everywhere (pandas divides by the column's range)
    change = [c for c in df.columns if c.endswith("(points)") and df[c].abs().max() > 0]
    styler = (df.style.format(fmt, na_rep="—").format_index(escape="html")   # class names are untrusted text
            .bar(subset=change, align="zero", color=[states.PRUNED.color, states.RETRAINED.color])
            .set_caption("Per-class test accuracy (%). Changes are paired (the same test crops before and after), "
                         "in points, with the 95% Newcombe interval and the exact McNemar p-value, then "
                         f"Holm-corrected over the classes with at least {df.attrs['min_test']} test crops; verdicts "
                         "at 5%. A class with fewer test crops is too few to read. Sorted by the change after "
                         "pruning, largest loss first."))
    return glossary.linked_caption(styler)   # its Holm, McNemar and Newcombe, to their definitions


def _class_line(state: str, family: list[tuple[str, dict]]) -> str:
    """One state's per-class verdicts after correction, and its largest other changes."""
    what = "pruning" if state == "pruned" else "pruning and retraining"
    moved = [(name, c) for name, c in family if c["verdict"] in ("drop", "gain")]
    s = (f"Per class ({what} against the trained model; exact McNemar tests on each class's test crops, "
         f"Holm-corrected over the {len(family)} classes read, at 5%): ")
    s += ("; ".join(f"{md_escape(name)} {signed(100 * c['change'])} points, a significant {c['verdict']} "
                    f"({c['gains']} gained, {c['losses']} lost; {pvalue(c['p_holm'])} after correction)"
                    for name, c in moved) if moved else "no class changed significantly")
    others = [(n, c) for n, c in sorted(family, key=lambda nc: -abs(nc[1]["change"]))
              if c["gains"] + c["losses"] and c["verdict"] not in ("drop", "gain")][:3]
    if others:
        s += ". Largest other changes: " + "; ".join(
            f"{md_escape(name)} {signed(100 * c['change'])} points ({c['gains']} gained, {c['losses']} lost; "
            f"{pvalue(c['p_value'])}, {pvalue(c['p_holm'])} after correction"
            + ("; too few changes for any verdict" if c["verdict"] == "too few changes" else "") + ")"
            for name, c in others)
    return f"- {s}."


def per_class_markdown(run_dir) -> str:
    """Which classes pay for pruning (and after retraining), in sentences computed from
    ``per_class_table``: the verdicts after correction, the largest other changes both ways, and
    the classes too small to read."""
    df = per_class_table(run_dir)
    if df.empty or _column("pruned", "change") not in df:
        return "No per-class comparison: the train and prune stages' predictions are not both in this run folder."
    lines = [_class_line(state, family) for state, family in df.attrs["tests"].items() if family]
    few = df[df[NOTE] != ""]
    if len(few):
        named = ", ".join(f"{md_escape(name)} ({int(r[SAMPLES])})" for name, r in few.iterrows())
        lines.append(f"- {named} {'has' if len(few) == 1 else 'have'} fewer than {df.attrs['min_test']} test crops "
                     "(data.min_test_per_class): too few to read per class, so no verdict is given.")
    return "\n".join(lines)


def _heatmap(ax, share: np.ndarray, counts: np.ndarray, cmap, xnames: list[str], ynames: list[str] | None) -> None:
    """A k x k heatmap of `share` (%, 0-100) with square cells, white cell borders and each nonempty
    cell's value printed (up to 15 classes; empty cells stay blank), dark text on light cells and
    light on dark, rows top-down: what seaborn's heatmap draws, without its three draws of the whole
    figure (it draws the figure to test whether the tick labels overlap), most of this figure's time."""
    k = len(share)
    ax.pcolormesh(share, cmap=cmap, vmin=0, vmax=100, edgecolors="white", linewidth=0.5)
    ax.set(xlim=(0, k), ylim=(k, 0), aspect="equal")
    ax.grid(False)
    if k <= 15:
        rgb = cmap(share / 100)[..., :3]   # seaborn's rule: the relative luminance of the cell's colour
        linear = np.where(rgb <= 0.03928, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
        luminance = linear @ [0.2126, 0.7152, 0.0722]
        for (r, c), v in np.ndenumerate(share):
            if counts[r, c] > 0:
                ax.text(c + 0.5, r + 0.5, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color=".15" if luminance[r, c] > 0.408 else "w")
    ax.set_xticks(np.arange(k) + 0.5, xnames)
    ax.set_yticks(np.arange(k) + 0.5, ynames if ynames is not None else [])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)


def plot_confusion(run_dir) -> Figure:
    """Row-normalised confusion matrices (%) of the trained / pruned / retrained models side by side."""
    run_dir = Path(run_dir)
    classes = data_info(run_dir)["classes"]
    labels = np.load(_test_labels_file(run_dir))
    shown = [(s, p) for s, p in _predictions(run_dir).items() if s in states.MAIN]
    if not shown:
        folders = "/".join(states.get(s).folder for s in states.MAIN)
        return placeholder(f"No predictions ({folders} {paths.PREDICTIONS}) in this run folder.")
    k = len(classes)
    side = min(6.0, max(3.6, 0.34 * k + 0.8))
    fig, axes = figure(len(shown), size=(side * len(shown) + 0.8, side + 0.6))
    names = [literal(c) for c in classes]
    for i, (ax, (state, pred)) in enumerate(zip(axes, shown)):
        cm = confusion_matrix(labels, pred, k)
        share = row_normalised(cm)
        color = states.get(state).color
        _heatmap(ax, share, cm, sns.light_palette(color, as_cmap=True), names, names if i == 0 else None)
        ax.set_title(f"{state}: {100 * np.trace(cm) / max(cm.sum(), 1):.1f}% correct",
                     color=color, fontweight="bold")
        label(ax, "predicted class", "true class (each row sums to 100%)" if i == 0 else "")
        ax.tick_params(axis="x", labelrotation=60)
        for t in ax.get_xticklabels():
            t.set_ha("right")
            t.set_rotation_mode("anchor")
    return fig
