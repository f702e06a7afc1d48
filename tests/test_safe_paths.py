"""Paths that cannot destroy (issue 30): claim and lock files are never written through a planted
link; a run or sweep folder is never the project, the stage store or a folder that is not its own;
a run or sweep folder records its store, and a rerun from the folder uses it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from prunestudy import atomic, cli, config, graph, runlock, stagestore

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "params" / "smoke.yaml")


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file and link under a folder: its relative name -> the sha256 of its bytes (or where a
    link points), so that any change, addition or removal shows."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + str(p.readlink())
        elif p.is_file():
            out[rel] = f"{p.stat().st_size} {hashlib.sha256(p.read_bytes()).hexdigest()}"
        else:
            out[rel] = "dir"
    return out


# --------------------------------------------------------------------------- planted links

def plant(tmp_path: Path, at: Path, name: str = "victim.pt") -> Path:
    """A file someone else owns (a model in the store) and a link to it where a lock file goes."""
    victim = tmp_path / name
    victim.write_bytes(b"the weights of another run" * 100)
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(victim)
    return victim


def test_a_planted_claim_link_is_refused_and_its_target_untouched(tmp_path):
    st = stagestore.Store(tmp_path / "store")
    claim = stagestore.claim_file(st.entry("train", "abc"))
    victim = plant(tmp_path, claim)
    before = victim.read_bytes()
    with pytest.raises(atomic.PlantedLink, match=str(claim)):
        with st.claim("train", "abc", log=lambda m: None):
            pass
    with pytest.raises(atomic.PlantedLink, match=str(claim)):
        stagestore.held(claim)
    assert victim.read_bytes() == before and claim.is_symlink()


def test_a_planted_hard_link_or_run_lock_link_is_refused(tmp_path):
    st = stagestore.Store(tmp_path / "store")
    claim = stagestore.claim_file(st.entry("prune", "k"))
    claim.parent.mkdir(parents=True)
    victim = tmp_path / "victim.json"
    victim.write_text('{"key": "k"}')
    claim.hardlink_to(victim)
    with pytest.raises(atomic.PlantedLink, match="hard link"):
        with st.claim("prune", "k", log=lambda m: None):
            pass
    assert victim.read_text() == '{"key": "k"}'
    run_dir = tmp_path / "run"
    lock = run_dir / "run.lock"
    victim = plant(tmp_path, lock, "model.pt")
    before = victim.read_bytes()
    with pytest.raises(atomic.PlantedLink, match=str(lock)):
        runlock.RunLock(run_dir, "test")
    assert victim.read_bytes() == before


def test_a_run_meeting_a_planted_claim_exits_2_naming_it(tmp_path, capsys):
    """The runner claims the data stage's entry first: the planted link stops it, one line, exit 2."""
    store = tmp_path / "store"
    cfg = config.load(SMOKE, [])
    claim = stagestore.claim_file(stagestore.Store(store).entry("data", graph.chain_keys(cfg)["data"]))
    victim = plant(tmp_path, claim)
    before = victim.read_bytes()
    assert cli.main(["run", "-f", SMOKE, "--run-dir", str(tmp_path / "run"), "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(claim) in err[0] and "symbolic link" in err[0], err
    assert victim.read_bytes() == before


# --------------------------------------------------------------------------- one store per folder

def test_a_folder_records_its_store_relative_to_itself_and_keeps_it(tmp_path, monkeypatch):
    run_dir, store = tmp_path / "runs" / "mine", tmp_path / "elsewhere" / "store"
    run_dir.mkdir(parents=True)
    monkeypatch.delenv(stagestore.ENV, raising=False)
    assert stagestore.choose(run_dir, None) == tmp_path / "runs" / ".store"   # a new folder: beside it
    assert stagestore.choose(run_dir, store) == store.resolve()
    stagestore.record(run_dir, store)
    assert [f for _, f in stagestore.users(store)] == [run_dir.resolve()]   # registered in the store (store gc)
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv(stagestore.ENV, str(tmp_path / "third"))
    assert stagestore.choose(run_dir, None) == store.resolve()   # any directory, whatever PRUNESTUDY_STORE says
    assert stagestore.choose(run_dir / "repeats" / "seed-1", None) == store.resolve()
    with pytest.raises(stagestore.StoreError, match="drop --store"):
        stagestore.choose(run_dir, tmp_path / "third")
    assert stagestore.choose(run_dir, "none") is None


@pytest.mark.e2e
def test_a_sweep_point_rerun_from_its_folder_uses_the_sweeps_store(tmp_path, monkeypatch):
    """The issue's probe: `prunestudy run -f <point>/params.json --run-dir <point>` from another
    directory, its prune and retrain links gone, links them again from the sweep's store; no second
    store appears under points/, and another --store is refused, exit 2, nothing changed."""
    import subprocess
    import sys

    monkeypatch.delenv(stagestore.ENV, raising=False)
    cli_ = [sys.executable, "-m", "prunestudy.cli"]
    env = {k: v for k, v in __import__("os").environ.items() if k != stagestore.ENV}
    sweep_dir = tmp_path / "grid"
    proc = subprocess.run([*cli_, "sweep", "-f", str(ROOT / "params" / "grid-small.yaml"), "-g",
                           "prune.method=l1_unstructured", "-g", "prune.amount=0.5", "-g", "seed=0", "--jobs", "1",
                           "--sweep-dir", str(sweep_dir)], cwd=ROOT, capture_output=True, text=True, timeout=1500,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = tmp_path / ".store"
    assert f"stage store {store}" in proc.stdout.strip().splitlines()[-1]
    (point,) = (sweep_dir / "points").iterdir()
    for stage in ("prune", "retrain"):
        (point / stage).unlink()   # the links only: the entries stay in the store
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rel = Path("..") / "grid" / "points" / point.name
    proc = subprocess.run([*cli_, "run", "-f", str(rel / "params.json"), "--run-dir", str(rel)], cwd=elsewhere,
                          capture_output=True, text=True, timeout=1500, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "found in the stage store" in proc.stdout and ": start (" not in proc.stdout, proc.stdout
    assert not (sweep_dir / "points" / ".store").exists()
    for stage in ("data", "train", "prune", "retrain"):
        assert (point / stage).resolve().is_relative_to(store.resolve()), stage
    assert f"stage store {store}" in proc.stdout.strip().splitlines()[-2]
    assert proc.stdout.strip().splitlines()[-1] == f"prunestudy: report {point.resolve() / 'report.html'}"
    before = tree_digest(point)
    proc = subprocess.run([*cli_, "run", "-f", str(rel / "params.json"), "--run-dir", str(rel), "--store",
                           str(tmp_path / "other")], cwd=elsewhere, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 2 and "drop --store" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert tree_digest(point) == before and not (tmp_path / "other").exists()


# --------------------------------------------------------------------------- paths that cannot destroy

def fake_store(folder: Path) -> Path:
    """A store with entries of two stages (other seeds' trainings among them) and their claims."""
    for stage, key in (("data", "d1"), ("train", "t1"), ("train", "t2"), ("prune", "p1")):
        entry = folder / stage / key
        entry.mkdir(parents=True)
        (entry / "model.pt").write_bytes(key.encode() * 1000)
        (entry / "stage.json").write_text(f'{{"key": "{key}"}}')
        stagestore.claim_file(entry).write_text("")
    return folder


def refused(capsys, *args) -> str:
    assert cli.main(list(args)) == 2, args
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_run_into_the_store_inside_it_or_holding_it_exits_2_and_changes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(stagestore.ENV, raising=False)
    store = fake_store(tmp_path / "runs" / ".store")
    before = tree_digest(tmp_path)
    # the probe: --run-dir runs/.store, whose default store (beside it) is itself
    line = refused(capsys, "run", "-f", SMOKE, "--run-dir", str(store))
    assert f"the run folder {store} is the stage store {store}" in line and "--run-dir runs/mine" in line
    assert "lies in the stage store" in refused(capsys, "run", "-f", SMOKE, "--run-dir", str(store / "train"))
    assert "contains the stage store" in refused(capsys, "run", "-f", SMOKE, "--run-dir", str(tmp_path / "runs"),
                                                 "--store", str(store))
    monkeypatch.setenv(stagestore.ENV, str(store))
    assert "lies in the stage store" in refused(capsys, "run", "-f", SMOKE, "--run-dir", str(store / "data" / "d1"))
    assert "lies in the stage store" in refused(capsys, "sweep", "-f", str(ROOT / "params" / "grid-small.yaml"),
                                                "--sweep-dir", str(store / "points"))
    assert tree_digest(tmp_path) == before


def test_a_sweep_into_the_project_or_a_foreign_folder_exits_2_and_changes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(stagestore.ENV, raising=False)
    notebooks = tree_digest(ROOT / "notebooks")
    grid_file = str(ROOT / "params" / "grid-small.yaml")
    line = refused(capsys, "sweep", "-f", grid_file, "--sweep-dir", str(ROOT))
    assert f"the sweep folder {ROOT} is, or contains, the project" in line and "--sweep-dir runs/my-grid" in line
    assert not (ROOT / "points").exists() and not (ROOT / "grid.json").exists()
    assert tree_digest(ROOT / "notebooks") == notebooks
    mine = tmp_path / "mine"
    (mine / "notebooks").mkdir(parents=True)
    (mine / "notebooks" / "06_sweep.ipynb").write_text("my own notebook")
    (mine / "thesis.tex").write_text("text")
    before = tree_digest(mine)
    assert "is neither new, empty nor a sweep folder" in refused(capsys, "sweep", "-f", grid_file, "--sweep-dir",
                                                                 str(mine))
    # a run does not take a folder holding a run's names without its params.json either
    assert "is not a run folder (no params.json) but holds notebooks" in refused(
        capsys, "run", "-f", SMOKE, "--run-dir", str(mine))
    assert tree_digest(mine) == before


def test_run_jobs_refuses_a_parallel_folder_that_leads_into_the_store(tmp_path, capsys):
    store, run_dir = fake_store(tmp_path / "store"), tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".parallel").symlink_to(store)
    before = tree_digest(store)
    line = refused(capsys, "run", "-f", SMOKE, "-p", "seeds=[0,1]", "--jobs", "2", "--run-dir", str(run_dir),
                   "--store", str(store))
    assert f"the sweep folder {store.resolve()} is the stage store" in line
    assert tree_digest(store) == before


def test_a_link_never_replaces_the_folder_that_holds_its_target(tmp_path):
    """What `run --run-dir <store>` did: data/ of the store replaced by a link to data/<key> in it."""
    store = fake_store(tmp_path / "store")
    before = tree_digest(store)
    with pytest.raises(stagestore.StoreError, match="refused to replace it"):
        stagestore.link(store / "data", store / "data" / "d1")
    assert tree_digest(store) == before
