"""Who may write a run folder: one writer at a time.

`RunLock` is an exclusive `flock` on `<run>/run.lock` held for a whole `prunestudy run`; the
kernels it starts inherit its token (PRUNESTUDY_LOCK_TOKEN) and may write. Any other writer (a
second `prunestudy run`, a notebook) is refused at once with the holder's pid and start time. The
lock dies with its process (even under SIGKILL), so a lock left by a killed run is taken over by
the next one. What a stage was computed from (its record): prunestudy.records.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from . import atomic, paths

TOKEN_ENV = "PRUNESTUDY_LOCK_TOKEN"      # set by the runner for the kernels it starts


class LockedError(RuntimeError):
    """The run folder is being written by another process (the CLI exits 2)."""


def holder(run_dir: Path) -> dict | None:
    """Who holds the run folder's lock now (pid, start time, host, command), or None."""
    path = paths.lock_file(run_dir)
    if not path.is_file():
        return None
    with atomic.open_lock(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                return json.loads(f.read() or "{}")
            except ValueError:
                return {}
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _describe(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "an unknown time"
    return (f"{info.get('command', 'another process')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
            f"started {when})")


class RunLock:
    """An exclusive lock on a run folder for the life of this object (or of its process)."""

    def __init__(self, run_dir: Path, command: str):
        self.path = paths.lock_file(run_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.token = uuid.uuid4().hex
        self._file = atomic.open_lock(self.path)   # a planted link is refused, never written through
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            try:
                info = json.loads(self._file.read() or "{}")
            except ValueError:
                info = {}
            self._file.close()
            raise LockedError(f"the run folder {run_dir} is being written by {_describe(info)}: wait for it to "
                              "finish, or choose another folder with --run-dir") from None
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": command,
                     "token": self.token}
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps(self.info))
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def writing(run_dir: Path, command: str):
    """Hold the run folder's lock while a stage writes, unless this process is a kernel of the
    `prunestudy run` that holds it (its token is in the environment)."""
    token = os.environ.get(TOKEN_ENV)
    info = holder(run_dir)
    if info is not None and token and info.get("token") == token:
        yield None
        return
    lock = RunLock(run_dir, command)
    os.environ[TOKEN_ENV] = lock.token   # processes it starts (torchrun workers) may write too
    try:
        yield lock
    finally:
        lock.release()
        if token is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = token


def under_runner(run_dir: Path) -> bool:
    """True in a kernel started by the `prunestudy run` that holds this run folder's lock."""
    token = os.environ.get(TOKEN_ENV)
    info = holder(run_dir) if token else None
    return bool(info and info.get("token") == token)
