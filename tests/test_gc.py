"""Space you can see and reclaim (issue 30 item 5): `prunestudy store du` and `store gc` on stores
built by hand (records.write, run folders of relative links), the protocol that keeps gc safe
beside a running sweep (a held claim, a link made after gc took its candidates), and a real sweep
with gc running over its store all along."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_sweep import SMALL, accuracies, local_sweep, seeded_store  # noqa: F401 - local_sweep: the fixture

from prunestudy import graph, grid, paths, reclaim, records, stagestore

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "prunestudy.cli"]


def entry(store: Path, stage: str, key: str, size: int = 1000, complete: bool = True) -> Path:
    e = store / stage / key
    e.mkdir(parents=True)
    (e / "model.pt").write_bytes(os.urandom(size))
    if complete:
        records.write(e, stage, key, {}, {}, 1.0, "the test", code={})
    return e


def linked(run: Path, name: str, target: Path) -> Path:
    """run/<name>: a relative link to target, as a run folder's stage folders are."""
    run.mkdir(parents=True, exist_ok=True)
    stagestore.link(run / name, target)
    return run / name


@pytest.fixture
def store(tmp_path) -> Path:
    """runs/.store: data d1 and train t1 linked by runs/a; prune p1 unlinked; retrain r1 linked by runs/a,
    its control c1 linked from inside r1 only; retrain r2 and its control c2 linked by nothing."""
    st = tmp_path / "runs" / ".store"
    d1, t1 = entry(st, "data", "d1", 5000), entry(st, "train", "t1", 3000)
    entry(st, "prune", "p1", 2000)
    r1, c1 = entry(st, "retrain", "r1", 1000), entry(st, "control", "c1", 700)
    r2, c2 = entry(st, "retrain", "r2", 1000), entry(st, "control", "c2", 600)
    os.symlink(os.path.relpath(c1, r1), r1 / paths.CONTROL)
    os.symlink(os.path.relpath(c2, r2), r2 / paths.CONTROL)
    run = tmp_path / "runs" / "a"
    for name, e in (("data", d1), ("train", t1), ("retrain", r1)):
        linked(run, name, e)
    (run / "notebooks").mkdir()
    os.symlink(os.path.relpath(t1 / "model.pt", run / "notebooks"), run / "notebooks" / "x.pt")   # into an entry
    return st


def names(st: Path) -> set[str]:
    return {e.relative_to(st).as_posix() for e in stagestore.entries(st)}


def test_du_counts_each_stage_and_what_the_folders_link(store, tmp_path):
    os.link(store / "data" / "d1" / "model.pt", store / "prune" / "p1" / "same.pt")   # a hard link: counted once
    q = store / paths.QUARANTINE / "prune" / "old-20240101"
    q.mkdir(parents=True)
    (q / "model.pt").write_bytes(b"x" * 400)
    report = reclaim.du(store)
    assert report["roots"] == [tmp_path / "runs"]
    st = report["stages"]
    assert st["data"]["entries"] == 1 and st["data"]["referenced"] == 1 and st["data"]["unreferenced"] == 0
    rec = {(s, k): (store / s / k / paths.STAGE_RECORD).stat().st_size for s, k in
           (("data", "d1"), ("prune", "p1"), ("retrain", "r1"), ("retrain", "r2"), ("control", "c1"),
            ("control", "c2"), ("train", "t1"))}
    assert st["data"]["bytes"] == 5000 + rec["data", "d1"]
    assert st["prune"]["unreferenced_bytes"] == 2000 + rec["prune", "p1"]   # same.pt: the data's inode, counted there
    assert (st["retrain"]["referenced"], st["retrain"]["unreferenced"]) == (1, 1)
    assert (st["control"]["referenced"], st["control"]["unreferenced"]) == (1, 1)   # c1 through r1's link
    assert st["control"]["referenced_bytes"] == 700 + rec["control", "c1"]
    assert report["quarantine"] == {"entries": 1, "bytes": 400}
    t = report["total"]
    assert (t["entries"], t["referenced"], t["unreferenced"]) == (7, 4, 3)
    assert t["bytes"] == sum(rec.values()) + 5000 + 3000 + 2000 + 1000 + 700 + 1000 + 600
    table = reclaim.du_table(report)
    assert table.splitlines()[-1].startswith("total") and "quarantine" in table


