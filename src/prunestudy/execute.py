"""One stage of one run folder: its notebook executed under papermill in the project's own kernel
(prunestudy.kernels), in its stage-store entry (claimed: computed once, whoever asks) or in the run
folder; or a complete entry of the same key linked instead. Also what every engine needs around
it: the kernelspec, the checks before any work, results.json, and the HTML pages (nbconvert).
The runner (prunestudy.pipeline) and the grid engine (prunestudy.sweep) both run stages through
here."""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from . import atomic, config, graph, kernels, paths, records, stagestore

KERNEL_NAME = "prunestudy"
TEMPLATES = Path(__file__).parent / "templates"


class StageFailed(RuntimeError):
    """A stage's notebook raised. `problem`: the one line of an error that is the file system's, not
    the stage's (a full disk: `write_problem`), else None."""

    def __init__(self, stage: str, notebook: Path, reason: str, page: Path | None = None,
                 problem: str | None = None):
        self.stage, self.notebook, self.problem = stage, notebook, problem
        shown = f"\n  the same as a web page: {page}" if page else ""
        super().__init__(f"stage '{stage}' failed: {reason}\n  executed notebook (with the traceback): {notebook}"
                         f"{shown}\n  finished stages are kept: fix the cause and rerun the same command")


def kernel_dir() -> Path:
    return Path(sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME


def ensure_kernel() -> str:
    """Install (or repair) the `prunestudy` kernelspec for *this* Python in sys.prefix, and put
    that folder first on JUPYTER_PATH, so papermill and JupyterLab start this environment's
    interpreter whatever other kernels of that name exist for the user or the system."""
    # log_level=CRITICAL: ipykernel warns on every start that loopback TCP is unencrypted (that line
    # would repeat five times per run in the terminal and in CI logs), and when Ctrl-C stops a cell
    # while the runner shuts the kernel down, it logs its failed reply as an ERROR (a ZMQError
    # traceback). The kernel's log is its own plumbing: cell errors reach the notebook, a dead
    # kernel is reported by papermill.
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                     "--IPKernelApp.log_level=CRITICAL"],
            "display_name": "Python (prunestudy)", "language": "python",
            "env": {"PYTHONUNBUFFERED": "1", "GLIBC_TUNABLES": kernels.MALLOC_TUNABLES},   # see kernels
            "metadata": {"debugger": True}}
    path = kernel_dir() / "kernel.json"
    if not path.is_file() or json.loads(path.read_text()) != spec:
        atomic.write_json(path, spec)
    data_dir = str(kernel_dir().parent.parent)
    paths = os.environ.get("JUPYTER_PATH", "").split(os.pathsep)
    if paths[0] != data_dir:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([data_dir, *[p for p in paths if p]])
    return KERNEL_NAME


def notebooks_dir() -> Path:
    return config.project_root() / "notebooks"


def link_timing(cfg: dict, run_dir: Path, st: stagestore.Store, retime: bool = False) -> None:
    """Before the analysis runs: each chain's timing/ (the study's, each in-run point's) a link to
    the store entry of its timing key on this machine (graph.timing_key), when its pruning left the
    latency to the timing stage; the analysis' run_timing claims and fills it, or finds it done.
    `retime` (--force timing): new entries, so that the timings other run folders link stay."""
    keys = graph.chain_keys(cfg)
    chains = [(run_dir, keys["retrain"])]
    chains += [(paths.curve_point_dir(run_dir, name), graph.point_keys(p, keys["data"])["retrain"])
               for name, p in curve_points(cfg)]
    for folder, retrain_key in chains:
        try:
            pm = atomic.read_json(paths.stage_dir(folder, "prune") / paths.METRICS)
        except (OSError, ValueError):
            continue
        if (pm.get("efficiency") or {}).get("latency_from") != graph.TIMING_PENDING:
            continue
        key = graph.timing_key(retrain_key, cfg["prune"]["latency_repeats"], cfg["train"]["device"])
        inputs = {s: paths.stage_dir(folder, s) for s in ("train", "prune", "retrain")}
        entry = usable_entry(st, "timing", key, inputs, paths.timing_dir(folder), fresh=retime)
        with stagestore.linking(entry):   # made if missing; `store gc` cannot remove it meanwhile
            stagestore.link(paths.timing_dir(folder), entry)


