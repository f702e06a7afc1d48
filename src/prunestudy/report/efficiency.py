"""What pruning saves: parameters, MACs, bytes on disk and measured time, per model state."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import efficiency, states
from .common import MB
from .style import md_escape

COSTED = (states.PRUNED, states.RETRAINED)   # the states whose efficiency a run measures


def dense_reference(results: dict) -> dict | None:
    """The efficiency summary whose dense half is the trained model's: the pruned model's (both timed
    in the same interleaved run), else the retrained one's."""
    return (states.metrics(results, "pruned").get("efficiency")
            or states.metrics(results, "retrained").get("efficiency"))


def remark(eff: dict) -> str:
    """The 'saves time?' sentence of an efficiency summary. A summary measured before verdicts needed
    an interval (no `speedup_ci`: a fixed timing order and a fixed threshold) gets no verdict."""
    if "speedup_ci" in eff:
        return eff["remark"]
    s = (f"not judged: measured {eff['measured_speedup']:.2f}x the dense model's speed, a ratio of medians timed in "
         "a fixed order without an interval (this run was measured before verdicts needed one), so no verdict.")
    return s + (" " + efficiency.same_shape_note(eff["theoretical_speedup"]) if eff["macs"] == eff["dense_macs"]
                else "")


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
    largest = eff.get("verdict_batch") or max((r["batch"] for t in eff.get("latency", {}).values()
                                               for r in t["rows"]), default=None)
    low, high = eff.get("speedup_ci") or (None, None)
    speedup = f"measured speedup, batch {largest} (×)" if largest else "measured speedup (×; not timed)"
    row[speedup] = 1.0 if dense else eff["measured_speedup"]
    row["speedup 95% CI (×)"] = "" if dense else ("—" if low is None else f"{low:.2f}–{high:.2f}")
    row["saves time"] = "reference" if dense else ("not timed yet" if efficiency.is_pending(eff) else
                                                   "not judged" if "speedup_ci" not in eff else
                                                   "yes" if eff["saves_time"] else "NO")
    return row


def efficiency_table(results: dict) -> pd.DataFrame:
    """What each model state costs, measured in this run: parameters (total, nonzero, % zero or
    removed), MACs per image (run by dense kernels, and nonzero only), theoretical speedup, bytes
    on disk (plain state_dict, with masks, sparse + zlib), median CPU (and CUDA) latency per batch
    and the measured speedup against the dense model, and whether time is saved. The dense row
    comes from the pruned model's measurement (both timed in the same interleaved run)."""
    rows = {}
    base = dense_reference(results)
    if base:
        rows[f"{states.TRAINED.label} (dense)"] = _eff_row(base, "dense")
    for s in COSTED:
        eff = states.metrics(results, s.key).get("efficiency")
        if eff:
            rows[s.label] = _eff_row(eff, "pruned")
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "model state"
    return df


def efficiency_styler(results: dict):
    """``efficiency_table`` formatted for display."""
    df = efficiency_table(results)
    fmt = {c: "{:,.0f}" for c in df.columns if c.startswith("params")}
    fmt.update({c: "{:.2f}" for c in df.columns if df[c].dtype.kind == "f" and c not in fmt})
    effs = [states.metrics(results, s.key).get("efficiency") or {} for s in COSTED]
    where = timed_where(results)
    if any(efficiency.timed(e) for e in effs):
        latency = ("Latency: median of interleaved runs in random order "
                   f"{'on ' + where if where else 'on this machine'} (masks folded, as deployed; "
                   f"{_formats(results)}; {_allocators(results)}). Measured speedup: the "
                   "geometric mean of the paired ratios dense time / pruned time, one per run, with its 95% "
                   "Student-t interval; "
                   f"'saves time' only when that interval lies above {efficiency.MIN_SPEEDUP:.2f}×. ")
    elif any(efficiency.is_pending(e) for e in effs):
        latency = ("Latency: not timed yet; the timing stage measures it on the machine of the run that reads these "
                   "models (the analysis runs it), so that a time taken on one machine is never shown for another. ")
    else:
        latency = ("Latency: not timed; the pruned models run the dense model's computation (masked weights, folded "
                   "as deployed, are multiplied by the same dense kernels), so their speed is the dense model's: "
                   "1.00×. ")
    return (df.style.format(fmt, na_rep="—")
            .set_caption(latency +
                         "MMACs: multiply-accumulates of the conv and linear layers per image. Sizes in MB of "
                         "10^6 bytes; 'sparse + zlib' is a size estimate (nonzero values + bitmask, zlib), not a "
                         "format any runtime loads."))


