"""The stage store: stage outputs kept once, by stage key, and shared by every run folder and
sweep point that asks for the same stage (as OpenLTH names a run by the hash of what defines it).

    <store>/<stage>/<key>/        the stage's outputs, its record (stage.json) and its executed
                                  notebook (.executed.ipynb); read-only once complete (`seal`)
    <store>/<stage>/<key>+<hex>/  another computation of the same key (`--force`, or inputs that
                                  were recomputed): entries are written once, never over
    <store>/<stage>/.<key>.claim  flock held by the process computing it (its pid inside)
    <store>/.quarantine/<stage>/<key>-<time>/   an entry whose files no longer match their digests
                                  (records.verify), moved aside with a note of why, never linked
    <store>/.users/<hash>         a folder that recorded the store (its absolute path: `register`)
    <store>/.gc.lock, .trash-<pid>/   `store gc`'s lock and what it is removing (prunestudy.reclaim)

A run folder's `data/`, `train/`, `prune/` and `retrain/` are symbolic links into the store, so
two runs that differ only in pruning parameters share the data and the training, and a sweep
computes each unique stage once. A process that computes a stage first *claims* its entry (an
exclusive flock, released when the process ends, even by SIGKILL): a second process asking for
the same stage waits, then finds it complete. A new folder's store lives beside it (`runs/.store`
for `runs/<name>`) unless `--store DIR` or PRUNESTUDY_STORE says otherwise (on a shared file system
for several machines); the folder then records it (`store.json`), and every later run in it uses
that store, from any directory (`choose`).

Entries are write-once: a stage is computed into an entry that no run folder links to yet
(`Store.fresh`: the key's own folder if it holds no record, else `<key>+<hex>`), and the entry is
made read-only once its record is written (`seal`). No writer ever changes a file that another run
folder links to: a `--force` rerun gets an entry of its own and relinks only its run folder; a
stage computed in a notebook goes into an entry of its own key as well (prunestudy.stages), and
marks its run's later stages stale in private copies (`privatize`), not in the shared entries.
Nothing computed in a run folder is lost when the runner relinks it (`keep`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from . import atomic, paths, records

ENV = "PRUNESTUDY_STORE"


class StoreError(ValueError):
    """A store asked for that is not the one the folder links into (the CLI exits 2)."""


def default_root(run_dir: Path) -> Path:
    """PRUNESTUDY_STORE, else `.store` beside the run folder (runs/.store for runs/<name>)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser().resolve()
    return Path(run_dir).resolve().parent / paths.STORE


def choose(folder: Path, asked: str | os.PathLike | None) -> Path | None:
    """The store a run or sweep folder uses: the one it recorded, whatever the current directory or
    PRUNESTUDY_STORE (a point rerun from its own folder uses its sweep's, not a new `.store` beside
    it); a `--store` (`asked`) other than that is refused, since the folder's stages link into the
    recorded one. A folder without a record: `asked`, else default_root. None: `--store none`."""
    if asked is not None and str(asked).lower() == "none":
        return None
    was = recorded(folder)
    if asked is None:
        return was or default_root(folder)
    root = Path(asked).expanduser().resolve()
    if was is not None and root != was:
        raise StoreError(f"{folder} links its stages into the stage store {was} (its {paths.STORE_RECORD}), "
                         f"not {root}: drop --store, or choose a new folder for that store (if {was} was moved, "
                         f"delete {Path(folder) / paths.STORE_RECORD} first)")
    return root


def recorded(folder: Path) -> Path | None:
    """The store a folder recorded (`record`); a repeat, curve point or sweep point without a record
    of its own: its run's or sweep's; a sweep of an earlier version: its grid.json's. None: none."""
    folder = Path(folder)
    places = [folder]
    if folder.parent.name in (paths.SWEEP_POINTS, paths.REPEATS, paths.CURVE):
        places.append(folder.parent.parent)
    for place in places:
        for name in (paths.STORE_RECORD, paths.SWEEP_GRID):
            try:
                value = atomic.read_json(place / name).get("store")
            except (OSError, ValueError, AttributeError):
                continue
            if value:
                return (place / value).resolve()   # relative to the folder, as its links are
    return None


