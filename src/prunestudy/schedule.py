"""The one scheduling loop (kedro's `AbstractRunner._run`): a graph of tasks, each submitted once
its inputs are done, to an executor that is the only thing the engines differ in:

    Inline   in this process, one task at a time, in the graph's order   `prunestudy run`
    Pool     a local process pool of N spawned workers                    `run --jobs N`, `sweep`
    Ray      one Ray task per task, on a local Ray or a cluster           `sweep --engine ray`

The loop does not know what a task computes: `work(task)` gives the function and its arguments
(a stage of a run folder, a stage of a grid point); the results of a task's inputs are appended to
them. A task whose worker process dies (a pool's BrokenProcessPool) is submitted again, up to
RETRIES more times (Ray retries its own); an error of the task itself is the task's result, or,
in this process (Inline), raised as it is. A result with `halt` (a full disk, a folder that cannot
be written: worker.run_task) stops the loop: no other task starts (they are skipped), the running
ones finish, `final` does not run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context

from . import kernels, lifeline, machine, progress

RETRIES = 2                                  # a task whose process died is tried this many more times
GPU_STAGES = ("train", "prune", "retrain")   # what may fine-tune: a GPU each on a cluster with GPUs
WARM_IMPORTS = "import prunestudy.stages, prunestudy.report"   # what every stage notebook imports


@dataclass(frozen=True)
class Task:
    id: str                 # "<stage>:<key>" (a grid's), or "<folder>:<stage>" (a run folder's)
    stage: str
    key: str
    point: str              # the point (run folder) that computes it
    deps: tuple[str, ...]   # the tasks it waits for
    points: tuple[str, ...] = ()   # every point that uses it


def failure(task: Task, error: str) -> dict:
    """A task's result when it could not run to its end outside its own code."""
    return {"id": task.id, "stage": task.stage, "point": task.point, "status": "failed", "error": error,
            "notebook": None}


def run(todo: dict[str, Task], executor, work: Callable[[Task], tuple], log: Callable[[str], None],
        final: tuple | None = None) -> tuple[dict[str, dict], object]:
    """Run every task of `todo` (ordered, inputs first) on `executor`: submit a task once its inputs
    are done, in `todo`'s order, as long as the executor has a free slot; wait for the first to finish;
    again. `final`: a (function, *args) run on the executor once every task is done (the grid
    report, in a worker whose kernel is warm). Returns ({task id: result}, what `final` returned:
    None when it did not run, False when it failed there)."""
    results: dict[str, dict] = {}
    attempts = dict.fromkeys(todo, 0)
    pending, running = dict(todo), {}
    with executor:
        try:
            while pending or running:
                for tid, task in list(pending.items()):
                    if executor.slots is not None and len(running) >= executor.slots:
                        break
                    if all(d in results for d in task.deps):
                        fn, *args = work(task)
                        running[executor.submit(task, fn, *args, *(results[d] for d in task.deps))] = tid
                        attempts[tid] += 1
                        del pending[tid]
                if not running:   # never: every input is done, pending or failed; a guard against waiting forever
                    for tid in pending:
                        results[tid] = failure(todo[tid], "its inputs never finished")
                    break
                for fut in _first_done(running):
                    tid = running.pop(fut)
                    try:
                        result = fut.result()
                    except Exception as e:  # noqa: BLE001 - the executor says what it means, or raises it
                        result = executor.failed(todo[tid], e)   # None: its worker process was lost
                    if result is None and attempts[tid] > RETRIES:
                        result = failure(todo[tid], f"its process died {attempts[tid]} times")
                    if result is None:
                        log(f"==> {tid}: its worker process died; trying again ({attempts[tid]}/{RETRIES + 1})")
                        pending[tid] = todo[tid]
                        continue
                    results[tid] = result
                    _log_result(result, log)
                    if result.get("halt"):   # a full disk: every other task would fail alike
                        for other in pending:
                            results[other] = {**failure(todo[other], result["halt"]), "status": "skipped",
                                              "because": tid}
                        pending.clear()
            halted = any(r.get("halt") for r in results.values())
            return results, (executor.final(*final) if final and not halted else None)
        except KeyboardInterrupt:
            executor.interrupt(running)
            raise


