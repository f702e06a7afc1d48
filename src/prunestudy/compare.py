"""`prunestudy compare RUN_A RUN_B [RUN ...] [-o OUT.html]`: finished runs side by side on one page.

The page is one self-contained HTML file (inline CSS, the figure as a data: URI, no JavaScript):

- the runs: folder name, params hash, git commit, model, pruning, test set;
- per model state (trained / pruned / retrained / dense control), the runs one under the other:
  the columns of ``report.summary_table`` (accuracy, true mean loss, sparsity, parameters, model
  size, measured latency), plus the accuracy change against
  the first run;
- one figure: test accuracy per model state, grouped by run (each state in its ``states`` colour);
- the parameters (flattened keys such as ``prune.amount``) whose values differ between the runs.

Every string from a run (folder names, class names, parameter values) is escaped with
``html.escape``: the page renders it as text and runs nothing. Runs are read with
``stages.load_results``; a folder without results.json, data or a trained model, or whose analysis
did not finish (no report.html, no analysis record), is refused (``CompareError``, exit 2) before
anything is written, and the page is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from . import atomic, config, paths, records, report, stages, states

DELTA = "Δ test accuracy vs first run (points)"
MISSING = "—"


class CompareError(Exception):
    """Bad input: not enough runs, a folder that is not a finished run, an unusable output path."""


@dataclass
class Run:
    path: Path
    label: str          # the folder name (made unique when two folders share a name)
    results: dict       # stages.load_results(path)
    saved: dict         # results.json as written by the run (its own provenance)


# --------------------------------------------------------------------------- reading runs

def load_run(path: str | Path) -> Run:
    """A finished run folder, or a CompareError naming the folder and the fix."""
    path = Path(path).expanduser().resolve()
    command = f"`prunestudy run -f PARAMS --run-dir {path}`"
    fix = f"run {command} into it first"
    if not path.is_dir():
        raise CompareError(f"{path}: no such folder: check the path, or make the run with {command}")
    if not (path / paths.RESULTS).is_file():
        raise CompareError(f"{path} is not a finished run (no {paths.RESULTS}): {fix}")
    gone = paths.dangling_stage(path)   # copied without its stage store
    if gone:
        raise CompareError(gone)
    try:
        saved = atomic.read_json(path / paths.RESULTS)
        results = stages.load_results(path)
    except FileNotFoundError:
        data_info = (paths.stage_dir(".", "data") / paths.DATA_INFO).as_posix()
        raise CompareError(f"{path} is not a finished run (no {data_info}): {fix}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CompareError(f"{path}: its results cannot be read ({type(e).__name__}: {e}): "
                           f"rerun `prunestudy run --run-dir {path}` with its parameters") from None
    if "test_accuracy" not in states.metrics(results, "trained"):
        raise CompareError(f"{path} is not a finished run (no trained model): {fix}")
    unfinished = analysis_unfinished(path)
    if unfinished:
        raise CompareError(f"{path} is not a finished run: its analysis did not finish ({unfinished}), so its "
                           f"figures may come from stopped or failed stages; finish it with {command} (a failed stage "
                           f"is named there, and in {paths.NOTEBOOKS}/*.html)")
    return Run(path, path.name or str(path), results, saved if isinstance(saved, dict) else {})


def analysis_unfinished(path: Path) -> str | None:
    """Why the analysis of a run folder is not finished (no report, no or a stale analysis record), or None."""
    record = records.read(paths.stage_dir(path, "analysis"))
    if not (path / paths.REPORT).is_file():
        return f"no {paths.REPORT}"
    if record is None:
        where = paths.stage_record(".", "analysis").as_posix()
        return f"no analysis record ({where}): a stage failed, was stopped or reran after it"
    if record.get("stale"):
        return f"its record is stale: {record['stale']}"
    return None


def load_runs(paths: list[str | Path]) -> list[Run]:
    """At least two distinct finished runs; every problem found is reported at once."""
    if len(paths) < 2:
        raise CompareError(f"at least two run folders are needed, got {len(paths)}: "
                           "give two or more, e.g. `prunestudy compare runs/a runs/b`")
    runs, problems, seen = [], [], set()
    for p in paths:
        resolved = Path(p).expanduser().resolve()
        if resolved in seen:
            problems.append(f"{resolved} is given twice: give each run folder once")
            continue
        seen.add(resolved)
        try:
            runs.append(load_run(p))
        except CompareError as e:
            problems.append(str(e))
    if problems:
        raise CompareError("\n".join(problems))
    names = [r.label for r in runs]
    for i, r in enumerate(runs):
        if names.count(r.label) > 1:
            r.label = f"{r.label} ({i + 1})"
    return runs


# --------------------------------------------------------------------------- tables

def _params(run: Run) -> dict:
    return run.results.get("params") or run.saved.get("params") or {}


def differing_params(runs: list[Run]) -> pd.DataFrame:
    """One row per flattened parameter key whose value differs between the runs, a column per run."""
    flat = [config.flatten(_params(r)) for r in runs]
    keys = sorted(set().union(*flat))
    rows = {k: [f.get(k, _ABSENT) for f in flat] for k in keys}
    differ = {k: v for k, v in rows.items() if len({_value(x) for x in v}) > 1}
    df = pd.DataFrame.from_dict({k: [_value(x) for x in v] for k, v in differ.items()}, orient="index",
                                columns=[r.label for r in runs])
    df.index.name = "parameter"
    return df


_ABSENT = object()


def _value(v: Any) -> str:
    if v is _ABSENT:
        return "(absent)"
    if not isinstance(v, (str, int, float, bool, list, dict, type(None))):
        return "(not set)"
    return json.dumps(v, ensure_ascii=False, sort_keys=True)


def run_summary(results: dict) -> pd.DataFrame:
    """summary_table's rows of this run's model states (not the curve points or the seed report's);
    the index holds state keys (trained / pruned / retrained / control)."""
    summary = report.summary_table(results)
    key_of = {s.long_label: s.key for s in states.ALL}   # the summary's row of each state
    return summary[[i in key_of for i in summary.index]].rename(index=key_of)


def summary_rows(runs: list[Run]) -> pd.DataFrame:
    """All runs' summaries, grouped by model state (index: state, run), with the accuracy change
    against the first run ("reference" in its own row; NaN where the first run lacks the state)."""
    parts = {r.label: run_summary(r.results) for r in runs}
    first = runs[0].label
    frames = []
    for state in states.KEYS:
        block = {label: df.loc[state] for label, df in parts.items() if state in df.index}
        if not block:
            continue
        frame = pd.DataFrame(block).T
        if report.ACC in frame:
            acc = pd.to_numeric(frame[report.ACC], errors="coerce")
            delta = (acc - acc[first]) if first in acc.index else acc * np.nan
            frame[DELTA] = ["reference" if label == first else d for label, d in delta.items()]
        frame.index = pd.MultiIndex.from_product([[state], frame.index], names=["model state", "run"])
        frames.append(frame)
    columns = list(dict.fromkeys(c for df in parts.values() for c in df.columns)) + [DELTA]
    return pd.concat(frames).reindex(columns=columns)


def _fmt(column: str, v: Any) -> str:
    if v is None or (pd.api.types.is_scalar(v) and pd.isna(v)):
        return MISSING
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        if column == DELTA:
            return f"{v:+.2f}"
        if column == report.LOSS:
            return f"{v:.4f}"
        return f"{int(v):,}" if column in (report.NONZERO, report.TOTAL) else f"{v:,.2f}"
    return str(v)


# --------------------------------------------------------------------------- HTML

def esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _state_cell(state: str, rowspan: int) -> str:
    s = states.get(state)
    return (f'<th scope="rowgroup" rowspan="{rowspan}" style="border-left: 6px solid {to_hex(s.color)}">'
            f"{esc(s.label)}</th>")


def summary_html(table: pd.DataFrame) -> str:
    head = "".join(f'<th scope="col">{esc(c)}</th>' for c in ["model state", "run", *table.columns])
    body = []
    for state in dict.fromkeys(table.index.get_level_values(0)):
        block = table.loc[state]
        for i, (label, row) in enumerate(block.iterrows()):
            cells = _state_cell(state, len(block)) if i == 0 else ""
            cells += f'<th scope="row">{esc(label)}</th>'
            cells += "".join(f'<td class="num">{esc(_fmt(c, row[c]))}</td>' for c in table.columns)
            body.append(("<tr class=\"first\">" if i == 0 else "<tr>") + cells + "</tr>")
    return f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def plain_table(rows: list[list[Any]], header: list[str], cls: str = "") -> str:
    """A table of text: the first cell of each row is its header; every cell escaped."""
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in header)
    body = "".join("<tr>" + f'<th scope="row">{esc(r[0])}</th>' + "".join(f"<td>{esc(c)}</td>" for c in r[1:])
                   + "</tr>" for r in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _commit(run: Run) -> str:
    c = (run.saved.get("provenance") or {}).get("git_commit")
    if not c:
        return "not recorded"
    return c[:12] + ("+dirty" if c.endswith("+dirty") else "")


def _params_hash(run: Run) -> str:
    h = run.saved.get("params_hash") or run.results.get("params_hash")
    return h or (config.stage_hash(_params(run)) if _params(run) else "not recorded")


def runs_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for r in runs:
        p, data, prune = _params(r), r.results.get("data") or {}, states.metrics(r.results, "pruned")
        model = states.metrics(r.results, "trained").get("model") or (p.get("train") or {}).get("model") or MISSING
        pruning = (f"{prune.get('method', '?')}, amount {prune.get('amount', '?')}" if prune else "not run")
        missing = [s.stage for s in (states.PRUNED, states.RETRAINED) if s.stage not in r.results]
        classes = data.get("classes") or []
        rows.append([r.label, str(r.path), _params_hash(r), _commit(r), model, pruning,
                     f"{data.get('test_size') or MISSING} test crops, {len(classes)} classes: " + ", ".join(classes),
                     "all" if not missing else "missing: " + ", ".join(missing)])
    return rows


RUN_HEADER = ["run", "folder", "params hash", "git commit", "model", "pruning", "test set", "stages"]


def params_html(runs: list[Run]) -> str:
    df = differing_params(runs)
    if not any(_params(r) for r in runs):
        return "<p>No run recorded its parameters.</p>"
    if df.empty:
        return (f"<p>The {len(runs)} runs have identical parameters (params hash {esc(_params_hash(runs[0]))}): "
                "any difference in their results comes from the code version, the machine or chance.</p>")
    rows = [[k, *v] for k, v in zip(df.index, df.values.tolist())]
    return ("<p>Only the parameters whose values differ (JSON values; “(absent)” where a run has no such key)."
            "</p>" + plain_table(rows, ["parameter", *df.columns], "params"))


def notes(runs: list[Run], table: pd.DataFrame) -> list[str]:
    """Sentences a reader needs to read the numbers fairly (computed from the runs)."""
    out = ["Accuracy in % of each run's test set; loss is the true mean per test sample; sparsity is the "
           "fraction of the targeted weights that are zero or removed, against the dense model; "
           f"“{MISSING}” = not measured in that run."]
    data_keys = {k for k in differing_params(runs).index if k.startswith("data.")}
    if data_keys:
        out.append("The runs' data parameters differ (" + ", ".join(sorted(data_keys)) + "), so their "
                   "accuracies are measured on different test sets.")
    if any("latency" in str(c) for c in table.columns):
        out.append(f"Latency is {_latency_point(runs)}, measured by each run on the machine that ran it: compare "
                   "it between runs only when they ran on the same, otherwise quiet, machine.")
    return out


def _latency_point(runs: list[Run]) -> str:
    """What the latency column measures: summary_table's attrs['latency'] = (device, batch), if given."""
    points = {r.label: report.summary_table(r.results).attrs.get("latency") for r in runs}
    where = {label: f"a batch of {p[1]} on {p[0]}" for label, p in points.items() if p}
    if not where:
        return "the median time measured"
    if len(set(where.values())) == 1 and len(where) == len(runs):
        return f"the median time for {next(iter(where.values()))}"
    return "the median time per batch (" + "; ".join(f"{k}: {v}" for k, v in where.items()) + ")"


# --------------------------------------------------------------------------- figure

def accuracy_figure(runs: list[Run], table: pd.DataFrame) -> Figure:
    """Grouped bars: per run (x), one bar per model state in its colour (``states``), ±1 binomial SE;
    ``table`` is ``summary_rows(runs)``."""
    shown = list(dict.fromkeys(table.index.get_level_values(0)))
    labels = [r.label for r in runs]
    width = 0.8 / max(len(shown), 1)
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook"):
        fig = Figure(figsize=(max(7.0, 2.0 + 1.9 * len(runs)), 4.2), dpi=report.DPI, layout="constrained")
        ax = fig.add_subplot()
        x = np.arange(len(runs), dtype=float)
        top = 0.0
        for j, state in enumerate(shown):
            acc = [table[report.ACC].get((state, lab), np.nan) for lab in labels]
            acc = np.array([np.nan if pd.isna(a) else float(a) for a in acc])
            n = [(r.results.get("data") or {}).get("test_size") for r in runs]
            se = [100 * report.binomial_se(a / 100, k) if k and not np.isnan(a) else 0 for a, k in zip(acc, n)]
            bars = ax.bar(x + (j - (len(shown) - 1) / 2) * width, acc, width, yerr=se, capsize=3,
                          color=states.get(state).color, ecolor="black", label=states.get(state).label)
            ax.bar_label(bars, fmt="%.1f", label_type="center", color="white", fontsize=8, fontweight="bold")
            top = max(top, np.nanmax(acc) if not np.all(np.isnan(acc)) else 0)
        ax.set_xticks(x, [textwrap.fill(report.literal(lab), 22) for lab in labels], fontsize=9)
        ax.set_ylim(0, min(100, top + 12) if top else 100)
        ax.set_xlabel("run (folder name)")
        ax.set_ylabel("test accuracy (% of test crops)")
        ax.set_title("Test accuracy per model state and run (error bars: ±1 binomial standard error)", fontsize=11)
        handles = [Patch(color=states.get(s).color, label=states.get(s).label) for s in shown]
        ax.legend(handles=handles, title="model state", loc="upper left", bbox_to_anchor=(1.01, 1),
                  borderaxespad=0, fontsize=8)
    return fig


def png_data_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- page

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.2em 2em; color: #222;
       max-width: 1500px; }
