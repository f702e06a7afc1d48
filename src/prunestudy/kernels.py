"""The Jupyter kernel a process runs its stage notebooks in.

By default a process (`prunestudy run`, a sweep's pool worker, a Ray worker) keeps one kernel of the
project's kernelspec and runs its stage notebooks in it one after another: starting a kernel and
importing PyTorch, pandas, seaborn and the package costs about 3.5 s per notebook on this machine
(more than the training of a smoke-sized stage), and a sweep runs hundreds of notebooks. Before
each notebook the kernel is reset to the state a fresh kernel would show the notebook:

- its namespace and history are emptied (IPython's reset, new session): a notebook sees no variable
  of the one before, so one that reads a name it did not define fails here as it would in
  JupyterLab, and its cells are numbered from 1; `__main__`'s `__spec__`, `__loader__` and
  `__package__`, which the reset deletes, are put back as the kernel had them (multiprocessing's
  spawn, used by the data stage's crop workers, reads them);
- open figures are closed, and what the notebook before held is freed (garbage collected, CUDA's
  cached memory given back); what survives a reset (imported modules) is moved out of the
  collector's way (gc.freeze), so that a collection costs what the notebooks added, not all of
  PyTorch's objects again;
- the PRUNESTUDY_* environment variables (the run lock's token, the store, the progress style,
  PRUNESTUDY_HOME) are set to the runner's current ones.

What a reset cannot undo is read once, when a kernel starts: the environment's other variables
(CUDA_VISIBLE_DEVICES, which Ray sets per task; OMP_NUM_THREADS, MKL_NUM_THREADS), the kernelspec
and the working folder. A kernel is therefore reused only while all of them are what it was
started with; otherwise, or when it died, a new one is started. Imported modules stay imported;
the stage functions set every seed and setting they depend on (the tests compare a reused kernel's
results with fresh kernels' bit for bit, tests/test_kernels.py).

`fresh=True` (`prunestudy run --fresh-kernels`, `prunestudy sweep --fresh-kernels`) starts a
kernel per notebook, as papermill does on its own.

What a notebook costs beyond its cells, in a reused kernel (benchmarks/bench_kernel.py): the reset,
papermill's set-up and its saves. jupyter_client's clients wait for 0.2 s of IOPub silence each
time they connect, and papermill and the reset each connect one per notebook; the project's
(ReadyClient) do not. With the collector's two full passes, that was about 0.75 s a notebook.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import signal
import threading
from pathlib import Path

# glibc's malloc gives a freed block of more than 32 MB (mmap'd) and the heap's free top (trim) back to
# the system, so the next batch of that size page-faults all its memory in again. That was about 40%
# of an evaluation of the seed CNN at batch 500 (1.65 s -> 0.97 s for 1,132 crops, 1 thread), a sixth
# of its forward pass at batch 64 (57.8 -> 47.9 ms) and 5-8% of a training epoch at batch 32. The kernelspec
# (stage notebooks, sweeps' workers, JupyterLab) raises both thresholds, as PyTorch's CPU tuning
# guides do with jemalloc or tcmalloc: freed memory stays with the kernel, up to its peak. Read by
# glibc once, at a process's start; ignored by other C libraries. Every latency table records the
# setting it was timed under (efficiency.allocator).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=536870912:glibc.malloc.trim_threshold=1073741824"
# IPython's history in memory, not in the user's ~/.ipython/profile_default/history.sqlite: every
# stage's code went there, kernels running side by side contended for its lock, and each reset wrote
# to it. nbclient passes this to the kernels it starts, but only to kernelspecs named python or
# python3, not to the project's; JupyterLab's sessions of the kernel keep their history as usual.
# And every kernel dies with the process that started it, even one SIGKILLed (prunestudy.lifeline).
KERNEL_ARGUMENTS = ("--HistoryManager.hist_file=:memory:", "--IPKernelApp.extensions=prunestudy.lifeline")
CLIENT_CLASS = f"{__name__}.ReadyClient"   # the kernel clients of reused kernels (ReadyClient's text)
COLLECT = "__import__('gc').collect(); __import__('gc').freeze()"   # the reset's last step (see _reset)
OWN_PREFIX = "PRUNESTUDY_"   # read by the stage functions when they run: set before each notebook
MAIN_ATTRS = ("__spec__", "__loader__", "__package__")   # kept through a reset (see _reset)
_IGNORED = ("JPY_",)         # set by Jupyter for the kernel itself

_km = None            # this process's kernel manager
_fingerprint = None   # what its kernel was started with
starts = 0            # kernels started by this process (the tests count them)
_sigint = False       # a Ctrl-C reached this process while a notebook ran (see watch_sigint)
_open_clients: set = set()   # ReadyClients whose channels run (see close_clients)


def fingerprint(kernel_name: str, cwd: str) -> str:
    """What a kernel reads once, at its start: its kernelspec, working folder and the environment
    (but the variables reset before each notebook)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith((OWN_PREFIX, *_IGNORED))}
    blob = json.dumps([kernel_name, str(cwd), sorted(env.items())])
    return hashlib.sha256(blob.encode()).hexdigest()