def _first_done(running: dict) -> set:
    """The futures done first, waking twice a second: the kernel may deliver a Ctrl-C (SIGINT) to any
    thread of this process; Python runs its handler in the main thread, but a main thread asleep in
    an untimed wait only wakes when a future completes, so the stage would run to its end first."""
    while True:
        done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
        if done:
            return done


def _log_result(r: dict, log: Callable[[str], None]) -> None:
    if r.get("status") == "failed":
        log(f"==> FAILED {r['id']} (point {r['point']}): {r.get('error')}")
    elif r.get("status") == "ran" and "seconds" in r:
        log(f"==> done {r['id']} (point {r['point']}) in {r['seconds']:.1f} s")


# --- executors -----------------------------------------------------------------------------------
class Inline:
    """This process, one task at a time: a task's errors (and Ctrl-C) are raised where it runs."""

    slots = 1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def submit(self, task: Task, fn: Callable, *args) -> Future:
        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut

    def failed(self, task: Task, exc: Exception) -> dict | None:
        raise exc

    def final(self, fn: Callable, *args):
        return fn(*args) or False

    def interrupt(self, running: Iterable) -> None:
        pass


class Pool:
    """A local pool of `jobs` spawned worker processes (`_worker_init`), pinned to `gpus` in turn
    (worker i sees only gpus[i % len(gpus)]); `warm` (`warm_settings`): the environment its workers'
    kernels start with, warmed as they start; `prestart` of them at once. A pool whose worker died
    (BrokenProcessPool) is replaced by a new one at the next submit."""

    def __init__(self, jobs: int, *, warm: dict | None = None, gpus: list[str] | None = None, prestart: int = 1):
        self.slots, self.gpus, self.prestart = jobs, gpus or [], prestart
        self.warm = warm if prestart else None   # nothing to compute: workers start as tasks come, cold
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _live(self) -> ProcessPoolExecutor:
        if self._pool is not None and getattr(self._pool, "_broken", False):
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._pool is None:
            self._pool = pool(self.slots, self.warm, self.gpus)
            with _sigint_blocked():   # each submit to a pool without an idle worker starts one: all start now
                for _ in range(min(self.prestart, self.slots) - 1):
                    self._pool.submit(int)
            self.prestart = 0
        return self._pool

    def submit(self, task: Task | None, fn: Callable, *args) -> Future:
        live = self._live()
        with _sigint_blocked():   # a worker it starts is born with SIGINT blocked
            return live.submit(_call, fn, *args)

    def failed(self, task: Task, exc: Exception) -> dict | None:
        """None: its worker died (the pool broke), it is submitted again; anything else is raised."""
        if isinstance(exc, BrokenProcessPool):
            return None
        raise exc

    def final(self, fn: Callable, *args):
        try:
            return next(iter(_first_done({self.submit(None, fn, *args): None}))).result() or False
        except BrokenProcessPool:   # its worker died: the caller runs it itself
            return False

    def interrupt(self, running: Iterable) -> None:
        """A Ctrl-C that reached only this process reaches the workers too: their kernels stop the stage."""
        for proc in list((getattr(self._pool, "_processes", None) or {}).values()):
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGINT)