def record(folder: Path, root: Path) -> None:
    """Write which store a run or sweep folder links into, relative to the folder (so a folder moved
    with its store keeps it, as its relative links do); and register the folder as a user of the
    store (`register`), so that `store gc` looks for its links wherever it lies."""
    register(root, folder)
    path = Path(folder) / paths.STORE_RECORD
    rel = os.path.relpath(Path(root).resolve(), Path(folder).resolve())
    try:
        if atomic.read_json(path).get("store") == rel:
            return
    except (OSError, ValueError, AttributeError):
        pass
    atomic.write_json(path, {"store": rel})


def user_file(root: Path, folder: Path) -> Path:
    """<store>/.users/<first 16 hex digits of the SHA-256 of the folder's absolute path>."""
    name = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]
    return Path(root) / paths.STORE_USERS / name


def register(root: Path, folder: Path) -> None:
    """Note in the store that a run or sweep folder links into it (its absolute path, written once):
    `store gc` then looks for links there too, a folder kept outside the store's parent included."""
    path = user_file(root, folder)
    if not path.is_file():
        atomic.write_bytes(path, f"{Path(folder).resolve()}\n".encode())


def users(root: Path) -> list[tuple[Path, Path]]:
    """(registry file, folder) of every folder registered as a user of the store (`register`)."""
    place = Path(root) / paths.STORE_USERS
    found = []
    for f in sorted(place.iterdir()) if place.is_dir() else []:
        if f.is_file() and not f.name.startswith("."):
            try:
                found.append((f, Path(f.read_text().strip())))
            except (OSError, UnicodeDecodeError):
                continue
    return found


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    @contextmanager
    def claim(self, stage: str, key: str, log: Callable[[str], None] = print):
        """Hold the exclusive right to compute this stage (waiting for another holder first)."""
        entry = self.entry(stage, key)
        entry.mkdir(parents=True, exist_ok=True)
        with claim_dir(entry, log):
            entry.mkdir(parents=True, exist_ok=True)   # `store gc` may have removed it, unclaimed, meanwhile
            for stale in entry.glob(".*.tmp"):   # left by a killed atomic write
                stale.unlink(missing_ok=True)
            yield entry

    def notebook(self, stage: str, key: str) -> Path:
        return self.entry(stage, key) / paths.ENTRY_NOTEBOOK

    def candidates(self, stage: str, key: str) -> list[Path]:
        """The entries of a key: its own folder first, then other computations of it (`fresh`),
        newest first. Each may hold a record computed from other inputs (their ids differ)."""
        own = self.entry(stage, key)
        others = sorted(own.parent.glob(f"{key}+*"), key=_mtime, reverse=True) if own.parent.is_dir() else []
        return [own, *(p for p in others if p.is_dir() and not p.is_symlink())]

    def fresh(self, stage: str, key: str) -> Path:
        """Where to compute a stage of this key (under its claim): the key's own folder when no
        computation was ever recorded there (new, or left incomplete: no run folder uses it), else a
        new entry `<key>+<hex>` beside it, so that the files other run folders link to never change."""
        own = self.entry(stage, key)
        if not (own / paths.STAGE_RECORD).exists() and not sealed(own):
            return own
        other = own.with_name(f"{key}+{uuid.uuid4().hex[:8]}")
        other.mkdir(parents=True)
        return other


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


_WRITE = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH


def seal(entry: Path) -> None:
    """Make a complete entry read-only (its files and folders lose every write bit; links inside it
    are left as they are): other run folders link to it, so nothing may change it in place. The
    digests (records.verify) catch what a write bit cannot stop (root, a tool that chmods)."""
    entry = Path(entry)
    if entry.is_symlink() or not entry.is_dir():
        return
    for top, dirs, files in os.walk(entry, topdown=False):
        for name in [*files, *dirs]:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) & ~_WRITE)
    os.chmod(entry, stat.S_IMODE(entry.stat().st_mode) & ~_WRITE)


def sealed(entry: Path) -> bool:
    """Whether an entry folder was made read-only (`seal`)."""
    try:
        return not os.lstat(entry).st_mode & stat.S_IWUSR
    except OSError:
        return False


def unseal(entry: Path) -> None:
    """Give the owner write permission on an entry's folders again (not its files): needed to move it
    (a folder's `..` changes) or remove it; its files stay read-only."""
    for top, dirs, _ in os.walk(entry):
        for path in [top, *(os.path.join(top, d) for d in dirs)]:
            if not os.path.islink(path):
                os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | stat.S_IWUSR)


