"""The first screen: the title, the verdict (what pruning cost and bought, or that nothing can be
concluded at the majority-class floor: report/verdict.py) and the data named; the summary table
(one row per model state and curve point, the majority floor, and the seed report's figures where
they are comparable, its notes folded away); and the test-accuracy bars."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .. import states
from . import glossary, reference
from .common import MB, binomial_se, count, pct, test_size
from .efficiency import dense_reference, time_column, time_note
from .style import SEED_EDGE, SEED_HATCH, bar_values, figure, label, legend_outside, literal, md_escape
from .verdict import verdict_markdown

ACC, LOSS, SPARSITY, NONZERO, TOTAL = ("test accuracy (%)", "test loss (mean per sample)", "global sparsity (%)",
                                       "nonzero params", "total params")
BALANCED, MACRO_F1 = "balanced accuracy (%)", "macro-F1 (%)"
SIZE, LATENCY = "size (MB, state_dict)", "latency (ms)"
SUMMARY_COLUMNS = [ACC, BALANCED, MACRO_F1, LOSS, SPARSITY, NONZERO, TOTAL, SIZE, LATENCY]
CONTROL_LABEL = states.CONTROL.long_label   # the dense control's row
SEED_ROW = "seed report (COCO 2017): {}"   # the seed report's rows, where they are comparable


def _summary_row(stage: dict) -> dict:
    def get(key, scale=1.0):
        v = stage.get(key)
        return np.nan if v is None else scale * float(v)
    return {ACC: get("test_accuracy", 100), BALANCED: get("balanced_accuracy", 100), MACRO_F1: get("macro_f1", 100),
            LOSS: get("test_loss"), SPARSITY: get("global_sparsity", 100),
            NONZERO: stage.get("params_nonzero"), TOTAL: stage.get("params_total")}


def floor_row(results: dict) -> tuple[str, dict] | None:
    """The majority floor as a summary row: always answering the commonest test class scores its
    share, a balanced accuracy of 1/K and a macro-F1 of 2s/(1+s)/K."""
    floor = results.get("floor")
    k = len((results.get("data") or {}).get("classes") or [])
    if not floor or not k:
        return None
    share = floor["share"]
    return (f"majority floor (always '{floor['class']}')",
            {ACC: 100 * share, BALANCED: 100 / k, MACRO_F1: 100 * 2 * share / (1 + share) / k})


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


def _curve_rows(results: dict) -> dict:
    """One summary row per curve point, after retraining where it was retrained (its latency was
    measured at another batch size: see the curve table)."""
    rows = {}
    for p in results.get("curve") or []:
        after = p.get("test_accuracy_after") is not None
        when = "after" if after else "before"
        acc, loss = p[f"test_accuracy_{when}"], p.get(f"test_loss_{when}")
        size = (p.get("sizes") or {}).get("state_dict_bytes")
        bal, f1 = p.get(f"balanced_accuracy_{when}"), p.get(f"macro_f1_{when}")
        rows[f"curve: {p['method']} {p['amount']:g} ({'retrained' if after else 'pruned, not retrained'})"] = {
            ACC: 100 * acc, BALANCED: np.nan if bal is None else 100 * bal,
            MACRO_F1: np.nan if f1 is None else 100 * f1,
            LOSS: np.nan if loss is None else loss, SPARSITY: 100 * p["sparsity"],
            NONZERO: p.get("params_nonzero"), TOTAL: p.get("params_total"),
            SIZE: np.nan if size is None else size / MB}
    return rows


def summary_table(results: dict) -> pd.DataFrame:
    """One row per model state of this run (trained / pruned / retrained, those present), the dense
    control beside the retrained model when it ran, each curve point, the majority floor, and the
    seed report's two rows only where this run is on COCO 2017 at its settings
    (``reference.data_source``; ``df.attrs['source']``). Accuracy, balanced accuracy, macro-F1 and
    sparsity in % (2 decimals), loss the true per-sample mean (4 decimals; NaN for the seed, whose
    loss is not comparable), parameter counts as integers, the state_dict's size in MB and the
    median latency measured in this run (device and batch in ``df.attrs['latency']``).
    Sparsity and nonzero count are NaN/NA where the stage did not measure them (the dense model);
    the dense control's size and latency are not measured (it is the trained architecture)."""
    rows = {s.long_label: _summary_row(m) for s in states.ALL if (m := states.metrics(results, s.key))}
    base = dense_reference(results)
    point = latency_point(base)
    if base and states.TRAINED.long_label in rows:
        rows[states.TRAINED.long_label].update(_cost(base, "dense", point))
    for s in (states.PRUNED, states.RETRAINED):
        if s.long_label in rows and states.metrics(results, s.key).get("efficiency"):
            rows[s.long_label].update(_cost(states.metrics(results, s.key)["efficiency"], "pruned", point))
    rows.update(_curve_rows(results))
    if (floor := floor_row(results)) is not None:
        rows[floor[0]] = floor[1]
    source = reference.data_source(results)
    if source["comparable"]:
        for state, acc in reference.accuracies().items():
            rows[SEED_ROW.format(state)] = {ACC: 100 * acc}
    df = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=SUMMARY_COLUMNS)
    df[[ACC, BALANCED, MACRO_F1, SPARSITY]] = df[[ACC, BALANCED, MACRO_F1, SPARSITY]].astype(float).round(2)
    df[LOSS] = df[LOSS].astype(float).round(4)
    df[[SIZE, LATENCY]] = df[[SIZE, LATENCY]].astype(float).round(3)
    df[[NONZERO, TOTAL]] = df[[NONZERO, TOTAL]].astype("Int64")
    df.index.name = "model state"
    df.attrs["latency"] = point
    df.attrs["source"] = source
    return df


