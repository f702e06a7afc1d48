"""`prunestudy coco download`: fetch, verify and unpack the official COCO 2017 archives.

Each archive is downloaded into ``<name>.part`` with HTTP Range resume, checked against
its expected byte size and md5, renamed to ``<name>`` only once verified, then unpacked
into a temporary folder inside the target and moved into the official layout::

    DIR/annotations/instances_{train,val}2017.json
    DIR/train2017/*.jpg
    DIR/val2017/*.jpg

A marker ``DIR/.coco-<split>.done`` (JSON: archive, size, md5) is written last, so an
interrupted unpack is never taken as complete and a second call does nothing.

Python API: :func:`fetch` (one URL to one verified file) and :func:`download_coco`.
Errors derive from :class:`CocoError`: :class:`UsageError` (bad split, unwritable folder),
:class:`DownloadError` (network, disk), :class:`VerificationError` (size or md5 mismatch),
:class:`UnsafeArchiveError` (a zip member that would land outside the target).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from . import atomic
from .progress import bar as progress_bar

__all__ = [
    "Archive", "ARCHIVES", "SPLITS", "COCO_URL", "URL_ENV",
    "fetch", "download_coco", "unpack", "add_cli",
    "CocoError", "UsageError", "DownloadError", "VerificationError", "UnsafeArchiveError",
]

#: Official host; override with ``base_url`` / ``--base-url`` / ``$PRUNESTUDY_COCO_URL``.
COCO_URL = "http://images.cocodataset.org"
URL_ENV = "PRUNESTUDY_COCO_URL"
CHUNK = 1 << 20
TIMEOUT_S = 60


@dataclass(frozen=True)
class Archive:
    """One downloadable archive: its path under the base URL, expected size and md5
    (None skips that check) and the paths (relative to DIR) it must provide."""

    path: str
    size: int | None
    md5: str | None
    provides: tuple[str, ...]

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


#: The official COCO 2017 archives (sizes and md5s as published for images.cocodataset.org).
ARCHIVES: dict[str, Archive] = {
    "annotations": Archive("annotations/annotations_trainval2017.zip", 252907541,
                           "f4bbac642086de4f52a3fdda2de5fa2c",
                           ("annotations/instances_train2017.json", "annotations/instances_val2017.json")),
    "val2017": Archive("zips/val2017.zip", 815585330, "442b8da7639aecaf257c1dceb8ba8c80", ("val2017",)),
    "train2017": Archive("zips/train2017.zip", 19336861798, "cced6f7f71b7629ddf16f17bbcfab6b2", ("train2017",)),
}
#: Default splits, smallest archive first so that a problem shows early.
SPLITS = tuple(ARCHIVES)


class CocoError(Exception):
    """Base of this module's errors; the message says what to do."""


class UsageError(CocoError):
    """Bad arguments: unknown split, target folder not writable (CLI exit 2)."""


class DownloadError(CocoError):
    """Network or disk failure during a download or unpack (CLI exit 1)."""


class VerificationError(DownloadError):
    """A downloaded file has the wrong size or md5; it has been removed."""


class UnsafeArchiveError(DownloadError):
    """A zip member has an absolute path or '..': nothing was unpacked."""


# --------------------------------------------------------------------------- fetch

