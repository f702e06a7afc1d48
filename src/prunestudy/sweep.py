"""`prunestudy sweep`: a grid of studies (prunestudy.grid), every unique stage computed once, in the
stage store, on this machine (`--engine local --jobs N`: a process pool) or on a Ray cluster
(`--engine ray`: one Ray task per unique stage, its inputs as dependencies, a GPU each for the
training stages on CUDA).

    runs/<sweep>/
      grid.json                 the points: name, grid values, parameters hash, stage keys
      points/<point>/           a run folder per point: its stages link into the store; its own
                                analysis, report.html and results.json
      sweep.json, sweep.csv     one row per point (sweep_table); written by the sweep notebook
      sweep.html                the grid report (notebooks/06_sweep.ipynb, code hidden)
      notebooks/06_sweep.ipynb  the executed sweep notebook

Each stage runs as its stage notebook under papermill, in its worker process's kernel (reset
between notebooks, prunestudy.kernels; `--fresh-kernels`: a kernel per notebook), so every stage
keeps its executed notebook and HTML page. A stage whose process dies (SIGKILL, a lost
Ray worker) is retried; a stage that raises is not: it is reported with its point, notebook and
last error line, the points that do not depend on it still finish, and the sweep exits 1. A rerun
does only what is missing or failed. Two sweeps over overlapping stages compute each stage once:
its store entry is claimed while it runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from . import atomic, config, execute, graph, grid, kernels, machine, paths, progress, records, runlock, stagestore

GPU_STAGES = ("train", "prune", "retrain")   # what may fine-tune: a GPU each on a cluster with GPUs
RETRIES = 2                                  # a stage whose process died is tried this many more times


@dataclass(frozen=True)
class Task:
    id: str                 # "<stage>:<key>"
    stage: str
    key: str
    point: str              # the point whose run folder runs it (the first that needs it)
    deps: tuple[str, ...]   # the tasks it waits for
    points: tuple[str, ...]  # every point that uses it


def tasks(pts: list[grid.Point], kinds: tuple[str, ...] = graph.CHAIN) -> dict[str, Task]:
    """The unique stages of the grid, in an order where every task comes after its inputs; `kinds`:
    the stage kinds to compute (a prefix of the chain)."""
    users: dict[str, list[str]] = {}
    first: dict[str, tuple[str, str, str, tuple[str, ...]]] = {}
    for p in pts:
        keys = graph.chain_keys(p.cfg)
        for stage in kinds:
            tid = f"{stage}:{keys[stage]}"
            users.setdefault(tid, []).append(p.name)
            up = graph.stage(stage).after
            deps = (f"{up}:{keys[up]}",) if up else ()
            first.setdefault(tid, (stage, keys[stage], p.name, deps))
    ordered = sorted(first, key=lambda t: graph.CHAIN.index(first[t][0]))
    return {t: Task(t, *first[t][:3], first[t][3], tuple(users[t])) for t in ordered}


def prepare(pts: list[grid.Point], sweep_dir: Path, st: stagestore.Store) -> None:
    """The point folders: parameters, and their stored stages linked into the store."""
    rows = []
    for p in pts:
        folder = paths.point_dir(sweep_dir, p.name)
        paths.notebooks_dir(folder).mkdir(parents=True, exist_ok=True)
        atomic.write_json(folder / paths.PARAMS, p.cfg)
        keys = graph.all_keys(p.cfg)
        for stage in graph.STORED:
            entry = st.entry(stage, keys[stage])
            entry.mkdir(parents=True, exist_ok=True)
            if not paths.stage_dir(folder, stage).is_symlink():   # a private, complete folder stays
                if records.read(paths.stage_dir(folder, stage)) is None:
                    stagestore.link(paths.stage_dir(folder, stage), entry)
        rows.append({"name": p.name, "values": p.values, "params_hash": config.stage_hash(p.cfg), "keys": keys})
    atomic.write_json(Path(sweep_dir) / paths.SWEEP_GRID, {"points": rows, "store": str(st.root)})


# --- one task, in a worker process ---------------------------------------------------------------
_interrupted = False   # in a worker process: Ctrl-C reached it


def run_task(spec: dict, *upstream: dict) -> dict:
    """Compute one stage for its point (a worker process of the pool, or a Ray task): skip it
    when it is complete (here or in the store), else run its notebook. Never raises for a stage
    that fails: returns its failure, so that the driver reports it and does not retry it."""
    global _busy
    _busy = True
    try:
        return _run_task(spec, *upstream)
    finally:
        _busy = False


def _run_task(spec: dict, *upstream: dict) -> dict:
    global _interrupted
    started = time.time()
    info = {"id": spec["id"], "stage": spec["stage"], "point": spec["point"], "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": started}
    if _interrupted:   # Ctrl-C reached this worker: a task queued to it before that does not start
        return {**info, "status": "skipped", "because": "Ctrl-C", "end": time.time()}
    failed = [u for u in upstream if u.get("status") in ("failed", "skipped")]
    if failed:
        return {**info, "status": "skipped", "because": failed[0]["id"], "end": time.time()}
    _apply_env(spec.get("env") or {}, spec["threads"])
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
        return {**info, "status": "failed", "error": str(e).splitlines()[0], "notebook": str(e.notebook),
                "end": time.time()}
    except runlock.LockedError as e:
        return {**info, "status": "failed", "error": str(e), "notebook": None, "end": time.time()}
    except KeyboardInterrupt:   # Ctrl-C reached this worker and its kernel: no "never retrieved" traceback
        _interrupted = True
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        raise
    except Exception as e:  # noqa: BLE001 - outside the notebook's code (saving it, the store, a bug): the
        # stage failed all the same, and is reported as failed; raised, it ended the whole sweep (the local
        # engine) with a traceback and without the other points' results
        for line in traceback.format_exc().rstrip().splitlines():
            log(f"==> [{spec['point']}] {stage}: {line}")
        return {**info, "status": "failed", "error": f"{type(e).__name__}: {e}"[:300], "notebook": None,
                "end": time.time()}
    return {**info, "status": "ran", "seconds": seconds, "end": time.time(), "kernel_starts": kernels.starts}


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


def _to_run(todo: dict[str, Task], sweep_dir: Path, st: stagestore.Store) -> int:
    """How many tasks have no record of their key yet (in the store, or the point's analysis): an
    estimate for starting workers; each task checks its stage again before it skips it."""
    return sum(not records.recorded(st.entry(t.stage, t.key) if t.stage in graph.STORED
                                    else paths.stage_dir(paths.point_dir(sweep_dir, t.point), t.stage), t.key)
               for t in todo.values())


def _apply_env(env: dict, threads: int) -> None:
    """A task's environment in its worker process (and so in the kernel it starts): the sweep's
    variables and the threads this task was given."""
    os.environ.update(env)
    for var in machine.THREAD_VARS:   # the stage's kernel computes with the threads this task was given
        os.environ[var] = str(threads)
    os.environ.setdefault(progress.ENV, "log")


def _complete(cfg: dict, folder: Path, stage: str, key: str, st: stagestore.Store) -> bool:
    if execute.problem(cfg, folder, stage, key) is None:
        return True
    return stage in graph.STORED and execute.reuse(st, cfg, folder, stage, key)


def _print(message: str) -> None:
    print(message, flush=True)


# --- engines ---------------------------------------------------------------------------------------
def _spec(task: Task, pts: dict[str, grid.Point], sweep_dir: Path, st: stagestore.Store, env: dict,
          threads: int, fresh_kernels: bool = False) -> dict:
    return {"id": task.id, "stage": task.stage, "key": task.key, "point": task.point, "cfg": pts[task.point].cfg,
            "threads": threads, "fresh_kernels": fresh_kernels, "keys": graph.chain_keys(pts[task.point].cfg),
            "point_dir": str(paths.point_dir(sweep_dir, task.point)), "store": str(st.root), "env": env,
            "inject": os.environ.get("PRUNESTUDY_INJECT_FAULT")}


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


@contextlib.contextmanager
def _sigint_blocked():
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_busy = False   # in a worker process: a task runs


def _worker_sigint(*_) -> None:
    """A pool worker's Ctrl-C: it stops the task that runs (KeyboardInterrupt); an idle worker (or
    one still starting) only notes it, quietly: the tasks queued to it do not start."""
    global _interrupted
    _interrupted = True
    if _busy:
        raise KeyboardInterrupt


def _worker_init(warm: dict | None = None, slots=None) -> None:
    """A pool worker starts with SIGINT blocked (a Ctrl-C while it imports would print a traceback);
    from here on `_worker_sigint` takes it (one that came meanwhile is delivered to it now). With
    `slots` (a queue of GPU ids, `_pool`), it takes one and sees only that GPU from now on: its
    kernel and every stage it runs. With `warm` (`warm_settings`: what its tasks will run with), it
    starts its kernel and imports the package there now, while the sweep's first stage runs in
    another worker."""
    signal.signal(signal.SIGINT, _worker_sigint)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if slots is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slots.get(timeout=60)
    if warm:
        _apply_env(warm["env"], warm["threads"])
        with contextlib.suppress(Exception):   # not warmed: its first notebook starts the kernel, as before
            kernels.warm(warm["kernel"], warm["cwd"], WARM_IMPORTS)


WARM_IMPORTS = "import prunestudy.stages, prunestudy.report"   # what every stage notebook imports


def warm_settings(specs: dict[str, dict]) -> dict | None:
    """What a pool worker's kernel is started with (`_worker_init`): the tasks' environment and
    threads, when all tasks share them (the local engine's do); None otherwise or with fresh kernels."""
    shared = {(tuple(sorted((sp.get("env") or {}).items())), sp["threads"], sp.get("fresh_kernels"))
              for sp in specs.values()}
    if len(shared) != 1:
        return None
    env, threads, fresh = shared.pop()
    if fresh:
        return None
    return {"env": dict(env), "threads": threads, "kernel": execute.ensure_kernel(),
            "cwd": str(execute.notebooks_dir())}


def _processes(train: dict) -> int:
    """How many processes a point's training runs: train.nproc_per_node under torchrun, else 1."""
    return train["nproc_per_node"] if train["launcher"] == "torchrun" else 1


def gpu_ids(gpus: str | None, pts: list[grid.Point]) -> list[str]:
    """The GPUs the local engine pins its workers to, worker i to ids[i % len(ids)] (its
    CUDA_VISIBLE_DEVICES), so that N jobs on a box of several GPUs use them all rather than all
    training on the first. `gpus`: "none" (no pinning), a comma-separated list of ids ("0,1", as
    CUDA_VISIBLE_DEVICES takes them), or "auto" (None too): the GPUs this process sees
    (CUDA_VISIBLE_DEVICES when set, else every GPU PyTorch finds), when some point trains on CUDA
    and none needs other GPUs than one (train.device cuda:N, which a pinned worker would not have;
    torchrun with train.nproc_per_node > 1 off the CPU, which trains on several).
    Raises ValueError for a list that is not one, or beside a point that needs other GPUs."""
    gpus = (gpus or "auto").strip()
    train = [p.cfg["train"] for p in pts]
    needs = sorted({f"train.device {t['device']}" for t in train if t["device"].startswith("cuda:")}
                   | {f"torchrun with train.nproc_per_node {t['nproc_per_node']}" for t in train
                      if _processes(t) > 1 and t["device"] != "cpu"})
    if gpus == "none":
        return []
    if gpus != "auto":
        ids = [g.strip() for g in gpus.split(",")]
        if not all(ids) or any(any(c.isspace() for c in g) for g in ids):
            raise ValueError(f"--gpus takes auto, none or a comma-separated list of GPU ids such as 0,1; got {gpus!r}")
        if needs:
            raise ValueError(f"--gpus pins each worker to one GPU, which it sees as cuda:0, but a point asks for "
                             f"{' and '.join(needs)}: use train.device: cuda (or auto) and one process a training, "
                             "or --gpus none")
        return ids
    if needs or all(t["device"] == "cpu" for t in train):
        return []
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() not in ("", "-1")]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _pool(jobs: int, warm: dict | None, gpus: list[str]) -> ProcessPoolExecutor:
    """The local engine's pool of `jobs` spawned workers (`_worker_init`); with `gpus`, a queue of
    their ids in turn, one per worker, so that worker i takes gpus[i % len(gpus)]."""
    ctx = get_context("spawn")
    slots = None
    if gpus:
        slots = ctx.Queue()
        for i in range(jobs):
            slots.put(gpus[i % len(gpus)])
    return ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init, initargs=(warm, slots))


