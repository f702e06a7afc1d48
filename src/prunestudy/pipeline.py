"""The runner: executes the five notebooks with papermill, in order, in the project's own kernel
(one kernel, reset between notebooks: prunestudy.kernels), then renders the HTML report with
nbconvert."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from . import config, kernels, paths, progress, records, stagestore, store

STAGES = paths.STAGES
KERNEL_NAME = "prunestudy"
TEMPLATES = Path(__file__).parent / "templates"


class StageFailed(RuntimeError):
    def __init__(self, stage: str, notebook: Path, reason: str, page: Path | None = None):
        self.stage, self.notebook = stage, notebook
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
        store.write_json(path, spec)
    data_dir = str(kernel_dir().parent.parent)
    paths = os.environ.get("JUPYTER_PATH", "").split(os.pathsep)
    if paths[0] != data_dir:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([data_dir, *[p for p in paths if p]])
    return KERNEL_NAME


def notebooks_dir() -> Path:
    return config.project_root() / "notebooks"


def default_run_dir(params_file: str | None, overrides: list[str], cfg: dict) -> Path:
    stem = Path(params_file).stem if params_file else "defaults"
    name = f"{stem}-{config.stage_hash(cfg)}" if overrides else stem
    return config.resolve_path(Path("runs") / name, config.project_root())   # the project's runs/, from anywhere


def notebook_parameters(stage: str, cfg: dict, run_dir: Path) -> dict:
    """What papermill injects into each notebook: its stage's parameters and its input paths."""
    if stage == "analysis":
        return {"run_dir": str(run_dir)}
    inputs = {"train": {"data_dir": "data"}, "prune": {"data_dir": "data", "model_dir": "train"},
              "retrain": {"data_dir": "data", "pruned_dir": "prune", "model_dir": "train"}}.get(stage, {})
    return {"run_dir": str(run_dir), **config.stage_params(stage, cfg),
            **{name: str(paths.stage_dir(run_dir, up)) for name, up in inputs.items()}}


# where, not what (and how, not what: refresh_cache rebuilds the same crop set): not part of a key
PATH_PARAMS = ("run_dir", "data_dir", "model_dir", "pruned_dir", "refresh_cache")


class PreflightError(ValueError):
    """A problem found before any work starts (the runner exits 2)."""


REPEAT_STAGES, POINT_STAGES = paths.REPEAT_STAGES, paths.POINT_STAGES
sweep_points = paths.sweep_points   # (folder name, parameters) of each in-run sweep point


def stage_keys(cfg: dict, run_dir: Path, *, after: str | None = None,
               names: tuple[str, ...] = STAGES) -> dict[str, str]:
    """Each stage's key: the hash of its own parameters and of the key of the stage before it, so a
    change reruns the stage it belongs to and every stage after it, and nothing before it. The
    analysis' key also holds the keys of the repeats' (`seeds`) and the sweep points' last stages."""
    keys, previous = {}, after
    for stage in names:
        params = {k: v for k, v in notebook_parameters(stage, cfg, run_dir).items() if k not in PATH_PARAMS}
        extra = {}
        if stage == "analysis" and config.repeat_seeds(cfg):
            extra["repeats"] = {str(s): repeat_keys(cfg, run_dir, s, keys["data"])["retrain"]
                                for s in config.repeat_seeds(cfg)}
        if stage == "analysis" and config.sweep_points(cfg):
            extra["sweep"] = {name: point_keys(pcfg, run_dir, name, keys["data"])["retrain"]
                              for name, pcfg in sweep_points(cfg)}
        keys[stage] = records.stage_key(stage, params, previous, **extra)
        previous = keys[stage]
    return keys


def repeat_keys(cfg: dict, run_dir: Path, seed: int, data_key: str) -> dict[str, str]:
    """Keys of a repeat's stages: its parameters (the study's, with `seed`) after the shared data."""
    return stage_keys(config.repeat_config(cfg, seed), paths.repeat_dir(run_dir, seed), after=data_key,
                      names=REPEAT_STAGES)


def point_keys(pcfg: dict, run_dir: Path, name: str, data_key: str) -> dict[str, str]:
    """Keys of a sweep point's stages: its parameters after the shared data (its training is the
    study's: the same key)."""
    return stage_keys(pcfg, paths.sweep_point_dir(run_dir, name), after=data_key, names=REPEAT_STAGES)