def fetch(url: str, dest, size: int | None = None, md5: str | None = None,
          progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Download url to dest, resuming ``dest.part``; verify size and md5; return dest.

    An existing dest is verified and kept (no request). The part file is renamed to dest
    only after verification; on a mismatch it is deleted and VerificationError raised.
    """
    dest = Path(dest)
    if dest.is_file():
        _verify(dest, size, md5, _md5_file(dest) if md5 else None)
        log(f"{dest.name}: already downloaded and verified")
        return dest
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    if offset:
        log(f"{dest.name}: resuming from byte {offset:,} of {part.name}")
    digest = _download(url, part, offset, size, progress, log)
    _verify(part, size, md5, digest, shown=dest.name)
    os.replace(part, dest)
    return dest


def _download(url: str, part: Path, offset: int, size: int | None, progress: bool,
              log: Callable[[str], None]) -> str:
    """Append url's bytes from offset to part; return the whole file's md5 hex digest."""
    if size is not None and offset == size:
        return _md5_file(part)
    h = _md5_update(hashlib.md5(), part) if offset else hashlib.md5()  # before connecting: may take a while
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as resp:
            if _resume_offset(resp, offset, part, log) != offset:
                offset, h = 0, hashlib.md5()
            length = resp.headers.get("Content-Length")
            end = offset + int(length) if length is not None else size
            got = _copy(resp, part, offset, end or size, h, progress)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # Range not satisfiable: the part file already holds everything
            return _md5_file(part)
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}; check the URL "
                            f"(--base-url / ${URL_ENV}) and rerun") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _network_error(url, part, e) from e
    if end is not None and got < end:
        raise _network_error(url, part, f"connection closed after {got:,} of {end:,} bytes")
    return h.hexdigest()


def _resume_offset(resp, offset: int, part: Path, log: Callable[[str], None]) -> int:
    """Offset the response body starts at: offset for a matching 206, else 0 (the part
    file is truncated, e.g. when the server ignores Range and answers 200)."""
    if offset and resp.status == 206:
        m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
        if m and int(m.group(1)) == offset:
            return offset
    if offset:
        log(f"{part.name}: server did not resume (HTTP {resp.status}); restarting from byte 0")
    part.write_bytes(b"")
    return 0


def _copy(resp, part: Path, offset: int, total: int | None, h, progress: bool) -> int:
    """Stream resp into part (append), updating h and a tqdm bar; return the byte count reached."""
    got = offset
    with open(part, "ab") as f, _bar(part.name.removesuffix(".part"), total, offset, progress, "B") as bar:
        while chunk := resp.read(CHUNK):
            f.write(chunk)
            h.update(chunk)
            got += len(chunk)
            bar.update(len(chunk))
    return got


def _bar(desc: str, total: int | None, initial: int, progress: bool, unit: str):
    """The project's progress bar (prunestudy.progress): bytes or files with rate and ETA."""
    return progress_bar(total, desc, unit=unit, show=progress, initial=initial)


def _network_error(url: str, part: Path, err) -> DownloadError:
    have = part.stat().st_size if part.is_file() else 0
    return DownloadError(f"download of {url} failed ({err}); {have:,} bytes kept in {part}: "
                         f"rerun the same command to resume")


def _md5_update(h, path: Path):
    """Feed a file's bytes to hash object h; return h."""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h


def _md5_file(path: Path) -> str:
    return _md5_update(hashlib.md5(), path).hexdigest()


def _verify(path: Path, size: int | None, md5: str | None, digest: str | None, shown: str | None = None) -> None:
    """Raise VerificationError (after deleting path) when size or md5 differ from expected."""
    shown = shown or path.name
    got_size = path.stat().st_size
    problem = None
    if size is not None and got_size != size:
        problem = f"size mismatch: expected {size:,} bytes, got {got_size:,}"
    elif md5 is not None and digest != md5.lower():
        problem = f"md5 mismatch: expected {md5.lower()}, got {digest}"
    if problem:
        path.unlink()
        raise VerificationError(f"{shown}: {problem}; the file was removed: rerun to download it again")


# --------------------------------------------------------------------------- unpack

def unpack(archive, to, progress: bool = True) -> list[str]:
    """Unpack a zip into folder to, safely and atomically enough; return its top-level names.

    Every member is checked first (no absolute path, drive or '..'); the archive is extracted
    into ``to/.unpack-<name>`` and then moved into place, so an interruption leaves only that
    temporary folder (removed on the next call), never a half-filled target taken as complete.
    """
    archive, to = Path(archive), Path(to)
    tmp = to / f".unpack-{archive.stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for info in members:
                _check_member(archive, info.filename)
            tmp.mkdir()
            for info in _iter_bar(members, archive.name, progress):
                zf.extract(info, tmp)
        tops = sorted(p.name for p in tmp.iterdir())
        for name in tops:
            _merge(tmp / name, to / name)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{archive}: not a valid zip archive ({e}); delete it and rerun") from e
    except OSError as e:
        raise DownloadError(f"unpacking {archive.name} into {to} failed ({e}); fix that (disk space?) "
                            f"and rerun: the verified archive is reused") from e
    shutil.rmtree(tmp, ignore_errors=True)
    return tops


def _iter_bar(members: list, name: str, progress: bool) -> Iterable:
    with _bar(f"unpack {name}", len(members), 0, progress, "file") as bar:
        for m in members:
            yield m
            bar.update(1)


def _check_member(archive: Path, name: str) -> None:
    """Raise UnsafeArchiveError for a member name that could land outside the target."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or ".." in parts:
        raise UnsafeArchiveError(f"{archive.name}: refusing to unpack member {name!r} (absolute path or '..'); "
                                 f"nothing was unpacked. Is --base-url serving the official COCO archives?")


def _merge(src: Path, dst: Path) -> None:
    """Move src to dst: a rename when dst is absent, else merge folders file by file."""
    if src.is_dir() and dst.is_dir():
        for child in src.iterdir():
            _merge(child, dst / child.name)
        src.rmdir()
    else:
        os.replace(src, dst)


# --------------------------------------------------------------------------- COCO

def download_coco(to, splits: Iterable[str] = SPLITS, base_url: str | None = None,
                  archives: Mapping[str, Archive] | None = None, keep_archives: bool = False,
                  log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Download, verify and unpack the COCO 2017 splits into folder to; return it.

    base_url defaults to ``$PRUNESTUDY_COCO_URL`` or the official host; archives overrides
    entries of :data:`ARCHIVES` (split -> Archive). Splits already unpacked (marker present,
    same md5, paths there) are skipped; a call with nothing to do says so.
    """
    table = {**ARCHIVES, **(archives or {})}
    splits = _check_splits(splits, table)
    to = _writable_dir(to)
    base = (base_url or os.environ.get(URL_ENV) or COCO_URL).rstrip("/")
    todo = [s for s in splits if not _is_done(to, s, table[s])]
    for s in splits:
        if s not in todo:
            log(f"{s}: already unpacked in {to} ({_marker(to, s).name}); skipping")
    if not todo:
        log(f"COCO 2017 {', '.join(splits)}: complete in {to}; nothing to do")
        return to
    for s in todo:
        _get_split(to, s, table[s], f"{base}/{table[s].path}", keep_archives, log, progress)
    log(f"COCO 2017 {', '.join(splits)}: ready in {to}")
    return to


def _get_split(to: Path, split: str, arc: Archive, url: str, keep: bool,
               log: Callable[[str], None], progress: bool) -> None:
    """Fetch, unpack and mark one split; delete the archive afterwards unless keep."""
    _marker(to, split).unlink(missing_ok=True)
    _check_space(to, arc)
    log(f"{split}: {url} -> {to / arc.name}")
    zpath = fetch(url, to / arc.name, arc.size, arc.md5, progress=progress, log=log)
    log(f"{split}: unpacking {zpath.name}")
    unpack(zpath, to, progress=progress)
    missing = [p for p in arc.provides if not (to / p).exists()]
    if missing:
        raise DownloadError(f"{zpath.name} did not provide {', '.join(missing)}; is it the right archive?")
    atomic.write_json(_marker(to, split), {"archive": arc.name, "url": url, "size": zpath.stat().st_size,
                                          "md5": arc.md5, "provides": list(arc.provides)})
    if not keep:
        zpath.unlink()
    log(f"{split}: done" + ("" if keep else f" ({zpath.name} deleted; --keep-archives keeps it)"))


def _check_splits(splits: Iterable[str], table: Mapping[str, Archive]) -> list[str]:
    splits = [splits] if isinstance(splits, str) else list(splits)
    bad = [s for s in splits if s not in table]
    if bad or not splits:
        raise UsageError(f"unknown split {', '.join(map(repr, bad)) or '(none given)'}; "
                         f"valid splits: {', '.join(table)}")
    return list(dict.fromkeys(splits))


def _writable_dir(to) -> Path:
    """Create folder to if needed and prove it writable, or raise UsageError saying so."""
    to = Path(to).expanduser()
    try:
        to.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=to):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to {to} ({e.strerror or e}); choose a folder you can write to "
                         f"with --to DIR") from e
    return to


