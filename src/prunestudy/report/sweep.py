"""The sweep: one row per (method, amount) point, its findings sentence and the trade-off curves
(accuracy against sparsity and against measured speedup). Method colours, markers and the floor
(random pruning) come from the method registry."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .. import states
from .common import MB, pct
from .style import figure, floor_method, label, literal, md_escape, method_style, placeholder


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


def f_sweep(results: dict) -> str | None:
    """The findings' sentence on the sweep: accuracy at the largest amount, against the floor, and speed."""
    sweep = _sweep(results)
    if not sweep:
        return None
    methods = list(dict.fromkeys(e["method"] for e in sweep))
    top = max(e["amount"] for e in sweep)
    at_top = {e["method"]: e for e in sweep if e["amount"] == top}
    stage = "after" if all(e.get("test_accuracy_after") is not None for e in at_top.values()) else "before"
    acc = {m: e[f"test_accuracy_{stage}"] for m, e in at_top.items()}
    parts = ", ".join(f"{m} {pct(a)} (sparsity {pct(at_top[m]['sparsity'], 0)})" for m, a in acc.items())
    n_amounts = len({e["amount"] for e in sweep})
    s = (f"In the sweep ({len(methods)} method{'s' * (len(methods) != 1)} × {n_amounts} "
         f"amount{'s' * (n_amounts != 1)}), at the largest "
         f"amount ({pct(top, 0)}) test accuracy {stage} retraining was: {parts}")
    rand = floor_method()
    if rand in acc:
        floor = acc[rand]
        below = [m + (f" (at {pct(at_top[m]['sparsity'], 0)} sparsity against random's "
                      f"{pct(at_top[rand]['sparsity'], 0)})"
                      if abs(at_top[m]["sparsity"] - at_top[rand]["sparsity"]) > 0.01 else "")
                 for m, a in acc.items() if m != rand and a <= floor]
        s += (f"; random pruning, the floor, scored {pct(floor)}"
              + (f", and {', '.join(below)} did no better than random there" if below else
                 ", and every other method beat it"))
    fast = {m: max(e["speedup_measured"] for e in sweep if e["method"] == m) for m in methods}
    saving = [m for m in methods if any(e["saves_time"] for e in sweep if e["method"] == m)]
    s += (f". Measured speedup at batch {sweep[0]['latency_batch']}: "
          + ", ".join(f"{m} up to {v:.2f}×" for m, v in fast.items())
          + ("; only " + ", ".join(saving) + " saved time" if saving else "; no method saved time"))
    return s + "."


def sweep_markdown(results: dict) -> str:
    s = f_sweep(results)
    return md_escape(s) if s else "No sweep in this run (prune.amounts is null), so there are no trade-off curves."


def _references(results: dict, axes, tops: list[float]) -> None:
    """The dense model and the dense control as horizontal lines; their accuracies join `tops`."""
    dense = states.metrics(results, "trained").get("test_accuracy")
    control = states.metrics(results, "control").get("test_accuracy")
    for ax in axes:
        if dense is not None:
            ax.axhline(100 * dense, color="black", lw=1.2, label=f"dense model ({pct(dense)})")
            tops.append(100 * dense)
        if control is not None:
            ax.axhline(100 * control, color=states.CONTROL.color, lw=1.4, ls=":",
                       label=f"{states.CONTROL.long_label} ({pct(control)})")
            tops.append(100 * control)
        ax.set_ylim(0, min(100, max(tops) + 8))


def plot_tradeoff(results: dict) -> Figure:
    """The sweep's trade-off curves: test accuracy (%) against sparsity (% of the targeted weights
    zero or removed) and against the measured CPU speedup over the dense model, one colour per
    method; solid = after retraining, dashed = before; random pruning (grey) shaded below as the
    floor; the dense model and the dense control as horizontal reference lines."""
    sweep = _sweep(results)
    if not sweep:
        return placeholder("No sweep in this run (prune.amounts is null): no trade-off curves.")
    fig, (ax_s, ax_t) = figure(2, size=(12, 4.6))
    methods = list(dict.fromkeys(e["method"] for e in sweep))
    rand = floor_method()
    tops = []
    for m in methods:
        points = sorted((e for e in sweep if e["method"] == m), key=lambda e: e["sparsity"])
        color, marker = method_style(m)
        before = [100 * e["test_accuracy_before"] for e in points]
        after = [np.nan if e.get("test_accuracy_after") is None else 100 * e["test_accuracy_after"] for e in points]
        tops += before + [a for a in after if not np.isnan(a)]
        name = literal(m) + (" (random: the floor)" if m == rand else "")
        for ax, x in ((ax_s, [100 * e["sparsity"] for e in points]), (ax_t, [e["speedup_measured"] for e in points])):
            if not np.all(np.isnan(after)):
                ax.plot(x, after, marker=marker, ls="-", color=color, lw=1.8, label=f"{name}: after retraining")
            ax.plot(x, before, marker=marker, ls="--", color=color, lw=1.2, alpha=0.75, mfc="none",
                    label=f"{name}: before retraining")
        if m == rand:
            floor = [a if not np.isnan(a) else b for a, b in zip(after, before)]
            ax_s.fill_between([100 * e["sparsity"] for e in points], 0, floor, color=color, alpha=0.12,
                              lw=0, label="at or below random pruning")
    _references(results, (ax_s, ax_t), tops)
    ax_t.axvline(1.0, color="dimgray", ls="-.", lw=1, label="no speedup (1×)")
    ax_t.set_xscale("log", base=2)  # masked methods sit at 1×, channel pruning spreads over octaves
    ax_t.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    batch, threads = sweep[0]["latency_batch"], sweep[0].get("latency_threads")
    label(ax_s, "sparsity: targeted weights zero or removed (% of the dense model's)", "test accuracy (%)",
          "Accuracy vs sparsity")
    device = sweep[0]["latency_device"]
    ax_s.set_xlim(0, 100)
    ax_t.set_xlim(left=min(0.9, 0.95 * min(e["speedup_measured"] for e in sweep)))
    label(ax_t, f"measured {device.upper() if device == 'cpu' else device} speedup over the dense model, batch {batch}"
          + (f", {threads} threads" if threads else "") + " (×, log scale)", "test accuracy (%)",
          "Accuracy vs measured speedup")
    handles = {}
    for ax in (ax_s, ax_t):
        for h, l in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(l, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=3, fontsize=8)
    return fig