def _report_task(sweep_dir: str, fresh_kernel: bool, env: dict, threads: int) -> str | None:
    """The grid report, in a worker of the pool or of Ray, with the tasks' environment (so that the
    kernel its last stage used, warm, is reused); None if it failed there (the driver then runs it
    itself, and its error is raised there as usual). A Ctrl-C stops it, as it stops a stage
    (`_worker_sigint`)."""
    global _busy, _interrupted
    _busy = True
    _apply_env(env, threads)
    try:
        return str(report(Path(sweep_dir), lambda message: None, fresh_kernel))   # the driver logs it
    except Exception:
        return None
    except KeyboardInterrupt:   # as in a stage: no "never retrieved" traceback of the stopped kernel
        _interrupted = True
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        raise
    finally:
        _busy = False


def _result(fut):
    """fut.result(), waking twice a second. The kernel may deliver a Ctrl-C (SIGINT) to any thread of
    this process that does not block it; Python runs its handler in the main thread, but a main
    thread asleep in an untimed wait only wakes when the future completes, so the stage (or the
    grid report) would run to its end first. Woken, it raises KeyboardInterrupt within 0.5 s."""
    while True:
        try:
            return fut.result(timeout=0.5)
        except TimeoutError:
            continue


def run_local(todo: dict[str, Task], specs: dict[str, dict], jobs: int, log: Callable[[str], None],
              final: tuple | None = None, prestart: int = 1, gpus: list[str] | None = None) -> tuple[dict, object]:
    """A process pool of `jobs` workers (pinned to `gpus` in turn, `_pool`); a task is submitted
    once its inputs are done. A worker that dies (BrokenProcessPool) takes its tasks with it: they
    are submitted again. `prestart`:
    how many workers to start at once, their kernels warmed up (`_worker_init`; 0: none warmed,
    workers start as tasks come, as when nothing is left to compute). `final`: a (function, *args)
    run in the pool once every task is done (the grid report). Returns (results, what `final`
    returned, or None when it did not run)."""
    results: dict[str, dict] = {}
    attempts = dict.fromkeys(todo, 0)
    pending = dict(todo)
    warm = warm_settings(specs) if prestart else None
    final_out = None
    while pending or (final and final_out is None):
        pool = _pool(jobs, warm, gpus or [])
        running = {}
        try:
            with _sigint_blocked():   # each submit to a pool without an idle worker starts one: all start now
                for _ in range(min(prestart, jobs, len(pending)) - 1):
                    pool.submit(int)
            while pending or running:
                for tid, task in list(pending.items()):
                    if all(d in results for d in task.deps):
                        upstream = [results[d] for d in task.deps]
                        with _sigint_blocked():   # a worker it starts is born with SIGINT blocked
                            running[pool.submit(run_task, specs[tid], *upstream)] = tid
                        attempts[tid] += 1
                        del pending[tid]
                if not running:
                    break
                done = set()
                while not done:   # waking twice a second: see _result
                    done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    result = fut.result()   # BrokenProcessPool: the task stays in `running`, tried again
                    tid = running.pop(fut)
                    results[tid] = result
                    _log_result(result, log)
            if final and not pending:
                with _sigint_blocked():
                    fut = pool.submit(*final)
                final_out = _result(fut) or False   # False: it ran and failed (the caller runs it again)
        except BrokenProcessPool:
            if final and not pending and not running:   # the final's worker died: the caller runs it
                final_out = False
            for fut, tid in running.items():   # every task of the dead pool: submitted again
                if fut.done() and not fut.exception():
                    results[tid] = fut.result()
                    continue
                if attempts[tid] > RETRIES:
                    results[tid] = {"id": tid, "stage": todo[tid].stage, "point": todo[tid].point,
                                    "status": "failed", "error": f"its process died {attempts[tid]} times",
                                    "notebook": None}
                else:
                    log(f"==> {tid}: its worker process died; trying again ({attempts[tid]}/{RETRIES + 1})")
                    pending[tid] = todo[tid]
        except KeyboardInterrupt:   # the workers too (a Ctrl-C that reached only this process): their
            for proc in list((getattr(pool, "_processes", None) or {}).values()):   # kernels stop the stage
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGINT)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        stuck = [tid for tid, task in pending.items() if not running and any(d not in results and d not in pending
                                                                             for d in task.deps)]
        for tid in stuck:   # never: every input is done, pending or failed; a guard against waiting forever
            results[tid] = {"id": tid, "stage": todo[tid].stage, "point": todo[tid].point, "status": "failed",
                            "error": "its inputs never finished", "notebook": None}
            del pending[tid]
    return results, final_out


