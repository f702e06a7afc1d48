"""The stages of a set of points (a grid's, or a run's chains under `--jobs`) as tasks: the task
graph (every unique stage once, its input's task before it), the point folders that compute them,
and what one task does in its worker process (`run_task`: its notebook under papermill, in the
stage store, claimed); `compute` hands them to the scheduling loop (prunestudy.schedule) on the
local pool or Ray."""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from . import (
    atomic,
    config,
    execute,
    graph,
    grid,
    kernels,
    machine,
    paths,
    progress,
    records,
    runlock,
    schedule,
    stagestore,
)


def tasks(pts: list[grid.Point], kinds: tuple[str, ...] = graph.CHAIN) -> dict[str, schedule.Task]:
    """The unique stages of the points, in an order where every task comes after its inputs; `kinds`:
    the stage kinds to compute (a prefix of the chain)."""
    users: dict[str, list[str]] = {}
    first: dict[str, tuple[str, str, str, tuple[str, ...]]] = {}
    for p in pts:
        keys = grid.keys_of(p)
        for stage in kinds:
            tid = f"{stage}:{keys[stage]}"
            users.setdefault(tid, []).append(p.name)
            up = graph.stage(stage).after
            deps = (f"{up}:{keys[up]}",) if up else ()
            first.setdefault(tid, (stage, keys[stage], p.name, deps))
    ordered = sorted(first, key=lambda t: graph.CHAIN.index(first[t][0]))
    return {t: schedule.Task(t, *first[t][:3], first[t][3], tuple(users[t])) for t in ordered}


def prepare(pts: list[grid.Point], folder: Path, st: stagestore.Store) -> None:
    """The point folders: parameters, and their stored stages linked into the store."""
    rows = []
    for p in pts:
        point = paths.point_dir(folder, p.name)
        paths.notebooks_dir(point).mkdir(parents=True, exist_ok=True)
        atomic.write_json(point / paths.PARAMS, p.cfg)
        keys = grid.keys_of(p)
        for stage in graph.STORED:
            entry, here = st.entry(stage, keys[stage]), paths.stage_dir(point, stage)
            if not here.is_symlink() and records.read(here) is None:   # a private, complete folder stays
                with stagestore.linking(entry):   # made if missing; `store gc` keeps it
                    stagestore.link(here, entry)
            else:
                entry.mkdir(parents=True, exist_ok=True)
        rows.append({"name": p.name, "values": p.values, "params_hash": config.stage_hash(p.cfg), "keys": keys})
    atomic.write_json(Path(folder) / paths.SWEEP_GRID, {"points": rows})
    stagestore.record(folder, st.root)   # a rerun of the sweep, or of a point from its folder, uses it


def compute(pts: list[grid.Point], folder: Path, st: stagestore.Store, *, engine: str = "local", jobs: int = 2,
            gpus: list[str] | None = None, address: str | None = None, ray_init: dict | None = None,
            log: Callable[[str], None] = print, kinds: tuple[str, ...] = graph.CHAIN, fresh_kernels: bool = False,
            report: bool = False) -> dict:
    """Every unique stage of the points once, into the store (their folders under `folder`), on the
    local pool of `jobs` workers (pinned to `gpus` in turn) or on Ray (`address`); `report`: then the
    grid report, in a worker whose kernel is warm. Returns {"results": {task id: result},
    "failed": [...], "ran": {stage: count}, "points", "unique", "page": the report, None or False,
    "halted": the one line of a full disk or an unwritable folder that stopped it, or None}. Raises
    PreflightError when the point folders cannot be prepared for that reason."""
    try:
        prepare(pts, folder, st)
    except OSError as e:   # a full disk, a store under a file or on a read-only disk: one line, exit 2
        problem = execute.write_problem(e, folder)
        if problem is None:
            raise
        raise execute.PreflightError(problem) from None
    todo = tasks(pts, kinds)
    env, threads = task_env(), task_threads(engine, jobs)
    by_name = {p.name: p for p in pts}
    specs = {tid: spec(t, by_name, folder, st, env, threads, fresh_kernels) for tid, t in todo.items()}
    log(f"==> sweep: {len(pts)} points, {len(todo)} unique stages, engine {engine}"
        + (f" ({jobs} jobs{', GPUs ' + ','.join(gpus) + ' in turn' if gpus else ''})" if engine == "local"
           else f" ({address or 'a local Ray'})"))
    if engine == "ray":
        def options(task: schedule.Task, on_gpus: bool) -> dict:
            return schedule.ray_options(task, specs[task.id]["cfg"], on_gpus)
        executor = schedule.Ray(address, ray_init, options=options)
    else:
        prestart = min(jobs, to_run(todo, folder, st))
        executor = schedule.Pool(jobs, warm=warm_settings(specs), gpus=gpus, prestart=prestart)
    final = (report_task, str(folder), fresh_kernels, env, threads) if report else None
    results, page = schedule.run(todo, executor, lambda t: (run_task, specs[t.id]), log, final)
    failed = [r for r in results.values() if r["status"] == "failed"]
    ran = {s: sum(1 for r in results.values() if r["status"] == "ran" and r["stage"] == s) for s in graph.CHAIN}
    halted = next((r["halt"] for r in failed if r.get("halt")), None)
    return {"results": results, "failed": failed, "ran": ran, "points": len(pts), "unique": len(todo), "page": page,
            "halted": halted}