def usable_entry(st: stagestore.Store, stage: str, key: str, inputs: dict[str, Path], current: Path,
                 fresh: bool = False) -> Path:
    """The store entry a stage the runner links before it is computed (the timing, a retraining's
    control) goes into: the one `current` links to, or another complete one of this key computed
    from these inputs, or else one nobody uses yet (Store.fresh): never a complete entry computed
    from other inputs, which the stage would recompute in place under other run folders' links.
    `fresh`: a new computation (--force timing), whatever is complete."""
    if not fresh:
        linked = Path(current).resolve() if Path(current).is_symlink() else None
        for entry in ([linked] if linked in st.candidates(stage, key) else []) + st.candidates(stage, key):
            if records.problem(entry, key, inputs) is None:
                return entry
    return st.fresh(stage, key)


def keep_replaced(st: stagestore.Store | None, cfg: dict, run_dir: Path, stage: str, key: str,
                  log: Callable[[str], None], tag: str) -> None:
    """Before the runner relinks or recomputes a run folder's stage: what a notebook (or Python)
    computed there is kept in the stage store (stagestore.keep moves it in when it is not there
    yet), and one line says what is replaced and where it stays."""
    folder = paths.stage_dir(run_dir, stage)
    rec = records.read(folder) if not paths.dangling(folder, fix=False) else None
    if rec is None or rec.get("by", "prunestudy run") == "prunestudy run":
        if rec is not None and st is not None:
            stagestore.keep(folder, st, log)   # a stage computed here without a store, or a private copy
        return
    now, old = graph.key_params(stage, cfg), rec.get("params") or {}
    differ = ", ".join(f"{n} = {old.get(n)!r}" for n in sorted({*old, *now}) if old.get(n) != now.get(n))
    what = (f"the {rec['by']}'s {stage} here ({differ + '; ' if differ else ''}key {rec['key']}, computed "
            f"{rec.get('finished', '?')})")
    entry = stagestore.keep(folder, st, log) if st is not None and not folder.is_symlink() else \
        folder.resolve() if folder.is_symlink() else None
    if entry is None:
        log(f"{tag}: replaces {what}; it is not kept ("
            + ("no stage store: --store none" if st is None else "its files changed after it was computed") + ")")
        return
    links = "no run links it: computed by code of its own" if str(rec.get("code", {}).get(
        f"notebooks/{paths.NOTEBOOK_OF[stage]}", "")).startswith("ran:") else "a run with its parameters links it"
    log(f"{tag}: replaces {what}; it stays in the stage store, {entry} ({links})")


def notebook_parameters(stage: str, cfg: dict, run_dir: Path) -> dict:
    """What papermill injects into each notebook: its stage's parameters and its input paths."""
    if stage == "analysis":
        return {"run_dir": str(run_dir)}
    return {"run_dir": str(run_dir), **graph.key_params(stage, cfg),
            **{graph.stage(up).read_as: str(paths.stage_dir(run_dir, up)) for up in graph.stage(stage).reads}}


class PreflightError(ValueError):
    """A problem found before any work starts (the runner exits 2)."""


curve_points = paths.curve_points   # (folder name, parameters) of each curve point


def stage_inputs(cfg: dict, run_dir: Path, stage: str) -> dict[str, Path]:
    """The stage folders a stage reads (its record holds their keys and ids): for the analysis,
    the repeats' and the curve points' last stages too."""
    inputs = {up: paths.stage_dir(run_dir, up) for up in graph.stage(stage).reads}
    if stage == "analysis":
        inputs |= {f"seed-{s}/retrain": paths.stage_dir(paths.repeat_dir(run_dir, s), "retrain")
                   for s in config.repeat_seeds(cfg)}
        inputs |= {f"{paths.CURVE}/{name}/{stage}": paths.curve_point(run_dir, stage, name)
                   for name, _ in curve_points(cfg) for stage in graph.POINT}
    return inputs