def summary_styler(results: dict):
    """``summary_table`` formatted for display (thousands separators, '—' for not measured)."""
    df = summary_table(results)
    point = df.attrs.get("latency")
    where = (f"Latency: median time for a batch of {point[1]} on {point[0]} in this run (masks folded, as "
             "deployed); whether pruning saves time is judged at batch "
             f"{_verdict_batch(results) or point[1]} (efficiency section). ") if point else ""
    where += time_note(results, point)
    untimed = df[LATENCY].isna().all()
    if untimed and dense_reference(results) and not where:   # masked pruning: the dense computation, not timed
        where = ("No latency column: the study's pruned and retrained models run the dense model's computation "
                 "(masked weights on dense kernels), so they are not timed; their speed is the dense model's "
                 "(efficiency section). ")
    bal = ("Balanced accuracy: the mean of the per-class recalls; macro-F1: the mean of the per-class F1 "
           "(classes with test crops); accuracy stays the headline, comparable across seeds. ")
    seed = reference.seed_report()
    if df.attrs["source"]["comparable"]:
        half = 100 * reference.rounding() / 2
        seed_s = (f"The seed report's accuracies are rounded (its {pct(reference.accuracy('trained'), 0)} is "
                  f"{100 * reference.accuracy('trained') - half:.1f}–{100 * reference.accuracy('trained') + half:.1f}%)"
                  f"; read them against this run's majority floor. " + seed["note"])
    else:
        seed_s = (f"The seed report's {pct(reference.accuracy('trained'), 0)} / {pct(reference.accuracy('pruned'), 0)} "
                  f"({seed['settings']['dataset']} at its settings) is not set beside this run, which is on other "
                  "data (named above).")
    shown = df.assign(**{LATENCY: time_column(results, df.index, point)})
    return (shown.style.format({ACC: "{:.2f}", BALANCED: "{:.2f}", MACRO_F1: "{:.2f}", LOSS: "{:.4f}",
                                SPARSITY: "{:.2f}", NONZERO: "{:,}", TOTAL: "{:,}", SIZE: "{:.2f}"}, na_rep="—")
            .hide([LATENCY] if untimed else [], axis="columns")
            .set_caption(details("How to read this table", where + bal + seed_s
                                 + f" Seed report: {seed['source']}.")))


def details(summary: str, text: str) -> str:
    """A caption folded away: its summary line shows, the long text opens on a click (HTML-escaped)."""
    return f"<details><summary>{html.escape(summary)}</summary>{html.escape(text, quote=False)}</details>"


def _verdict_batch(results: dict) -> int | None:
    """The batch size 'saves time' is judged at: recorded, or (older runs) the largest measured."""
    eff = dense_reference(results) or {}
    return eff.get("verdict_batch") or max((r["batch"] for t in (eff.get("latency") or {}).values()
                                            for r in t["rows"]), default=None)


def data_line(results: dict) -> str:
    """The first screen's line naming the data (and whether the seed report is comparable)."""
    if not results.get("data"):
        return ""
    src = reference.data_source(results)
    tail = (" The seed report's figures stand beside this run's." if src["comparable"] else
            " The seed report (COCO 2017 at its settings) is a reference only.")
    return f"**Data:** {md_escape(src['text'])}.{md_escape(tail)}\n\n"


