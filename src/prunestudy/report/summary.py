"""The first screen: the title, the summary table (one row per model state, sweep point and seed
report figure) and the test-accuracy bars beside the seed report."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .. import states
from . import reference
from .common import MB, binomial_se, count, pct, test_size
from .efficiency import dense_reference
from .style import SEED_EDGE, SEED_HATCH, bar_values, figure, label, legend_outside, md_escape

ACC, LOSS, SPARSITY, NONZERO, TOTAL = ("test accuracy (%)", "test loss (mean per sample)", "global sparsity (%)",
                                       "nonzero params", "total params")
SIZE, LATENCY = "size (MB, state_dict)", "latency (ms)"
SUMMARY_COLUMNS = [ACC, LOSS, SPARSITY, NONZERO, TOTAL, SIZE, LATENCY]
CONTROL_LABEL = states.CONTROL.long_label   # the dense control's row


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
    rows = {s.long_label: _summary_row(m) for s in states.ALL if (m := states.metrics(results, s.key))}
    base = dense_reference(results)
    point = latency_point(base)
    if base and states.TRAINED.long_label in rows:
        rows[states.TRAINED.long_label].update(_cost(base, "dense", point))
    for s in (states.PRUNED, states.RETRAINED):
        if s.long_label in rows and states.metrics(results, s.key).get("efficiency"):
            rows[s.long_label].update(_cost(states.metrics(results, s.key)["efficiency"], "pruned", point))
    rows.update(_sweep_rows(results))
    for state, acc in reference.accuracies().items():
        rows[f"seed report: {state}"] = {ACC: 100 * acc}
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
            .set_caption(where + reference.seed_report()["note"]))


def title_markdown(results: dict) -> str:
    """A heading naming the model, the pruning and the run's parameter hash."""
    model = states.metrics(results, "trained").get("model", "model")
    prune = states.metrics(results, "pruned")
    what = (f"{prune.get('method', 'pruning')} at {pct(prune['amount'], 0)}" if prune.get("amount") is not None
            else "pruning not run")
    if (prune.get("rounds") or 1) > 1:
        what += f" in {prune['rounds']} rounds"
    if prune.get("rewind"):
        what += f", rewound to step {prune['rewind']['step']}"
    if results.get("sweep"):
        what += f"; sweep of {len(results['sweep'])} points"
    h = results.get("params_hash")
    return (f"# Pruning study: {md_escape(model)}, {md_escape(what)}\n\n"
            + stale_warning(results)
            + (f"Run parameters hash {md_escape(h)}. " if h else "")
            + md_escape(f"Seed report for comparison: {reference.seed_report()['source']}."))


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
    """Test accuracy of this run's model states (and the dense control, when it ran) beside the seed
    report's 71% / 70% (hatched grey bars)."""
    ours = [(s, m["test_accuracy"]) for s in states.ALL
            if (m := states.metrics(results, s.key)).get("test_accuracy") is not None]
    seed = reference.accuracies()
    n = test_size(results)
    fig, (ax,) = figure()
    x = np.arange(len(ours), dtype=float)
    if ours:
        bars = ax.bar(x, [100 * a for _, a in ours], color=[s.color for s, _ in ours], width=0.7,
                      yerr=[100 * binomial_se(a, n) for _, a in ours] if n else None, capsize=4, ecolor="black")
        bar_values(ax, bars, "%.1f%%")
    seed_x = np.arange(len(seed)) + len(ours) + 0.5
    seed_bars = ax.bar(seed_x, [100 * a for a in seed.values()], width=0.7, color=states.SEED_REPORT_COLOR,
                       hatch=SEED_HATCH, edgecolor=SEED_EDGE)
    bar_values(ax, seed_bars, "%.0f%%")
    ax.set_xticks(np.concatenate([x, seed_x]), [s.tick_label for s, _ in ours]
                  + [f"seed report:\n{s}" for s in seed])
    ax.set_ylim(0, min(100, max([100 * a for a in seed.values()] + [100 * a for _, a in ours]) + 15))
    handles = [Patch(color=s.color, label=f"this run: {s.long_label}") for s, _ in ours]
    dataset = reference.seed_report()["settings"]["dataset"]
    handles.append(Patch(facecolor=states.SEED_REPORT_COLOR, hatch=SEED_HATCH, edgecolor=SEED_EDGE,
                         label=f"seed report ({dataset}; retraining not reported)"))
    if n:
        handles.append(Line2D([], [], color="black", marker="_", ls="none", ms=10,
                              label=f"±1 binomial SE ({count(n)} test crops)"))
    legend_outside(ax, handles=handles)
    label(ax, "model state", "test accuracy (%)", "Test accuracy: this run beside the seed report")
    return fig