def stage_inputs(cfg: dict, run_dir: Path, stage: str) -> dict[str, Path]:
    """The stage folders a stage reads (its record holds their keys and ids): for the analysis,
    the repeats' and the sweep points' last stages too."""
    inputs = {up: paths.stage_dir(run_dir, up) for up in records.INPUTS[stage]}
    if stage == "analysis":
        inputs |= {f"seed-{s}/retrain": paths.stage_dir(paths.repeat_dir(run_dir, s), "retrain")
                   for s in config.repeat_seeds(cfg)}
        inputs |= {f"{paths.SWEEP}/{name}/{stage}": paths.sweep_point(run_dir, stage, name)
                   for name, _ in sweep_points(cfg) for stage in POINT_STAGES}
    return inputs


def problem(cfg: dict, run_dir: Path, stage: str, key: str) -> str | None:
    """Why `stage` must (re)run in run_dir, or None when it is complete with this key: its record,
    its inputs (recomputed since?), its output files (missing, changed?) are all checked."""
    why = records.problem(paths.stage_dir(run_dir, stage), key, stage_inputs(cfg, run_dir, stage))
    if why is None and not paths.completion_marker(run_dir, stage).is_file():
        why = f"{paths.completion_marker(run_dir, stage).name} is missing"
    return why


def run(cfg: dict, run_dir: str | Path, *, force: str | None = None, log: Callable[[str], None] = print,
        store_root: str | Path | None = None, fresh_kernels: bool = False, jobs: int = 1) -> dict:
    """Run the study into run_dir, skipping every stage already complete with the same key (in the
    run folder, or in the stage store: then it is linked, not recomputed); `force` reruns from
    that stage on. `store_root`: the stage store (None: stagestore.default_root; "none": no store,
    every stage computed in the run folder). `fresh_kernels`: a new kernel per notebook, rather
    than one kernel reset between them (prunestudy.kernels). `jobs` > 1: the chains (the study, its
    sweep points and its `seeds` repeats) are computed first, `jobs` stages at a time
    (`parallel_points`). Holds the run folder's lock throughout (a
    second writer is refused: records.LockedError). Returns results.json's content."""
    import papermill  # noqa: F401  (fail here, before any work, if it is missing)

    run_dir = config.resolve_path(run_dir)
    if force is not None and force not in STAGES:
        raise PreflightError(f"--force must name a stage ({', '.join(STAGES)}), got {force!r}")
    preflight(cfg, run_dir)
    if sweep_points(cfg) and config.repeat_seeds(cfg):
        log(f"==> note: the sweep (prune.amounts) runs on the study's seed ({cfg['seed']}) only, not on the repeats of "
            f"`seeds`: for bands over seeds, {config.SWEEP_SEEDS_HINT}")
    with records.RunLock(run_dir, f"prunestudy run (pid {os.getpid()})") as lock:
        os.environ[records.TOKEN_ENV] = lock.token   # the kernels it starts inherit it: they may write
        try:
            stage_store = _store(run_dir, store_root)
            if jobs > 1:
                parallel_points(cfg, run_dir, stage_store, jobs, log, fresh_kernels, force)
            return _run(cfg, run_dir, force, log, stage_store, fresh_kernels)
        finally:
            os.environ.pop(records.TOKEN_ENV, None)


def parallel_points(cfg: dict, run_dir: Path, stage_store: stagestore.Store | None, jobs: int,
                    log: Callable[[str], None], fresh_kernels: bool = False, force: str | None = None) -> None:
    """The study's chain, its sweep points and its `seeds` repeats are points of one stage graph,
    with the keys of the grid points they equal. With `--jobs N` they are computed first, N stages
    at a time, by the sweep's local engine (prunestudy.sweep) into the stage store, and the run then
    links them like any stored stage. Each of those stages computes with cores/N threads, so its
    figures may differ in the last digits from a run with --jobs 1 (sweep.task_threads). A stage
    that fails there runs again in the chain, which reports it as usual."""
    seeds, points = config.repeat_seeds(cfg), sweep_points(cfg)
    if not seeds and not points:
        log(f"==> --jobs {jobs}: one chain (no seeds repeats, no sweep): its stages run one after another")
        return
    if stage_store is None or force is not None:
        log(f"==> --jobs {jobs}: the chains run one after another ("
            + ("no stage store: --store none" if stage_store is None else f"--force {force} reruns them") + ")")
        return
    from . import grid, sweep  # sweep imports this module

    main = config.repeat_config(cfg, cfg["seed"])   # the study's own chain: the point of its seed
    pts = [grid.Point(f"seed={cfg['seed']}", {"seed": cfg["seed"]}, main)]
    pts += [grid.Point(name, {"prune.method": p["prune"]["method"], "prune.amount": p["prune"]["amount"]}, p)
            for name, p in points]
    pts += [grid.Point(f"seed={s}", {"seed": s}, config.repeat_config(cfg, s)) for s in seeds]
    log(f"==> --jobs {jobs}: {len(pts)} chains (the study, {len(points)} sweep point(s), {len(seeds)} repeat(s)) "
        f"computed {jobs} stages at a time (the sweep's local engine), then linked")
    summary = sweep.run(pts, run_dir / paths.PARALLEL, jobs=jobs, store_root=stage_store.root, log=log,
                        fresh_kernels=fresh_kernels, kinds=("data", *REPEAT_STAGES))
    if summary["failed"]:
        log(f"==> --jobs {jobs}: {len(summary['failed'])} stage(s) failed; they run again below, one at a time")
    else:
        shutil.rmtree(run_dir / paths.PARALLEL, ignore_errors=True)   # its stages are in the store


