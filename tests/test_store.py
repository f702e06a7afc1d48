"""The stage store's entries hold the digest of every file their stage wrote: an entry whose bytes
changed, even with its files' sizes and times restored, is never served; it is moved to the
store's quarantine and computed again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunestudy import paths, records, stagestore

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "prunestudy.cli"]


def damage_in_place(path: Path, at: float = 0.5, size: int = 4096) -> None:
    """Zero `size` bytes in the middle of a file, then restore its size and times: what a bad disk,
    a stray write through a link or a careless tool does, unseen by a size-and-time check."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start:start + size] = bytes(min(size, len(data) - start))
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def entry_with_record(tmp_path: Path) -> Path:
    entry = tmp_path / "store" / "prune" / "abc123"
    entry.mkdir(parents=True)
    (entry / "model.pt").write_bytes(os.urandom(20000))
    (entry / "metrics.json").write_text('{"test_accuracy": 0.5}')
    records.write(entry, "prune", "abc123", {}, {}, 1.0, "the test", code={})
    return entry


def test_a_record_holds_each_outputs_digest_and_verify_finds_an_edit_that_kept_size_and_time(tmp_path):
    entry = entry_with_record(tmp_path)
    rec = records.read(entry)
    assert set(rec["digests"]) == {"model.pt", "metrics.json"} and rec["format"] == records.FORMAT
    assert rec["digests"]["model.pt"] == records.file_digest(entry / "model.pt")
    assert records.verify(entry) is None
    records._verified.clear()
    damage_in_place(entry / "model.pt")
    assert records.problem(entry, "abc123") is None   # the cheap check cannot see it ...
    assert "model.pt is not the bytes the stage wrote" in records.verify(entry)   # ... the digest does


