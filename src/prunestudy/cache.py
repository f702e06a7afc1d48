"""The crop-set cache: a data stage whose inputs did not change is a lookup, not a rebuild.

A crop set is named by the hash of what defines it (as OpenLTH names runs): the sha256 of both
annotation files, the COCO root's path and every data parameter that changes a crop, a label
or the subset (``workers`` does not: the result is the same with any number). It is built once
under ``<project>/data/cache/crops/<key>/`` and every run that asks for it gets hard links to
its files in ``<run>/data/`` (copies where links are impossible), so a second run, or one that
changes only training or pruning parameters, takes seconds.

The key also covers the image files: the name, size and modification time of every file of
train2017/ and val2017/ (a listing, not a read: about a second for COCO's 123,000 images), so a
changed, repaired, added or deleted image gives another key and the set is built again.

The sha256 of an annotation file (448 MB for train2017) is itself remembered by
(path, size, mtime), so an unchanged file is not read again. A build holds a lock on its
entry, so two runs asking for the same set build it once. ``prunestudy cache list`` shows the
entries, ``prunestudy cache clear`` removes them (and the generated embedded dataset with
``--all``). ``PRUNESTUDY_CACHE`` puts the cache elsewhere (`cache_root`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from . import atomic, config, data, graph
from .config import CACHE_ENV as ENV  # noqa: F401  (the caches' folder and its variable: config)
from .config import cache_root

FORMAT = 4  # bump when the crop rule, the file layout or the checks change: old entries are then not reused
DIGESTS = "digests.json"




def annotation_digest(path: Path) -> str:
    """sha256 of a file, remembered by (absolute path, size, mtime) in the cache folder."""
    path = Path(path).resolve()
    st = path.stat()
    memo_path = cache_root() / DIGESTS
    memo = _read_json(memo_path)
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    if key not in memo:
        memo = {k: v for k, v in memo.items() if not k.startswith(f"{path}|")}
        memo[key] = data.sha256_file(path)
        try:
            atomic.write_json(memo_path, memo)
        except OSError:  # a read-only project still works, it just hashes again next time
            pass
    return memo[key]


def crop_key(root: Path, params: dict) -> str:
    """The name of the crop set built from ``root`` with data ``params``."""
    root = Path(root).resolve()
    digests = {split: annotation_digest(data._annotation_path(root, split)) for split in data.SPLITS}
    images = {split: images_digest(data._image_dir(root, split)) for split in data.SPLITS}
    return config.stage_hash({"format": FORMAT, "root": str(root), "annotations": digests, "images": images,
                              "params": graph.defining("data", params)})


def images_digest(folder: Path) -> str:
    """sha256 of the listing of an image folder: every file's name, size and mtime (not its bytes)."""
    h = hashlib.sha256()
    with os.scandir(folder) as it:
        rows = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in it if e.is_file())
    for row in rows:
        h.update(f"{row[0]}\0{row[1]}\0{row[2]}\n".encode())
    return h.hexdigest()


def crops(root, params: dict, out_dir, *, workers=None, log=print, refresh: bool = False) -> dict:
    """Build (or find) the crop set of ``root`` + ``params`` and link it into ``out_dir``;
    ``refresh`` builds it again even if the cache holds it.

    Returns the data.json of ``out_dir``, which records the cache key and entry path.
    """
    root = Path(root).resolve()
    data.check_layout(root)
    key = crop_key(root, params)
    entry = cache_root() / "crops" / key
    with _locked(entry):
        if refresh and (entry / data.INFO_FILE).is_file():
            log(f"data: crop set {key} is in the cache, but a rebuild was asked for (--force data): rebuilding it")
            (entry / data.INFO_FILE).unlink()
        if (entry / data.INFO_FILE).is_file():
            log(f"data: crop set {key} found in the cache ({entry}); reusing it")
        else:
            start = time.perf_counter()
            log(f"data: building crop set {key} from {root}")
            data.build_dataset(root, entry, workers=workers, **params)
            log(f"data: built in {time.perf_counter() - start:.1f} s")
    return materialize(entry, out_dir, key)


def materialize(entry: Path, out_dir, key: str) -> dict:
    """Hard-link (or copy) a complete cache entry's files into ``out_dir``; data.json last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / data.INFO_FILE).unlink(missing_ok=True)
    for src in sorted(entry.iterdir()):
        if src.name.startswith(".") or src.name == data.INFO_FILE or not src.is_file():
            continue
        atomic.link_file(src, out / src.name)
    info = data.read_info(entry)
    info["cache"] = {"key": key, "entry": str(entry)}
    atomic.write_bytes(out / data.INFO_FILE, (json.dumps(info, indent=2) + "\n").encode())
    return info


@contextmanager
def _locked(entry: Path):
    entry.mkdir(parents=True, exist_ok=True)
    with atomic.open_lock(entry / ".lock") as f:   # a planted link is refused, never truncated
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def entries() -> list[dict]:
    """Every cached crop set and generated embedded dataset, with its size on disk."""
    rows = []
    for kind in ("crops", "embedded"):
        folder = cache_root() / kind if kind == "crops" else config.project_root() / "data" / "embedded"
        for entry in sorted(folder.glob("*")) if folder.is_dir() else []:
            info = _read_json(entry / data.INFO_FILE) if kind == "crops" else {}
            marker = data.INFO_FILE if kind == "crops" else "prunestudy-synth.json"
            rows.append({"kind": kind, "key": entry.name, "path": str(entry), "bytes": _du(entry),
                         "complete": (entry / marker).is_file(),
                         "root": info.get("root"), "train_size": info.get("train_size"),
                         "test_size": info.get("test_size")})
    return rows


def clear(include_embedded: bool = False) -> int:
    """Remove cached crop sets (and the embedded dataset if asked); returns bytes freed.

    Run folders keep working: their data/ holds hard links (or copies), not references.
    """
    freed = 0
    targets = [cache_root()]
    if include_embedded:
        targets.append(config.project_root() / "data" / "embedded")
    for folder in targets:
        if folder.is_dir():
            freed += _du(folder)
            shutil.rmtree(folder)
    return freed


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
