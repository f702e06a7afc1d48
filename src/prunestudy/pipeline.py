"""The runner: a study's chain (data, train, prune, retrain, analysis), its in-run points
(`prune.amounts`) and repeats (`seeds`), as tasks of the scheduling loop (prunestudy.schedule)
run in order in this process (its Inline executor) into one run folder, each stage through
`prunestudy.execute` (its notebook under papermill in the project's own kernel, or linked from the
stage store); `--jobs N` first computes the chains' stages on the same loop with the local pool
(prunestudy.worker), then links them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import atomic, config, execute, graph, grid, paths, progress, records, runlock, schedule, stagestore, worker

STAGES = graph.CHAIN   # a run folder's stages, in order
FORCEABLE = (*STAGES, "timing")   # --force timing: the analysis times the models again, nothing else reruns


def default_run_dir(params_file: str | None, overrides: list[str], cfg: dict) -> Path:
    stem = Path(params_file).stem if params_file else "defaults"
    name = f"{stem}-{config.stage_hash(cfg)}" if overrides else stem
    return config.resolve_path(Path("runs") / name, config.project_root())   # the project's runs/, from anywhere


def run(cfg: dict, run_dir: str | Path, *, force: str | None = None, log: Callable[[str], None] = print,
        store_root: str | Path | None = None, fresh_kernels: bool = False, jobs: int = 1) -> dict:
    """Run the study into run_dir, skipping every stage already complete with the same key (in the
    run folder, or in the stage store: then it is linked, not recomputed); `force` reruns from
    that stage on. `store_root`: the stage store (None: the one the run folder recorded, else
    stagestore.default_root; "none": no store, every stage computed in the run folder;
    stagestore.choose). `fresh_kernels`: a new kernel per notebook, rather
    than one kernel reset between them (prunestudy.kernels). `jobs` > 1: the chains (the study, its
    curve points and its `seeds` repeats) are computed first, `jobs` stages at a time
    (`parallel_points`). Holds the run folder's lock throughout (a
    second writer is refused: runlock.LockedError). Returns results.json's content."""
    import papermill  # noqa: F401  (fail here, before any work, if it is missing)

    run_dir = config.resolve_path(run_dir)
    if force is not None and force not in FORCEABLE:
        raise execute.PreflightError(f"--force must name a stage ({', '.join(FORCEABLE)}), got {force!r}")
    root = stagestore.choose(run_dir, store_root)
    execute.preflight(cfg, run_dir, root)
    if execute.curve_points(cfg) and config.repeat_seeds(cfg):
        log(f"==> note: the curve (prune.amounts) runs on the study's seed ({cfg['seed']}) only, not on the repeats of "
            f"`seeds`: for bands over seeds, {config.SWEEP_SEEDS_HINT}")
    with runlock.RunLock(run_dir, f"prunestudy run (pid {os.getpid()})") as lock:
        os.environ[runlock.TOKEN_ENV] = lock.token   # the kernels it starts inherit it: they may write
        try:
            stage_store = stagestore.Store(root) if root is not None else None
            pooled = jobs > 1 and parallel_points(cfg, run_dir, stage_store, jobs, log, fresh_kernels, force)
            if stage_store is not None:   # a rerun from any directory, or of a sweep's point, uses it again;
                # after --jobs' checks of .parallel/: a refused run writes nothing (the store registers it)
                stagestore.record(run_dir, stage_store.root)
            results = _run(cfg, run_dir, force, log, stage_store, fresh_kernels)
            if pooled:   # its links go, not their entries; only now, as the run folder links them (store gc)
                shutil.rmtree(run_dir / paths.PARALLEL, ignore_errors=True)
            return results
        finally:
            os.environ.pop(runlock.TOKEN_ENV, None)