def execute_notebook(src: str | os.PathLike, out: str | os.PathLike, *, kernel_name: str, fresh: bool = False,
                     **kw):
    """papermill's execute_notebook of `src` into `out`, in this process's kernel (reset for it) or,
    with `fresh`, in a kernel of its own; the working folder is the notebook's. A Ctrl-C stops it
    even if a library on the way swallowed it (watch_sigint), and stops a reused kernel that may
    still compute. `kw`: papermill's (parameters, stdout_file, ...)."""
    import papermill as pm

    cwd = notebook_cwd(src)
    try:
        with watch_sigint():
            km = {} if fresh else {"km": manager(kernel_name, cwd)}
            try:
                pm.execute_notebook(str(src), str(out), kernel_name=kernel_name, cwd=cwd, progress_bar=False,
                                    extra_arguments=list(KERNEL_ARGUMENTS), **km, **kw)
            finally:
                close_clients()
            check_interrupted()
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) or getattr(e, "ename", None) == "KeyboardInterrupt":
            shutdown()
        raise


def close_clients() -> None:
    """Stop the channels of the clients a notebook's run left open. nbclient stops its client only
    when it owns the kernel manager; with ours (a reused kernel) each notebook left its client's
    sockets (about 14 file descriptors) and a heartbeat thread behind, until the process failed
    with "Too many open files": after 71 notebooks at the common limit of 1,024 descriptors, some
    24 points of a sweep's pool worker."""
    for kc in list(_open_clients):
        kc.stop_channels()


def notebook_cwd(src: str | os.PathLike) -> str:
    """The working folder a notebook runs in (and its kernel is started in): the notebook's own."""
    return str(Path(src).parent)


def manager(kernel_name: str, cwd: str):
    """This process's kernel manager for `kernel_name` started in `cwd`, reset for the next notebook
    (papermill starts its kernel on first use when it has none). A new one replaces a kernel that
    died or that was started with another environment."""
    global _km, _fingerprint, starts
    from jupyter_client.manager import AsyncKernelManager
    from nbclient.util import run_sync

    fp = fingerprint(kernel_name, cwd)
    if _km is not None and _km.has_kernel and fp == _fingerprint and run_sync(_km.is_alive)():
        try:
            _reset(_km)
            return _km
        except (RuntimeError, TimeoutError):   # it died meanwhile (or hangs): a new one
            pass
    shutdown()
    _km, _fingerprint = AsyncKernelManager(kernel_name=kernel_name, client_class=CLIENT_CLASS), fp
    starts += 1
    _register_shutdown()
    return _km