def problem(cfg: dict, run_dir: Path, stage: str, key: str, *, verify: bool = False,
            log: Callable[[str], None] = print) -> str | None:
    """Why `stage` must (re)run in run_dir, or None when it is complete with this key: its record,
    its inputs (recomputed since?), its output files (missing, changed?) are all checked. `verify`
    (before the stage is used): its files' digests too; a store entry that fails is quarantined."""
    folder = paths.stage_dir(run_dir, stage)
    gone = paths.dangling(folder, fix=False)   # copied without its stage store: said so, not "no record"
    if gone:
        return gone
    why = records.problem(folder, key, stage_inputs(cfg, run_dir, stage),
                          (graph.key_params(stage, cfg), graph.code_files(stage)))
    if why is None and not paths.completion_marker(run_dir, stage).is_file():
        why = f"{paths.completion_marker(run_dir, stage).name} is missing"
    if why is None and verify:
        why = damaged(folder, log)
    return why


def damaged(folder: Path, log: Callable[[str], None] = print) -> str | None:
    """Why a complete stage folder's files are not what its stage wrote (records.verify), after moving
    it out of the stage store when it is an entry there (every run that links it computes it again)."""
    why = records.verify(folder)
    if why is not None and Path(folder).is_symlink():
        where = stagestore.quarantine(folder, why)
        if where is not None:
            log(f"==> the stored {Path(folder).name} entry {Path(folder).resolve().name} is damaged ({why}): "
                f"moved to {where}, computed again")
        why = f"damaged in the stage store: {why}"
    return why


def _reusable(entry: Path, key: str, stage: str, inputs: dict[str, Path]) -> bool:
    return records.problem(entry, key, inputs) is None and (entry / paths.marker(stage)).is_file()


def reuse(st: stagestore.Store, cfg: dict, run_dir: Path, stage: str, key: str,
          log: Callable[[str], None] = print, claimed: bool = False) -> bool:
    """Link the run folder's stage to a complete store entry of this key, if there is one whose
    files are the bytes its stage wrote (a damaged one is quarantined, and the stage computed).
    Each entry under a shared claim (stagestore.using: `store gc` cannot remove it meanwhile); one
    whose claim another process holds (computing it, or gc removing it) is passed over: the
    caller's claim path waits and rechecks. `claimed`: this process holds the key's claim already."""
    for entry in st.candidates(stage, key):
        with stagestore.using(entry, claimed and entry == st.entry(stage, key)) as ok:
            if not ok or not _reusable(entry, key, stage, stage_inputs(cfg, run_dir, stage)):
                continue
            why = records.verify(entry)
            if why is not None:
                where = stagestore.quarantine(entry, why)
                log(f"==> the stored {stage} entry {entry.name} is damaged ({why}): moved to {where}, computed again")
                continue
            stagestore.link(paths.stage_dir(run_dir, stage), entry)
            if (entry / paths.ENTRY_NOTEBOOK).is_file():
                stagestore.link(paths.executed_notebook(run_dir, stage), entry / paths.ENTRY_NOTEBOOK)
            return True
    return False