class Ray:
    """One Ray task per task (`options(task)`: its resources; Ray retries a task whose worker dies),
    on the cluster at `address` (None: a local Ray, started here and stopped after)."""

    slots = None   # Ray queues the tasks itself

    def __init__(self, address: str | None = None, init: dict | None = None,
                 options: Callable[[Task, bool], dict] | None = None):
        self.address, self.init, self.options = address, init, options
        self._refs: dict[Future, object] = {}
        self._remote: dict[Callable, object] = {}   # each function exported to the cluster once

    def __enter__(self):
        import ray

        self._started_here = not ray.is_initialized()
        if self._started_here and self.address:
            reachable(self.address)
        if self._started_here:
            kw = {"include_dashboard": False, "log_to_driver": True, **(self.init or {})}
            sigterm = signal.getsignal(signal.SIGTERM)
            ray.init(address=self.address, **kw) if self.address else ray.init(**kw)
            signal.signal(signal.SIGTERM, sigterm)   # Ray's own handler aborts with its stack (rc 134)
        self.gpus = ray.cluster_resources().get("GPU", 0) > 0
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if self._started_here:
            ray.shutdown()

    def submit(self, task: Task | None, fn: Callable, *args) -> Future:
        import ray

        opts = (self.options(task, self.gpus) if task is not None and self.options
                else {"num_cpus": 1, "max_retries": RETRIES, "name": getattr(task, "id", "grid report")})
        if fn not in self._remote:
            self._remote[fn] = ray.remote(fn)
        ref = self._remote[fn].options(**opts).remote(*args)
        fut = ref.future()
        self._refs[fut] = ref
        return fut

    def failed(self, task: Task, exc: Exception) -> dict | None:
        """Ray retried it already (max_retries): a failed task, its worker lost more often than retried."""
        return failure(task, f"{type(exc).__name__}: {exc}"[:300])

    def final(self, fn: Callable, *args):
        try:
            return next(iter(_first_done({self.submit(None, fn, *args): None}))).result() or False
        except Exception:  # noqa: BLE001 - its worker lost: the driver renders it
            return False

    def interrupt(self, running: Iterable) -> None:
        import ray

        for fut in running:
            with contextlib.suppress(Exception):
                ray.cancel(self._refs[fut], force=True)



class EngineError(RuntimeError):
    """The engine cannot start (a Ray cluster that does not answer): one line naming what and the fix."""


