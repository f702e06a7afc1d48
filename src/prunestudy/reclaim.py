"""Space you can see and reclaim: `prunestudy store du` (what the stage store holds, stage by stage,
and how much of it no run or sweep folder links) and `prunestudy store gc` (remove what none links).

A *reference* is a symbolic link whose resolved target is a store entry or lies in one: anywhere
under the roots (the run and sweep folders; by default the store's parent folder, `runs/` for
`runs/.store`, and every folder registered as a user of the store: stagestore.register), or inside
another entry that is kept (a retraining's `control` link). An entry that nothing kept links is
unreferenced; so is one linked only from unreferenced entries (the closure is taken from the roots).

gc is safe beside a running sweep or run: an entry whose claim is held (being computed) is kept;
every code path that links an existing entry does so under a shared claim (stagestore.using,
stagestore.linking); gc takes the exclusive claim of each candidate (non-blocking: a busy one is
kept) under the store's gc lock, *then* looks for references again and removes only what is still
unreferenced, by renaming it into `<store>/.trash-<pid>/` first (a crash leaves no half entry that
looks complete; the next gc empties the trash of a process that is gone), then deleting it.
"""

from __future__ import annotations

import fcntl
import os
import re
import resource
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from . import atomic, paths, stagestore


def _batch() -> int:
    """Candidates locked at once: each holds its claim file open (within the open-files limit);
    each batch looks for links again, so the larger, the faster."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(5000, (soft if soft != resource.RLIM_INFINITY else 10000) // 2 - 64))


BATCH = _batch()
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """'7d', '12h', '30m', '45s', '2w' -> seconds; a ValueError naming the forms otherwise."""
    m = _AGE.match(str(text))
    if not m:
        raise ValueError(f"--older-than takes an age like 7d, 12h, 30m, 45s or 2w, got {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --------------------------------------------------------------------------- what is there
def default_roots(root: Path) -> list[Path]:
    """Where run and sweep folders that use the store may lie: its parent folder and every folder
    registered as its user (that still exists)."""
    root = Path(root).resolve()
    return [root.parent, *(folder for _, folder in stagestore.users(root) if folder.is_dir())]


def roots_of(root: Path, given: Iterable[str | os.PathLike] | None) -> list[Path]:
    """The roots to look under: those given, else default_roots; resolved, each once, none inside
    another."""
    found = [Path(r).expanduser().resolve() for r in given] if given else default_roots(root)
    found = sorted({r for r in found if r.is_dir()}, key=lambda p: (len(p.parts), str(p)))
    kept: list[Path] = []
    for r in found:
        if not any(r.is_relative_to(k) for k in kept):
            kept.append(r)
    return kept


def finished(entry: Path) -> float:
    """When an entry was completed: its record's mtime, else (incomplete) the folder's."""
    try:
        return (entry / paths.STAGE_RECORD).stat().st_mtime
    except OSError:
        return entry.stat().st_mtime


def tree_bytes(top: Path, seen: set[tuple[int, int]]) -> int:
    """The bytes of the plain files under `top` (links not followed), each inode counted once
    across calls sharing `seen` (hard links)."""
    total = 0
    for dirpath, _, files in os.walk(top):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _links(top: Path, skip: Path | None = None) -> Iterator[str]:
    """The resolved target of every symbolic link under `top` (links not followed; `skip`: a folder
    not looked into, the store itself when it lies under a root)."""
    skipped = str(skip) if skip is not None else None
    for dirpath, dirs, files in os.walk(top):
        keep = []
        for name in dirs:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                yield os.path.realpath(full)
            elif full != skipped:
                keep.append(name)
        dirs[:] = keep
        for name in files:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                yield os.path.realpath(full)


def entry_of(target: str, root: Path) -> Path | None:
    """The store entry a resolved path is or lies in (None: outside the store's entries)."""
    rel = os.path.relpath(target, root)
    parts = rel.split(os.sep)
    if rel.startswith("..") or len(parts) < 2 or parts[0].startswith(".") or parts[1].startswith("."):
        return None
    return root / parts[0] / parts[1]


@dataclass
class Links:
    """Who links which entries: from the roots, and from inside each entry (to others)."""
    roots: set[Path] = field(default_factory=set)
    inside: dict[Path, set[Path]] = field(default_factory=dict)

    def closure(self, seeds: Iterable[Path]) -> set[Path]:
        """The seeds and every entry linked from one of them, and so on."""
        out, todo = set(), list(seeds)
        while todo:
            e = todo.pop()
            if e not in out:
                out.add(e)
                todo.extend(self.inside.get(e, ()))
        return out


def scan(root: Path, roots: list[Path], entries: list[Path]) -> Links:
    """Every reference to an entry: the links under the roots (not inside the store) and in the entries."""
    found = Links()
    for top in roots:
        found.roots.update(e for t in _links(top, root) if (e := entry_of(t, root)) is not None)
    for entry in entries:
        targets = {e for t in _links(entry) if (e := entry_of(t, root)) is not None and e != entry}
        if targets:
            found.inside[entry] = targets
    return found


def entries(root: Path) -> list[Path]:
    """Every entry: <store>/<stage>/<name>/, any folder whose names do not start with '.'."""
    return list(stagestore.entries(root))


# --------------------------------------------------------------------------- du
def du(root: Path, roots: Iterable[str | os.PathLike] | None = None) -> dict:
    """{"store", "roots", "stages": {stage: {entries, bytes, referenced, referenced_bytes,
    unreferenced, unreferenced_bytes}}, "quarantine": {entries, bytes}, "trash_bytes", "total": {...}}.
    Bytes: plain files' sizes, each inode once (a referenced entry's files are counted first, so an
    unreferenced entry's bytes are those its removal would free in the store)."""
    root = Path(root).resolve()
    looked = roots_of(root, roots)
    ents = entries(root)
    links = scan(root, looked, ents)
    used = links.closure(links.roots)
    seen: set[tuple[int, int]] = set()
    sizes = {e: tree_bytes(e, seen) for e in sorted(ents, key=lambda e: e not in used)}
    stages: dict[str, dict] = {}
    for e in ents:
        row = stages.setdefault(e.parent.name, dict.fromkeys(
            ("entries", "bytes", "referenced", "referenced_bytes", "unreferenced", "unreferenced_bytes"), 0))
        kind = "referenced" if e in used else "unreferenced"
        row["entries"] += 1
        row["bytes"] += sizes[e]
        row[kind] += 1
        row[f"{kind}_bytes"] += sizes[e]
    quarantined = [p for s in (root / paths.QUARANTINE).glob("*") if s.is_dir() for p in s.iterdir() if p.is_dir()]
    quarantine = {"entries": len(quarantined), "bytes": tree_bytes(root / paths.QUARANTINE, seen)}
    trash = sum(tree_bytes(t, seen) for t in root.glob(f"{paths.TRASH}*"))
    total = {k: sum(r[k] for r in stages.values()) for k in
             ("entries", "bytes", "referenced", "referenced_bytes", "unreferenced", "unreferenced_bytes")}
    total["all_bytes"] = total["bytes"] + quarantine["bytes"] + trash
    return {"store": root, "roots": looked, "stages": stages, "quarantine": quarantine, "trash_bytes": trash,
            "total": total}


def du_table(report: dict) -> str:
    """du's result as a table, a total line last."""
    head = f"{'stage':12s} {'entries':>7s} {'bytes':>11s}   {'referenced':>10s} {'bytes':>11s}   " \
           f"{'unreferenced':>12s} {'bytes':>11s}"
    lines = [head, "-" * len(head)]

    def row(name: str, r: dict) -> str:
        return (f"{name:12s} {r['entries']:7d} {human(r['bytes']):>11s}   {r['referenced']:10d} "
                f"{human(r['referenced_bytes']):>11s}   {r['unreferenced']:12d} {human(r['unreferenced_bytes']):>11s}")

    for stage, r in sorted(report["stages"].items()):
        lines.append(row(stage, r))
    q = report["quarantine"]
    lines.append(f"{'quarantine':12s} {q['entries']:7d} {human(q['bytes']):>11s}   (never linked: "
                 "`store gc --quarantine` empties it)")
    if report["trash_bytes"]:
        lines.append(f"{'trash':12s} {'':7s} {human(report['trash_bytes']):>11s}   (a gc that stopped half-way: "
                     "the next gc removes it)")
    lines.append("-" * len(head))
    t = report["total"]
    lines.append(row("total", t) + f"   ({human(t['all_bytes'])} with the quarantine)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- gc
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def writable(top: Path) -> None:
    """chmod u+w every folder under `top` (links not followed): entries are made read-only once
    complete, and a folder's entries cannot be removed (nor a folder moved to another parent)
    without write permission on it."""
    for dirpath, _, _ in os.walk(top):
        mode = os.lstat(dirpath).st_mode
        if not mode & stat.S_IWUSR:
            os.chmod(dirpath, stat.S_IMODE(mode) | stat.S_IWUSR)


def to_trash(entry: Path, trash: Path) -> Path:
    """Move an entry into the trash folder (one rename: nothing half-removed stays in the store)."""
    target = trash / entry.parent.name / entry.name
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = os.lstat(entry).st_mode
    if not mode & stat.S_IWUSR:   # moving a folder to another parent rewrites its '..'
        os.chmod(entry, stat.S_IMODE(mode) | stat.S_IWUSR)
    os.rename(entry, target)
    return target


def purge(folder: Path) -> None:
    """Delete a folder of the trash (its read-only folders made writable first)."""
    if folder.exists():
        writable(folder)
        shutil.rmtree(folder)


def clean_trash(root: Path) -> list[Path]:
    """Empty the trash of gc processes that are gone (stopped half-way); returns what was removed."""
    gone = []
    for t in Path(root).glob(f"{paths.TRASH}*"):
        try:
            pid = int(t.name[len(paths.TRASH):])
        except ValueError:
            continue
        if pid == os.getpid() or not _alive(pid):
            purge(t)
            gone.append(t)
    return gone


def _plan(root: Path, looked: list[Path], young: Callable[[Path], bool]) -> tuple[list[Path], set[Path], Links]:
    """(candidates, busy, links): the entries that nothing kept links, busy ones (claim held) kept,
    to a fixpoint (a kept entry's links keep their targets)."""
    ents = entries(root)
    links = scan(root, looked, ents)
    busy: set[Path] = set()
    while True:
        keep = links.closure(links.roots | busy | {e for e in ents if young(e)})
        cands = [e for e in ents if e not in keep]
        now_busy = {e for e in cands if _computing(e)}
        if not now_busy:
            return cands, busy, links
        busy |= now_busy


def collect(root: Path, roots: Iterable[str | os.PathLike] | None = None, *, dry_run: bool = False,
            older_than: float | None = None, quarantine: bool = False, log: Callable[[str], None] = print,
            now: float | None = None, on_locked: Callable[[list[Path]], None] | None = None) -> dict:
    """`store gc`: remove every entry no run or sweep folder under the roots links (directly or
    through kept entries); `older_than` (seconds): only entries completed longer ago; `dry_run`:
    list them and their bytes, remove nothing; `quarantine`: empty the quarantine too. Registered
    users that no longer exist are dropped. `on_locked`: called with the locked candidates before
    the rescan (for the tests: a link made then is respected). Returns {"removed": [entry names],
    "bytes", "busy", "roots", "dropped_users", "quarantine_bytes"}."""
    root = Path(root).resolve()
    now = time.time() if now is None else now

    def young(e: Path) -> bool:
        try:
            return older_than is not None and now - finished(e) < older_than
        except OSError:   # removed meanwhile
            return False

    dropped = [(f, folder) for f, folder in stagestore.users(root) if not folder.exists()]
    if not dry_run:
        for f, _ in dropped:
            f.unlink(missing_ok=True)
        clean_trash(root)
    looked = roots_of(root, roots)
    removed: list[str] = []
    freed = 0
    busy_all: set[Path] = set()
    trash = root / f"{paths.TRASH}{os.getpid()}"
    seen: set[tuple[int, int]] = set()
    if dry_run:
        cands, busy_all, _ = _plan(root, looked, young)
        for e in cands:
            size = tree_bytes(e, seen)
            freed += size
            removed.append(e.relative_to(root).as_posix())
            log(f"would remove {removed[-1]} ({human(size)})")
    while not dry_run:   # each pass may leave entries unreferenced that only removed ones linked
        cands, busy, links = _plan(root, looked, young)
        busy_all |= busy
        cands.sort(key=lambda e: e not in links.inside)   # the entries that link others first
        gone = 0
        for i in range(0, len(cands), BATCH):
            batch = cands[i:i + BATCH]
            with stagestore.gc_lock(root, shared=False), ExitStack() as held:
                locked = [e for e in batch if _claim(e, held)]
                busy_all |= set(batch) - set(locked)
                if on_locked is not None:
                    on_locked(locked)
                current = entries(root)
                again = scan(root, looked, current)   # after the claims: a link made since is seen
                mine = set(locked)
                keep = again.closure(again.roots | {e for e in current if e not in mine or young(e)})
                for e in locked:
                    if e in keep or not e.is_dir():
                        continue
                    size = tree_bytes(e, seen)
                    to_trash(e, trash)
                    freed += size
                    gone += 1
                    removed.append(e.relative_to(root).as_posix())
                    log(f"removed {removed[-1]} ({human(size)})")
            purge(trash)
        if not gone:
            break
    qbytes = 0
    qdir = root / paths.QUARANTINE
    if quarantine and qdir.is_dir():
        qbytes = tree_bytes(qdir, seen)
        if dry_run:
            log(f"would empty the quarantine ({human(qbytes)})")
        else:
            trash.mkdir(parents=True, exist_ok=True)
            os.rename(qdir, trash / paths.QUARANTINE)
            purge(trash)
            log(f"emptied the quarantine ({human(qbytes)})")
    return {"removed": removed, "bytes": freed, "busy": sorted(e.relative_to(root).as_posix() for e in busy_all),
            "roots": looked, "dropped_users": [str(folder) for _, folder in dropped], "quarantine_bytes": qbytes}


def _computing(entry: Path) -> bool:
    """Whether a process holds the entry's claim, or, for another computation of a key
    (`<key>+<hex>`, stagestore.Store.fresh), the key's claim it is computed under."""
    own = entry.name.split("+", 1)[0]
    return stagestore.held(stagestore.claim_file(entry)) or (
        own != entry.name and stagestore.claim_file(entry.with_name(own)).is_file()
        and stagestore.held(stagestore.claim_file(entry.with_name(own))))


def _claim(entry: Path, stack: ExitStack) -> bool:
    """Take an entry's exclusive claim without waiting, held until `stack` closes; False: busy (or
    the key's claim is held: `<key>+<hex>` is being computed under it)."""
    own = entry.name.split("+", 1)[0]
    if own != entry.name and _computing(entry):
        return False
    f = stack.enter_context(atomic.open_lock(stagestore.claim_file(entry)))
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    stack.callback(fcntl.flock, f, fcntl.LOCK_UN)
    return True
