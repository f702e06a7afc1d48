"""The grid report (notebooks/06_sweep.ipynb -> sweep.html): one row per point read from its own
results.json, the ShrinkBench / Blalock et al. columns, the mean and a 95% t-interval over seeds
per operating point, trade-off curves per method (random pruning as the floor, the dense model and
the dense control as references), links to every point's own report, sweep.csv and sweep.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .. import atomic, efficiency, metrics, paths, states
from .seeds import t_interval
from .style import figure, floor_method, label, legend_outside, literal, md_escape, method_style, placeholder

POINT_COLUMNS = ["point", "method", "amount", "seed", "sparsity", "compression_ratio", "theoretical_speedup",
                 "measured_speedup", "speedup_timed", "dense_accuracy", "accuracy_before", "accuracy_after",
                 "balanced_accuracy_after", "control_accuracy", "change_vs_dense", "change_vs_control", "floor_share",
                 "floor_class", "dense_at_floor", "before_at_floor", "after_at_floor", "finished", "report"]
# a state flagged by metrics.floor (not above the majority-class floor, or answering one class)
FLAGS = {"dense_at_floor": "trained", "before_at_floor": "pruned", "after_at_floor": "retrained"}
# the operating point's figures averaged over seeds (per method and amount, and any other grid key)
MEASURES = {"sparsity": "sparsity (%)", "compression_ratio": "compression ratio (x)",
            "theoretical_speedup": "theoretical speedup (x)", "measured_speedup": "measured speedup (x)",
            "accuracy_before": "acc. before retraining (%)", "accuracy_after": "acc. after retraining (%)",
            "balanced_accuracy_after": "balanced acc. after (%)", "change_vs_dense": "vs dense (points)",
            "change_vs_control": "vs dense control (points)"}
PERCENT = {"sparsity", "accuracy_before", "accuracy_after", "balanced_accuracy_after", "change_vs_dense",
           "change_vs_control"}


def grid_info(sweep_dir) -> dict:
    return atomic.read_json(Path(sweep_dir) / paths.SWEEP_GRID)


def _get(d: dict | None, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def point_row(sweep_dir: Path, row: dict) -> dict:
    """One point's figures from its results.json (None where a stage did not finish)."""
    folder = paths.point_dir(sweep_dir, row["name"])
    try:
        res = atomic.read_json(folder / paths.RESULTS)
    except (OSError, ValueError):
        res = {}
    pr, re_, tr = (states.metrics(res, k) for k in ("pruned", "retrained", "trained"))
    ctl = states.metrics(res, "control")
    eff = pr.get("efficiency") or {}
    dense, after = tr.get("test_accuracy"), re_.get("test_accuracy")
    finished = (folder / paths.REPORT).is_file() and paths.stage_record(folder, "analysis").is_file()
    params = res.get("params") or {}
    floor = res.get("floor") or {}
    flagged = metrics.flagged(floor)
    flags = {col: (state in flagged) if state in (floor.get("states") or {}) else None for col, state in FLAGS.items()}
    return {"point": row["name"], "method": _get(params, "prune", "method"), "amount": _get(params, "prune", "amount"),
            "seed": params.get("seed"), "values": row["values"],
            "sparsity": pr.get("global_sparsity"), "compression_ratio": eff.get("compression_ratio"),
            "theoretical_speedup": eff.get("theoretical_speedup"), "measured_speedup": eff.get("measured_speedup"),
            # False: the dense model's computation (masked), not timed, 1x by construction (efficiency.untimed)
            "speedup_timed": efficiency.timed(eff) if eff else None,
            "dense_accuracy": dense, "accuracy_before": pr.get("test_accuracy"), "accuracy_after": after,
            "balanced_accuracy_after": re_.get("balanced_accuracy"),
            "control_accuracy": ctl.get("test_accuracy"),
            "change_vs_dense": None if None in (after, dense) else after - dense,
            "change_vs_control": None if None in (after, ctl.get("test_accuracy")) else after - ctl["test_accuracy"],
            "floor_share": floor.get("share"), "floor_class": floor.get("class"), **flags,
            "finished": finished, "report": f"{paths.SWEEP_POINTS}/{row['name']}/{paths.REPORT}" if finished else None}