h1 { font-size: 1.4em; margin: 0 0 .3em; } h2 { font-size: 1.15em; margin: 1.4em 0 .4em; }
p { margin: .3em 0; max-width: 70em; } .note { color: #555; font-size: .9em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .85em; margin: .4em 0; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }
thead th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.first > * { border-top: 2px solid #888; }
table.runs td, table.runs th, table.params td, table.params th { overflow-wrap: anywhere; max-width: 32em; }
img { max-width: 100%; height: auto; }
"""


def render(runs: list[Run]) -> str:
    """The whole page as a string (every interpolated string escaped)."""
    names = ", ".join(r.label for r in runs)
    table = summary_rows(runs)
    fig = accuracy_figure(runs, table)
    alt = f"Grouped bar chart: test accuracy (%) per model state for the runs {names}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(f'prunestudy: {len(runs)} runs compared')}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>prunestudy: {len(runs)} runs compared</h1>",
        '<h2 id="runs">Runs</h2><div class="scroll">', plain_table(runs_rows(runs), RUN_HEADER, "runs"), "</div>",
        '<h2 id="summary">Results per model state</h2>',
        "".join(f'<p class="note">{esc(s)}</p>' for s in notes(runs, table)),
        '<div class="scroll">', summary_html(table), "</div>",
        '<h2 id="figure">Test accuracy</h2>',
        f'<img src="{png_data_uri(fig)}" alt="{esc(alt)}">',
        '<h2 id="params">Parameters that differ</h2><div class="scroll">', params_html(runs), "</div>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def check_output(out: str | Path) -> Path:
    out = Path(out).expanduser().resolve()
    if out.is_dir():
        raise CompareError(f"-o {out} is a folder: give a file name, e.g. -o {out / paths.COMPARE_PAGE}")
    return out


def compare(paths: list[str | Path], out: str | Path = paths.COMPARE_PAGE) -> Path:
    """Write the comparison page of the runs at ``paths`` to ``out`` (atomically); return its path."""
    out = check_output(out)
    runs = load_runs(paths)
    page = render(runs)
    try:
        return atomic.write_bytes(out, page.encode("utf-8"))   # with the usual file mode (atomic.FILE_MODE)
    except OSError as e:
        raise CompareError(f"cannot write {out} ({e.strerror or e}): choose another file with -o") from None
