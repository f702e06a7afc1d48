"""A process that dies with the one that started it: a sweep's pool workers and every kernel.

`kill -9` of a sweep's driver left its pool workers computing their stages for minutes (a busy
worker notices its lost driver only when it sends the stage's result), and their kernels with them.
`tie_to_parent` asks Linux to SIGKILL this process as soon as its parent dies
(prctl(PR_SET_PDEATHSIG)), then checks that the parent is still the one it was started by (it may
have died before the prctl: the process was then reparented, and ends itself now). Where prctl is
missing (not Linux), a watchdog thread polls the parent's pid twice a second instead.

PR_SET_PDEATHSIG fires when the *thread* that started this process ends, not its whole process: the
pool's workers are started by the driver's main thread (ProcessPoolExecutor.submit), the kernels by
their worker's (or `prunestudy run`'s) main thread, where jupyter_client's launch runs; neither ends
before its process.

A kernel ties itself when IPython loads this module as an extension (`load_ipython_extension`,
kernels.KERNEL_ARGUMENTS): to the pid jupyter_client gave it in JPY_PARENT_PID (the process that
launched it), so the project's kernelspec, shared by every checkout using this Python, is unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1   # <linux/prctl.h>
POLL_SECONDS = 0.5     # the watchdog's period, where prctl is missing


def tie_to_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> str:
    """From now on this process gets `sig` (SIGKILL: it cannot be ignored, a busy process stops at
    once) when its parent dies. `parent`: the pid this process was started by (default: its parent
    now); a process whose parent is already another one (it died meanwhile) gets `sig` at once.
    Returns how: "prctl" or "watchdog"."""
    parent = os.getppid() if parent is None else parent
    how = "prctl" if _prctl_deathsig(sig) else "watchdog"
    if os.getppid() != parent:   # the parent died before the prctl: nothing will fire for it
        os.kill(os.getpid(), sig)
    if how == "watchdog":
        threading.Thread(target=_watch, args=(parent, sig), name="prunestudy-lifeline", daemon=True).start()
    return how


def _prctl_deathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int, sig: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os.kill(os.getpid(), sig)


def load_ipython_extension(ipython) -> None:
    """A kernel (`--IPKernelApp.extensions=prunestudy.lifeline`): tied to the process that launched it."""
    parent = os.environ.get("JPY_PARENT_PID", "")
    tie_to_parent(int(parent) if parent.isdigit() else None)