def title_markdown(results: dict) -> str:
    """The first screen above the table: a heading naming the model, the pruning and the run's
    parameter hash; a warning when the run folder mixes computations; the verdict (what pruning cost
    and bought, or that nothing can be concluded at the majority floor); the line naming the data."""
    model = states.metrics(results, "trained").get("model", "model")
    prune = states.metrics(results, "pruned")
    what = (f"{prune.get('method', 'pruning')} at {pct(prune['amount'], 0)}" if prune.get("amount") is not None
            else "pruning not run")
    if (prune.get("rounds") or 1) > 1:
        what += f" in {prune['rounds']} rounds"
    if prune.get("rewind"):
        what += f", rewound to step {prune['rewind']['step']}"
    if results.get("curve"):
        what += f"; curve of {len(results['curve'])} points"
    h = results.get("params_hash")
    run = f" (run {md_escape(h)})" if h else ""
    return (f"# Pruning study: {md_escape(model)}, {md_escape(what)}{run}\n\n"
            + stale_warning(results) + glossary.link(verdict_markdown(results)) + "\n" + data_line(results))


def stale_warning(results: dict) -> str:
    """A plain warning, first on the page, when the run folder's stages do not form one chain (a
    stage recomputed by a notebook after later stages used it, an output changed or missing)."""
    problems = results.get("chain") or []
    if not problems:
        return ""
    rows = "\n".join(f"- **{md_escape(stage)}**: {md_escape(why)}" for stage, why in problems)
    return ("> **Warning: this run folder mixes computations.** The figures below come from stages that "
            "were not all computed from one another, so they may contradict each other:\n>\n"
            + "\n".join(f"> {line}" for line in rows.splitlines())
            + "\n>\n> Rerun `prunestudy run` with the parameters you want: it recomputes exactly these stages "
              "and the ones after them.\n\n")


def plot_accuracy(results: dict) -> Figure:
    """Test accuracy of this run's model states (and the dense control, when it ran) with ±1
    binomial SE, the majority floor as a dashed line, and the seed report's 71% / 70% (hatched grey
    bars) only where this run is on COCO 2017 at its settings."""
    ours = [(s, m["test_accuracy"]) for s in states.ALL
            if (m := states.metrics(results, s.key)).get("test_accuracy") is not None]
    source = reference.data_source(results)
    seed = reference.accuracies() if source["comparable"] else {}
    n = test_size(results)
    fig, (ax,) = figure()
    x = np.arange(len(ours), dtype=float)
    if ours:
        bars = ax.bar(x, [100 * a for _, a in ours], color=[s.color for s, _ in ours], width=0.7,
                      yerr=[100 * binomial_se(a, n) for _, a in ours] if n else None, capsize=4, ecolor="black")
        bar_values(ax, bars, "%.1f%%")
    handles = [Patch(color=s.color, label=f"this run: {s.long_label}") for s, _ in ours]
    seed_x = np.arange(len(seed)) + len(ours) + 0.5
    if seed:
        seed_bars = ax.bar(seed_x, [100 * a for a in seed.values()], width=0.7, color=states.SEED_REPORT_COLOR,
                           hatch=SEED_HATCH, edgecolor=SEED_EDGE)
        bar_values(ax, seed_bars, "%.0f%%")
        handles.append(Patch(facecolor=states.SEED_REPORT_COLOR, hatch=SEED_HATCH, edgecolor=SEED_EDGE,
                             label="seed report (rounded to whole %; retraining not reported)"))
    ax.set_xticks(np.concatenate([x, seed_x]), [s.tick_label for s, _ in ours]
                  + [f"seed report:\n{s}" for s in seed])
    floor = results.get("floor")
    tops = [100 * a for a in seed.values()] + [100 * a for _, a in ours]
    if floor:
        ax.axhline(100 * floor["share"], color="black", ls="--", lw=1.2)
        handles.append(Line2D([], [], color="black", ls="--", lw=1.2,
                              label=f"majority floor: always '{literal(floor['class'])}' ({pct(floor['share'])})"))
        tops.append(100 * floor["share"])
    ax.set_ylim(0, min(100, max(tops or [0]) + 15))
    if n:
        handles.append(Line2D([], [], color="black", marker="_", ls="none", ms=10,
                              label=f"±1 binomial SE ({count(n)} test crops)"))
    legend_outside(ax, handles=handles)
    label(ax, "model state", "test accuracy (%)", "Test accuracy: this run beside the seed report" if seed else
          "Test accuracy of this run (the seed report, on other data, is not set beside it)")
    return fig