def grid_table(sweep_dir) -> pd.DataFrame:
    """One row per point of the grid (its grid values as columns too), in grid order."""
    info = grid_info(sweep_dir)
    rows = [point_row(Path(sweep_dir), r) for r in info["points"]]
    frame = pd.DataFrame(rows)
    keys = list(info["points"][0]["values"]) if info["points"] else []
    for k in keys:
        frame[k] = [r["values"].get(k) for r in rows]
    return frame.drop(columns=["values"])


def group_keys(table: pd.DataFrame) -> list[str]:
    """What an operating point is: every grid key but the seed (method and amount first)."""
    grid_cols = [c for c in table.columns if "." in c and c != "seed"]
    first = [c for c in ("prune.method", "prune.amount") if c in grid_cols]
    return first + [c for c in grid_cols if c not in first] or ["method", "amount"]


def operating_points(table: pd.DataFrame) -> pd.DataFrame:
    """Per operating point: the number of finished seeds, and for each measure the mean, the SD and
    a 95% t-interval over seeds (NaN where fewer than 2 seeds)."""
    keys = group_keys(table)
    done = table[table["accuracy_after"].notna()]
    rows = []
    for values, group in done.groupby(keys, sort=False, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        row = dict(zip(keys, values))
        row["seeds"] = len(group)
        for col in ("dense_at_floor", "after_at_floor"):
            row[col] = _flagged(group, col)
        # False: no seed's model was timed (the dense computation, 1x by construction); None: unknown
        timed = group["speedup_timed"].dropna() if "speedup_timed" in group else pd.Series(dtype=object)
        row["speedup_timed"] = bool(timed.any()) if len(timed) else None
        for m in MEASURES:
            x = pd.to_numeric(group[m], errors="coerce").dropna().to_numpy(float)
            if not len(x):
                continue
            mean, sd, lo, hi = t_interval(x) if len(x) > 1 else (float(x[0]), np.nan, np.nan, np.nan)
            row[m], row[f"{m}_sd"], row[f"{m}_lo"], row[f"{m}_hi"] = mean, sd, lo, hi
        rows.append(row)
    return pd.DataFrame(rows)


def grid_operating_styler(table: pd.DataFrame):
    """The operating points as a table: mean ± SD over seeds, in percent where a fraction."""
    ops = operating_points(table)
    if ops.empty:
        return pd.DataFrame({"note": ["no point has finished its retraining yet"]}).style.hide(axis="index")
    keys = group_keys(table)
    shown = ops[keys + ["seeds"]].copy()
    for k in keys:   # grid values as written (0.5, not 0.500000)
        shown[k] = [f"{v:g}" if isinstance(v, float) else str(v) for v in shown[k]]
    for m, name in MEASURES.items():
        if m not in ops:
            continue
        scale = 100 if m in PERCENT else 1
        digits = 1 if m in PERCENT else 2
        shown[name] = [("—" if pd.isna(v) else f"{scale * v:.{digits}f}"
                        + ("" if pd.isna(s) else f" ± {scale * s:.{digits}f}")) for v, s in zip(ops[m], ops[f"{m}_sd"])]
        if m == "measured_speedup":   # 1.00 by construction, not a measurement: say so
            shown[name] = [f"{v:.2f} (not timed)" if t is not None and not t else c
                           for v, t, c in zip(ops[m], ops["speedup_timed"], shown[name])]
    shown["at the majority floor"] = [_floor_cell(d, a, n) for d, a, n in
                                      zip(ops["dense_at_floor"], ops["after_at_floor"], ops["seeds"])]
    shown.columns = [literal(c) for c in shown.columns]
    return shown.style.hide(axis="index").set_caption(
        "Mean ± SD over seeds per operating point (points whose retraining finished). Accuracy in %, changes "
        "in percentage points (the point's retrained model against its own dense model and dense control, "
        "paired by seed). Compression ratio: dense parameters / nonzero parameters. Measured speedup: latency "
        "against the dense model on this machine; 'not timed': a masked model runs the dense model's "
        "computation (zeroed weights on dense kernels), so its speed is the dense model's. At the majority floor: "
        "seeds whose dense or retrained model is not above the majority-class floor or answers one class "
        "(each point's report says which); nothing about pruning can be read from those seeds.")


def _flagged(rows: pd.DataFrame, col: str) -> int:
    """How many rows have `col` True (None: the point's floor is unknown, not counted)."""
    return int((rows[col] == True).sum()) if col in rows else 0   # noqa: E712


def _floor_cell(dense: int, after: int, seeds: int) -> str:
    if not dense and not after:
        return "—"
    return ", ".join(f"{what} {n} of {seeds}" for what, n in (("dense", dense), ("retrained", after)) if n)


def floor_markdown(table: pd.DataFrame) -> str:
    """The first warning of the grid report: finished points whose dense or retrained model sits at
    the majority-class floor (or answers one class): their accuracies say nothing about pruning."""
    done = table[table["finished"]] if len(table) else table
    if not len(done) or "dense_at_floor" not in done:
        return ""
    dense, after = _flagged(done, "dense_at_floor"), _flagged(done, "after_at_floor")
    if not dense and not after:
        return ""
    shares = done["floor_share"].dropna()
    classes = sorted({str(c) for c in done["floor_class"].dropna()})
    share = (f"{100 * shares.min():.1f}%" if shares.min() == shares.max()
             else f"{100 * shares.min():.1f}–{100 * shares.max():.1f}%") if len(shares) else "?"
    parts = [f"in {n} of {len(done)}{' finished points' * (i == 0)} the {what} model"
             for i, (what, n) in enumerate((w, n) for w, n in (("dense", dense), ("retrained", after)) if n)]
    return (f"**Warning: majority-class floor.** {' and '.join(parts).capitalize()} is not significantly above "
            f"the majority-class floor ({share} of the test set, always answering "
            f"{' or '.join(repr(c) for c in classes)}) or answers one class. Nothing about pruning can be concluded "
            "from those points: a model that has learnt no more than the commonest class has nothing for pruning "
            "to take away. Train longer (`train.epochs`) or on more data before reading this grid; the column "
            "*at the majority floor* and each point's report say which seeds.")


def grid_heading(sweep_dir, table: pd.DataFrame) -> str:
    """The heading: how many points, finished and failed, and what the grid varies."""
    info = grid_info(sweep_dir)
    keys = list(info["points"][0]["values"]) if info["points"] else []
    done = int(table["finished"].sum()) if len(table) else 0
    missing = [p for p, f in zip(table["point"], table["finished"]) if not f] if len(table) else []
    s = (f"# Pruning grid: {md_escape(Path(sweep_dir).name)}\n\n{len(table)} points over "
         + (", ".join(f"`{md_escape(k)}`" for k in keys) or "no grid key")
         + f"; {done} finished with their own report.")
    if missing:
        s += (f" **{len(missing)} did not finish** ({', '.join(md_escape(m) for m in missing[:10])}"
              + (", ..." if len(missing) > 10 else "") + "): they are left out of the means and curves; rerun "
              "the same `prunestudy sweep` to compute only what is missing.")
    warning = floor_markdown(table)
    return s + (f"\n\n{warning}" if warning else "")


def plot_grid_tradeoff(table: pd.DataFrame) -> Figure:
    """Accuracy against sparsity, compression ratio and measured speedup, one colour per method:
    after retraining (solid, with the 95% band over seeds) and before (dashed); random pruning is
    the floor (shaded); the dense models and the dense controls (mean over seeds) as lines."""
    ops = operating_points(table)
    if ops.empty or "accuracy_after" not in ops:
        return placeholder("no finished point yet: nothing to plot")
    method_col = "prune.method" if "prune.method" in ops else None
    panels = [("sparsity", "sparsity of the targeted weights (%)"), ("compression_ratio", "compression ratio (x, log)")]
    if timed_any(table):   # no panel of points that all sit at 1x untimed (masked pruning)
        panels.append(("measured_speedup", _speedup_axis(table)))
    fig, axes = figure(ncols=len(panels), size=(5 * len(panels), 4.6))
    for ax, (x, xname) in zip(axes, panels):
        for method, group in (ops.groupby(method_col, sort=False) if method_col else [("points", ops)]):
            group = group.sort_values(x)
            colour, marker = method_style(method)
            xs = group[x] * (100 if x == "sparsity" else 1)
            ax.plot(xs, 100 * group["accuracy_after"], color=colour, marker=marker, label=literal(f"{method} (after)"))
            if group["accuracy_after_lo"].notna().any():
                # an accuracy lies in 0-100%: a t-band over 2 or 3 seeds can reach past both ends
                lo, hi = (100 * group[f"accuracy_after_{end}"].clip(0, 1) for end in ("lo", "hi"))
                ax.fill_between(xs, lo, hi, color=colour, alpha=0.3 if method == floor_method() else 0.15, lw=0)
            if "accuracy_before" in group:
                ax.plot(xs, 100 * group["accuracy_before"], color=colour, marker=marker, ls="--", alpha=0.7,
                        label=literal(f"{method} (before)"))
        if "floor_share" in table and table["floor_share"].notna().any():
            ax.axhline(100 * table["floor_share"].mean(), color="dimgray", ls="-.", lw=1.2,
                       label="majority-class floor")
        for ref, colour, style, name in (("dense_accuracy", states.TRAINED.color, (0, (7, 3)), "dense (trained)"),
                                         ("control_accuracy", states.CONTROL.color, ":", states.CONTROL.label)):
            if table[ref].notna().any():   # told apart by style as well as colour, and named in the legend
                ax.axhline(100 * table[ref].mean(), color=colour, ls=style, lw=1.6, label=name)
        if x == "compression_ratio":
            ax.set_xscale("log")
            for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):   # 2, 3: not 2x10^0
                axis(FuncFormatter(lambda v, _: f"{v:g}"))
        label(ax, xname, "test accuracy (%)")
    legend_outside(axes[-1])
    fig.suptitle("Accuracy against sparsity, compression" + (" and measured speed" if len(panels) == 3 else "")
                 + " (mean and 95% band over seeds)")
    return fig


