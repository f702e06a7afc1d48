"""Which classes pay for pruning: per-class test accuracy of every model state, the paired change
against the trained model with its standard error, and the confusion matrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .. import paths, states
from .common import data_info, where
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


def per_class_table(run_dir) -> pd.DataFrame:
    """Per-class test accuracy of every model state, and the paired change (points, ± one standard
    error) of the pruned and retrained models against the trained one; most hurt by pruning first."""
    run_dir = Path(run_dir)
    classes = data_info(run_dir).get("classes") or []
    labels = np.load(_test_labels_file(run_dir)) if _test_labels_file(run_dir).is_file() else None
    preds = _predictions(run_dir) if labels is not None else {}
    if not preds or not classes:
        return pd.DataFrame()
    rows = {}
    for k, name in enumerate(classes):
        sel = labels == k
        row = {"test samples": int(sel.sum())}
        for state, pred in preds.items():
            row[f"{states.get(state).label} (%)"] = 100 * float((pred[sel] == k).mean()) if sel.any() else np.nan
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
            .bar(subset=change, align="zero", color=[states.PRUNED.color, states.RETRAINED.color])
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
        annot = np.where(cm > 0, np.char.mod("%.0f", share), "") if k <= 15 else False   # empty cells stay blank
        color = states.get(state).color
        sns.heatmap(share, ax=ax, vmin=0, vmax=100, square=True, cbar=False,
                    cmap=sns.light_palette(color, as_cmap=True), annot=annot, fmt="",
                    annot_kws={"fontsize": 7}, xticklabels=names, yticklabels=names if i == 0 else False,
                    linewidths=0.5, linecolor="white")
        ax.set_title(f"{state}: {100 * np.trace(cm) / max(cm.sum(), 1):.1f}% correct",
                     color=color, fontweight="bold")
        label(ax, "predicted class", "true class (each row sums to 100%)" if i == 0 else "")
        ax.tick_params(axis="x", labelrotation=60)
        for t in ax.get_xticklabels():
            t.set_ha("right")
            t.set_rotation_mode("anchor")
    return fig