def _store(run_dir: Path, root: str | Path | None) -> stagestore.Store | None:
    if root is not None and str(root).lower() == "none":
        return None
    return stagestore.Store(root if root is not None else stagestore.default_root(run_dir))


def _run(cfg: dict, run_dir: Path, force: str | None, log: Callable[[str], None],
         stage_store: stagestore.Store | None, fresh_kernels: bool = False) -> dict:
    paths.notebooks_dir(run_dir).mkdir(parents=True, exist_ok=True)
    store.write_json(run_dir / paths.PARAMS, cfg)
    kernel = ensure_kernel()
    os.environ.setdefault(progress.ENV, "log")  # kernels inherit it: progress bars paced for a log
    keys = stage_keys(cfg, run_dir)
    forced = STAGES[STAGES.index(force):] if force else ()
    timings: dict[str, float] = {}
    chain = _Chain(kernel, forced, log, invalidate=paths.stage_record(run_dir, "analysis"), store=stage_store,
                   fresh_kernels=fresh_kernels)
    ran = chain.run(cfg, run_dir, STAGES[:-1], keys, timings, lambda: _finish(run_dir, cfg, timings, keys))
    points = sweep_points(cfg)
    for n, (name, pcfg) in enumerate(points, 1):   # the sweep: other methods and amounts, the same training
        pdir, pkeys = paths.sweep_point_dir(run_dir, name), point_keys(pcfg, run_dir, name, keys["data"])
        chain.label = f"sweep {name}: point {n}/{len(points)}"
        ran |= run_point(chain, pcfg, pdir, pkeys, run_dir, keys, lambda: _finish(run_dir, cfg, timings, keys))
    seeds = config.repeat_seeds(cfg)
    for n, seed in enumerate(seeds, 1):   # the same study with other seeds, on the same data
        rcfg, rdir = config.repeat_config(cfg, seed), paths.repeat_dir(run_dir, seed)
        rkeys, rtimes = repeat_keys(cfg, run_dir, seed, keys["data"]), {}
        new = not paths.stage_dir(rdir, "data").exists()   # a new repeat: its stages may be in the store
        relinked = link_data(paths.stage_dir(run_dir, "data"), paths.stage_dir(rdir, "data")) and not new
        chain.label = f"seed {seed}: repeat {n}/{len(seeds)}"
        ran |= chain.run(rcfg, rdir, REPEAT_STAGES, rkeys, rtimes,
                         lambda d=rdir, c=rcfg, t=rtimes, k=rkeys: _finish(d, c, t, k),
                         after_change=relinked)
    chain.label = ""
    saved = run_dir / paths.RESULTS
    if ran or _saved_params(saved) != cfg:
        _finish(run_dir, cfg, timings, keys)   # what the analysis reads: these parameters, every stage so far
    ran |= chain.run(cfg, run_dir, ("analysis",), keys, timings, lambda: _finish(run_dir, cfg, timings, keys),
                     after_change=bool(ran))
    if not ran:
        log(f"==> nothing to do: every stage is up to date in {run_dir} (--force STAGE reruns from STAGE)")
    return store.read_json(saved)


