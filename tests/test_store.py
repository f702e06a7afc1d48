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
