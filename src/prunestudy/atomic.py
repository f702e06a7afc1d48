"""Atomic artifact writes and safe loads: a stage killed midway leaves nothing that looks complete."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0644 under the usual 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()   # read once, at import (os.umask can only be read by setting it)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any]) -> Path:
    """Call write(binary file) on a temp file beside path, fsync, then rename it into place:
    readers see the old file or the whole new one, never a part. The file gets the mode a plain
    open() would give it (FILE_MODE): mkstemp's temp files are 0600, so reports, results and models
    could be read by their owner only, not by a colleague or a web server on a shared file system."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {path}: free some space "
                          f"and rerun; the previous {path.name}, if any, is untouched") from e
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    data = json.dumps(obj, indent=2, sort_keys=False, default=_jsonable).encode() + b"\n"
    return write_bytes(path, data)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def link_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Put a hard link to `src` at `dst` (a copy where links are not possible: another file system),
    atomically: `dst` is the old file or the new one, never a partial one."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


class PlantedLink(ValueError):
    """A lock or claim file that is a symbolic link, a hard link or not a file: never written
    through (the CLI exits 2)."""


def open_lock(path: str | os.PathLike):
    """A lock or claim file (flock, then a pid written into it) opened read-write without following
    a link: created with O_EXCL, else opened with O_NOFOLLOW and checked to be a plain file of one
    link. A link planted in its place (to a model in the store, say) would otherwise be truncated
    and overwritten by whoever takes the lock; it is refused with its path instead."""
    path = Path(path)
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        try:
            fd = os.open(path, flags)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise PlantedLink(_planted(path, "a symbolic link")) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise PlantedLink(_planted(path, "not a plain file" if not stat.S_ISREG(st.st_mode)
                                   else f"a hard link ({st.st_nlink} names)"))
    return os.fdopen(fd, "r+")


def _planted(path: Path, what: str) -> str:
    return (f"{path} is {what}, not a lock file of its own: refused, nothing written through it; "
            "remove it (rm) and rerun")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def save_tensors(path: str | os.PathLike, tensors: dict) -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(tensors, f))


def load_tensors(path: str | os.PathLike, device="cpu") -> dict:
    """Tensors only: torch.load(weights_only=True) refuses pickled code."""
    import torch

    return torch.load(path, map_location=device, weights_only=True)


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