@functools.cache
def _ready_client_class():
    """ReadyClient, defined once, on first use: jupyter_client is imported only by processes that run notebooks."""
    import time
    from queue import Empty

    from jupyter_client.asynchronous import AsyncKernelClient

    class ReadyClient(AsyncKernelClient):
        """jupyter_client's asynchronous client, but for the end of `wait_for_ready`.

        jupyter_client's own (8.x) asks for kernel_info until the reply comes on the shell channel
        and a message on IOPub proves that its subscription is connected (a SUB socket misses what is
        published before it joined), then waits until IOPub has been silent for 0.2 s. Papermill's
        client and the reset (`_reset`) each make a new client, so every notebook in a reused kernel
        slept at least 0.4 s in those waits, 1.2 s of a sweep point's three notebooks. This one waits
        instead for the kernel_info request's own last IOPub message (its `idle` status), which
        proves the subscription as well, and then takes only what is queued already: what is still
        to come belongs to an earlier request, and nbclient ignores messages of other requests (it
        matches their parent message id)."""

        def start_channels(self, *args, **kwargs) -> None:
            super().start_channels(*args, **kwargs)
            _open_clients.add(self)

        def stop_channels(self) -> None:
            _open_clients.discard(self)
            super().stop_channels()

        async def wait_for_ready(self, timeout: float | None = None) -> None:
            deadline = time.monotonic() + (float("inf") if timeout is None else timeout)
            while True:
                msg_id = self.kernel_info()
                reply = None
                while reply is None:   # the reply to this request (a late one of an earlier request is skipped)
                    try:
                        msg = await self.shell_channel.get_msg(timeout=1)
                    except Empty:
                        break
                    if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "kernel_info_reply":
                        reply = msg
                if reply is not None and await self._idle_seen(msg_id, wait=0.2):
                    self._handle_kernel_info_reply(reply)
                    break
                if not await self._async_is_alive():
                    raise RuntimeError("Kernel died before replying to kernel_info")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Kernel didn't respond in {timeout} seconds")
            while True:   # what IOPub holds already; nothing is waited for
                try:
                    await self.iopub_channel.get_msg(timeout=0)
                except Empty:
                    break

        async def _idle_seen(self, msg_id: str, wait: float) -> bool:
            """True once IOPub brings the `idle` status of request `msg_id`; False after `wait` s of
            silence (the subscription was not connected yet: the caller asks again)."""
            while True:
                try:
                    msg = await self.iopub_channel.get_msg(timeout=wait)
                except Empty:
                    return False
                if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status" \
                        and msg["content"].get("execution_state") == "idle":
                    return True

    return ReadyClient


def __getattr__(name: str):
    if name == "ReadyClient":   # the manager's client_class names it by its dotted path
        return _ready_client_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def warm(kernel_name: str, cwd: str, code: str = "") -> None:
    """Start this process's kernel now, in `cwd` and with the environment as it is, and run `code`
    in it (imports), so that the first notebook finds it ready: a sweep's pool worker does this as
    it starts, while the sweep's first stage runs elsewhere. The kernel is reused only if the
    notebook's environment and folder are these (`manager`); otherwise it is replaced as usual."""
    from nbclient.util import run_sync

    km = manager(kernel_name, cwd)
    if not km.has_kernel:
        run_sync(km.start_kernel)(cwd=cwd, extra_arguments=list(KERNEL_ARGUMENTS))
    if code:
        _execute(km, code, "warming the kernel up")


def run_here(code: str, what: str) -> bool:
    """Run `code` in this process's kernel, when it has one alive (a reused kernel: its imports are
    done), with the runner's PRUNESTUDY_* variables as a reset sets them. True when it ran without
    error; False when there is no kernel or the code failed there: the caller then does the work in
    this process (and sees the error itself, with its traceback)."""
    from nbclient.util import run_sync

    km = _km
    if km is None or not km.has_kernel:
        return False
    own = {k: v for k, v in os.environ.items() if k.startswith(OWN_PREFIX)}
    try:
        if not run_sync(km.is_alive)():
            return False
        _execute(km, f"__import__('os').environ.update({own!r})\n{code}", what)
    except (RuntimeError, TimeoutError):
        return False
    return True