def parallel_points(cfg: dict, run_dir: Path, stage_store: stagestore.Store | None, jobs: int,
                    log: Callable[[str], None], fresh_kernels: bool = False, force: str | None = None) -> bool:
    """The study's chain, its curve points and its `seeds` repeats are points of one stage graph,
    with the keys of the grid points they equal. With `--jobs N` they are computed first, N stages
    at a time, on the local pool (prunestudy.worker) into the stage store, and the run then
    links them like any stored stage. Each of those stages computes with cores/N threads, so its
    figures may differ in the last digits from a run with --jobs 1 (worker.task_threads). A stage
    that fails there runs again in the chain, which reports it as usual. True: every stage was
    computed there (its folder, `.parallel/`, is removed once the run links them)."""
    seeds, points = config.repeat_seeds(cfg), execute.curve_points(cfg)
    if not seeds and not points:
        log(f"==> --jobs {jobs}: one chain (no seeds repeats, no curve): its stages run one after another")
        return False
    if stage_store is None or force is not None:
        log(f"==> --jobs {jobs}: the chains run one after another ("
            + ("no stage store: --store none" if stage_store is None else f"--force {force} reruns them") + ")")
        return False
    main = config.repeat_config(cfg, cfg["seed"])   # the study's own chain: the point of its seed
    pts = [grid.Point(f"seed={cfg['seed']}", {"seed": cfg["seed"]}, main)]
    pts += [grid.Point(name, {"prune.method": p["prune"]["method"], "prune.amount": p["prune"]["amount"]}, p)
            for name, p in points]
    pts += [grid.Point(f"seed={s}", {"seed": s}, config.repeat_config(cfg, s)) for s in seeds]
    log(f"==> --jobs {jobs}: {len(pts)} chains (the study, {len(points)} curve point(s), {len(seeds)} repeat(s)) "
        f"computed {jobs} stages at a time (the local pool), then linked")
    folder = run_dir / paths.PARALLEL
    execute.check_folder(folder, "sweep", stage_store.root)   # never a link planted into the store or elsewhere
    for p in pts:
        execute.preflight(p.cfg, paths.point_dir(folder, p.name), stage_store.root)
    with runlock.RunLock(folder, f"prunestudy run --jobs {jobs} (pid {os.getpid()})"):
        summary = worker.compute(pts, folder, stage_store, jobs=jobs, log=log, fresh_kernels=fresh_kernels,
                                 kinds=("data", *graph.REPEAT))
    if summary["failed"]:
        log(f"==> --jobs {jobs}: {len(summary['failed'])} stage(s) failed; they run again below, one at a time")
    return not summary["failed"]


def _run(cfg: dict, run_dir: Path, force: str | None, log: Callable[[str], None],
         stage_store: stagestore.Store | None, fresh_kernels: bool = False) -> dict:
    rename_old_curve(run_dir)
    paths.notebooks_dir(run_dir).mkdir(parents=True, exist_ok=True)
    atomic.write_json(run_dir / paths.PARAMS, cfg)
    kernel = execute.ensure_kernel()
    os.environ.setdefault(progress.ENV, "log")  # kernels inherit it: progress bars paced for a log
    keys = graph.chain_keys(cfg)
    forced = ("analysis",) if force == "timing" else STAGES[STAGES.index(force):] if force else ()
    timings: dict[str, float] = {}

    def finish() -> dict:   # results.json from the stages so far
        return execute.write_results(run_dir, cfg, timings, keys)

    chain = _Chain(kernel, forced, log, invalidate=paths.stage_record(run_dir, "analysis"), store=stage_store,
                   fresh_kernels=fresh_kernels, retime=force == "timing", root=run_dir)
    folders = [_Folder("study", "", cfg, run_dir, STAGES[:-1], keys, timings, finish)]
    points = execute.curve_points(cfg)
    for n, (name, pcfg) in enumerate(points, 1):   # the curve: other methods and amounts, the same training
        pdir, pkeys = paths.curve_point_dir(run_dir, name), graph.point_keys(pcfg, keys["data"])
        folders.append(_Folder(f"{paths.CURVE}/{name}", f"curve {name}: point {n}/{len(points)}", pcfg, pdir,
                               graph.POINT, pkeys, {}, finish,   # finish: the study's results
                               before=lambda c=pcfg, d=pdir, k=pkeys: link_point(chain, c, d, k, run_dir, keys),
                               after="study:train"))
    seeds = config.repeat_seeds(cfg)
    for n, seed in enumerate(seeds, 1):   # the same study with other seeds, on the same data
        rcfg, rdir = config.repeat_config(cfg, seed), paths.repeat_dir(run_dir, seed)
        rkeys, rtimes = graph.repeat_keys(cfg, seed, keys["data"]), {}
        folders.append(_Folder(f"seed={seed}", f"seed {seed}: repeat {n}/{len(seeds)}", rcfg, rdir, graph.REPEAT,
                               rkeys, rtimes,
                               lambda d=rdir, c=rcfg, t=rtimes, k=rkeys: execute.write_results(d, c, t, k),
                               before=lambda d=rdir: link_repeat(run_dir, d), after="study:data"))
    saved = run_dir / paths.RESULTS

    def before_analysis() -> bool:
        if chain.ran or _saved_params(saved) != cfg:
            finish()   # what the analysis reads: these parameters, every stage so far
        return bool(chain.ran)
    folders.append(_Folder("", "", cfg, run_dir, ("analysis",), keys, timings, finish, before=before_analysis,
                           after=tuple(f"{f.name}:{f.names[-1]}" for f in folders)))
    todo = {t.id: t for f in folders for t in f.tasks()}
    by_task = {t.id: (f, j) for f in folders for j, t in enumerate(f.tasks())}
    schedule.run(todo, schedule.Inline(), lambda t: (chain.step, *by_task[t.id]), log)
    if not chain.ran:
        log(f"==> nothing to do: every stage is up to date in {run_dir} (--force STAGE reruns from STAGE)")
    return atomic.read_json(saved)


