"""`prunestudy export RUN DEST`: a self-contained copy of a run folder.

A run folder's stages (data/, train/, prune/, retrain/, timing/, its notebooks) are relative links
into its stage store (prunestudy.stagestore); `cp -r` / `cp -a` copy those links, not the stages, so
a copy moved elsewhere points nowhere (paths.dangling says so). Export writes every link that leads
out of RUN as real files: hard links where DEST is on the store's file system (the store's files
are never written in place: every write replaces a name), copies otherwise or with `copy=True`.
Links that stay inside RUN (a curve point's train/ -> ../../train) stay relative links. Files
keep their modification times (the stage records check size and time). The copy has no store.json:
a later run in it that must compute a stage uses the default store beside it. It is written into
`DEST.partial-<pid>` and renamed to DEST at the end, so an interrupted export leaves no half folder
at DEST. A sweep folder is not exported whole: each of its points is a run folder.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import graph, paths, runlock, stagestore

# never copied: the folder's store (the copy has none), its lock, a `run --jobs` scratch sweep
SKIP_TOP = (paths.STORE_RECORD, paths.LOCK, paths.PARALLEL)
STAGE_NAMES = tuple(graph.STAGES)   # the store's folders: <store>/<stage>/<key>/
SKIP_SUFFIXES = (".tmp", ".building", ".link", ".claim", ".partial")   # left by killed writes


class ExportError(ValueError):
    """Bad input: nothing written (the CLI exits 2)."""


@dataclass
class Summary:
    dest: Path
    files: int = 0
    bytes: int = 0
    linked: int = 0            # hard links (to the store's files, or to a file exported before)
    copied: int = 0
    copied_bytes: int = 0
    seconds: float = 0.0
    _seen: dict = field(default_factory=dict, repr=False)   # (device, inode) -> its path in DEST
    _no_link: set = field(default_factory=set, repr=False)  # devices DEST cannot hard-link to

    def line(self) -> str:
        return (f"{self.files} files, {self.bytes / 2**20:.1f} MiB: {self.linked} hard-linked, {self.copied} "
                f"copied ({self.copied_bytes / 2**20:.1f} MiB written) in {self.seconds:.1f} s")


def export(run: str | Path, dest: str | Path, *, copy: bool = False,
           log: Callable[[str], None] = lambda m: None) -> Summary:
    """Write the self-contained copy of run folder `run` at `dest` (see the module). Raises
    ExportError (nothing written) for a RUN that is not a run folder or holds a link that leads
    nowhere, or a DEST that exists, lies in RUN or in a stage store RUN links into."""
    run, dest = Path(os.path.abspath(run)), Path(os.path.abspath(dest))
    check(run, dest)
    partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    summary = Summary(dest)
    started = time.perf_counter()
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.mkdir()
        _tree(run, partial, run, copy, summary, (run.resolve(),), top=True)
        os.rename(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    summary.seconds = time.perf_counter() - started
    log(f"{run} -> {dest}: {summary.line()}")
    return summary


def check(run: Path, dest: Path) -> None:
    """Why RUN cannot be exported to DEST (an ExportError naming the problem and the fix), if it cannot."""
    if not (run / paths.PARAMS).is_file():
        if (run / paths.SWEEP_GRID).is_file():
            raise ExportError(f"{run} is a sweep folder: export its points one by one, each a run folder "
                              f"(`prunestudy export {run / paths.SWEEP_POINTS}/<point> DEST`)")
        raise ExportError(f"{run} is not a run folder (no {paths.PARAMS}): name a folder `prunestudy run` wrote "
                          f"(a sweep's {paths.SWEEP_POINTS}/<point> is one)")
    if dest.exists() or dest.is_symlink():
        raise ExportError(f"{dest} exists: export writes a new folder, never into or over one; choose a new DEST "
                          "(or remove that one first)")
    real_dest = dest.parent.resolve() / dest.name
    if real_dest.is_relative_to(run.resolve()):
        raise ExportError(f"{dest} lies inside the run folder {run}: choose a DEST outside it")
    info = runlock.holder(run)
    if info is not None:
        raise ExportError(f"the run folder {run} is being written by {runlock._describe(info)}: wait for it to "
                          "finish, then export it")
    stores = {stagestore.default_root(run)}
    if (was := stagestore.recorded(run)) is not None:
        stores.add(was)
    for link in _links(run):
        gone = paths.dangling(link, fix=False)
        if gone:
            raise ExportError(f"{gone}: compute its stages again with {paths.rerun_command(run)}, then export it")
        target = link.resolve()
        if not target.is_relative_to(run.resolve()):   # <store>/<stage>/<key>[/<file>]
            stores.update(a.parent for a in target.parents if a.name in STAGE_NAMES)
    for store in stores:
        if real_dest.is_relative_to(store):
            raise ExportError(f"{dest} lies inside the stage store {store}, which {run} links into: choose a DEST "
                              "outside it")


def _links(run: Path):
    """Every symbolic link in the run folder (not followed)."""
    for folder, dirs, files in os.walk(run):
        for name in (*dirs, *files):
            path = Path(folder) / name
            if path.is_symlink():
                yield path


def _tree(src: Path, dst: Path, run: Path, copy: bool, summary: Summary, seen: tuple[Path, ...],
          top: bool = False) -> None:
    """Export folder `src` into the existing folder `dst`. `run`: the run folder whose own links stay
    links (None inside a folder reached through a link out of it: every link there is followed)."""
    # links first: a file of the store that the run folder also holds as a hard link (a curve point's
    # data/) is then linked to the store's, not copied first
    for entry in sorted(os.scandir(src), key=lambda e: (not e.is_symlink(), e.name)):
        name, source, target = entry.name, Path(entry.path), dst / entry.name
        if (top and name in SKIP_TOP) or name.endswith(SKIP_SUFFIXES) or name.startswith(".write-test"):
            continue
        if entry.is_symlink():
            inside = Path(os.path.normpath(src / os.readlink(source)))
            if run is not None and inside.is_relative_to(run):   # stays in the run folder: a relative link
                os.symlink(os.path.relpath(inside, src), target)
                continue
            real = source.resolve(strict=True)
            if real.is_dir():
                if any(real.is_relative_to(s) or s.is_relative_to(real) for s in seen):
                    raise ExportError(f"{source} links to {real}, which holds it: a loop of links; remove it")
                target.mkdir()
                _tree(real, target, None, copy, summary, (*seen, real))
            else:
                _file(real, target, copy, summary)
        elif entry.is_dir(follow_symlinks=False):
            target.mkdir()
            _tree(source, target, run, copy, summary, seen)
        elif entry.is_file(follow_symlinks=False):   # the run folder's own files are copied, never linked
            _file(source, target, copy or run is not None, summary)


def _file(src: Path, dst: Path, copy: bool, summary: Summary) -> None:
    """One file: a hard link (to a file already exported, or unless `copy` to `src`: a file of the
    store, which is never written in place), else a copy with its modification time (shutil.copy2).
    A run folder's own files are copied: a later run writes some of them in place (papermill's
    executed notebooks)."""
    st = src.stat()
    summary.files += 1
    summary.bytes += st.st_size
    again = summary._seen.get((st.st_dev, st.st_ino))
    if again is not None:   # hard links in the run folder (a curve point's data/) stay hard links
        os.link(again, dst)
        summary.linked += 1
        return
    summary._seen[(st.st_dev, st.st_ino)] = dst
    if not copy and st.st_dev not in summary._no_link:
        try:
            os.link(src, dst)
            summary.linked += 1
            return
        except OSError as e:   # another file system, a file of another user (protected_hardlinks), too many links
            if e.errno == errno.EXDEV:
                summary._no_link.add(st.st_dev)
    shutil.copy2(src, dst)
    summary.copied += 1
    summary.copied_bytes += st.st_size