def run_point(chain: _Chain, pcfg: dict, pdir: Path, pkeys: dict, run_dir: Path, keys: dict,
              finish: Callable[[], dict]) -> set[str]:
    """One sweep point: its folder links the study's data (hard links) and training (a symlink), then
    its pruning and retraining run as a chain of their own (linked from the stage store when
    computed before, by this run, another or a grid). A point with the study's own method and
    amount has the study's keys: its folders link the study's."""
    assert pkeys["train"] == keys["train"], "a sweep point trains as the study does"
    new = not paths.stage_dir(pdir, "data").exists()
    relinked = link_data(paths.stage_dir(run_dir, "data"), paths.stage_dir(pdir, "data")) and not new
    stagestore.link(paths.stage_dir(pdir, "train"), paths.stage_dir(run_dir, "train"))
    if all(pkeys[s] == keys[s] for s in POINT_STAGES):
        for stage in POINT_STAGES:
            stagestore.link(paths.stage_dir(pdir, stage), paths.stage_dir(run_dir, stage))
            nb = paths.executed_notebook(run_dir, stage)   # none where the stage was computed outside the runner
            if nb.exists():
                stagestore.link(paths.executed_notebook(pdir, stage), nb)
            else:
                paths.executed_notebook(pdir, stage).unlink(missing_ok=True)
        chain.log(f"==> [{chain.label}]: the study's own method and amount: its prune and retrain folders linked")
        return set()
    return chain.run(pcfg, pdir, POINT_STAGES, pkeys, {}, finish, after_change=relinked)   # finish: the study's results


def _saved_params(path: Path) -> dict | None:
    """The parameters results.json was written with; None when it is missing or damaged (it is then
    rebuilt from the stage outputs)."""
    try:
        return store.read_json(path).get("params")
    except (OSError, ValueError, AttributeError):
        return None


class _Chain:
    """Runs stages in order, each as its notebook under papermill, skipping those complete with the
    same key until one runs; from there on every later stage reruns (its inputs changed)."""

    def __init__(self, kernel: str, forced: tuple[str, ...], log: Callable[[str], None], invalidate: Path,
                 store: stagestore.Store | None = None, fresh_kernels: bool = False):
        self.kernel, self.forced, self.log, self.label = kernel, forced, log, ""
        self.fresh_kernels = fresh_kernels
        self.invalidate = invalidate   # the analysis' record: outdated as soon as any stage reruns
        self.store = store

    def run(self, cfg: dict, run_dir: Path, names: tuple[str, ...], keys: dict, timings: dict,
            finish: Callable[[], dict], *, after_change: bool = False) -> set[str]:
        """Run `names` in order; `after_change`: their inputs changed, so all of them rerun."""
        ran: set[str] = set()
        changed = after_change
        for j, stage in enumerate(names):
            tag = f"==> [{self.label or f'{STAGES.index(stage) + 1}/{len(STAGES)}'}] {stage}"
            stored = self.store is not None and stage in stagestore.STORED
            if not changed and stage not in self.forced:
                why = problem(cfg, run_dir, stage, keys[stage])
                linked = why is not None and stored and reuse(self.store, cfg, run_dir, stage, keys[stage])
                if why is None or linked:   # one line each: linked from the store, or up to date here
                    rec = records.read(paths.stage_dir(run_dir, stage)) or {}
                    timings[stage] = rec.get("wall_seconds", rec.get("seconds", 0.0))
                    self.log(f"{tag}: found in the stage store (key {keys[stage]}), linked" if linked
                             else f"{tag}: up to date (key {keys[stage]}), skipped")
                    continue
                if records.read(paths.stage_dir(run_dir, stage)) is not None or \
                        paths.completion_marker(run_dir, stage).is_file():
                    self.log(f"{tag}: {why}: it reruns, and every stage after it")
            if not ran:  # this stage and every later one will run: none of them counts as complete now
                self.invalidate.unlink(missing_ok=True)
                for later in names[j:]:
                    folder = paths.stage_dir(run_dir, later)
                    if folder.is_symlink():   # a store entry other runs may use: unlinked, not cleared
                        folder.unlink()
                        continue
                    records.clear(folder)
                    for stale in folder.glob(".*.tmp"):  # left by a killed atomic write
                        stale.unlink(missing_ok=True)
            recheck = not changed and stage not in self.forced   # another process may finish it meanwhile
            changed = True
            seconds = execute_stage(cfg, run_dir, stage, keys[stage], kernel=self.kernel, stage_store=self.store,
                                    log=self.log, tag=tag, refresh=stage == "data" and stage in self.forced,
                                    recheck=recheck, on_failure=finish, fresh_kernel=self.fresh_kernels)
            if seconds is None:   # found complete in the store once claimed: nothing after it must rerun
                rec = records.read(paths.stage_dir(run_dir, stage)) or {}
                timings[stage] = rec.get("wall_seconds", rec.get("seconds", 0.0))
                changed = False
                continue
            ran.add(stage)
            timings[stage] = seconds
            finish()
            self.log(f"{tag}: done in {seconds:.1f} s")
        return ran