def _reset(km) -> None:
    """Run the reset (see the module's text) in the kernel, outside any executed notebook and its
    history: IPython's reset with a new history session numbers the next cell 1."""
    own = {k: v for k, v in os.environ.items() if k.startswith(OWN_PREFIX)}
    code = "\n".join([
        "import os as _o, sys as _s",
        f"[_o.environ.pop(_k) for _k in [_k for _k in _o.environ if _k.startswith({OWN_PREFIX!r})]]",
        f"_o.environ.update({own!r})",
        "if 'matplotlib.pyplot' in _s.modules: _s.modules['matplotlib.pyplot'].close('all')",
        # IPython's reset also deletes __main__'s __spec__, __loader__ and __package__, which a fresh
        # kernel has (None) and multiprocessing's spawn reads: a data stage's crop workers would fail
        f"_s._prunestudy_main = {{_k: getattr(_s.modules['__main__'], _k) for _k in {MAIN_ATTRS!r} "
        "if hasattr(_s.modules['__main__'], _k)}",
        "get_ipython().reset(new_session=True)",
        "[setattr(__import__('sys').modules['__main__'], _k, _v) "
        "for _k, _v in vars(__import__('sys')).pop('_prunestudy_main').items()]",
        # what the notebook before held is freed now (and CUDA's cached blocks given back), not later;
        # what survives (the imported modules, mostly) is frozen: a full collection walked all of
        # PyTorch's, pandas' and matplotlib's objects, 0.1 s here, and IPython's reset makes one
        # too, so each reset spent 0.2 s in the collector; now both scan what came since
        COLLECT,
        "(lambda t: t.cuda.empty_cache() if t and t.cuda.is_initialized() else None)"
        "(__import__('sys').modules.get('torch'))",
    ])
    _execute(km, code, "resetting the kernel")


def _execute(km, code: str, what: str) -> None:
    """Run `code` in the kernel of `km`, outside any notebook's history; RuntimeError if it fails."""
    from nbclient.util import run_sync

    kc = km.client()
    kc.start_channels()
    try:
        run_sync(kc.wait_for_ready)(timeout=60)
        reply = run_sync(kc.execute_interactive)(code, store_history=False, timeout=120, output_hook=lambda m: None)
    finally:
        kc.stop_channels()
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"{what} failed: {reply['content'].get('evalue')}")


def shutdown() -> None:
    """Stop this process's kernel, if it has one."""
    global _km, _fingerprint
    km, _km, _fingerprint = _km, None, None
    if km is None or not km.has_kernel:
        return
    from nbclient.util import run_sync

    try:
        run_sync(km.shutdown_kernel)(now=True)
    except Exception:   # already gone: nothing to stop
        pass


_registered = False


def _register_shutdown() -> None:
    """Stop the kernel when this process ends: atexit for a plain process; a multiprocessing
    finaliser for a pool worker (whose exit skips atexit). A process killed outright leaves its
    kernel to ipykernel's parent poller, which ends a kernel whose parent is gone."""
    global _registered
    if _registered:
        return
    import atexit
    from multiprocessing import util

    atexit.register(shutdown)
    util.Finalize(None, shutdown, exitpriority=10)
    _registered = True


@contextlib.contextmanager
def watch_sigint():
    """While a notebook runs: Ctrl-C (SIGINT) raises KeyboardInterrupt as before and is also
    remembered, so that a library on the way that swallows the exception (a callback, a retry)
    cannot lose it: `check_interrupted` raises it again once the notebook returns."""
    global _sigint
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _sigint = False
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        global _sigint
        _sigint = True
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C reached this process during `watch_sigint`."""
    if _sigint:
        raise KeyboardInterrupt