def run_ray(todo: dict[str, Task], specs: dict[str, dict], address: str | None, log: Callable[[str], None],
            init: dict | None = None, final: tuple | None = None) -> tuple[dict, object]:
    """One Ray task per unique stage, with its inputs' tasks as arguments (Ray orders them);
    a GPU per training process for the training stages when the cluster has GPUs and the point
    trains on one (`ray_options`; Ray sets CUDA_VISIBLE_DEVICES for it); a task whose worker dies is
    retried by Ray. `final`: a (function, *args) run as one more task once every task is done (the
    grid report, in a worker whose kernel is warm, instead of a new kernel in the driver). Returns
    (results, what `final` returned: None when it did not run, False when it failed)."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        kw = {"include_dashboard": False, "log_to_driver": True, **(init or {})}
        ray.init(address=address, **kw) if address else ray.init(**kw)
    try:
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        remote = ray.remote(run_task)
        refs: dict[str, object] = {}
        for tid, task in todo.items():
            refs[tid] = remote.options(**ray_options(task, specs[tid]["cfg"], gpus)).remote(
                specs[tid], *[refs[d] for d in task.deps if d in refs])
        by_ref = {ref: tid for tid, ref in refs.items()}
        results: dict[str, dict] = {}
        waiting = list(refs.values())
        try:
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                tid = by_ref[done[0]]
                try:
                    results[tid] = ray.get(done[0])
                except Exception as e:  # noqa: BLE001 - a worker lost more often than retried
                    results[tid] = {"id": tid, "stage": todo[tid].stage, "point": todo[tid].point,
                                    "status": "failed", "error": f"{type(e).__name__}: {e}"[:300], "notebook": None}
                _log_result(results[tid], log)
            final_out = None
            if final:
                waiting = [ray.remote(final[0]).options(num_cpus=1, max_retries=RETRIES, name="grid report")
                           .remote(*final[1:])]
                try:
                    final_out = ray.get(waiting[0]) or False
                except Exception:  # noqa: BLE001 - its worker lost: the driver renders it
                    final_out = False
        except KeyboardInterrupt:
            for ref in waiting:
                ray.cancel(ref, force=True)
            raise
        return results, final_out
    finally:
        if started_here:
            ray.shutdown()


def ray_options(task: Task, cfg: dict, gpus: bool) -> dict:
    """A stage's Ray task options: a CPU for each of its processes (a training stage under torchrun
    runs train.nproc_per_node), and, for a stage that trains on CUDA on a cluster with GPUs, a GPU
    for each of them; retried when its worker dies, not when it raises."""
    t = cfg["train"]
    procs = _processes(t) if task.stage in GPU_STAGES else 1
    gpu = gpus and task.stage in GPU_STAGES and t["device"] != "cpu"
    return {"num_cpus": procs, "num_gpus": procs if gpu else 0, "max_retries": RETRIES, "retry_exceptions": False,
            "name": task.id}


def _log_result(r: dict, log: Callable[[str], None]) -> None:
    if r["status"] == "failed":
        log(f"==> FAILED {r['id']} (point {r['point']}): {r.get('error')}")
    elif r["status"] == "ran":
        log(f"==> done {r['id']} (point {r['point']}) in {r.get('seconds', 0):.1f} s")


# --- the sweep -------------------------------------------------------------------------------------
def run(pts: list[grid.Point], sweep_dir: str | Path, *, engine: str = "local", jobs: int = 2,
        address: str | None = None, store_root: str | Path | None = None, log: Callable[[str], None] = print,
        ray_init: dict | None = None, fresh_kernels: bool = False, kinds: tuple[str, ...] = graph.CHAIN,
        gpus: str | None = "auto") -> dict:
    """Run every point of the grid into sweep_dir, each unique stage once; then the grid report.
    Each worker runs its stages' notebooks in one kernel, reset between them (prunestudy.kernels);
    `fresh_kernels`: a kernel per notebook. `kinds`: only these stage kinds (a prefix of the chain; without
    the analysis there is no grid report: `prunestudy run --jobs` computes its repeats so).
    `gpus`: the local engine's workers' GPUs (`gpu_ids`; Ray gives each GPU task its own itself).
    Returns {"results": {task id: result}, "failed": [...], "ran": {stage: count}}."""
    sweep_dir = config.resolve_path(sweep_dir)
    pinned = gpu_ids(gpus, pts) if engine == "local" else []
    for p in pts:
        execute.preflight(p.cfg, paths.point_dir(sweep_dir, p.name))
    st = stagestore.Store(store_root or stagestore.default_root(sweep_dir))
    execute.ensure_kernel()
    with runlock.RunLock(sweep_dir, f"prunestudy sweep (pid {os.getpid()})"):
        prepare(pts, sweep_dir, st)
        todo = tasks(pts, kinds)
        env = task_env()
        by_name = {p.name: p for p in pts}
        threads = task_threads(engine, jobs)
        specs = {tid: _spec(t, by_name, sweep_dir, st, env, threads, fresh_kernels) for tid, t in todo.items()}
        log(f"==> sweep: {len(pts)} points, {len(todo)} unique stages, engine {engine}"
            + (f" ({jobs} jobs{', GPUs ' + ','.join(pinned) + ' in turn' if pinned else ''})" if engine == "local"
               else f" ({address or 'a local Ray'})"))
        final = (_report_task, str(sweep_dir), fresh_kernels, env, threads) if "analysis" in kinds else None
        if engine == "ray":
            results, page = run_ray(todo, specs, address, log, ray_init, final)
        else:
            results, page = run_local(todo, specs, jobs, log, final, prestart=min(jobs, _to_run(todo, sweep_dir, st)),
                                      gpus=pinned)
        failed = [r for r in results.values() if r["status"] == "failed"]
        ran = {s: sum(1 for r in results.values() if r["status"] == "ran" and r["stage"] == s) for s in graph.CHAIN}
        summary = {"results": results, "failed": failed, "ran": ran, "points": len(pts), "unique": len(todo)}
        if page:   # a worker of the pool or of Ray rendered it
            log(f"==> sweep report: {page}")
        elif "analysis" in kinds:
            report(sweep_dir, log, fresh_kernels)
    return summary


def report(sweep_dir: Path, log: Callable[[str], None] = print, fresh_kernel: bool = False) -> Path:
    """Run notebooks/06_sweep.ipynb on the sweep (tables, curves, sweep.csv and sweep.json), render
    sweep.html with the code hidden."""
    src = execute.notebooks_dir() / paths.SWEEP_NOTEBOOK
    out = paths.notebooks_dir(sweep_dir) / paths.SWEEP_NOTEBOOK
    out.parent.mkdir(parents=True, exist_ok=True)
    kernels.execute_notebook(src, out, kernel_name=execute.ensure_kernel(), fresh=fresh_kernel,
                             parameters={"sweep_dir": str(sweep_dir)}, stdout_file=sys.stdout, stderr_file=sys.stderr)
    page = execute.render_html(out, Path(sweep_dir) / paths.SWEEP_REPORT, hide_code=True,
                                title=f"prunestudy sweep: {Path(sweep_dir).name}")
    log(f"==> sweep report: {page}")
    return page


# --- the command line ------------------------------------------------------------------------------
def add_cli(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="run a grid of studies, each unique stage once (local pool or Ray)")
    p.add_argument("-f", "--file", required=True, help="grid file: study parameters plus `grid:` (params/grid.yaml)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter of every point (repeatable; value read as YAML)")
    p.add_argument("-g", "--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="set or replace a grid key's values, e.g. -g prune.amount=0.2,0.5,0.8 (repeatable)")
    p.add_argument("--sweep-dir", help="output folder (default: runs/<grid file name>[-<hash of the points>])")
    p.add_argument("--dry-run", action="store_true", help="print the plan (points, unique stages, done, time left)")
    p.add_argument("--engine", choices=("local", "ray"), default="local", help="local process pool (default) or Ray")
    p.add_argument("--jobs", type=int, default=machine.usable_cpus(),
                   help="local engine: parallel stages (default: the cores this process may use)")
    p.add_argument("--gpus", default="auto", metavar="auto|none|ID,ID,...",
                   help="local engine: pin worker i to GPU i mod the count (its CUDA_VISIBLE_DEVICES), so N jobs use "
                        "every GPU; auto (default): the GPUs this process sees, when a point trains on CUDA")
    p.add_argument("--address", help="ray engine: the cluster (auto, ray://host:port); default a local Ray")
    p.add_argument("--store", metavar="DIR", help="the stage store (default: .store beside the sweep folder, or "
                                                  "$PRUNESTUDY_STORE; on a shared file system for several machines)")
    p.add_argument("--fresh-kernels", action="store_true",
                   help="a new Jupyter kernel for every notebook (default: one per worker, reset between notebooks)")
    p.set_defaults(handler=_cli)


def _cli(args) -> int:
    try:
        pts = grid.points(args.file, args.param, args.grid)
    except config.ParamsError as e:
        print(f"prunestudy: {e}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"prunestudy: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    if args.engine == "ray" and args.gpus != "auto":
        print("prunestudy: --gpus is the local engine's; Ray gives each training stage a GPU of its own "
              "(num_gpus=1): drop --gpus", file=sys.stderr)
        return 2
    try:
        gpu_ids(args.gpus, pts)
    except ValueError as e:
        print(f"prunestudy: {e}", file=sys.stderr)
        return 2
    name = Path(args.file).stem + (f"-{config.stage_hash([p.cfg for p in pts])}" if args.param or args.grid else "")
    sweep_dir = (config.resolve_path(args.sweep_dir) if args.sweep_dir
                 else config.resolve_path(Path("runs") / name, config.project_root()))   # the project's runs/
    root = Path(args.store).resolve() if args.store else stagestore.default_root(sweep_dir)
    if args.dry_run:
        print(f"prunestudy: sweep folder {sweep_dir}, stage store {root}")
        print(grid.dry_run_text(pts, sweep_dir, root))
        return 0
    print(f"prunestudy: sweep folder {sweep_dir} ({len(pts)} points), stage store {root}", flush=True)
    try:
        summary = run(pts, sweep_dir, engine=args.engine, jobs=args.jobs, address=args.address, store_root=root,
                      log=lambda m: print(m, flush=True), fresh_kernels=args.fresh_kernels, gpus=args.gpus)
    except (FileNotFoundError, execute.PreflightError, runlock.LockedError) as e:
        print(f"prunestudy: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)   # see cli._run
        print(f"prunestudy: interrupted; finished stages are kept in the store ({root}): rerun the same command to "
              "go on", file=sys.stderr)
        return 130
    except execute.StageFailed as e:   # the grid report itself
        print(f"prunestudy: {e}", file=sys.stderr)
        return 1
    ran = ", ".join(f"{n} {s}" for s, n in summary["ran"].items() if n) or "nothing (every stage was done)"
    print(f"prunestudy: {summary['points']} points, {summary['unique']} unique stages; computed {ran}; "
          f"report {sweep_dir / paths.SWEEP_REPORT}")
    if summary["failed"]:
        print(f"prunestudy: {len(summary['failed'])} stage(s) failed; the points that need them are unfinished:",
              file=sys.stderr)
        for r in summary["failed"]:
            where = f"; executed notebook: {r['notebook']}" if r.get("notebook") else ""
            print(f"  - {r['id']} (point {r['point']}): {r.get('error')}{where}", file=sys.stderr)
        print("  fix the cause and rerun the same command: only what is missing or failed runs", file=sys.stderr)
        return 1
    return 0