def rename_old_curve(run_dir: Path) -> bool:
    """A run folder of a version that called the curve's folder `sweep/`: renamed to `curve/` once, so
    that its points are found (their stages, links relative to the folder, work as they were)."""
    old, new = run_dir / paths.OLD_CURVE, run_dir / paths.CURVE
    if old.is_dir() and not old.is_symlink() and not new.exists() and (run_dir / paths.PARAMS).is_file():
        old.rename(new)
        return True
    return False


def link_point(chain: _Chain, pcfg: dict, pdir: Path, pkeys: dict, run_dir: Path, keys: dict) -> bool | None:
    """An in-run point's folder before its stages: it links the study's data (hard links) and
    training (a symlink); its pruning and retraining then run as a chain of their own (linked from the
    stage store when computed before, by this run, another or a grid). A point with the study's own
    method and amount has the study's keys: its folders link the study's (returns None: nothing to
    run). True: its data changed, so its stages rerun."""
    assert pkeys["train"] == keys["train"], "a curve point trains as the study does"
    new = not paths.stage_dir(pdir, "data").exists()
    relinked = link_data(paths.stage_dir(run_dir, "data"), paths.stage_dir(pdir, "data")) and not new
    stagestore.link(paths.stage_dir(pdir, "train"), paths.stage_dir(run_dir, "train"))
    if all(pkeys[s] == keys[s] for s in graph.POINT):
        for stage in graph.POINT:
            stagestore.link(paths.stage_dir(pdir, stage), paths.stage_dir(run_dir, stage))
            nb = paths.executed_notebook(run_dir, stage)   # none where the stage was computed outside the runner
            if nb.exists():
                stagestore.link(paths.executed_notebook(pdir, stage), nb)
            else:
                paths.executed_notebook(pdir, stage).unlink(missing_ok=True)
        return None
    return relinked


def link_repeat(run_dir: Path, rdir: Path) -> bool:
    """A repeat's folder before its stages: the study's data, hard-linked. True: it changed (the
    data stage reran), so the repeat's stages rerun."""
    new = not paths.stage_dir(rdir, "data").exists()   # a new repeat: its stages may be in the store
    return link_data(paths.stage_dir(run_dir, "data"), paths.stage_dir(rdir, "data")) and not new


def _saved_params(path: Path) -> dict | None:
    """The parameters results.json was written with; None when it is missing or damaged (it is then
    rebuilt from the stage outputs)."""
    try:
        return atomic.read_json(path).get("params")
    except (OSError, ValueError, AttributeError):
        return None


@dataclass
class _Folder:
    """Stages of one folder run in order (the study's chain, an in-run point's, a repeat's, the
    analysis): their tasks for the scheduling loop, each after the one before it; the first after
    `after` (other folders' tasks). `before`: run before its first stage; True: its inputs changed,
    every stage reruns; None: its stages were linked, nothing to run."""
    name: str
    label: str
    cfg: dict
    run_dir: Path
    names: tuple[str, ...]
    keys: dict
    timings: dict
    finish: Callable[[], dict]
    before: Callable[[], bool | None] | None = None
    after: str | tuple[str, ...] = ()
    ran: set = field(default_factory=set)
    changed: bool | None = False

    def tasks(self) -> list[schedule.Task]:
        first = (self.after,) if isinstance(self.after, str) else tuple(self.after)
        ids = [f"{self.name}:{s}" if self.name else s for s in self.names]
        return [schedule.Task(ids[j], s, self.keys[s], self.name, (ids[j - 1],) if j else first)
                for j, s in enumerate(self.names)]