def test_store_verify_quarantines_a_damaged_entry_and_exits_1(tmp_path):
    entry = entry_with_record(tmp_path)
    good = tmp_path / "store" / "prune" / "good"
    good.mkdir()
    (good / "model.pt").write_bytes(b"fine")
    records.write(good, "prune", "good", {}, {}, 1.0, "the test", code={})
    damage_in_place(entry / "model.pt", size=100)
    proc = subprocess.run([*CLI, "store", "verify", "--store", str(tmp_path / "store")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 entries verified, 1 damaged (quarantined)" in proc.stdout
    assert not entry.exists() and good.is_dir()
    moved = list((tmp_path / "store" / paths.QUARANTINE / "prune").iterdir())
    assert len(moved) == 1 and "model.pt" in (moved[0] / "QUARANTINED").read_text()
    again = subprocess.run([*CLI, "store", "verify", "--store", str(tmp_path / "store")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "1 entries verified, 0 damaged" in again.stdout   # the quarantine is not an entry
    assert [e.name for e in stagestore.entries(tmp_path / "store")] == ["good"]


@pytest.mark.e2e
def test_a_damaged_store_entry_is_never_linked_and_is_computed_again_with_the_same_numbers(tmp_path):
    """The issue's probe: 4 KiB zeroed in the middle of a stored retrain/<key>/model.pt, its size and
    time restored. A new run with the same parameters used to link it ("found in the stage store");
    now it is quarantined, the retraining computed again, with the numbers of the undamaged one, and
    the first run, rerun, computes nothing it does not need."""
    store = tmp_path / "store"
    args = ["run", "-f", "params/smoke.yaml", "-p", "prune.amounts=null", "--store", str(store)]
    first = subprocess.run([*CLI, *args, "--run-dir", str(tmp_path / "a")], cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = json.loads((tmp_path / "a" / paths.RESULTS).read_text())
    model = (tmp_path / "a" / "retrain").resolve() / paths.MODEL
    damage_in_place(model)

    second = subprocess.run([*CLI, *args, "--run-dir", str(tmp_path / "b")], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = second.stdout
    assert "[4/5] retrain: found in the stage store" not in out and "retrain: start" in out, out
    assert "is damaged (output model.pt is not the bytes the stage wrote" in out and "computed again" in out, out
    assert "[3/5] prune: found in the stage store" in out   # the undamaged entries are linked
    after = json.loads((tmp_path / "b" / paths.RESULTS).read_text())
    for state in ("train", "prune", "retrain"):
        assert after[state]["test_accuracy"] == before[state]["test_accuracy"], state
        assert after[state]["test_loss"] == before[state]["test_loss"], state
    assert records.verify(model.parent) is None   # the entry at that key is whole again
    assert len(list((store / paths.QUARANTINE / "retrain").iterdir())) == 1

    rerun = subprocess.run([*CLI, *args, "--run-dir", str(tmp_path / "a")], cwd=ROOT, capture_output=True,
                           text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "retrain: start" not in rerun.stdout and "train: start" not in rerun.stdout, rerun.stdout


# --------------------------------------------------------------------------- write-once entries

def test_a_stage_is_computed_into_a_new_entry_when_its_keys_folder_holds_a_computation(tmp_path):
    st = stagestore.Store(tmp_path / "store")
    assert st.fresh("prune", "abc123") == st.entry("prune", "abc123")   # never computed: the key's own folder
    entry = entry_with_record(tmp_path)
    other = st.fresh("prune", "abc123")
    assert other != entry and other.name.startswith("abc123+") and other.is_dir() and not any(other.iterdir())
    assert st.candidates("prune", "abc123") == [entry, other]
    assert [e.name for e in stagestore.entries(st.root)] == sorted(["abc123", other.name])


def test_a_sealed_entry_is_read_only_and_can_still_be_quarantined(tmp_path):
    entry = entry_with_record(tmp_path)
    (entry / "sub").mkdir()
    (entry / "sub" / "x.json").write_text("{}")
    os.symlink("../../control/k", entry / "control")   # a link inside it: not followed, not changed
    stagestore.seal(entry)
    assert stagestore.sealed(entry)
    for path in [entry, entry / "sub", entry / "model.pt", entry / "sub" / "x.json", entry / paths.STAGE_RECORD]:
        assert path.stat().st_mode & 0o222 == 0, path
    assert (entry / "control").is_symlink()
    where = stagestore.quarantine(entry, "a test")
    assert where is not None and not entry.exists() and (where / "QUARANTINED").read_text() == "a test\n"
    assert (where / "model.pt").stat().st_mode & 0o222 == 0   # its files stay as they were


def test_a_complete_entry_computed_from_other_inputs_is_never_the_one_a_linked_stage_goes_into(tmp_path):
    """The timing and the control are linked before the analysis or the retraining computes them: a
    complete entry of the key whose inputs differ (a run that recomputed its retraining) would be
    recomputed in place under the other runs' links; they get an entry of their own instead."""
    from prunestudy import execute

    st = stagestore.Store(tmp_path / "store")
    upstream = tmp_path / "run" / "train"
    upstream.mkdir(parents=True)
    records.write(upstream, "train", "t1", {}, {}, 1.0, "the test", code={})
    own = st.entry("control", "c1")
    own.mkdir(parents=True)
    records.write(own, "control", "c1", {}, records.input_ids({"train": upstream}), 1.0, "the test", code={})
    link = tmp_path / "run" / "control"
    assert execute.usable_entry(st, "control", "c1", {"train": upstream}, link) == own   # computed from this train
    assert execute.usable_entry(st, "control", "c1", {"train": upstream}, link, fresh=True) != own   # --force
    records.write(upstream, "train", "t1", {}, {}, 1.0, "the test", code={})   # the training recomputed: a new id
    other = execute.usable_entry(st, "control", "c1", {"train": upstream}, link)
    assert other != own and other.name.startswith("c1+") and records.read(own)["key"] == "c1"
    records.write(other, "control", "c1", {}, records.input_ids({"train": upstream}), 1.0, "the test", code={})
    stagestore.link(link, other)
    assert execute.usable_entry(st, "control", "c1", {"train": upstream}, link) == other   # found again


def test_privatize_gives_the_run_folder_its_own_copy_and_leaves_the_entry_untouched(tmp_path):
    entry = entry_with_record(tmp_path)
    stagestore.seal(entry)
    folder = tmp_path / "run" / "prune"
    folder.parent.mkdir()
    stagestore.link(folder, entry)
    before = {p.name: p.read_bytes() for p in entry.iterdir()}
    stagestore.privatize(folder)
    assert not folder.is_symlink() and folder.is_dir()
    assert records.problem(folder, "abc123") is None   # the same files (hard links): still complete here
    assert records.mark_stale(folder, "its input was recomputed")
    assert records.problem(folder, "abc123").startswith("stale")
    assert records.problem(entry, "abc123") is None and records.verify(entry) is None
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == before


def _tree(folder: Path) -> dict[str, str]:
    """Every file under a folder, links followed, -> its sha256 (what the folder's reader sees)."""
    out = {}
    for top, _, files in os.walk(folder, followlinks=True):
        for name in files:
            path = Path(top) / name
            if not name.endswith(".claim"):
                out[path.relative_to(folder).as_posix()] = records.file_digest(path)
    return out


@pytest.mark.e2e
def test_force_and_notebook_reruns_in_one_run_never_change_what_another_run_links(tmp_path):
    """The issue's probes: `run --force prune` in a run that shares the store rewrote the prune and
    retrain entries in place (another run's linked retrain/metrics.json changed under it), and a
    notebook rerun of the pruning marked the shared retrain entry stale through the link. Now both
    compute into entries of their own; the other run's files are byte-identical and up to date, no
    file of an entry that was complete changes, and complete entries are read-only."""
    from prunestudy import atomic, execute, graph

    store = tmp_path / "store"
    args = ["run", "-f", "params/smoke.yaml", "-p", "prune.amounts=null", "--store", str(store)]
    for name in ("a", "b"):
        proc = subprocess.run([*CLI, *args, "--run-dir", str(tmp_path / name)], cwd=ROOT, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[4/5] retrain: found in the stage store" in proc.stdout   # b links a's entries
    b_stages = {s: _tree(tmp_path / "b" / s) for s in ("data", "train", "prune", "retrain")}
    stored = _tree(store)
    for entry in stagestore.entries(store):
        assert stagestore.sealed(entry) and (entry / paths.STAGE_RECORD).stat().st_mode & 0o222 == 0, entry

    def b_is_untouched():
        assert {s: _tree(tmp_path / "b" / s) for s in b_stages} == b_stages
        cfg = atomic.read_json(tmp_path / "b" / paths.PARAMS)
        keys = graph.chain_keys(cfg)
        for s in b_stages:
            records._verified.clear()
            assert execute.problem(cfg, tmp_path / "b", s, keys[s], verify=True) is None, s
        now = _tree(store)
        assert {k: now.get(k) for k in stored} == stored   # no file of a complete entry changed or went
        was = {"/".join(name.split("/")[:2]) for name in stored}
        for name in set(now) - set(stored):   # new files are in new entries only
            assert "/".join(name.split("/")[:2]) not in was, name

    forced = subprocess.run([*CLI, *args, "--run-dir", str(tmp_path / "a"), "--force", "prune"], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    assert "prune: start" in forced.stdout and "retrain: start" in forced.stdout
    b_is_untouched()
    for s in ("prune", "retrain"):   # a's own new entries, complete and read-only
        entry = (tmp_path / "a" / s).resolve()
        assert "+" in entry.name and stagestore.sealed(entry) and records.read(entry)["key"] == entry.name[:12]

    code = ("import json, sys; from prunestudy import stages; "
            "p = json.load(open(sys.argv[1] + '/params.json'))['prune']; "
            "stages.run_prune(sys.argv[1], method=p['method'], amount=0.5, log=lambda m: None)")
    nb = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True,
                        timeout=900)   # what 03_prune.ipynb does with `amount = 0.5` in b
    assert nb.returncode == 0, nb.stdout[-3000:] + nb.stderr[-3000:]
    assert records.problem(tmp_path / "b" / "retrain").startswith("stale: prune was recomputed")
    mine = (tmp_path / "b" / "prune").resolve()   # the notebook's: an entry of its own key, which only b links
    assert mine.parent == store.resolve() / "prune" and stagestore.sealed(mine)
    assert records.read(mine)["params"]["amount"] == 0.5 and records.read(mine)["by"] == "python"
    b_stages = {s: b_stages[s] for s in ("data", "train")}
    b_is_untouched()
    cfg = atomic.read_json(tmp_path / "a" / paths.PARAMS)   # a, whose forced entries b never shared, too
    keys = graph.chain_keys(cfg)
    assert all(execute.problem(cfg, tmp_path / "a", s, keys[s]) is None for s in ("prune", "retrain"))
    a_first = [e for e in stagestore.entries(store) if e.parent.name == "retrain" and "+" not in e.name]
    assert len(a_first) == 1 and records.problem(a_first[0]) is None   # the shared retrain: not stale
