"""Reruns, interruptions, failures and hostile inputs through the real command line (issue 7).

Every test here is a row of the README's fault table."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import terminal_sigint

from prunestudy import atomic, config, execute, graph, paths, stages

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "prunestudy.cli"]
STAGES = ("data", "train", "prune", "retrain", "analysis")


def run_cli(*args, timeout=900):
    return subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def copy_run(smoke_run, tmp_path) -> Path:
    """A copy of the finished smoke run, to rerun with changes."""
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run[0], run_dir, symlinks=False)
    return run_dir


def ran(stdout: str) -> list[str]:
    return re.findall(r"\] (\w+): start", stdout)


def skipped(stdout: str) -> list[str]:
    return re.findall(r"\] (\w+): up to date", stdout)


def scores(run_dir: Path) -> dict:
    res = json.loads((run_dir / "results.json").read_text())
    return {s: (res[s]["test_accuracy"], res[s]["test_loss"]) for s in ("train", "prune", "retrain")}


# --------------------------------------------------------------------------- caching

@pytest.mark.e2e
def test_rerunning_a_finished_run_does_nothing(smoke_run, tmp_path):
    run_dir = copy_run(smoke_run, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    proc = run_cli("run", "-f", "params/smoke.yaml", "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    points = ["prune", "retrain"] * 2   # the sweep's two points: each its own pruning and retraining
    assert skipped(proc.stdout) == [*STAGES[:-1], *points, "analysis"] and ran(proc.stdout) == []
    assert "nothing to do" in proc.stdout
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    changed = sorted(str(p.relative_to(run_dir)) for p in after if after[p] != before.get(p))
    # params.json rewritten with the same content, run.lock with this run's pid; nothing else touched
    assert changed == ["params.json", "run.lock"], changed


@pytest.mark.e2e
def test_a_run_without_the_store_never_writes_through_a_link_into_it(smoke_run, tmp_path):
    """A stored run (a copy of the smoke run and its store, links kept), then the same folder with
    --store none and --force prune: the stages are computed in the run folder, and the store's
    entries (other runs use them), their executed notebooks included, are left as they were."""
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run[0], run_dir, symlinks=True)
    shutil.copytree(smoke_run[0].parent / paths.STORE, tmp_path / paths.STORE, symlinks=True)
    entry = paths.executed_notebook(run_dir, "prune").resolve()
    assert entry.is_relative_to(tmp_path / paths.STORE)
    before = entry.read_bytes()
    proc = run_cli("run", "-f", "params/smoke.yaml", "-p", "prune.amounts=null", "--run-dir", str(run_dir),
                   "--store", "none", "--force", "prune")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ran(proc.stdout) == ["prune", "retrain", "analysis"]
    assert entry.read_bytes() == before
    for stage in ("prune", "retrain"):
        assert not paths.executed_notebook(run_dir, stage).is_symlink() and not (run_dir / stage).is_symlink()


# --------------------------------------------------------------------------- interruptions

def start_run(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "run", "-f", "params/smoke.yaml", "--run-dir", str(run_dir), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=terminal_sigint)


def wait_for(proc: subprocess.Popen, pattern: str, timeout: float = 300) -> str:
    """Read the runner's output until a line matches; returns what was read."""
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
        if time.time() > deadline:
            break
    raise AssertionError(f"never saw {pattern!r}:\n" + "".join(seen)[-3000:])


KILLED = ("data", "train", "retrain")   # the stages that leave partial work: crop cache, checkpoints,
                                        # the control


@pytest.mark.e2e
def test_sigkill_in_stages_with_partial_work_then_rerun_gives_the_same_results(smoke_run, tmp_path):
    """Kill the whole runner (kernels included) with SIGKILL inside the data, train and retrain
    stages in turn; each rerun resumes after the last complete stage, and the end result equals the
    uninterrupted run's. (Without the smoke run's sweep points, whose stages change none of this.)"""
    run_dir, no_sweep = tmp_path / "killed", ("-p", "prune.amounts=null")
    for i, stage in enumerate(STAGES, 1):
        if stage not in KILLED:
            continue
        proc = start_run(run_dir, *no_sweep)
        wait_for(proc, rf"\[{i}/5\] {stage}: start")
        time.sleep(6)  # the kernel is up and the stage is working
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        keys, cfg = _keys(run_dir), config.load(ROOT / "params" / "smoke.yaml")
        for earlier in STAGES[: i - 1]:  # finished stages are kept as complete
            assert execute.problem(cfg, run_dir, earlier, keys[earlier]) is None, (stage, earlier)
    proc = run_cli("run", "-f", "params/smoke.yaml", "--run-dir", str(run_dir), *no_sweep)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert scores(run_dir) == scores(smoke_run[0])
    assert (run_dir / "report.html").stat().st_size > 0
    assert not list(run_dir.rglob(".*.tmp")), "a temporary file was left behind as if it were an artifact"


def _keys(run_dir: Path) -> dict:
    return graph.chain_keys(config.load(ROOT / "params" / "smoke.yaml"))


@pytest.mark.e2e
def test_ctrl_c_stops_cleanly_and_keeps_finished_stages(smoke_run, tmp_path):
    run_dir = copy_run(smoke_run, tmp_path)
    proc = start_run(run_dir, "--force", "train")
    wait_for(proc, r"\[2/5\] train: start")
    time.sleep(1.5)   # inside the train stage: its kernel starts and imports (3 s and more), then it trains
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: runner and kernel alike
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "interrupted; finished stages are kept" in out and "rerun the same command" in out
    assert (run_dir / "data" / "stage.json").is_file()
    for stage in ("train", "prune", "retrain", "analysis"):  # from the forced stage on: not complete
        assert not paths.stage_record(run_dir, stage).is_file()
    # (that a rerun then goes on to the same results is what the SIGKILL test proves)