def test_gc_removes_only_what_nothing_links_and_the_dry_run_nothing(store, tmp_path):
    before = names(store)
    dry = reclaim.collect(store, dry_run=True, log=lambda m: None)
    assert sorted(dry["removed"]) == ["control/c2", "prune/p1", "retrain/r2"] and dry["bytes"] > 3600
    assert names(store) == before
    done = reclaim.collect(store, log=lambda m: None)
    assert sorted(done["removed"]) == sorted(dry["removed"]) and done["bytes"] == dry["bytes"]
    assert names(store) == {"data/d1", "train/t1", "retrain/r1", "control/c1"}   # c1: r1, kept, links it
    assert not list(store.glob(f"{paths.TRASH}*"))
    assert reclaim.collect(store, log=lambda m: None)["removed"] == []
    # the run folder gone: everything goes, in one gc (c1 only linked from r1, removed in it)
    import shutil
    shutil.rmtree(tmp_path / "runs" / "a")
    assert len(reclaim.collect(store, log=lambda m: None)["removed"]) == 4 and names(store) == set()


def test_older_than_keeps_what_completed_recently(store):
    old = time.time() - 3 * 86400
    for e in (store / "prune" / "p1", store / "retrain" / "r2"):
        os.utime(e / paths.STAGE_RECORD, (old, old))
    done = reclaim.collect(store, older_than=reclaim.parse_age("2d"), log=lambda m: None)
    assert sorted(done["removed"]) == ["prune/p1", "retrain/r2"]   # c2 is recent (and was linked by r2)
    assert "control/c2" in names(store)
    assert reclaim.parse_age("12h") == 43200 and reclaim.parse_age("30m") == 1800
    with pytest.raises(ValueError, match="7d, 12h, 30m"):
        reclaim.parse_age("7 days")


def test_a_registered_folder_outside_the_roots_keeps_its_entries(store, tmp_path):
    elsewhere = tmp_path / "elsewhere" / "run"
    linked(elsewhere, "prune", store / "prune" / "p1")
    stagestore.record(elsewhere, store)
    stagestore.record(elsewhere, store)   # written once
    assert [f for _, f in stagestore.users(store)] == [elsewhere.resolve()]
    gone = tmp_path / "gone"
    gone.mkdir()
    stagestore.record(gone, store)
    gone.joinpath(paths.STORE_RECORD).unlink()
    gone.rmdir()
    done = reclaim.collect(store, log=lambda m: None)
    assert "prune/p1" in names(store) and "prune/p1" not in done["removed"]
    assert elsewhere.resolve() in done["roots"] and done["dropped_users"] == [str(gone.resolve())]
    assert [f for _, f in stagestore.users(store)] == [elsewhere.resolve()]
    # ROOTS given: only those count (the registered folder is not looked at)
    reclaim.collect(store, [tmp_path / "runs"], log=lambda m: None)
    assert "prune/p1" not in names(store)


def test_a_claimed_entry_is_kept_and_its_links_keep_theirs(store):
    with stagestore.claim_dir(store / "retrain" / "r2", lambda m: None):   # being computed
        done = reclaim.collect(store, log=lambda m: None)
    assert sorted(done["removed"]) == ["prune/p1"] and done["busy"] == ["retrain/r2"]
    assert {"retrain/r2", "control/c2"} <= names(store)


def test_another_computation_of_a_key_is_kept_while_the_keys_claim_is_held(store):
    """A forced rerun computes into <key>+<hex> (stagestore.Store.fresh) under the key's own claim:
    gc treats that entry as claimed, even with no run folder under its roots linking it yet."""
    other = entry(store, "prune", "p1+ab12cd34", complete=False)
    with stagestore.claim_dir(store / "prune" / "p1", lambda m: None):
        done = reclaim.collect(store, log=lambda m: None)
    assert {"prune/p1", "prune/p1+ab12cd34"} <= set(done["busy"]) and other.is_dir()
    done = reclaim.collect(store, log=lambda m: None)   # the claim released: unlinked, it goes
    assert "prune/p1+ab12cd34" in done["removed"] and not other.exists()


