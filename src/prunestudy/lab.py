"""`prunestudy lab` (and `make lab`): JupyterLab on a run folder's working copies of the stage
notebooks, or (`--source`) on the project's tracked notebooks, in this environment, as a user or as
root (containers, CI), with the `prunestudy` kernel and no news pop-up.

Interactive work happens in a run, not in the sources (issue 31): a user who ran the tracked
notebooks and saved them left outputs and edited defaults in git, and the provenance read `+dirty`.
`prunestudy lab RUN` writes RUN/lab/0N_<stage>.ipynb once, each the tracked notebook with the run's
values in its `parameters` cell (they are then the user's: never overwritten; `--reset` moves them
aside first), and serves RUN. Whatever JupyterLab saves under the project's notebooks/ (`--source`)
goes through `pre_save` first: outputs, execution counts and the metadata JupyterLab adds
(NOTEBOOK_NOISE, CELL_NOISE) are put back as the file on disk has them, so that saving an unedited
tracked notebook writes its bytes again; a code edit is saved as made.

JupyterLab asks on first start whether to fetch Jupyter news and checks for updates; the project's
settings answer both with no (an `overrides.json` in this environment's JupyterLab settings folder,
written by `prunestudy kernel`), and the server never checks for updates either.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import shlex
import sys
import time
from pathlib import Path

from . import atomic, config, execute, graph, paths

# What JupyterLab would otherwise ask or fetch at start (docs: user/announcements).
OVERRIDES = {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}}

# The metadata JupyterLab writes about where and how a notebook was last run or shown, not what it
# is: the pre-save hook puts these keys back as the tracked file has them (the one list of them).
NOTEBOOK_NOISE = ("kernelspec", "language_info", "widgets")
CELL_NOISE = ("execution", "ExecuteTime", "scrolled", "collapsed", "jupyter", "trusted")
PRE_SAVE_HOOK = f"{__name__}.pre_save"   # the contents manager imports it by this name


def settings_dir() -> Path:
    """This environment's JupyterLab application settings folder (read for overrides.json)."""
    return Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings"


def ensure_settings() -> Path:
    """Merge the project's overrides into this environment's overrides.json (others are kept)."""
    path = settings_dir() / "overrides.json"
    try:
        current = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        current = {}
    merged = {**current, **{k: {**current.get(k, {}), **v} for k, v in OVERRIDES.items()}}
    if merged != current:
        atomic.write_json(path, merged)
    return path


def command(root_dir: Path, *, ip: str = "127.0.0.1", port: int | None = None, open_browser: bool = True,
            token: str | None = None, default_url: str | None = None) -> list[str]:
    """The JupyterLab command line: this Python's jupyterlab serving root_dir, loopback only,
    --allow-root when running as root, no update checks, the pre-save hook; `default_url`: the page
    it opens on (e.g. /lab/tree/lab, the run's working copies)."""
    args = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={root_dir}", f"--ServerApp.ip={ip}",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            f"--ContentsManager.pre_save_hook={PRE_SAVE_HOOK}"]
    if default_url is not None:
        args.append(f"--LabApp.default_url={default_url}")
    if port is not None:
        args.append(f"--ServerApp.port={port}")
    if not open_browser:
        args.append("--no-browser")
    if token is not None:
        args.append(f"--IdentityProvider.token={token}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")   # containers and CI run as root; JupyterLab refuses without it
    return args


# --------------------------------------------------------------------------- saving a tracked notebook

def pre_save(model: dict, path: str, contents_manager, **kwargs) -> None:
    """The contents manager's pre_save_hook: a notebook saved under the project's notebooks/ is made
    what is committed (`as_committed`); any other file (a run's lab/ copies) is saved as it is. An
    error here is logged by the server and the model saved unchanged: a save is never lost."""
    if model.get("type") != "notebook" or not isinstance(model.get("content"), dict):
        return
    target = Path(getattr(contents_manager, "root_dir", "")) / path.strip("/")
    if not target.resolve().is_relative_to(execute.notebooks_dir().resolve()):
        return
    try:
        on_disk = json.loads(target.read_text()) if target.is_file() else None
    except ValueError:
        on_disk = None
    as_committed(model["content"], on_disk)