# --------------------------------------------------------------------------- failures and bad input

@pytest.mark.e2e
def test_failing_stage_names_notebook_renders_it_and_keeps_finished_stages(smoke_run, tmp_path):
    run_dir = copy_run(smoke_run, tmp_path)
    proc = run_cli("run", "-f", "params/smoke.yaml", "--run-dir", str(run_dir), "-p", "train.device=cuda:7")
    assert proc.returncode == 1
    executed = run_dir / "notebooks" / "02_train.ipynb"
    assert "stage 'train' failed" in proc.stderr and "CUDA is not available" in proc.stderr
    assert str(executed) in proc.stderr and executed.with_suffix(".html").stat().st_size > 0
    assert "finished stages are kept" in proc.stderr
    assert skipped(proc.stdout) == ["data"] and "[3/5] prune" not in proc.stdout
    assert (run_dir / "data" / "data.json").is_file()


@pytest.mark.e2e
def test_parameters_reach_notebooks_as_data_never_as_code(tmp_path):
    marker = tmp_path / "pwned"
    nasty = f"x\"'; import os; os.system('touch {marker}') #\n\"\"\"'''\\\\ {{}} </script>"
    run_dir = tmp_path / "run"
    proc = run_cli("run", "-f", "params/smoke.yaml", "--run-dir", str(run_dir), "-p",
                   "data.classes=" + json.dumps([nasty, "person"]))
    assert proc.returncode == 1 and "stage 'data' failed" in proc.stderr
    assert not marker.exists()
    executed = run_dir / "notebooks" / "01_data.ipynb"   # the failure names the stage's executed notebook
    assert str(executed) in proc.stderr and "[2/5] train" not in proc.stdout
    import nbformat

    nb = nbformat.read(run_dir / "notebooks" / "01_data.ipynb", as_version=4)
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    namespace: dict = {}
    exec(injected.source, namespace)  # noqa: S102 - the injected cell, evaluated here to read it back
    assert namespace["classes"] == [nasty, "person"] and not marker.exists()


@pytest.mark.e2e
def test_unwritable_run_folder_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_cli("run", "-f", "params/smoke.yaml", "--run-dir", str(blocker / "run"))
    assert proc.returncode == 2
    assert f"the run folder {blocker / 'run'} cannot be written" in proc.stderr and "--run-dir" in proc.stderr
    assert "[1/5]" not in proc.stdout


def test_written_files_get_the_mode_of_a_plain_open_not_the_temp_files_0600(tmp_path, smoke_run):
    """Results, reports and models are written atomically through a temp file (0600); they used to
    keep that mode, so a colleague or a web server on a shared file system could not read a report."""
    target = atomic.write_bytes(tmp_path / "page.html", b"<html></html>")
    assert target.stat().st_mode & 0o777 == atomic.FILE_MODE
    probe = "import os; os.umask(0o027); from prunestudy import atomic; print(oct(atomic.FILE_MODE))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "0o640"   # the umask decides, as for open()
    run_dir, _ = smoke_run   # the study's own files, under this process's umask
    for name in ("report.html", "results.json", "notebooks/05_analysis.html"):
        assert (run_dir / name).stat().st_mode & 0o777 == atomic.FILE_MODE, name
    for name in ("train/metrics.json", "train/model.pt"):   # in the store: read-only once complete (sealed)
        assert (run_dir / name).resolve().stat().st_mode & 0o777 == atomic.FILE_MODE & ~0o222, name


def test_full_disk_gives_a_clear_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    atomic.write_json(target, {"old": True})

    def fill(f):
        f.write(b"{\"new\": ")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="no space left on the device while writing .*metrics.json: free some space"):
        atomic.atomic_write(target, fill)
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_full_disk_for_real_on_a_tiny_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the simulated test covers it")
    try:
        atomic.write_bytes(mnt / "kept.bin", b"1" * 1000)
        with pytest.raises(OSError, match="no space left on the device while writing"):
            atomic.write_bytes(mnt / "kept.bin", b"2" * 200_000)
        assert (mnt / "kept.bin").read_bytes() == b"1" * 1000
        assert [p.name for p in mnt.iterdir()] == ["kept.bin"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# --------------------------------------------------------------------------- security

class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.e2e
def test_a_planted_malicious_pickle_is_refused(smoke_run, tmp_path):
    run_dir = copy_run(smoke_run, tmp_path)
    marker = tmp_path / "pwned"
    with open(run_dir / "train" / "model.pt", "wb") as f:
        torch.save({"conv1.weight": _Evil(marker)}, f)  # a torch file whose unpickling runs code
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump(_Evil(marker), f)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        stages.load_model(run_dir / "train")
    with pytest.raises(pickle.UnpicklingError):
        atomic.load_tensors(tmp_path / "plain.pkl")
    assert not marker.exists()


def test_no_code_loads_pickles():
    lines = [line for p in (ROOT / "src" / "prunestudy").rglob("*.py") for line in p.read_text().splitlines()]
    assert not [l for l in lines if re.search(r"^\s*(import pickle|from pickle)|pickle\.loads?\(", l)]
    assert all("weights_only=True" in l for l in lines if "torch.load(" in l)
    assert not [l for l in lines if "allow_pickle=True" in l]  # numpy's np.load refuses pickles by default