def reachable(address: str, timeout: float = 10.0) -> None:
    """Raise EngineError unless a Ray cluster's `address` (host:port or ray://host:port; "auto" is
    left to Ray) accepts a connection within `timeout` seconds: ray.init itself retries an address
    that does not answer for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise EngineError(f"no Ray cluster answers at {address} ({e.strerror or e}): start one there (ray start "
                          "--head) or give its address to --address (auto: the one started on this machine)") from None


def ray_options(task: Task, cfg: dict, gpus: bool) -> dict:
    """A stage's Ray task options: a CPU for each of its processes (a training stage under torchrun
    runs train.nproc_per_node), and, for a stage that trains on CUDA on a cluster with GPUs, a GPU
    for each of them; retried when its worker dies, not when it raises."""
    t = cfg["train"]
    procs = processes(t) if task.stage in GPU_STAGES else 1
    gpu = gpus and task.stage in GPU_STAGES and t["device"] != "cpu"
    return {"num_cpus": procs, "num_gpus": procs if gpu else 0, "max_retries": RETRIES, "retry_exceptions": False,
            "name": task.id}


def processes(train: dict) -> int:
    """How many processes a training runs: train.nproc_per_node under torchrun, else 1."""
    return train["nproc_per_node"] if train["launcher"] == "torchrun" else 1


def gpu_ids(gpus: str | None, trainings: list[dict]) -> list[str]:
    """The GPUs the pool pins its workers to, worker i to ids[i % len(ids)] (its CUDA_VISIBLE_DEVICES),
    so that N jobs on a box of several GPUs use them all rather than all training on the first.
    `trainings`: the `train` sections of the points. `gpus`: "none" (no pinning), a comma-separated
    list of ids ("0,1", as CUDA_VISIBLE_DEVICES takes them), or "auto" (None too): the GPUs this
    process sees (CUDA_VISIBLE_DEVICES when set, else every GPU PyTorch finds), when some point trains
    on CUDA and none needs other GPUs than one (train.device cuda:N, which a pinned worker would not
    have; torchrun with train.nproc_per_node > 1 off the CPU, which trains on several).
    Raises ValueError for a list that is not one, or beside a point that needs other GPUs."""
    gpus = (gpus or "auto").strip()
    needs = sorted({f"train.device {t['device']}" for t in trainings if t["device"].startswith("cuda:")}
                   | {f"torchrun with train.nproc_per_node {t['nproc_per_node']}" for t in trainings
                      if processes(t) > 1 and t["device"] != "cpu"})
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
    if needs or all(t["device"] == "cpu" for t in trainings):
        return []
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() not in ("", "-1")]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


# --- the driver's signals -------------------------------------------------------------------------
_terminated = False    # SIGTERM reached the driver


def sigterm_as_sigint() -> None:
    """SIGTERM (`kill`, a batch system's stop) ends this process as Ctrl-C does: it runs the SIGINT
    handler of the moment, so the same code runs (the loop interrupts its workers and their kernels,
    claims are released, no stack is printed); `terminated()` then tells the command line to exit
    143. (Not raise_signal: a SIGINT still pending at exit kills the process with status -2.)"""
    def handler(signum, frame) -> None:
        global _terminated
        _terminated = True
        on_sigint = signal.getsignal(signal.SIGINT)
        if callable(on_sigint):
            on_sigint(signal.SIGINT, frame)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def note_sigterm(signum=None, frame=None) -> None:
    """A SIGTERM handler that only notes it (`terminated()`): for a process that is ending already."""
    global _terminated
    _terminated = True


def terminated() -> bool:
    """SIGTERM reached this process (sigterm_as_sigint): an interrupt exits 143, not 130."""
    return _terminated


# --- a pool's worker process ---------------------------------------------------------------------
_busy = False          # a task runs in this worker
_interrupted = False   # Ctrl-C reached this worker


def interrupted() -> bool:
    """Ctrl-C reached this worker process: a task queued to it before that does not start."""
    return _interrupted


def apply_env(env: dict, threads: int) -> None:
    """A task's environment in its worker process (and so in the kernel it starts): the engine's
    variables and the threads this task was given."""
    os.environ.update(env)
    for var in machine.THREAD_VARS:   # the stage's kernel computes with the threads this task was given
        os.environ[var] = str(threads)
    os.environ.setdefault(progress.ENV, "log")


def _call(fn: Callable, *args):
    """A task in a pool worker: while it runs, Ctrl-C stops it (`_worker_sigint`), quietly."""
    global _busy, _interrupted
    _busy = True
    try:
        return fn(*args)
    except KeyboardInterrupt:   # Ctrl-C reached this worker and its kernel: no "never retrieved" traceback
        _interrupted = True
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        raise
    finally:
        _busy = False


@contextlib.contextmanager
def _sigint_blocked():
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker_sigint(*_) -> None:
    """A pool worker's Ctrl-C: it stops the task that runs (KeyboardInterrupt); an idle worker (or
    one still starting) only notes it, quietly: the tasks queued to it do not start."""
    global _interrupted
    _interrupted = True
    if _busy:
        raise KeyboardInterrupt


def _worker_init(warm: dict | None = None, slots=None, driver: int | None = None) -> None:
    """A pool worker dies with its `driver` (the pid of the process that started it), even one
    SIGKILLed (prunestudy.lifeline); so does its kernel. It starts with SIGINT blocked (a Ctrl-C while
    it imports would print a traceback); from here on `_worker_sigint` takes it (one that came
    meanwhile is delivered to it now). With
    `slots` (a queue of GPU ids, `pool`), it takes one and sees only that GPU from now on: its
    kernel and every stage it runs. With `warm` (`warm_settings`: what its tasks will run with), it
    starts its kernel and imports the package there now, while the first stage runs in another worker."""
    lifeline.tie_to_parent(driver)
    signal.signal(signal.SIGINT, _worker_sigint)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if slots is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slots.get(timeout=60)
    if warm:
        apply_env(warm["env"], warm["threads"])
        with contextlib.suppress(Exception):   # not warmed: its first notebook starts the kernel, as before
            kernels.warm(warm["kernel"], warm["cwd"], WARM_IMPORTS)


def pool(jobs: int, warm: dict | None, gpus: list[str]) -> ProcessPoolExecutor:
    """A pool of `jobs` spawned workers (`_worker_init`); with `gpus`, a queue of their ids in turn,
    one per worker, so that worker i takes gpus[i % len(gpus)]."""
    ctx = get_context("spawn")
    slots = None
    if gpus:
        slots = ctx.Queue()
        for i in range(jobs):
            slots.put(gpus[i % len(gpus)])
    return ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                               initargs=(warm, slots, os.getpid()))