def as_committed(content: dict, on_disk: dict | None) -> dict:
    """A notebook's JSON (changed in place) as the project commits it: no outputs, no execution counts,
    the noise metadata (NOTEBOOK_NOISE, CELL_NOISE) as `on_disk` (the file's JSON) has it: a cell's
    matched by its id or its type and source; a new cell's, or any cell's of a new file (None), dropped
    (a new file keeps its notebook-level metadata: its kernel). Sources, tags and any other metadata
    are the model's: what the user edited is saved."""
    cells = content.get("cells", [])
    for cell in cells:
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
    disk_cells = (on_disk or {}).get("cells", [])
    for cell in cells:
        old = next((c for c in disk_cells if _cell_key(c) == _cell_key(cell) or _cell_id(c) == _cell_id(cell)), {})
        _restore(cell.setdefault("metadata", {}), old.get("metadata", {}), CELL_NOISE)
    if on_disk is not None:
        _restore(content.setdefault("metadata", {}), on_disk.get("metadata", {}), NOTEBOOK_NOISE)
        minor = on_disk.get("nbformat_minor")
        if isinstance(minor, int) and minor < content.get("nbformat_minor", minor):   # upgraded on the way
            content["nbformat_minor"] = minor
            for cell in cells if minor < 5 else ():   # cell ids came with 4.5
                cell.pop("id", None)
    return content


def _cell_key(cell: dict) -> tuple:
    """A cell's type and source: how a cell without an id is found in the file on disk."""
    source = cell.get("source", "")
    return cell.get("cell_type"), "".join(source) if isinstance(source, list) else source


def _cell_id(cell: dict) -> object:
    return cell.get("id") or object()   # a cell without an id matches none by id


def _restore(meta: dict, disk_meta: dict, keys: tuple[str, ...]) -> None:
    """`keys` of meta as disk_meta has them: its value, or none."""
    for key in keys:
        if key in disk_meta:
            meta[key] = copy.deepcopy(disk_meta[key])
        else:
            meta.pop(key, None)


# --------------------------------------------------------------------------- a run's working copies

def tracked(stage: str) -> Path:
    """The project's notebook of a stage."""
    return execute.notebooks_dir() / paths.NOTEBOOK_OF[stage]


def run_values(stage: str, cfg: dict, run_dir: Path) -> dict:
    """What a stage's working copy sets in its parameters cell: what the runner gives papermill (the
    run folder, the stage's parameters in the run), less its input folders (None: they follow run_dir)."""
    inputs = {graph.stage(up).read_as for up in graph.stage(stage).reads}
    return {k: v for k, v in execute.notebook_parameters(stage, cfg, run_dir).items() if k not in inputs}


def with_values(source: str, values: dict) -> str:
    """A parameters cell with `values` for the names it assigns: a value that differs is written with
    repr (the cell stays literals only), the rest of its line (a comment) kept, but a comment saying
    what None means where None was replaced; other lines as they were."""
    lines = source.splitlines(keepends=True)
    for node in reversed(_assignments(source)):
        name, value = node.targets[0].id, node.value
        if name not in values or _same(_literal(value), values[name]):
            continue
        head = lines[value.lineno - 1].encode()[:value.col_offset].decode()   # ast's offsets count bytes
        tail = lines[value.end_lineno - 1].encode()[value.end_col_offset:].decode()
        if _literal(value) is None and "None means" in tail:   # the comment tells what None stood for
            end = "\n" if tail.endswith("\n") else ""
            tail = ("  # the run folder of this copy" if name == "run_dir" else "") + end
        lines[value.lineno - 1:value.end_lineno] = [head + repr(values[name]) + tail]
    return "".join(lines)


def cell_values(source: str) -> dict:
    """The names a parameters cell assigns and their values (a value that is no literal: its text)."""
    return {node.targets[0].id: _literal(node.value, ast.unparse(node.value)) for node in _assignments(source)}


def _assignments(source: str) -> list[ast.Assign]:
    return [n for n in ast.parse(source).body
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)]