def privatize(folder: Path) -> None:
    """A run folder's stage folder that links into the store, replaced by a private folder of hard
    links to the entry's files (copies with their times where links fail), so that what happens to
    this run folder's view of it (a notebook rerun marking it stale) never reaches the shared entry;
    the entry's files are never written through the hard links (every write replaces a file)."""
    folder = Path(folder)
    if not folder.is_symlink() or not folder.is_dir():
        return
    src, tmp = folder.resolve(), folder.with_name(f".{folder.name}.private")
    if tmp.exists():
        shutil.rmtree(tmp)
    for top, dirs, files in os.walk(src):
        rel = Path(top).relative_to(src)
        (tmp / rel).mkdir(parents=True, exist_ok=True)
        for name in [*files, *(d for d in dirs if os.path.islink(os.path.join(top, d)))]:
            a, b = Path(top) / name, tmp / rel / name
            if a.is_symlink():
                os.symlink(os.path.relpath(a.resolve(), b.parent), b)
                continue
            try:
                os.link(a, b)
            except OSError:
                shutil.copy2(a, b)
    folder.unlink()
    os.rename(tmp, folder)


@contextmanager
def claim_dir(folder: Path, log: Callable[[str], None] = print):
    """An exclusive claim on a folder that may be shared (a store entry, seen through a link):
    the flock file sits beside the folder's real location, opened without following a link
    (atomic.open_lock: a planted one is refused with its path)."""
    real = Path(folder).resolve()
    with atomic.open_lock(claim_file(real)) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"    {real.parent.name} {real.name} is being computed by another process: waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))   # who computes it (a stale claim dies with its process)
        f.flush()
        try:
            yield real
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def claim_file(folder: Path) -> Path:
    """The (hidden) flock file of a folder's claim, beside the folder."""
    return folder.with_name(f".{folder.name}.claim")


def held(claim: Path) -> bool:
    """Whether a claim file is held now (by a process computing that stage)."""
    with atomic.open_lock(claim) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


@contextmanager
def using(entry: Path, claimed: bool = False):
    """A shared flock on an entry's claim file while a run or sweep folder is linked to it: `store
    gc` (which takes the exclusive claim before it removes an entry) cannot remove it meanwhile.
    Yields True when held; False when the claim is held (the entry is being computed, or gc is
    removing it): treat the entry as not reusable now (the claim path waits, then rechecks).
    `claimed`: this process holds the exclusive claim already (flock locks per open file
    description: a second descriptor of this process asking for a shared lock would conflict with
    its own claim): yields True without locking."""
    if claimed:
        yield True
        return
    real = Path(entry).resolve()
    real.parent.mkdir(parents=True, exist_ok=True)
    with atomic.open_lock(claim_file(real)) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def linking(entry: Path):
    """While an entry that may be new (made here if missing) is linked from a folder, whether or not
    another process is computing it: safe against `store gc`. The shared claim (`using`); when the
    claim is held, the store's gc lock, shared: gc holds it exclusively for as long as it holds
    any claim, so a claim still held then is a computing process's, which keeps the entry until
    the link is made, and gc sees the link when it rescans. Makes the entry; yields its path."""
    entry = Path(entry)
    with using(entry) as ok:
        if ok:
            entry.mkdir(parents=True, exist_ok=True)
            yield entry
            return
    with gc_lock(entry.parent.parent, shared=True):
        entry.mkdir(parents=True, exist_ok=True)
        yield entry


@contextmanager
def gc_lock(root: Path, shared: bool):
    """The store's gc lock (<store>/.gc.lock): exclusive for `store gc` while it holds claims, rescans
    and removes; shared for a process linking an entry whose claim it could not share (`linking`)."""
    path = Path(root) / paths.GC_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.open_lock(path) as f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def link(folder: Path, target: Path) -> None:
    """Make `folder` (a run folder's stage folder) a relative symbolic link to `target`, replacing
    what was there (an older link, or a private folder of outputs that is being recomputed)."""
    folder = Path(folder)
    rel = os.path.relpath(target, folder.parent)
    if not folder.is_symlink() and Path(target).resolve().is_relative_to(folder.resolve()):
        raise StoreError(f"{folder} holds {target}: refused to replace it with a link into itself (a run folder "
                         "that is the store?); choose a run folder of its own")
    if folder.is_symlink():
        if os.readlink(folder) == rel:
            return
        folder.unlink()
    elif folder.is_dir():
        shutil.rmtree(folder)
    elif folder.exists():
        folder.unlink()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(rel, tmp)
    os.replace(tmp, folder)