def execute_stage(cfg: dict, run_dir: Path, stage: str, key: str, *, kernel: str, stage_store: stagestore.Store | None,
                  log: Callable[[str], None], tag: str, refresh: bool = False, recheck: bool = True,
                  on_failure: Callable[[], object] = lambda: None, fresh_kernel: bool = False,
                  retime: bool = False) -> float | None:
    """Run one stage's notebook for run_dir under papermill, in the project's kernel: in its store
    entry (claimed: computed once, whoever asks) when the stage is stored, else in the run folder;
    check the record it wrote; returns its wall time. With `recheck`, a stored stage that another
    process completed while this one waited for its claim is linked, not recomputed: returns None.
    Raises StageFailed (the stage, the error's last line, the executed notebook) or
    KeyboardInterrupt; `on_failure` runs first. The notebook runs in this process's kernel, reset
    for it (prunestudy.kernels), or with `fresh_kernel` in a kernel of its own."""
    import papermill as pm

    src = notebooks_dir() / paths.NOTEBOOK_OF[stage]
    out = shown = paths.executed_notebook(run_dir, stage)   # shown: where the run folder has it
    stored = stage_store is not None and stage in graph.STORED
    paths.notebooks_dir(run_dir).mkdir(parents=True, exist_ok=True)
    log(f"{tag}: start ({src.name}, key {key})")
    start = time.perf_counter()
    parameters = notebook_parameters(stage, cfg, run_dir)
    if refresh:
        parameters["refresh_cache"] = True   # --force data: never reuse a cached crop set
    if retime:
        parameters["retime"] = True   # --force timing: the analysis times the models again
    try:
        with stage_store.claim(stage, key, log) if stored else nullcontext():
            if stored and recheck and reuse(stage_store, cfg, run_dir, stage, key, log, claimed=True):
                log(f"{tag}: completed meanwhile by another process (key {key}); linked, not recomputed")
                return None
            if stored:   # computed in an entry no run folder uses yet, which the run folder links to
                entry = stage_store.fresh(stage, key)
                with stagestore.linking(entry):   # `store gc` cannot remove it before the link is made
                    stagestore.link(paths.stage_dir(run_dir, stage), entry)
                out = entry / paths.ENTRY_NOTEBOOK
                stagestore.link(shown, out)   # before it runs: a failure's notebook is found in the run folder
                if stage == "retrain" and cfg["retrain"]["control"]:   # the control: shared by its own key
                    control = usable_entry(stage_store, "control", graph.all_keys(cfg)["control"],
                                           {"train": paths.stage_dir(run_dir, "train")}, entry / paths.CONTROL)
                    with stagestore.linking(control):   # made if missing; `store gc` keeps it
                        stagestore.link(entry / paths.CONTROL, control)
            elif shown.is_symlink():   # a link left by a stored run or a sweep point: never written through
                shown.unlink()
            if stage == "analysis" and stage_store is not None:
                link_timing(cfg, run_dir, stage_store, retime)
            try:
                kernels.execute_notebook(src, out, kernel_name=kernel, fresh=fresh_kernel, parameters=parameters,
                                         stdout_file=sys.stdout, stderr_file=sys.stderr)
            except BaseException:
                # a stage is done only once its whole notebook ran: the stage function may have
                # recorded its outputs before a later cell failed or Ctrl-C stopped it
                records.clear(paths.stage_dir(run_dir, stage))
                raise
            seconds = round(time.perf_counter() - start, 2)
            folder = paths.stage_dir(run_dir, stage)
            if stage == "analysis":   # the one stage the runner records: the report is rendered here
                log(f"==> report: {render_report(run_dir, cfg)}")
                records.write(folder, stage, key, graph.key_params(stage, cfg),
                              records.input_ids(stage_inputs(cfg, run_dir, stage)), seconds, "prunestudy run")
            rec = records.read(folder)
            if rec is None or rec["key"] != key:
                raise StageFailed(stage, out, f"the stage finished without the record of key {key} (found: "
                                  f"{rec and rec['key']}): its notebook must call the stage function with the "
                                  "parameters it was given")
            atomic.write_json(folder / paths.STAGE_RECORD, {**rec, "wall_seconds": seconds})   # still claimed
            if stored:   # complete: other run folders may link it from now on, nothing changes it
                stagestore.seal(folder.resolve())
                if (folder / paths.CONTROL).is_symlink():
                    stagestore.seal((folder / paths.CONTROL).resolve())
    except pm.PapermillExecutionError as e:
        on_failure()
        if e.ename == "KeyboardInterrupt":  # Ctrl-C reached the kernel first
            raise KeyboardInterrupt from None
        log(f"{tag}: FAILED after {time.perf_counter() - start:.1f} s")
        page = _render_failed(shown)
        problem = write_problem(f"{e.ename}: {e.evalue}", paths.stage_dir(run_dir, stage).resolve())
        raise StageFailed(stage, shown, f"{e.ename}: {_last_line(e.evalue)}" + (f"\n  {problem}" if problem else ""),
                          page, problem) from None
    return seconds