# --- one task, in a worker process ---------------------------------------------------------------
def run_task(spec: dict, *upstream: dict) -> dict:
    """Compute one stage for its point (a worker process of the pool, or a Ray task): skip it
    when it is complete (here or in the store), else run its notebook. Never raises for a stage
    that fails: returns its failure, so that the driver reports it and does not retry it."""
    started = time.time()
    info = {"id": spec["id"], "stage": spec["stage"], "point": spec["point"], "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": started}
    if schedule.interrupted():   # Ctrl-C reached this worker: a task queued to it before that does not start
        return {**info, "status": "skipped", "because": "Ctrl-C", "end": time.time()}
    failed = [u for u in upstream if u.get("status") in ("failed", "skipped")]
    if failed:
        return {**info, "status": "skipped", "because": failed[0]["id"], "end": time.time()}
    schedule.apply_env(spec.get("env") or {}, spec["threads"])
    if spec.get("inject") == spec["id"]:   # fault injection for the tests (PRUNESTUDY_INJECT_FAULT)
        return {**info, "status": "failed", "error": "injected fault", "end": time.time(), "notebook": None}
    cfg, folder, stage, key = spec["cfg"], Path(spec["point_dir"]), spec["stage"], spec["key"]
    st = stagestore.Store(spec["store"])
    log = _print   # the tags name the point
    try:
        with runlock.RunLock(folder, f"prunestudy sweep (pid {os.getpid()})") as lock:
            os.environ[runlock.TOKEN_ENV] = lock.token
            if _complete(cfg, folder, stage, key, st):
                return {**info, "status": "done earlier", "end": time.time()}
            if stage == "analysis":
                _finish(folder, cfg, spec.get("fresh_kernels", False), spec.get("keys"))
            seconds = execute.execute_stage(cfg, folder, stage, key, kernel=execute.ensure_kernel(), stage_store=st,
                                             log=log, tag=f"==> [{spec['point']}] {stage}",
                                             fresh_kernel=spec.get("fresh_kernels", False))
            if seconds is None:   # another sweep or run computed it while this one waited for its claim
                return {**info, "status": "done earlier", "end": time.time()}
            if stage == "analysis":
                _finish(folder, cfg, spec.get("fresh_kernels", False), spec.get("keys"))
    except execute.StageFailed as e:
        return {**info, "status": "failed", "error": e.problem or str(e).splitlines()[0], "notebook": str(e.notebook),
                "end": time.time(), **({"halt": e.problem} if e.problem else {})}
    except runlock.LockedError as e:
        return {**info, "status": "failed", "error": str(e), "notebook": None, "end": time.time()}
    except Exception as e:  # noqa: BLE001 - outside the notebook's code (saving it, the store, a bug): the
        # stage failed all the same, and is reported as failed; raised, it ended the whole sweep (the local
        # engine) with a traceback and without the other points' results
        problem = execute.write_problem(e, st.entry(stage, key) if stage in graph.STORED
                                         else paths.stage_dir(folder, stage))
        if problem:   # a full disk, a folder that cannot be written: one line, and the sweep stops
            log(f"==> [{spec['point']}] {stage}: {problem}")
            return {**info, "status": "failed", "error": problem, "notebook": None, "end": time.time(),
                    "halt": problem}
        for line in traceback.format_exc().rstrip().splitlines():
            log(f"==> [{spec['point']}] {stage}: {line}")
        return {**info, "status": "failed", "error": f"{type(e).__name__}: {e}"[:300], "notebook": None,
                "end": time.time()}
    return {**info, "status": "ran", "seconds": seconds, "end": time.time(), "kernel_starts": kernels.starts}