class _Chain:
    """Runs a folder's stages in order, each as its notebook under papermill, skipping those complete
    with the same key until one runs; from there on every later stage reruns (its inputs changed)."""

    def __init__(self, kernel: str, forced: tuple[str, ...], log: Callable[[str], None], invalidate: Path,
                 store: stagestore.Store | None = None, fresh_kernels: bool = False, retime: bool = False,
                 root: Path | None = None):
        self.kernel, self.forced, self.log = kernel, forced, log
        self.root = root   # the run folder: nothing outside it is ever cleared or replaced
        self.retime = retime   # --force timing: the analysis measures the timings again
        self.fresh_kernels = fresh_kernels
        self.invalidate = invalidate   # the analysis' record: outdated as soon as any stage reruns
        self.store = store
        self.ran: set[str] = set()   # the tasks computed (not linked, not skipped)
        self.kept: set[Path] = set()   # stage folders whose notebook computation keep() looked at

    def tag(self, f: _Folder, stage: str) -> str:
        return f"==> [{f.label or f'{STAGES.index(stage) + 1}/{len(STAGES)}'}] {stage}"

    def keep(self, f: _Folder, stage: str) -> None:
        """Before a stage folder is relinked or recomputed: what a notebook computed there is kept
        (execute.keep_replaced), once per folder."""
        folder = paths.stage_dir(f.run_dir, stage)
        if stage in graph.STORED and folder not in self.kept:
            self.kept.add(folder)
            execute.keep_replaced(self.store, f.cfg, f.run_dir, stage, f.keys[stage], self.log, self.tag(f, stage))

    def step(self, f: _Folder, j: int, *upstream: dict) -> dict:
        """The folder's j-th stage: up to date, linked from the store, or computed. It reruns,
        whatever its record says, when the stage before it in the folder was computed (or, for the
        first, when the folder's inputs changed), or when forced."""
        stage = f.names[j]
        result = {"id": f"{f.name}:{stage}" if f.name else stage, "stage": stage, "point": f.name}
        if j == 0:
            if self.root is not None:   # a repeat's or curve point's folder: no link out of the run folder
                execute.owned(f.run_dir, self.root)
            f.changed = f.before() if f.before else False
            if f.changed is None:
                self.log(f"==> [{f.label}]: the study's own method and amount: its prune and retrain folders linked")
        if f.changed is None:
            return {**result, "status": "linked"}
        changed = f.changed if j == 0 else upstream[0]["status"] == "ran"
        run_dir, key, names = f.run_dir, f.keys[stage], f.names
        tag = self.tag(f, stage)
        stored = self.store is not None and stage in graph.STORED
        if not changed and stage not in self.forced:
            why = execute.problem(f.cfg, run_dir, stage, key, verify=stage in graph.STORED, log=self.log)
            if why is not None:
                self.keep(f, stage)
            linked = why is not None and stored and execute.reuse(self.store, f.cfg, run_dir, stage, key, self.log)
            if why is None or linked:   # one line each: linked from the store, or up to date here
                rec = records.read(paths.stage_dir(run_dir, stage)) or {}
                f.timings[stage] = rec.get("wall_seconds", rec.get("seconds", 0.0))
                self.log(f"{tag}: found in the stage store (key {key}), linked" if linked
                         else f"{tag}: up to date (key {key}), skipped")
                return {**result, "status": "linked" if linked else "up to date"}
            if paths.dangling(paths.stage_dir(run_dir, stage)):   # a folder copied without its stage store
                self.log(f"{tag}: {why}: it is computed again, and every stage after it")
            elif records.read(paths.stage_dir(run_dir, stage)) is not None or \
                    paths.completion_marker(run_dir, stage).is_file():
                self.log(f"{tag}: {why}: it reruns, and every stage after it")
        if not f.ran:  # this stage and every later one will run: none of them counts as complete now
            self.invalidate.unlink(missing_ok=True)
            for later in names[j:]:
                self.keep(f, later)
                folder = paths.stage_dir(run_dir, later)
                if folder.is_symlink():   # a store entry other runs may use: unlinked, not cleared
                    folder.unlink()
                    continue
                if self.root is not None:
                    execute.owned(folder, self.root)
                records.clear(folder)
                for stale in folder.glob(".*.tmp"):  # left by a killed atomic write
                    stale.unlink(missing_ok=True)
        recheck = not changed and stage not in self.forced   # another process may finish it meanwhile
        seconds = execute.execute_stage(f.cfg, run_dir, stage, key, kernel=self.kernel,
                                        stage_store=self.store, log=self.log, tag=tag,
                                        refresh=stage == "data" and stage in self.forced, recheck=recheck,
                                        on_failure=f.finish, fresh_kernel=self.fresh_kernels,
                                        retime=self.retime and stage == "analysis")
        if seconds is None:   # found complete in the store once claimed: nothing after it must rerun
            rec = records.read(paths.stage_dir(run_dir, stage)) or {}
            f.timings[stage] = rec.get("wall_seconds", rec.get("seconds", 0.0))
            return {**result, "status": "done earlier"}
        f.ran.add(stage)
        self.ran.add(result["id"])
        f.timings[stage] = seconds
        f.finish()
        self.log(f"{tag}: done in {seconds:.1f} s")
        return {**result, "status": "ran"}


def link_data(src: Path, dst: Path) -> bool:
    """A repeat's data/: hard links to the run's data files (copies where links fail), refreshed
    whenever a file differs (the data stage reran). True when anything changed. The data stays
    immutable: no stage writes there."""
    if dst.is_symlink():   # never written through: the files behind it are not this folder's
        dst.unlink()
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
        atomic.link_file(a, b)
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