def _check_space(to: Path, arc: Archive) -> None:
    """Refuse early when the disk cannot hold the archive (what is left to download of it)."""
    if arc.size is None:
        return
    part = to / (arc.name + ".part")
    need = arc.size - (part.stat().st_size if part.is_file() else 0)
    free = shutil.disk_usage(to).free
    if need > free and not (to / arc.name).is_file():
        raise DownloadError(f"{arc.name} needs {need / 2**30:.1f} GiB more, only {free / 2**30:.1f} GiB "
                            f"free in {to}; free space (unpacking needs about as much again) and rerun")


def _marker(to: Path, split: str) -> Path:
    return to / f".coco-{split}.done"


def _is_done(to: Path, split: str, arc: Archive) -> bool:
    """True when split's marker records this archive's md5 and what it provides is present."""
    try:
        rec = atomic.read_json(_marker(to, split))
    except (OSError, ValueError):
        return False
    return rec.get("md5") == arc.md5 and all((to / p).exists() for p in arc.provides)


# --------------------------------------------------------------------------- CLI

def add_cli(subparsers) -> None:
    """Register ``coco download`` on a ``prunestudy`` subparsers object (handler in defaults)."""
    coco = subparsers.add_parser("coco", help="COCO 2017 data: download")
    sub = coco.add_subparsers(dest="coco_command", required=True)
    p = sub.add_parser("download", help="download, verify and unpack the COCO 2017 archives (resumable)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--to", required=True, metavar="DIR", help="target folder (created if needed)")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), metavar="SPLIT",
                   help=f"which archives (default: all): {' '.join(SPLITS)}")
    p.add_argument("--base-url", help=f"mirror to fetch from (default: ${URL_ENV} or {COCO_URL})")
    p.add_argument("--keep-archives", action="store_true", help="keep the verified zips after unpacking")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cli)


def _cli(args) -> int:
    """Run ``coco download``: 0 ok, 2 bad arguments, 1 download or verification failure."""
    try:
        download_coco(args.to, args.splits, base_url=args.base_url, keep_archives=args.keep_archives,
                      log=lambda m: print(m, flush=True), progress=not args.no_progress)
    except UsageError as e:
        print(f"prunestudy: {e}", file=sys.stderr)
        return 2
    except CocoError as e:
        print(f"prunestudy: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prunestudy: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
