"""A run's curve (prune.amounts x prune.methods): one row per (method, amount) point, its findings
sentence and the trade-off plots (accuracy against sparsity and against measured speedup). Method
colours, markers and the floor (random pruning) come from the method registry."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .. import config, efficiency, states
from .common import MB, p_cell, pct, pvalue, signed
from .style import figure, floor_method, label, literal, md_escape, method_style, placeholder


def _points(results: dict) -> list[dict]:
    return [e for e in results.get("curve") or [] if e.get("test_accuracy_before") is not None]


def _pct(v) -> float:
    return np.nan if v is None else 100 * v


def _latest(e: dict) -> str:
    """'after' where the point was retrained, else 'before'."""
    return "after" if e.get("test_accuracy_after") is not None else "before"


def curve_table(results: dict) -> pd.DataFrame:
    """One row per curve point: method, amount and sparsity (%), test accuracy, balanced accuracy and
    macro-F1 (%) before and after retraining; the paired change against the dense (trained) model
    after retraining (before, where not retrained) with its 95% interval and the exact McNemar
    p-value Holm-corrected over the curve points, and its verdict at 5%; measured speedup with its
    interval, theoretical speedup, latency, sizes."""
    rows = []
    timing = _timing(results)
    for e in _points(results):
        when = _latest(e)
        c = e.get(f"paired_{when}")
        low, high = e.get("speedup_ci") or (None, None)
        rows.append({"method": e["method"], "amount (%)": 100 * e["amount"], "sparsity (%)": 100 * e["sparsity"],
                     "accuracy before retraining (%)": 100 * e["test_accuracy_before"],
                     "accuracy after retraining (%)": _pct(e.get("test_accuracy_after")),
                     "balanced accuracy before (%)": _pct(e.get("balanced_accuracy_before")),
                     "balanced accuracy after (%)": _pct(e.get("balanced_accuracy_after")),
                     "macro-F1 after (%)": _pct(e.get("macro_f1_after")),
                     "vs dense (points)": np.nan if c is None else 100 * c["change"],
                     "vs dense: 95% CI": "—" if c is None else f"{signed(100 * c['ci_low'])} to "
                                                             f"{signed(100 * c['ci_high'])}",
                     "vs dense: p (Holm)": np.nan if c is None else c["p_holm"],
                     "vs dense: verdict": "—" if c is None else f"{c['verdict']} ({when} retraining)",
                     f"latency, batch {timing[1]} (ms)" if timing else "latency (ms)": e["latency_ms"],
                     "measured speedup (×)": e["speedup_measured"],
                     "speedup 95% CI (×)": "—" if low is None else f"{low:.2f}–{high:.2f}",
                     "theoretical speedup (×)": e["speedup_theoretical"],
                     "sparse + zlib (MB)": e["sizes"]["sparse_compressed_bytes"] / MB,
                     "saves time": _saves(e)})
    return pd.DataFrame(rows)


def curve_styler(results: dict):
    df = curve_table(results)
    if df.empty:
        return df
    fmt = {c: "{:.2f}" for c in df.columns if df[c].dtype.kind == "f"}
    fmt["vs dense: p (Holm)"] = p_cell
    return (df.style.format(fmt, na_rep="—").hide(axis="index")
            .set_caption("vs dense: the paired change of test accuracy against the trained (dense) model on the "
                         "same test crops, after retraining where the point was retrained; exact McNemar p-value "
                         "Holm-corrected over the curve points, verdict at 5% ('too few changes': the crops that "
                         "changed answer could not reach 5% whichever way they went). Speedup: geometric mean of "
                         f"paired timing ratios with its 95% interval; 'saves time' only when it lies above "
                         f"{efficiency.MIN_SPEEDUP:.2f}×; masked points run the dense computation and are not "
                         "timed (1.00×, no latency)."))


def _saves(e: dict) -> str:
    """'yes' / 'NO' from the point's interval verdict ('NO' too for a model of the dense computation,
    not timed); 'not judged' where it was measured without an interval."""
    if e.get("timed") is False:
        return "NO"
    return "not judged" if e.get("speedup_ci") is None else ("yes" if e["saves_time"] else "NO")


def _timing(results: dict) -> tuple[str, int, int | None] | None:
    """(device, batch, threads) of the curve's latency measurements: those of its first timed point;
    None when no point was timed (every one of the dense computation: masked methods)."""
    e = next((e for e in _points(results) if e.get("timed", True)), None)
    return (e["latency_device"], e["latency_batch"], e.get("latency_threads")) if e else None


def f_curve(results: dict) -> str | None:
    """The findings' sentence on the curve: accuracy at the largest amount against the dense model and
    against the floor (random pruning), each a paired test Holm-corrected over the curve, and speed."""
    curve = _points(results)
    if not curve:
        return None
    methods = list(dict.fromkeys(e["method"] for e in curve))
    top = max(e["amount"] for e in curve)
    at_top = {e["method"]: e for e in curve if e["amount"] == top}
    stage = "after" if all(e.get("test_accuracy_after") is not None for e in at_top.values()) else "before"
    acc = {m: e[f"test_accuracy_{stage}"] for m, e in at_top.items()}

    def vs_dense(m: str) -> str:
        c = at_top[m].get(f"paired_{stage}")
        if at_floor(at_top[m], stage):
            return f"; {at_floor_text(results)}"
        return "" if c is None else f"; {signed(100 * c['change'])} points against the dense model, {_short(c)}"
    parts = "; ".join(f"{m} {pct(a)} (sparsity {pct(at_top[m]['sparsity'], 0)}{vs_dense(m)})" for m, a in acc.items())
    n_amounts = len({e["amount"] for e in curve})
    s = (f"On the curve ({len(methods)} method{'s' * (len(methods) != 1)} × {n_amounts} "
         f"amount{'s' * (n_amounts != 1)}), at the largest "
         f"amount ({pct(top, 0)}) test accuracy {stage} retraining was: {parts}")
    rand = floor_method()
    if rand in acc and at_floor(at_top[rand], stage):
        s += (f". Random pruning scored {pct(acc[rand])} there ({at_floor_text(results)}), so it is no floor for "
              "the other methods and none is compared against it")
    elif rand in acc:
        s += f". Random pruning, the floor, scored {pct(acc[rand])} there"
        against = []
        for m in acc:
            c = at_top[m].get(f"vs_floor_{stage}")
            if m == rand or c is None or at_floor(at_top[m], stage):
                continue
            sparsity = (f" at {pct(at_top[m]['sparsity'], 0)} sparsity against random's "
                        f"{pct(at_top[rand]['sparsity'], 0)}"
                        if abs(at_top[m]["sparsity"] - at_top[rand]["sparsity"]) > 0.01 else "")
            against.append(f"{m} {signed(100 * c['change'])} points{sparsity} ({_short(c)})"
                           + ("" if c["verdict"] == "gain" else ": not shown to beat random"))
        if against:
            s += "; against it, paired on the same crops: " + "; ".join(against)
    fast = {m: max(e["speedup_measured"] for e in curve if e["method"] == m) for m in methods}
    saving = [m for m in methods if any(_saves(e) == "yes" for e in curve if e["method"] == m)]
    timing = _timing(results)
    s += ((f". Measured speedup at batch {timing[1]}: " if timing else
           ". Speedup: none timed, every point runs the dense model's computation (masked weights on dense kernels): ")
          + ", ".join(f"{m} 1.00× (not timed: the dense computation)" if not any(
              e.get("timed", True) for e in curve if e["method"] == m) else f"{m} up to {v:.2f}×"
              for m, v in fast.items())
          + ("; no method was shown to save time" if not saving else
             f"; {'only ' * (len(saving) < len(methods))}{', '.join(saving)} saved time (speedup interval above "
             f"{efficiency.MIN_SPEEDUP:.2f}×)"))
    return s + "."


def at_floor(e: dict, when: str) -> bool:
    """Whether a curve point's model (before or after retraining) is at the majority-class floor or
    collapsed onto one class (results.json's floor_before / floor_after), judged like a run's states."""
    f = e.get(f"floor_{when}") or {}
    return bool(f.get("at_floor") or f.get("collapsed"))


def at_floor_text(results: dict) -> str:
    """'not above the majority-class floor of 15.1%: nothing can be concluded from it'."""
    share = (results.get("floor") or {}).get("share")
    floor = f" of {pct(share)}" if share is not None else ""
    return f"not above the majority-class floor{floor}: nothing can be concluded from it"


def _short(c: dict) -> str:
    """A curve comparison's verdict in a few words: 'a significant drop, p < 0.001 after Holm'."""
    if c["verdict"] == "too few changes":
        return f"only {c['gains'] + c['losses']} crops changed: too few for a verdict"
    p = pvalue(c["p_holm"]) + f" after Holm's correction over {c['family']} curve points"
    return f"a significant {c['verdict']}, {p}" if c["verdict"] in ("drop", "gain") else f"no significant change, {p}"


def curve_markdown(results: dict) -> str:
    s = f_curve(results)
    if not s:
        return "No curve in this run (prune.amounts is null), so there are no trade-off curves."
    return md_escape(s) + one_seed_note(results)


def one_seed_note(results: dict) -> str:
    """What the curve of a run with `seeds` repeats does not show: the repeats do not repeat it."""
    others = [r["seed"] for r in results.get("repeats") or []]
    if not others:
        return ""
    seed = (results.get("params") or {}).get("seed")
    return (f"\n\nThe curve ran on the study's seed ({md_escape(seed)}) only: the repeats (seed"
            f"{'s' * (len(others) > 1)} {', '.join(md_escape(s) for s in others)}) do not repeat it, so its points "
            f"have no spread over seeds. For means and 95% bands over seeds, {config.SWEEP_SEEDS_HINT}.")


def _references(results: dict, axes, tops: list[float], key: str = "test_accuracy") -> None:
    """The dense model and the dense control as horizontal lines (their `key`: test_accuracy or
    balanced_accuracy); their values join `tops`."""
    dense = states.metrics(results, "trained").get(key)
    control = states.metrics(results, "control").get(key)
    what = "" if key == "test_accuracy" else ", balanced"
    for ax in axes:
        if dense is not None:
            ax.axhline(100 * dense, color="black", lw=1.2, label=f"dense model{what} ({pct(dense)})")
            tops.append(100 * dense)
        if control is not None:
            ax.axhline(100 * control, color=states.CONTROL.color, lw=1.4, ls=":",
                       label=f"{states.CONTROL.long_label}{what} ({pct(control)})")
            tops.append(100 * control)
        ax.set_ylim(0, min(100, max(tops) + 8))


def _curves(ax, points: list[dict], x: list[float], key: str, style: tuple[str, str], name: str) -> list[float]:
    """One method's curves of `key` (test_accuracy, balanced_accuracy) in %: solid after retraining,
    dashed before; returns the values drawn."""
    color, marker = style
    before = [np.nan if e.get(f"{key}_before") is None else 100 * e[f"{key}_before"] for e in points]
    after = [np.nan if e.get(f"{key}_after") is None else 100 * e[f"{key}_after"] for e in points]
    if not np.all(np.isnan(after)):
        ax.plot(x, after, marker=marker, ls="-", color=color, lw=1.8, label=f"{name}: after retraining")
    if not np.all(np.isnan(before)):
        ax.plot(x, before, marker=marker, ls="--", color=color, lw=1.2, alpha=0.75, mfc="none",
                label=f"{name}: before retraining")
    return [v for v in before + after if not np.isnan(v)]


def plot_tradeoff(results: dict) -> Figure:
    """The curve's trade-off plots: test accuracy (%) against sparsity (% of the targeted weights
    zero or removed), balanced accuracy against sparsity, and test accuracy against the measured
    CPU speedup over the dense model, one colour per method; solid = after retraining, dashed =
    before; random pruning (grey) shaded below as the floor; the dense model and the dense control
    as horizontal reference lines."""
    curve = _points(results)
    if not curve:
        return placeholder("No curve in this run (prune.amounts is null): no trade-off curves.")
    fig, (ax_s, ax_b, ax_t) = figure(3, size=(16, 4.6))
    methods = list(dict.fromkeys(e["method"] for e in curve))
    rand = floor_method()
    tops, tops_b = [], []
    for m in methods:
        points = sorted((e for e in curve if e["method"] == m), key=lambda e: e["sparsity"])
        name = literal(m) + (" (random: the floor)" if m == rand else "")
        sparsity = [100 * e["sparsity"] for e in points]
        tops += _curves(ax_s, points, sparsity, "test_accuracy", method_style(m), name)
        tops_b += _curves(ax_b, points, sparsity, "balanced_accuracy", method_style(m), name)
        _curves(ax_t, points, [e["speedup_measured"] for e in points], "test_accuracy", method_style(m), name)
        if m == rand:
            floor = [100 * e["test_accuracy_after" if e.get("test_accuracy_after") is not None else
                           "test_accuracy_before"] for e in points]
            ax_s.fill_between(sparsity, 0, floor, color=method_style(m)[0], alpha=0.12, lw=0,
                              label="at or below random pruning")
    _references(results, (ax_s, ax_t), tops)
    _references(results, (ax_b,), tops_b or [0.0], "balanced_accuracy")
    ax_t.axvline(1.0, color="dimgray", ls="-.", lw=1, label="no speedup (1×)")
    ax_t.set_xscale("log", base=2)  # masked methods sit at 1×, channel pruning spreads over octaves
    ax_t.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    device, batch, threads = _timing(results) or (None, None, None)
    for ax, what, title in ((ax_s, "test accuracy (%)", "Accuracy vs sparsity"),
                            (ax_b, "balanced accuracy (%, mean per-class recall)", "Balanced accuracy vs sparsity")):
        label(ax, "sparsity: targeted weights zero or removed (% of the dense model's)", what, title)
        ax.set_xlim(0, 100)
    ax_t.set_xlim(left=min(0.9, 0.95 * min(e["speedup_measured"] for e in curve)))
    parts = [f"{device.upper() if device == 'cpu' else device}, batch {batch}"
             + (f", {threads} threads" if threads else "")] if device else []
    if any(e.get("timed") is False for e in curve):
        parts.append("masked points at 1×, not timed")
    where = "; ".join(parts)
    label(ax_t, f"measured speedup over the dense model (×, log scale)\n{where}", "test accuracy (%)",
          "Accuracy vs measured speedup")
    handles = {}
    for ax in (ax_s, ax_b, ax_t):
        for h, l in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(l, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=3, fontsize=8)
    return fig
