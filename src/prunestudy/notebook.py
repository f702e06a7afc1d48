"""What a stage notebook calls first, after its `parameters` cell: the values its stage runs with.

`parameters(stage, globals())` reads IPython's input history, the cells run so far in order.
Under papermill, the cell papermill injects right after the `parameters` cell (first line
`# Parameters`) assigns the names the caller gave. Every other parameter takes the value in the
params.json of the run folder `run_dir` names, when it has one (`config.stage_params`, so prune's
`lr` is `retrain.lr`): the cell's literals are the defaults of a new run (params/default.yaml's),
and a notebook pointed at a run folder recomputes that run's stage unless told otherwise. Input
folders (data_dir, ...) and what params.json does not hold (refresh_cache, retime) keep the cell's
values. Run by hand (JupyterLab, or papermill without any `-p`: nothing injected), the parameters
cell is what runs, as it reads; the stage's first lines say where it differs from params.json
(stages._announce). `prunestudy run` injects every parameter, so nothing is taken from params.json.

A name the parameters cell does not assign (papermill only warns, and the notebook ran with its
default), a run folder that does not exist or an input stage that is not complete stops the
notebook in that cell with one line (`NotebookError`), before a stage function takes the run
folder's lock: a mistyped run_dir leaves no folder behind.
"""

from __future__ import annotations

import ast
import difflib
import json
from pathlib import Path

from . import atomic, config, graph, paths

INJECTED = "# Parameters"   # the first line of the cell papermill injects (its `comment`)


class NotebookError(Exception):
    """A mistake in what a notebook was given: one line in the notebook, not a traceback (IPython
    shows the lines of an exception's `_render_traceback_` instead of its traceback)."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class UnknownParameter(NotebookError, TypeError):
    """A parameter the notebook does not have."""


class MissingInput(NotebookError, FileNotFoundError):
    """No run folder to read, or an input stage that is not complete in it."""


def parameters(stage: str, namespace: dict, history: list[str] | None = None) -> dict:
    """The keyword arguments of `stage`'s function (every name its parameters cell assigns) by the
    rules above, after checking the names and the inputs; `namespace` (the notebook's globals()) is
    updated to them, so later cells see what runs. `history`: the cells run so far, the current one
    last (IPython's input history by default)."""
    cell, injected = cells(_ipython_history() if history is None else history)
    known = assigned(cell)
    given = known if injected is None else assigned(injected)
    check_names(stage, known, given)
    values = {name: namespace[name] for name in known}
    saved = {} if injected is None else run_values(stage, values.get("run_dir"))
    taken = {k: v for k, v in saved.items() if k in values and k not in given and not _same(v, values[k])}
    values.update(taken)
    require_inputs(stage, values)
    if taken:
        print(taken_line(stage, taken, values.get("run_dir")))
    namespace.update(values)
    return values


def taken_line(stage: str, taken: dict, run_dir) -> str:
    """The line that names the values taken from params.json (where they differ from the cell's)."""
    where = Path(run_dir) if run_dir else paths.resolve_run_dir(None)
    said = [f"{k} = {v!r}" for k, v in taken.items()]
    listed = f"{', '.join(said[:-1])} and {said[-1]}" if len(said) > 1 else said[0]
    return f"[{stage}] {listed} from {where / paths.PARAMS} (not given)"


def _ipython_history() -> list[str]:
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        raise NotebookError("notebook.parameters reads the cells a kernel ran: call it in a notebook, or pass "
                            "`history`")
    return list(shell.history_manager.input_hist_raw)


def cells(history: list[str]) -> tuple[str, str | None]:
    """The parameters cell and papermill's injected cell after it (None when there is none: run by
    hand), the latest to run before the current cell (the last of `history`). The parameters cell
    is one of assignments only, run_dir's among them."""
    before = list(history[:-1])
    for i in range(len(before) - 1, -1, -1):
        if _is_injected(before[i]) and i > 0 and _is_parameters(before[i - 1]):
            return before[i - 1], before[i]
        if _is_parameters(before[i]) and not _is_injected(before[i]):
            return before[i], None
    raise NotebookError("no parameters cell ran before this one: run the notebook's first code cell first")


def _is_injected(source: str) -> bool:
    return source.lstrip().split("\n", 1)[0].strip() == INJECTED


def _is_parameters(source: str) -> bool:
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return False
    return all(isinstance(n, ast.Assign) for n in body) and "run_dir" in assigned(source)


def assigned(source: str) -> list[str]:
    """The names a cell assigns at its top level, in order."""
    names = [t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name)]
    return list(dict.fromkeys(names))


def check_names(stage: str, known: list[str], given: list[str]) -> None:
    """UnknownParameter naming each given name the notebook does not have, with the closest one it has."""
    unknown = [n for n in given if n not in known]
    if not unknown:
        return
    hint = {n: difflib.get_close_matches(n, known, n=1) for n in unknown}
    if len(unknown) == 1:
        what = f"parameter {unknown[0]!r} for {paths.NOTEBOOK_OF[stage]}" + \
            (f": did you mean {hint[unknown[0]][0]!r}?" if hint[unknown[0]] else "")
    else:
        what = "parameters " + ", ".join(repr(n) + (f" (did you mean {hint[n][0]!r}?)" if hint[n] else "")
                                         for n in unknown) + f" for {paths.NOTEBOOK_OF[stage]}"
    raise UnknownParameter(f"unknown {what} (its parameters: {', '.join(known)})")


def run_values(stage: str, run_dir) -> dict:
    """`stage`'s parameters in the params.json of run_dir, by the notebook's names ({} without one;
    the analysis has none there)."""
    if stage not in config.STAGE_EXTRAS:
        return {}
    try:
        cfg = atomic.read_json(paths.resolve_run_dir(run_dir) / paths.PARAMS)
    except (OSError, ValueError):
        return {}
    out = {}
    for name, key in config.stage_parameters(stage).items():
        try:
            out[name] = config.value(cfg, key)
        except (KeyError, TypeError):   # a params.json of an older schema: the cell's value
            pass
    return out


def _same(a, b) -> bool:
    """Equal as JSON (params.json's lists are a cell's tuples)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def require_inputs(stage: str, values: dict) -> None:
    """MissingInput when the run folder or an input stage of `stage` is missing (paths.require's
    line), for the folders `values` name (run_dir, data_dir, ...)."""
    run_dir = paths.resolve_run_dir(values.get("run_dir"))
    inputs = {up: config.resolve_path(values[graph.stage(up).read_as]) if values.get(graph.stage(up).read_as)
              else paths.stage_dir(run_dir, up) for up in graph.stage(stage).reads}
    require_run(run_dir, inputs)
    for up, folder in inputs.items():
        try:
            paths.require(up, folder)
        except FileNotFoundError as e:
            raise MissingInput(str(e)) from None


def require_run(run_dir: Path, inputs: dict[str, Path]) -> None:
    """MissingInput when run_dir does not exist and a stage would read an input there (not given
    elsewhere): a stage that reads earlier ones never starts a run folder (its lock, taken first,
    would be left behind in a new one). The stage functions ask this too (stages._recorded)."""
    if not Path(run_dir).is_dir() and any(not Path(d).exists() for d in inputs.values()):
        raise MissingInput(f"no run folder {run_dir}: notebooks/{paths.NOTEBOOK_OF['data']} with this run_dir "
                           f"starts one, or `prunestudy run --run-dir {run_dir}`")