def quarantine(entry: Path, reason: str) -> Path | None:
    """Move a store entry whose files are not the bytes its stage wrote out of the store (into
    <store>/.quarantine/, with a note of why), so that no run links it again and the stage is
    computed anew; the run folders that linked it find their stage missing. Returns where it went
    (None when it was not in a store, or another process moved it first)."""
    entry = Path(entry).resolve()
    root, stage = entry.parent.parent, entry.parent.name
    if root.name == paths.QUARANTINE or not (root / stage).is_dir():
        return None
    target = root / paths.QUARANTINE / stage / f"{entry.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        unseal(entry)   # moving a folder rewrites its `..`: it must be writable
        os.rename(entry, target)
    except FileNotFoundError:
        return None
    (target / "QUARANTINED").write_text(reason + "\n")
    return target


def keep(folder: Path, store: Store, log: Callable[[str], None] = print) -> Path | None:
    """A run folder's own stage folder (not a link) holding a complete computation (a notebook's, or
    one made without a store) is moved into the store as an entry of its key, sealed, and the folder
    links it: nothing computed is lost when the folder is relinked. A private copy of an entry
    (`privatize`: the same record id) links that entry again. Returns the entry; None when there is
    nothing to keep (a link already, no complete record, files changed since the record)."""
    folder = Path(folder)
    rec = records.read(folder) if folder.is_dir() and not folder.is_symlink() else None
    if rec is None or not (folder / paths.marker(rec["stage"])).is_file() or records.verify(folder) is not None:
        return None
    for entry in store.candidates(rec["stage"], rec["key"]):   # a private copy of an entry (privatize)
        if (records.read(entry) or {}).get("id") == rec["id"]:
            link(folder, entry)
            return entry
    if rec.get("stale"):   # a run folder's view (its input there was recomputed): the entry's inputs are its record's
        atomic.write_json(folder / paths.STAGE_RECORD, {k: v for k, v in rec.items() if k != "stale"})
    with store.claim(rec["stage"], rec["key"], log):
        entry = store.fresh(rec["stage"], rec["key"])
        with linking(entry):
            try:
                os.rename(folder, entry)   # onto the empty entry folder
            except OSError:   # another file system: copied, times kept
                shutil.copytree(folder, entry, dirs_exist_ok=True, symlinks=True)
                shutil.rmtree(folder)
            link(folder, entry)
        seal(entry)
    return entry


def detach(folder: Path) -> None:
    """Before a stage is computed outside the runner (a notebook, Python) into a run folder whose
    stage folder links into the store: give the run folder a private folder instead, so the
    shared entry (other runs use it) is never overwritten with other parameters."""
    folder = Path(folder)
    if folder.is_symlink():
        folder.unlink()
        folder.mkdir()


def entries(root: Path):
    """Every entry folder of a store: <root>/<stage>/<key>/ (not the quarantine, claims or temporary files)."""
    root = Path(root)
    stages = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    for stage in stages:
        yield from sorted(p for p in stage.iterdir() if p.is_dir() and not p.name.startswith("."))


def verify_all(root: Path, log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Hash every complete entry of a store again (records.verify); a damaged one is quarantined.
    Returns {"ok", "damaged", "unverifiable" (records of an earlier prunestudy: no digests),
    "incomplete" (no record: being computed, or abandoned)}: entry paths relative to the store."""
    out: dict[str, list[str]] = {"ok": [], "damaged": [], "unverifiable": [], "incomplete": []}
    for entry in entries(root):
        name = entry.relative_to(root).as_posix()
        rec = records.read(entry)
        if rec is None:
            out["incomplete"].append(name)
        elif not rec.get("digests"):
            out["unverifiable"].append(name)
        elif (why := records.verify(entry)) is None:
            out["ok"].append(name)
        else:
            where = quarantine(entry, why)
            log(f"damaged: {name}: {why}; moved to {where}")
            out["damaged"].append(name)
    return out