def report_task(sweep_dir: str, fresh_kernel: bool, env: dict, threads: int) -> str | None:
    """The grid report, in a worker of the pool or of Ray, with the tasks' environment (so that the
    kernel its last stage used, warm, is reused); None if it failed there (the driver then runs it
    itself, and its error is raised there as usual)."""
    schedule.apply_env(env, threads)
    try:
        return str(execute.sweep_report(Path(sweep_dir), lambda message: None, fresh_kernel))   # the driver logs it
    except Exception:  # noqa: BLE001 - rendered again by the driver, which raises its error
        return None


def _finish(folder: Path, cfg: dict, fresh_kernels: bool, keys: dict | None = None) -> None:
    """A point's results.json (execute.write_results), computed in this worker's kernel, where PyTorch,
    pandas and the package are imported already: importing them into the worker process itself cost
    each worker about 2 s at its first analysis, while both cores waited. In this process when it has
    no kernel to reuse (fresh kernels) or the kernel could not do it. `keys`: the point's stage keys as
    the driver computed them (the analysis' holds the machine, with the driver's threads)."""
    keys = keys or graph.chain_keys(cfg)
    code = (f"from prunestudy import execute as _p\n"
            f"_p.write_results(_p.Path({str(folder)!r}), __import__('json').loads({json.dumps(cfg)!r}), {{}}, "
            f"{keys!r})")
    if fresh_kernels or not kernels.run_here(code, f"results.json of {folder.name}"):
        execute.write_results(folder, cfg, {}, keys)


def _complete(cfg: dict, folder: Path, stage: str, key: str, st: stagestore.Store) -> bool:
    if execute.problem(cfg, folder, stage, key, verify=stage in graph.STORED, log=_print) is None:
        return True
    return stage in graph.STORED and execute.reuse(st, cfg, folder, stage, key, _print)


def _print(message: str) -> None:
    print(message, flush=True)


# --- what the driver gives each task -------------------------------------------------------------
def to_run(todo: dict[str, schedule.Task], folder: Path, st: stagestore.Store) -> int:
    """How many tasks have no record of their key yet (in the store, or the point's analysis): an
    estimate for starting workers; each task checks its stage again before it skips it."""
    return sum(not records.recorded(st.entry(t.stage, t.key) if t.stage in graph.STORED
                                    else paths.stage_dir(paths.point_dir(folder, t.point), t.stage), t.key)
               for t in todo.values())


def spec(task: schedule.Task, pts: dict[str, grid.Point], folder: Path, st: stagestore.Store, env: dict,
         threads: int, fresh_kernels: bool = False) -> dict:
    """What `run_task` is given: plain data, sent to a worker process or a Ray node."""
    return {"id": task.id, "stage": task.stage, "key": task.key, "point": task.point, "cfg": pts[task.point].cfg,
            "threads": threads, "fresh_kernels": fresh_kernels, "keys": _chain(grid.keys_of(pts[task.point])),
            "point_dir": str(paths.point_dir(folder, task.point)), "store": str(st.root), "env": env,
            "inject": os.environ.get("PRUNESTUDY_INJECT_FAULT")}


def _chain(keys: dict[str, str]) -> dict[str, str]:
    """A point's chain keys (graph.chain_keys) of its stage keys (graph.all_keys: the control's too)."""
    return {stage: keys[stage] for stage in graph.CHAIN}


def task_env() -> dict:
    """The environment variables the driver gives every task (after `execute.ensure_kernel`)."""
    return {"PRUNESTUDY_HOME": str(config.project_root()), progress.ENV: "log",
            "JUPYTER_PATH": os.environ.get("JUPYTER_PATH", "")}


def task_threads(engine: str, jobs: int) -> int:
    """The CPU threads of each stage: the cores shared by the parallel jobs on the local engine (no
    oversubscription), 1 on Ray (each task asks for num_cpus=1). Fixed per engine and jobs, so the
    local engine and a Ray of as many CPUs compute bit for bit alike: PyTorch's CPU results depend
    on the thread count (the order of float sums); the count is in every stage's metrics.json."""
    return max(1, machine.usable_cpus() // max(jobs, 1)) if engine == "local" else 1


def warm_settings(specs: dict[str, dict]) -> dict | None:
    """What a pool worker's kernel is started with (`schedule._worker_init`): the tasks' environment
    and threads, when all tasks share them (the local engine's do); None otherwise or with fresh kernels."""
    shared = {(tuple(sorted((sp.get("env") or {}).items())), sp["threads"], sp.get("fresh_kernels"))
              for sp in specs.values()}
    if len(shared) != 1:
        return None
    env, threads, fresh = shared.pop()
    if fresh:
        return None
    return {"env": dict(env), "threads": threads, "kernel": execute.ensure_kernel(),
            "cwd": str(execute.notebooks_dir())}