def reuse(st: stagestore.Store, cfg: dict, run_dir: Path, stage: str, key: str) -> bool:
    """Link the run folder's stage to a complete store entry of this key, if there is one."""
    entry = st.entry(stage, key)
    if records.problem(entry, key, stage_inputs(cfg, run_dir, stage)) is not None \
            or not (entry / paths.marker(stage)).is_file():
        return False
    stagestore.link(paths.stage_dir(run_dir, stage), entry)
    if st.notebook(stage, key).is_file():
        stagestore.link(paths.executed_notebook(run_dir, stage), st.notebook(stage, key))
    return True


def execute_stage(cfg: dict, run_dir: Path, stage: str, key: str, *, kernel: str, stage_store: stagestore.Store | None,
                  log: Callable[[str], None], tag: str, refresh: bool = False, recheck: bool = True,
                  on_failure: Callable[[], object] = lambda: None, fresh_kernel: bool = False) -> float | None:
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
    stored = stage_store is not None and stage in stagestore.STORED
    paths.notebooks_dir(run_dir).mkdir(parents=True, exist_ok=True)
    log(f"{tag}: start ({src.name}, key {key})")
    start = time.perf_counter()
    parameters = notebook_parameters(stage, cfg, run_dir)
    if refresh:
        parameters["refresh_cache"] = True   # --force data: never reuse a cached crop set
    try:
        with stage_store.claim(stage, key, log) if stored else nullcontext():
            if stored and recheck and reuse(stage_store, cfg, run_dir, stage, key):
                log(f"{tag}: completed meanwhile by another process (key {key}); linked, not recomputed")
                return None
            if stored:   # computed in its store entry, which the run folder links to
                stagestore.link(paths.stage_dir(run_dir, stage), stage_store.entry(stage, key))
                out = stage_store.notebook(stage, key)
                stagestore.link(shown, out)   # before it runs: a failure's notebook is found in the run folder
                if stage == "retrain" and cfg["retrain"]["control"]:   # the control: shared by its own key
                    from .grid import point_keys

                    control = stage_store.entry("control", point_keys(cfg)["control"])
                    control.mkdir(parents=True, exist_ok=True)
                    stagestore.link(stage_store.entry(stage, key) / paths.CONTROL, control)
            elif shown.is_symlink():   # a link left by a stored run or a sweep point: never written through
                shown.unlink()
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
                records.write(folder, stage, key, {}, records.input_ids(stage_inputs(cfg, run_dir, stage)), seconds,
                              "prunestudy run")
            rec = records.read(folder)
            if rec is None or rec["key"] != key:
                raise StageFailed(stage, out, f"the stage finished without the record of key {key} (found: "
                                  f"{rec and rec['key']}): its notebook must call the stage function with the "
                                  "parameters it was given")
            store.write_json(folder / paths.STAGE_RECORD, {**rec, "wall_seconds": seconds})   # still claimed
    except pm.PapermillExecutionError as e:
        on_failure()
        if e.ename == "KeyboardInterrupt":  # Ctrl-C reached the kernel first
            raise KeyboardInterrupt from None
        log(f"{tag}: FAILED after {time.perf_counter() - start:.1f} s")
        page = _render_failed(shown)
        raise StageFailed(stage, shown, f"{e.ename}: {_last_line(e.evalue)}{_hint(e)}", page) from None
    return seconds


def link_data(src: Path, dst: Path) -> bool:
    """A repeat's data/: hard links to the run's data files (copies where links fail), refreshed
    whenever a file differs (the data stage reran). True when anything changed. The data stays
    immutable: no stage writes there."""
    dst.mkdir(parents=True, exist_ok=True)
    names = {f.name for f in src.iterdir() if f.is_file() and not f.name.startswith(".")}
    changed = False
    for f in dst.iterdir():
        if f.is_file() and f.name not in names:
            f.unlink()
            changed = True
    for name in sorted(names):
        a, b = src / name, dst / name
        if b.is_file() and (os.path.samefile(a, b) or (a.stat().st_size == b.stat().st_size and _same_bytes(a, b))):
            continue
        changed = True
        store.link_file(a, b)
    return changed