def timed_any(table: pd.DataFrame) -> bool:
    """Whether any point's speedup was measured (a table of an older sweep, without the flag: yes)."""
    return "speedup_timed" not in table or not (table["speedup_timed"] == False).all()   # noqa: E712


def _speedup_axis(table: pd.DataFrame) -> str:
    """The measured-speedup axis' name; it says so where masked points sit at 1x without a timing."""
    untimed = "speedup_timed" in table and (table["speedup_timed"] == False).any()   # noqa: E712 (None: unknown)
    return "measured speedup (x)" + ("; masked: 1x, not timed (dense computation)" if untimed else "")


def grid_points_markdown(table: pd.DataFrame) -> str:
    """A line per point with a link to its own report (or why there is none)."""
    lines = []
    for row in table.itertuples():
        acc = "" if pd.isna(row.accuracy_after) else f": {100 * row.accuracy_after:.1f}% after retraining"
        at = [w for w, flag in (("dense", row.dense_at_floor), ("retrained", row.after_at_floor)) if flag is True]
        acc += f" (**{' and '.join(at)} model{'s' * (len(at) > 1)} at the majority-class floor**)" if at else ""
        link = f"[{md_escape(row.point)}]({row.report})" if row.report else f"{md_escape(row.point)} (not finished)"
        lines.append(f"- {link}{acc}")
    return "\n".join(lines)


def save_grid_tables(sweep_dir, table: pd.DataFrame) -> list[Path]:
    """sweep.csv and sweep.json: one row per point, for other tools (written atomically)."""
    out = Path(sweep_dir)
    rows = json.loads(table.to_json(orient="records"))
    return [atomic.write_bytes(out / paths.SWEEP_CSV, table.to_csv(index=False).encode()),
            atomic.write_json(out / paths.SWEEP_JSON, {"points": rows, "operating_points":
                                                  json.loads(operating_points(table).to_json(orient="records"))})]