def test_a_link_made_after_gc_took_its_candidates_is_respected(store, tmp_path):
    """The race, in the order it would happen: gc plans and claims its candidates; a sweep links one
    of them (as prepare or a stage link do) before gc removes anything; gc rescans and keeps it."""
    def meanwhile(locked):
        assert store / "prune" / "p1" in locked
        linked(tmp_path / "runs" / "sweep" / "points" / "x", "prune", store / "prune" / "p1")
    done = reclaim.collect(store, log=lambda m: None, on_locked=meanwhile)
    assert "prune/p1" in names(store) and "prune/p1" not in done["removed"]
    assert sorted(done["removed"]) == ["control/c2", "retrain/r2"]


def test_a_linker_never_links_what_gc_holds_and_never_deadlocks_on_its_own_claim(store):
    p1 = store / "prune" / "p1"
    with stagestore.using(p1) as ok:   # a run linking it: gc cannot take the entry meanwhile
        assert ok
        assert stagestore.held(stagestore.claim_file(p1))
        assert reclaim.collect(store, log=lambda m: None)["busy"] == ["prune/p1"]
    assert p1.is_dir()
    with stagestore.claim_dir(p1, lambda m: None):   # gc's (or a computing process's) exclusive claim
        with stagestore.using(p1) as ok:
            assert ok is False   # not reusable now: the claim path waits, then rechecks
        with stagestore.using(p1, claimed=True) as ok:   # the claim is this process's own (execute_stage)
            assert ok is True
    # linking a new entry while another process computes it: made, linked, kept by gc afterwards
    new = store / "timing" / "t9"
    new.parent.mkdir()
    with stagestore.claim_dir(new, lambda m: None):
        with stagestore.linking(new) as e:
            assert e.is_dir()


def test_removal_makes_read_only_entries_writable_first(tmp_path, monkeypatch):
    """Complete entries are read-only (chmod a-w); rmtree fails on read-only folders for a user
    that is not root. Tests run as root: check the modes when rmtree is called instead."""
    st = tmp_path / ".store"
    e = entry(st, "train", "k", 100)
    (e / "sub").mkdir()
    (e / "sub" / "f").write_bytes(b"x")
    for path in (e / "sub" / "f", e / "model.pt", e / "sub", e):
        os.chmod(path, stat.S_IMODE(path.stat().st_mode) & ~0o222)
    checked = []
    real = reclaim.shutil.rmtree

    def rmtree(folder, *a, **k):
        for dirpath, _, _ in os.walk(folder):
            assert os.stat(dirpath).st_mode & stat.S_IWUSR, dirpath
            checked.append(dirpath)
        real(folder, *a, **k)
    monkeypatch.setattr(reclaim.shutil, "rmtree", rmtree)
    trash = st / f"{paths.TRASH}{os.getpid()}"
    moved = reclaim.to_trash(e, trash)
    assert not e.exists() and moved.is_dir()
    reclaim.purge(trash)
    assert not trash.exists() and len(checked) == 4


def test_the_trash_of_a_gc_that_died_is_emptied_and_quarantine_only_on_request(store):
    dead = store / f"{paths.TRASH}999999999"
    (dead / "prune" / "x").mkdir(parents=True)
    alive = store / f"{paths.TRASH}1"   # init: a process that lives
    alive.mkdir()
    q = store / paths.QUARANTINE / "prune" / "old"
    q.mkdir(parents=True)
    reclaim.collect(store, log=lambda m: None)
    assert not dead.exists() and alive.exists() and q.exists()
    assert reclaim.collect(store, quarantine=True, log=lambda m: None)["quarantine_bytes"] == 0
    assert not (store / paths.QUARANTINE).exists()