def _last_line(text: str) -> str:
    lines = [l for l in str(text).strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


# what a full disk says: Python's OSError (ENOSPC), and PyTorch's torch.save, whose C++ writer
# (caffe2's inline_container.cc) reports a short write without the errno or the file
DISK_FULL = ("No space left on device", "[Errno 28]")
TORCH_DISK_FULL = ("unexpected pos", "file write failed")   # with "inline_container" in the same message
UNWRITABLE = {errno.EACCES: "Permission denied", errno.EPERM: "Operation not permitted",
              errno.EROFS: "Read-only file system", errno.ENOTDIR: "a part of it is a file, not a folder"}


def disk_full(error: BaseException | str) -> bool:
    """Whether an error (an exception, or a notebook's error text) says that the disk is full: the
    one recognition of it, for `run`, a sweep's stages (any engine) and its preparation."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    text = str(error)
    return any(sign in text for sign in DISK_FULL) or \
        ("inline_container" in text and any(sign in text for sign in TORCH_DISK_FULL))


def write_problem(error: BaseException | str, path: str | os.PathLike) -> str | None:
    """The one line for an error that is the file system's, not the code's, naming `path` (where it
    wrote: an OSError's own file name first) and the fix: a full disk (`disk_full`), or a folder
    that cannot be written (no permission, read-only, a file on the way). None for other errors."""
    code, named = getattr(error, "errno", None), getattr(error, "filename", None)
    if not isinstance(error, BaseException):   # a notebook's error text: "PermissionError: [Errno 13] ...: 'path'"
        found = re.search(r"\[Errno (\d+)\][^'\n]*(?:'([^'\n]+)')?", error)
        code, named = (int(found[1]), found[2]) if found else (None, None)
    path = named or path
    if disk_full(error):
        return (f"the disk is full: {path} could not be written (No space left on device): free some space "
                "there and rerun the same command; finished stages are kept")
    if code in UNWRITABLE:
        return (f"{path} cannot be written ({UNWRITABLE[code]}): fix its permissions (or choose another "
                "folder) and rerun the same command")
    return None


def _render_failed(notebook: Path) -> Path | None:
    """The failed stage's executed notebook as HTML beside it (best effort: never hides the error)."""
    try:
        return render_html(notebook, notebook.with_suffix(".html"), hide_code=False)
    except Exception:  # noqa: BLE001 - the stage's own error is what matters
        return None


def preflight(cfg: dict, run_dir: Path | None = None, store: Path | None = None) -> None:
    """Checks that need the file system, before any work starts; `run_dir` where the run writes,
    linking into `store` (check_folder)."""
    if cfg["data"]["root"] != "embedded":
        from . import data

        data.check_layout(config.resolve_path(cfg["data"]["root"]))
    missing = [nb for nb in paths.NOTEBOOK_OF.values() if not (notebooks_dir() / nb).is_file()]
    if missing:
        raise FileNotFoundError(f"notebooks {', '.join(missing)} not found in {notebooks_dir()}: run "
                                "prunestudy from the project's checkout (or set PRUNESTUDY_HOME to it)")
    if run_dir is not None:
        check_folder(Path(run_dir), "run", store)
        check_writable(Path(run_dir))


_FOLDER = {"run": ("run folder", "--run-dir runs/mine"), "sweep": ("sweep folder", "--sweep-dir runs/my-grid")}


def check_folder(folder: Path, kind: str, store: Path | None) -> None:
    """Where a run ("run") or a sweep ("sweep": `prunestudy sweep`, `run --jobs`' .parallel/) may
    write, checked in this one place before any work: never the project (nor in its notebooks/),
    never the stage store, inside it or holding it (a run replaces its stage folders by links into
    the store: the store's own data/ and train/ would be removed), never a folder of something
    else (`_foreign`). A PreflightError names the folder, the problem and what to use instead."""
    name, fix = _FOLDER[kind]
    real, root = Path(folder).resolve(), config.project_root().resolve()
    if store is not None and root.is_relative_to(Path(store).resolve()):
        raise PreflightError(f"the stage store {store} is, or contains, the project {root}: choose a store "
                             "of its own, e.g. --store runs/.store")
    stores = [Path(store).resolve()] if store is not None else []
    why = _in_project(real, root) or next(filter(None, (_in_store(real, s) for s in [*stores, *_store_of(real)])),
                                          None) or _foreign(real, kind)
    if why:
        raise PreflightError(f"the {name} {real} {why}; choose a folder of its own, e.g. {fix}")


def _in_project(real: Path, root: Path) -> str | None:
    if root.is_relative_to(real) or real.is_relative_to(root / "notebooks"):
        return (f"is, or contains, the project {root} (or lies in its notebooks/): it would get executed "
                "notebooks and stage folders over the project's own files")
    return None


def _in_store(real: Path, store: Path) -> str | None:
    where = "is" if real == store else "lies in" if real.is_relative_to(store) else \
        "contains" if store.is_relative_to(real) else None
    return where and (f"{where} the stage store {store}: its stage folders would replace the store's own "
                      "folders with links")


def _store_of(real: Path) -> list[Path]:
    """The stage store the folder is or lies in, whichever store the run would use (`--run-dir
    runs/.store/train` has its own default store beside it): a folder whose data/ or train/ holds
    claim files (beside the entries) is a store; a run folder's never do."""
    for folder in (real, *real.parents):
        for stage in graph.CHAIN[:2]:
            place = folder / stage
            if place.is_dir() and not place.is_symlink() and next(place.glob(".*.claim"), None):
                return [folder]
    return []


def _foreign(real: Path, kind: str) -> str | None:
    """Why an existing folder is not one a run or sweep may write into: a sweep writes only into a
    new or empty folder, one a sweep began (run.lock, points/) or a sweep folder (grid.json); a run
    not into a folder that holds a run's names (RUN_NAMES, stage folders) but no params.json."""
    if not real.is_dir():
        return None
    names = {p.name for p in real.iterdir()}
    if kind == "sweep":
        if paths.SWEEP_GRID in names or names <= set(paths.SWEEP_BEGUN):
            return None
        return (f"is neither new, empty nor a sweep folder (no {paths.SWEEP_GRID}): a sweep writes points/, "
                "notebooks/ and its pages into it")
    clash = sorted(names & {*paths.RUN_NAMES, *paths.NOTEBOOK_OF})
    if paths.PARAMS in names or not clash:
        return None
    return f"is not a run folder (no {paths.PARAMS}) but holds {', '.join(clash)}: a run would replace them"


def owned(path: Path, run_dir: Path) -> Path:
    """`path`, if it really lies in the run folder; else a PreflightError: a link on its way leads out
    of it (into the store, another run), and the runner never removes or replaces anything there."""
    if path.exists() and not path.resolve().is_relative_to(Path(run_dir).resolve()):
        raise PreflightError(f"{path} leads out of the run folder {run_dir} (to {path.resolve()}) through a "
                             "link: refused to clear or replace it; remove that link and rerun")
    return path


def check_writable(run_dir: Path) -> None:
    """The run folder can be created and written, or a PreflightError saying so."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(run_dir / ".write-test", b"ok")
        (run_dir / ".write-test").unlink()
    except OSError as e:
        raise PreflightError(f"the run folder {run_dir} cannot be written ({e.strerror or e}): choose another "
                             f"with --run-dir, or fix its permissions / free space") from None


def write_results(run_dir: Path, cfg: dict, timings: dict, keys: dict) -> dict:
    """results.json from the stages completed so far, with their timings and keys."""
    from . import stages  # PyTorch and the statistics: the runner itself needs them only here

    results = stages.collect_results(run_dir, cfg, timings)
    results["stage_keys"] = keys
    atomic.write_json(run_dir / paths.RESULTS, results)
    return results


def sweep_report(sweep_dir: Path, log: Callable[[str], None] = print, fresh_kernel: bool = False) -> Path:
    """Run notebooks/06_sweep.ipynb on a sweep folder (tables, curves, sweep.csv and sweep.json),
    render sweep.html with the code hidden."""
    src = notebooks_dir() / paths.SWEEP_NOTEBOOK
    out = paths.notebooks_dir(sweep_dir) / paths.SWEEP_NOTEBOOK
    out.parent.mkdir(parents=True, exist_ok=True)
    kernels.execute_notebook(src, out, kernel_name=ensure_kernel(), fresh=fresh_kernel,
                             parameters={"sweep_dir": str(sweep_dir)}, stdout_file=sys.stdout, stderr_file=sys.stderr)
    page = render_html(out, Path(sweep_dir) / paths.SWEEP_REPORT, hide_code=True,
                       title=f"prunestudy sweep: {Path(sweep_dir).name}")
    log(f"==> sweep report: {page}")
    return page


def render_html(notebook: Path, target: Path, *, hide_code: bool, title: str | None = None) -> Path:
    """One executed notebook as a self-contained HTML page (figures embedded, nothing fetched)."""
    import nbformat

    resources = {"metadata": {"name": title or Path(notebook).stem}}
    body, _ = _exporter(hide_code).from_notebook_node(nbformat.read(notebook, as_version=4), resources=resources)
    atomic.write_bytes(target, body.encode())
    return target


@functools.cache
def _exporter(hide_code: bool):
    """nbconvert's HTML exporter with the project's template, made once per process: a new one
    compiles its Jinja templates again, about 40% of a page's time."""
    from nbconvert import HTMLExporter

    return HTMLExporter(template_name="prunestudy_report", extra_template_basedirs=[str(TEMPLATES)],
                        exclude_input=hide_code, exclude_input_prompt=hide_code,
                        exclude_output_prompt=hide_code, embed_images=True)


def render_report(run_dir: Path, cfg: dict) -> Path:
    """report.html from the analysis notebook (code hidden); every stage notebook (the repeats' and
    the curve points' of these parameters too) as HTML beside it."""
    nb_dir = paths.notebooks_dir(run_dir)
    repeats = [nb for s in config.repeat_seeds(cfg) for nb in paths.notebooks_dir(paths.repeat_dir(run_dir, s))
               .glob("0*.ipynb")]
    points = [nb for name, _ in curve_points(cfg) for nb in paths.notebooks_dir(paths.curve_point_dir(run_dir, name))
              .glob("0*.ipynb")]   # a folder of a point no longer asked for keeps its old pages
    for nb in sorted([*nb_dir.glob("0*.ipynb"), *repeats, *points]):
        if nb.is_symlink() and not nb.exists():   # the study's notebook, gone: computed outside the runner
            continue
        if nb.is_symlink():   # a stage of the store, whose entry is read-only: its page is the run folder's
            target, mine = nb.resolve(), nb.with_suffix(".html")
            page = target.with_suffix(".html")   # rendered into the entry by an earlier version
            if page.is_file() and page.stat().st_mtime_ns >= target.stat().st_mtime_ns:
                stagestore.link(mine, page)
            elif mine.is_symlink() or not mine.is_file() or mine.stat().st_mtime_ns < target.stat().st_mtime_ns:
                mine.unlink(missing_ok=True)
                render_html(target, mine, hide_code=False, title=nb.stem)
        else:
            render_html(nb, nb.with_suffix(".html"), hide_code=False)
    return render_html(paths.executed_notebook(run_dir, "analysis"), Path(run_dir) / paths.REPORT, hide_code=True,
                       title=f"prunestudy report: {Path(run_dir).name}")