def _literal(node: ast.expr, otherwise: object = None) -> object:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError):
        return otherwise if otherwise is not None else object()


def _same(a: object, b: object) -> bool:
    """Equal as parameters: 1 and 1.0, or 1 and True, are not (their JSON differs)."""
    as_json = lambda v: json.dumps(v, sort_keys=True, default=repr)   # noqa: E731
    return as_json(a) == as_json(b)


def _parameters_cell(nb):
    return next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)


def _code(nb) -> list[str]:
    """The sources of a notebook's code cells, its parameters cell left out."""
    parameters = _parameters_cell(nb)
    return [c.source for c in nb.cells if c.cell_type == "code" and c is not parameters]


def lab_copy(stage: str, cfg: dict, run_dir: Path) -> bytes:
    """A stage's working copy: the tracked notebook, outputs stripped, the run's values in its
    parameters cell (run_values), written as nbformat writes a notebook."""
    import nbformat

    nb = nbformat.read(tracked(stage), as_version=nbformat.NO_CONVERT)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    cell = _parameters_cell(nb)
    if cell is not None:
        cell.source = with_values(cell.source, run_values(stage, cfg, run_dir))
    return (nbformat.writes(nb) + "\n").encode()


def differences(stage: str, cfg: dict, run_dir: Path) -> tuple[dict, bool]:
    """How a stage's working copy differs from what it would be now: {name: (its value, the run's)}
    of its parameters cell, and whether its code cells differ from the tracked notebook's."""
    import nbformat

    mine, theirs = (nbformat.read(p, as_version=4) for p in (paths.lab_notebook(run_dir, stage), tracked(stage)))
    cell = _parameters_cell(mine)
    found = cell_values(cell.source) if cell is not None else {}
    changed = {k: (found[k], v) for k, v in run_values(stage, cfg, run_dir).items()
               if k in found and not _same(found[k], v)}
    return changed, _code(mine) != _code(theirs)


def prepare(run_dir: Path, cfg: dict, reset: bool = False) -> tuple[list[str], dict]:
    """Write each stage's working copy into run/lab/ where there is none; `reset`: where one differs
    from a fresh copy, move it to lab/.old/ first. Returns the lines to print (what was written or
    moved aside, each kept copy that differs from the run or the tracked code) and the schema keys
    the copies set otherwise than the run ({key: value}, for the command that applies them)."""
    lines, applied, stamp = [], {}, time.strftime("%Y%m%d-%H%M%S")
    for stage in paths.NOTEBOOK_OF:
        path, fresh = paths.lab_notebook(run_dir, stage), lab_copy(stage, cfg, run_dir)
        if reset and path.is_file() and path.read_bytes() != fresh:
            lines.append(f"{_shown(path, run_dir)}: copied again; yours is kept as "
                         f"{_shown(_move_aside(run_dir, stage, stamp), run_dir)}")
        if not path.is_file():
            atomic.write_bytes(path, fresh)
            continue
        lines += _kept(stage, cfg, run_dir, applied)
    return lines, applied


def _kept(stage: str, cfg: dict, run_dir: Path, applied: dict) -> list[str]:
    """The line that says how a kept working copy differs (none when it does not)."""
    path = paths.lab_notebook(run_dir, stage)
    try:
        changed, code = differences(stage, cfg, run_dir)
    except (ValueError, SyntaxError, AttributeError) as e:   # not a notebook any more, a cell that does not parse
        return [f"{_shown(path, run_dir)}: kept, but it cannot be read ({e})"]
    keys = config.stage_parameters(stage) if stage in config.STAGE_EXTRAS else {}
    applied.update({keys[k]: mine for k, (mine, _) in changed.items() if k in keys})
    what = [f"{k} = {mine!r} (the run: {run!r})" for k, (mine, run) in changed.items()]
    what += [f"its code cells differ from notebooks/{path.name}"] if code else []
    return [f"{_shown(path, run_dir)}: kept as you left it: {'; '.join(what)}"] if what else []