def test_incomplete_and_renamed_entries_count_as_entries(tmp_path):
    st = tmp_path / "runs" / ".store"
    entry(st, "train", "k+0123abcd", 10)   # a recompute of a complete key (write-once entries)
    old = entry(st, "prune", "half", 10, complete=False)
    t = time.time() - 3600
    os.utime(old, (t, t))
    assert names(st) == {"train/k+0123abcd", "prune/half"}
    assert reclaim.finished(old) == pytest.approx(t)
    assert sorted(reclaim.collect(st, older_than=60, log=lambda m: None)["removed"]) == ["prune/half"]


def test_the_commands_print_where_they_looked_a_table_and_a_total(store, tmp_path):
    du = subprocess.run([*CLI, "store", "du", "--store", str(store)], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
    assert du.returncode == 0, du.stderr
    assert f"looked for links under: {tmp_path / 'runs'}" in du.stdout
    assert "unreferenced" in du.stdout and du.stdout.splitlines()[-1].startswith("total")
    gc = subprocess.run([*CLI, "store", "gc", "--store", str(store), "--dry-run", str(tmp_path / "runs")], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert gc.returncode == 0, gc.stderr
    assert "would remove 3 entries" in gc.stdout and "would remove prune/p1" in gc.stdout
    assert len(names(store)) == 7
    bad = subprocess.run([*CLI, "store", "gc", "--store", str(store), "--older-than", "soon"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "7d, 12h, 30m" in bad.stderr


# --------------------------------------------------------------------------- a real sweep, gc all along

@pytest.mark.e2e
@pytest.mark.xdist_group("test_sweep.py: faults")
def test_a_sweep_finishes_with_the_same_numbers_while_gc_runs_over_its_store(local_sweep, tmp_path):  # noqa: F811
    """The grid's two points of seed 0 at amount 0.5 on a store that holds the fixture's data,
    trainings and controls (seed 1's are garbage here; seed 0's controls are kept by a folder that
    links them): `store gc` runs over the store again and again while the sweep computes, links and
    claims. The sweep ends with the uninterrupted sweep's numbers, every link of its folder resolves,
    and gc removed the garbage."""
    base, _, _ = local_sweep
    store = seeded_store(base, tmp_path / "store")
    pts = grid.points(SMALL, [], ["seed=0", "prune.amount=0.5"])
    ours = {graph.all_keys(p.cfg)[s] for p in pts for s in ("data", "train", "control")}
    garbage = {e for e in stagestore.entries(store) if e.name not in ours}
    assert garbage   # seed 1's training and control
    for e in stagestore.entries(store):
        if e.parent.name == "control" and e.name in ours:
            linked(tmp_path / "keep", "control", e)   # kept, as a run folder of the same settings would
    stop, rounds, removed, busy = threading.Event(), [], [], set()

    def gc_loop():
        while not stop.is_set():
            done = reclaim.collect(store, log=lambda m: None)
            rounds.append(done)
            removed.extend(done["removed"])
            busy.update(done["busy"])
            time.sleep(0.2)
    loop = threading.Thread(target=gc_loop, daemon=True)
    loop.start()
    try:
        proc = subprocess.run([*CLI, "sweep", "-f", str(SMALL), "--sweep-dir", str(tmp_path / "grid"), "--store",
                               str(store), "--jobs", "2", "-g", "seed=0", "-g", "prune.amount=0.5"], cwd=ROOT,
                              capture_output=True, text=True, timeout=1500)
    finally:
        stop.set()
        loop.join(timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert len(rounds) >= 3 and {e.relative_to(store).as_posix() for e in garbage} <= set(removed), removed
    local = accuracies(base / "grid")
    assert all(v == local[k] for k, v in accuracies(tmp_path / "grid").items())
    dangling = [p for p in (tmp_path / "grid").rglob("*") if p.is_symlink() and not p.exists()]
    assert dangling == []
    again = reclaim.collect(store, log=lambda m: None)   # the sweep done: nothing it links goes
    assert again["removed"] == [] and again["busy"] == []