def _ms(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def time_cell(eff: dict | None, which: str, point: tuple[str, int] | None) -> str | float:
    """The summary's time cell at `point` (device, batch) of an efficiency summary: the dense model's
    median ('dense': '54.2 ms'), or the pruned model's beside the dense one of the same interleaved
    run with the speedup and its interval ('54.2 vs 5.7 ms, 9.50x [0.59, 52.80]'). A speedup is never
    shown without its interval (one repeat: the medians only); NaN (shown '—') without a timing."""
    rows = ((eff or {}).get("latency") or {}).get(point[0], {}).get("rows", []) if point else []
    at = {r["model"]: r for r in rows if r["batch"] == point[1]}
    if "dense" not in at or (which != "dense" and "pruned" not in at):
        return np.nan
    if which == "dense":
        return f"{_ms(at['dense']['median_ms'])} ms"
    r = at["pruned"]
    lo, hi = r.get("speedup_ci_low"), r.get("speedup_ci_high")
    return (f"{_ms(at['dense']['median_ms'])} vs {_ms(r['median_ms'])} ms"
            + (f", {r['speedup_vs_dense']:.2f}× [{lo:.2f}, {hi:.2f}]" if lo is not None else " (no interval)"))


def time_column(results: dict, index, point: tuple[str, int] | None) -> list:
    """The summary's time cells of the rows `index` (model states' long labels): the trained model
    is the dense reference, the pruned and retrained models are set against it; others NaN."""
    cells = {states.TRAINED.long_label: time_cell(dense_reference(results), "dense", point)}
    for s in COSTED:
        cells[s.long_label] = time_cell(states.metrics(results, s.key).get("efficiency"), "pruned", point)
    return [cells.get(label, np.nan) for label in index]


def time_note(results: dict, point: tuple[str, int] | None) -> str:
    """The summary caption's words on its time cells: what the figures are and where the paired
    repeats behind them are kept ('repeats not stored' for a run timed before they were kept); for
    a run whose timing stage has not run, that it has not."""
    if not point:
        pending = efficiency.is_pending(dense_reference(results))
        return "Latency: not timed yet (the timing stage measures it, within the analysis). " if pending else ""
    return (f"A pruned row gives the dense model's median vs its own, then the speedup (geometric mean of the "
            f"paired ratios dense / pruned, one per repeat) and its {efficiency.CONFIDENCE:.0%} Student-t interval "
            f"[low, high] at batch {point[1]}; {repeats_kept(results)}. ")


def repeats_kept(results: dict) -> str:
    """Where the paired repeats behind a run's latencies are kept, or that they are not (a run timed
    before the timing stage kept them: its figures cannot be recomputed)."""
    times = (results.get("timing") or {}).get("times")
    return (f"every paired repeat behind them is kept in {times} (docs/results.md recomputes them)" if times else
            "repeats not stored (timed before runs kept them), so these figures cannot be recomputed")


def timed_where(results: dict) -> str | None:
    """'AMD EPYC 9B14 (avx512 kernels, 2 threads) on 2026-12-07 18:02': the machine and the time the
    timing stage measured this run's latencies at, or None when it measured nothing."""
    t = results.get("timing") or {}
    m = t.get("machine") or {}
    if not m:
        return None
    gpus = f", {', '.join(m['gpus'])}" if m.get("gpus") else ""
    when = (t.get("measured") or "")[:16].replace("T", " ")
    where = f"{m.get('cpu')} ({m.get('isa')} kernels, {m.get('threads')} threads{gpus})"
    return where + (f" on {when}" if when else "")


FORMAT_TEXT = {"channels_last": "channels-last (NHWC) tensors", "contiguous": "NCHW tensors"}


def _formats(results: dict) -> str:
    """The memory formats the latencies were timed in (tables from before it was recorded: NCHW)."""
    found = {t.get("memory_format", "contiguous") for s in COSTED
             for t in (states.metrics(results, s.key).get("efficiency") or {}).get("latency", {}).values()}
    return ", ".join(FORMAT_TEXT.get(f, f) for f in sorted(found)) or FORMAT_TEXT[efficiency.MEMORY_FORMAT]


def _allocators(results: dict) -> str:
    """The malloc settings the latencies were timed under (tables from before they were recorded:
    glibc's defaults)."""
    found = {t.get("allocator", "default") for s in COSTED
             for t in (states.metrics(results, s.key).get("efficiency") or {}).get("latency", {}).values()}
    return ", ".join("glibc's default malloc" if a == "default" else f"malloc with GLIBC_TUNABLES={a}"
                     for a in sorted(found)) or "glibc's default malloc"


def efficiency_markdown(results: dict) -> str:
    """Plain sentences: does the pruned (and retrained) model save time, and why not when it does not."""
    lines = []
    for s in COSTED:
        eff = states.metrics(results, s.key).get("efficiency")
        if not eff:
            continue
        timed = (f" Not timed again: retraining held the masks, so it runs the same computation as "
                 f"{md_escape(eff['latency_from'])}; its latency is that one's."
                 if eff.get("latency_from") and efficiency.timed(eff) else "")
        lines.append(f"- **{s.label}**: {md_escape(remark(eff))}{timed} On disk: "
                     f"{eff['state_dict_bytes'] / MB:.2f} MB as a plain state_dict "
                     f"(dense model {eff['dense_state_dict_bytes'] / MB:.2f} MB), "
                     f"{eff['sparse_compressed_bytes'] / MB:.2f} MB stored sparse and compressed.")
    where = timed_where(results)
    if lines and where:
        lines.append(f"- **Where and when**: the latencies were timed on {md_escape(where)}, by the timing stage: "
                     "a run on another machine (or `prunestudy run --force timing`) times them again, and never "
                     f"recomputes the models; {md_escape(repeats_kept(results))}.")
    return "\n".join(lines) or "No efficiency figures: the prune stage has not run in this run folder."


def f_efficiency(results: dict) -> str | None:
    """The findings' sentence on what the pruned model saves."""
    prune = states.metrics(results, "pruned")
    eff = prune.get("efficiency")
    if not eff:
        return None
    method = prune.get("method", "the pruning")
    s = (f"Efficiency of {method}: {remark(eff)} Nonzero MACs per image fell from {eff['dense_macs'] / 1e6:.1f} M "
         f"to {eff['effective_macs'] / 1e6:.1f} M (theoretical {eff['theoretical_speedup']:.2f}×), while the kernels "
         f"still run {eff['macs'] / 1e6:.1f} M")
    return s + "."