def _same_bytes(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    """Byte-for-byte equality (a copy made where hard links are not possible)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def _last_line(text: str) -> str:
    lines = [l for l in str(text).strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def _hint(e) -> str:
    if "No space left on device" in str(e.evalue) or "Errno 28" in str(e.evalue):
        return "\n  the disk is full: free some space and rerun the same command; finished stages are kept"
    return ""


def _render_failed(notebook: Path) -> Path | None:
    """The failed stage's executed notebook as HTML beside it (best effort: never hides the error)."""
    try:
        return render_html(notebook, notebook.with_suffix(".html"), hide_code=False)
    except Exception:  # noqa: BLE001 - the stage's own error is what matters
        return None


def preflight(cfg: dict, run_dir: Path | None = None) -> None:
    """Checks that need the file system, before any work starts."""
    if cfg["data"]["root"] != "embedded":
        from . import data

        data.check_layout(config.resolve_path(cfg["data"]["root"]))
    missing = [nb for nb in paths.NOTEBOOK_OF.values() if not (notebooks_dir() / nb).is_file()]
    if missing:
        raise FileNotFoundError(f"notebooks {', '.join(missing)} not found in {notebooks_dir()}: run "
                                "prunestudy from the project's checkout (or set PRUNESTUDY_HOME to it)")
    if run_dir is not None:
        check_not_project(Path(run_dir))
        check_writable(Path(run_dir))


def check_not_project(run_dir: Path) -> None:
    """A run folder is never the project, nor holds it, nor lives in its notebooks/: a run writes
    its executed notebooks and stage folders there."""
    root, rd = config.project_root().resolve(), Path(run_dir).resolve()
    nb = root / "notebooks"
    if root.is_relative_to(rd) or rd.is_relative_to(nb):
        raise PreflightError(f"the run folder {rd} is, or contains, the project {root} (or lies in its "
                             "notebooks/): a run writes executed notebooks and stage folders into its folder, "
                             "over the project's own files; choose a folder of its own, e.g. --run-dir runs/mine")


def check_writable(run_dir: Path) -> None:
    """The run folder can be created and written, or a PreflightError saying so."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        store.write_bytes(run_dir / ".write-test", b"ok")
        (run_dir / ".write-test").unlink()
    except OSError as e:
        raise PreflightError(f"the run folder {run_dir} cannot be written ({e.strerror or e}): choose another "
                             f"with --run-dir, or fix its permissions / free space") from None


def _finish(run_dir: Path, cfg: dict, timings: dict, keys: dict) -> dict:
    """results.json from the stages completed so far, with their timings and keys."""
    from . import stages  # PyTorch and the statistics: the runner itself needs them only here

    results = stages.collect_results(run_dir, cfg, timings)
    results["stage_keys"] = keys
    store.write_json(run_dir / paths.RESULTS, results)
    return results


def render_html(notebook: Path, target: Path, *, hide_code: bool, title: str | None = None) -> Path:
    """One executed notebook as a self-contained HTML page (figures embedded, nothing fetched)."""
    import nbformat

    resources = {"metadata": {"name": title or Path(notebook).stem}}
    body, _ = _exporter(hide_code).from_notebook_node(nbformat.read(notebook, as_version=4), resources=resources)
    store.write_bytes(target, body.encode())
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
    the sweep points' of these parameters too) as HTML beside it."""
    nb_dir = paths.notebooks_dir(run_dir)
    repeats = [nb for s in config.repeat_seeds(cfg) for nb in paths.notebooks_dir(paths.repeat_dir(run_dir, s))
               .glob("0*.ipynb")]
    points = [nb for name, _ in sweep_points(cfg) for nb in paths.notebooks_dir(paths.sweep_point_dir(run_dir, name))
              .glob("0*.ipynb")]   # a folder of a point no longer asked for keeps its old pages
    for nb in sorted([*nb_dir.glob("0*.ipynb"), *repeats, *points]):
        if nb.is_symlink() and not nb.exists():   # the study's notebook, gone: computed outside the runner
            continue
        if nb.is_symlink():   # a stage of the store: its page is rendered once, beside its notebook there
            target = nb.resolve()
            page = target.with_suffix(".html")
            if not page.is_file() or page.stat().st_mtime_ns < target.stat().st_mtime_ns:
                render_html(target, page, hide_code=False, title=nb.stem)
            stagestore.link(nb.with_suffix(".html"), page)
        else:
            render_html(nb, nb.with_suffix(".html"), hide_code=False)
    return render_html(paths.executed_notebook(run_dir, "analysis"), Path(run_dir) / paths.REPORT, hide_code=True,
                       title=f"prunestudy report: {Path(run_dir).name}")