def _move_aside(run_dir: Path, stage: str, stamp: str) -> Path:
    """Move a stage's working copy to lab/.old/<name>-<stamp>.ipynb (a new name, never over another)."""
    target, n = paths.lab_old(run_dir, stage, stamp), 1
    while target.exists():
        target, n = paths.lab_old(run_dir, stage, f"{stamp}-{n}"), n + 1
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(paths.lab_notebook(run_dir, stage), target)
    return target


def _shown(path: Path, run_dir: Path) -> str:
    return str(Path(path).relative_to(run_dir))


def apply_command(run_dir: Path, values: dict) -> str:
    """The command that makes values the run's ({schema key: value}; none: a placeholder)."""
    sets = " ".join(f"-p {shlex.quote(f'{k}={_yaml_text(k, v)}')}" for k, v in values.items())
    return f"prunestudy run -f {run_dir / paths.PARAMS} {sets or '-p KEY=VALUE'} --run-dir {run_dir}"


def _yaml_text(key: str, value: object) -> str:
    """A value as an override writes it: a string bare where it reads back the same, else as JSON."""
    try:
        if isinstance(value, str) and config.parse_override(f"{key}={value}")[1] == value:
            return value
    except config.ParamsError:
        pass
    return json.dumps(value)


# --------------------------------------------------------------------------- the command

def no_run_folder(run_dir: Path) -> str | None:
    """The one line that says run_dir is not a run folder and how to make one (None when it is)."""
    if (run_dir / paths.PARAMS).is_file():
        return None
    return (f"prunestudy lab: {run_dir} is not a run folder (no {paths.PARAMS} there): make one first: "
            "`make study` or `prunestudy run -f params/smoke.yaml --run-dir runs/smoke` (then `prunestudy lab "
            "runs/smoke`), or `prunestudy lab --source` for the tracked notebooks")


def main(run: str | None = None, *, source: bool = False, reset: bool = False, port: int | None = None,
         open_browser: bool = True) -> int:
    """Start JupyterLab in the foreground (Ctrl-C stops it): on RUN (default runs/default), its lab/
    copies written first; `source`: on the tracked notebooks/."""
    if source:
        root, url = execute.notebooks_dir(), None
        lines = [f"JupyterLab on the tracked {root} (--source: to edit the study's code); saving strips "
                 "outputs and JupyterLab's metadata, so only what you edit reaches git"]
    else:
        root = paths.resolve_run_dir(run)
        problem = no_run_folder(root)
        if problem:
            print(problem, file=sys.stderr)
            return 2
        try:
            cfg = config.load(root / paths.PARAMS)
        except config.ParamsError as e:
            print(f"prunestudy lab: {root / paths.PARAMS}: {e}", file=sys.stderr)
            return 2
        url = f"/lab/tree/{paths.LAB}"
        lines = _guide(root, cfg, reset)
    execute.ensure_kernel()
    ensure_settings()
    for line in lines:
        print(f"prunestudy: {line}", flush=True)
    args = command(root, port=port, open_browser=open_browser, default_url=url)
    # the server (its pre-save hook) and the kernels find the project as this process does, wherever
    # the run folder lies
    os.execve(args[0], args, {**os.environ, "PRUNESTUDY_HOME": str(config.project_root())})
    return 0  # not reached


def _guide(run_dir: Path, cfg: dict, reset: bool) -> list[str]:
    """Write the working copies (prepare) and say where they are, what differs and what to do."""
    changes, applied = prepare(run_dir, cfg, reset)
    lines = [f"JupyterLab on the run folder {run_dir}, opening {paths.LAB}/: copies of the stage notebooks with this "
             "run's parameters, yours to edit and run (the tracked notebooks/ are not touched)", *changes]
    if changes and not reset:
        lines.append(f"`prunestudy lab {run_dir} --reset` copies them again (yours moved to "
                     f"{paths.LAB}/{paths.LAB_OLD}/)")
    lines += ["a copy run with other values computes its stage into this run folder (the later stages then stale); "
              f"to make them the run's: {apply_command(run_dir, applied)}",
              "`prunestudy lab --source` opens the tracked notebooks/ instead, to edit the study's code"]
    return lines
