"""Interactive and batch use are one study (issue 13): a stage records what it was computed from,
whoever computed it; the runner trusts a stage only if its record, its inputs and its files agree;
one writer per run folder; a run folder is never the project; `make lab` works as root."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from prunestudy import atomic, browser, cli, config, execute, graph, lab, paths, records, runlock, stages, synth

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "prunestudy.cli"]
PAPERMILL = [sys.executable, "-m", "papermill"]


def run_cli(*args, timeout=900):
    return subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def copy_run(smoke_run, tmp_path, name="run") -> Path:
    run_dir = tmp_path / name
    shutil.copytree(smoke_run[0], run_dir, symlinks=False)
    return run_dir


def started(out: str) -> list[str]:
    import re

    return re.findall(r"\] (\w+): start", out)


def sparsity_of_masks(stage_dir: Path) -> float:
    masks = atomic.load_tensors(stage_dir / paths.MASKS)
    kept = sum(int(m.sum()) for m in masks.values())
    return 1 - kept / sum(m.numel() for m in masks.values())


def prune_notebook(run_dir: Path, tmp_path: Path, amount: float) -> subprocess.CompletedProcess:
    """The pruning notebook by itself, through papermill's own command line, as the README invites."""
    return subprocess.run([*PAPERMILL, str(ROOT / "notebooks" / "03_prune.ipynb"), str(tmp_path / "out.ipynb"),
                           "-p", "run_dir", str(run_dir), "-p", "amount", str(amount),
                           "-y", "{lr: 0.001, latency_repeats: 5}",   # the smoke run's other values
                           "-k", "prunestudy", "--cwd", str(ROOT / "notebooks")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def notebook_text(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "\n".join(o.get("text", "") + json.dumps(o.get("data", {})) for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs)


# --------------------------------------------------------------------------- the stage owns its record

@pytest.mark.e2e
def test_notebook_result_is_kept_when_the_run_asks_for_it(smoke_run, tmp_path):
    """The reverse: after the notebook at 0.5, `prunestudy run -p prune.amount=0.5` keeps that prune
    stage (its key matches) and reruns retrain and analysis, which were computed from the old one.
    Before that, the analysis notebook alone shows the mixed folder on its first screen."""
    run_dir = copy_run(smoke_run, tmp_path)
    assert prune_notebook(run_dir, tmp_path, 0.5).returncode == 0
    analysis = subprocess.run([*PAPERMILL, str(ROOT / "notebooks" / "05_analysis.ipynb"), str(tmp_path / "a.ipynb"),
                               "-p", "run_dir", str(run_dir), "-k", "prunestudy"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    first = nbformat.read(tmp_path / "a.ipynb", as_version=4).cells[3].outputs  # title, summary, findings
    text = json.dumps([o.get("data", {}) for o in first])
    assert "mixes computations" in text and "retrain" in text and "prune was recomputed" in text
    proc = run_cli("run", "-f", "params/smoke.yaml", "-p", "prune.amount=0.5", "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert started(proc.stdout) == ["retrain", "analysis"], proc.stdout
    res = atomic.read_json(run_dir / "results.json")
    assert res["prune"]["amount"] == 0.5 and res["retrain"]["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert records.read(run_dir / "prune")["by"] == "notebook"   # kept, not recomputed


def test_a_stage_called_from_python_records_its_key_inputs_and_files(tmp_path):
    root = synth.ensure(tmp_path / "coco", seed=2, train_images=16, val_images=8, image_size=96)
    cfg = config.load(overrides=[f"data.root={root}", "data.min_box=8", "data.min_per_class=1", "train.epochs=1"])
    stages.run_data(tmp_path / "run", **config.stage_params("data", cfg), log=lambda m: None)
    stages.run_train(tmp_path / "run", **config.stage_params("train", cfg), log=lambda m: None)
    keys = graph.chain_keys(cfg)
    data_rec, train_rec = records.read(tmp_path / "run" / "data"), records.read(tmp_path / "run" / "train")
    assert data_rec["key"] == keys["data"] and train_rec["key"] == keys["train"]  # what the runner computes
    assert train_rec["inputs"] == {"data": {"key": data_rec["key"], "id": data_rec["id"]}}
    assert set(train_rec["outputs"]) == {"model.pt", "history.json", "metrics.json", "predictions.npy"}
    assert train_rec["by"] == "python"
    assert execute.problem(cfg, tmp_path / "run", "train", keys["train"]) is None
    (tmp_path / "run" / "train" / "model.pt").unlink()
    assert execute.problem(cfg, tmp_path / "run", "train", keys["train"]) == "output model.pt is missing"
    # a rerun of the data stage (same parameters) makes the training stale: it read the old record
    stages.run_data(tmp_path / "run", **config.stage_params("data", cfg), log=lambda m: None)
    assert "stale" in records.read(tmp_path / "run" / "train")
    assert execute.problem(cfg, tmp_path / "run", "train", keys["train"]).startswith("stale: data was recomputed")


# --------------------------------------------------------------------------- one writer per run folder

@pytest.mark.e2e
def test_second_writer_refused_and_a_killed_holder_taken_over(smoke_run, tmp_path):
    run_dir, no_sweep = tmp_path / "busy", ("-p", "prune.amounts=null")   # the smoke run's sweep points: not needed
    first = subprocess.Popen([*CLI, "run", "-f", "params/smoke.yaml", *no_sweep, "--run-dir", str(run_dir)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while runlock.holder(run_dir) is None and time.time() < deadline:
            time.sleep(0.2)
        second = run_cli("run", "-f", "params/smoke.yaml", "-p", "prune.amount=0.6", "--run-dir", str(run_dir))
        assert second.returncode == 2 and first.poll() is None   # refused at once, while the first one works
        assert f"pid {first.pid}" in second.stderr and "started" in second.stderr, second.stderr
        time.sleep(8)   # the first run is inside a stage
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert runlock.holder(run_dir) is None   # the lock died with its process
    third = run_cli("run", "-f", "params/smoke.yaml", *no_sweep, "--run-dir", str(run_dir))
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    ours, smoke = (atomic.read_json(d / "results.json") for d in (run_dir, smoke_run[0]))
    for s in ("train", "prune", "retrain"):
        assert (ours[s]["test_accuracy"], ours[s]["test_loss"]) == (smoke[s]["test_accuracy"], smoke[s]["test_loss"])


def test_a_notebook_cannot_write_into_a_folder_a_run_is_writing(tmp_path):
    with runlock.RunLock(tmp_path / "run", "prunestudy run (test)"):
        child = subprocess.run([sys.executable, "-c",
                                "from prunestudy import stages; stages.run_data(r'%s', root='nowhere')"
                                % (tmp_path / "run")], capture_output=True, text=True, timeout=120,
                               env={**os.environ, runlock.TOKEN_ENV: ""})
    assert child.returncode != 0 and "is being written by prunestudy run (test)" in child.stderr


# --------------------------------------------------------------------------- files are checked

@pytest.mark.e2e
def test_deleted_model_reruns_its_stage_and_what_follows(smoke_run, tmp_path):
    run_dir = copy_run(smoke_run, tmp_path)
    (run_dir / "train" / "model.pt").unlink()
    proc = run_cli("run", "-f", "params/smoke.yaml", "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train: output model.pt is missing: it reruns" in proc.stdout
    # the sweep points' pruning and retraining read that training too: they rerun after it
    assert started(proc.stdout) == ["train", "prune", "retrain"] + ["prune", "retrain"] * 2 + ["analysis"]
    assert (run_dir / "train" / "model.pt").is_file() and "nothing to do" not in proc.stdout


def test_a_repaired_image_is_seen_and_force_never_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESTUDY_HOME", str(tmp_path / "home"))
    root = synth.ensure(tmp_path / "coco", seed=4, train_images=16, val_images=8, image_size=96)
    kw = dict(root=str(root), min_box=8, min_per_class=1, max_bad_fraction=0.5,
              min_test_per_class=0)   # 8 val images: a class may have no test crop
    good = stages.run_data(tmp_path / "a", log=lambda m: None, **kw)
    image = sorted((root / "train2017").glob("*.jpg"))[0]
    original = image.read_bytes()
    image.write_bytes(original[: len(original) // 3])          # truncated: rejected as corrupt
    bad = stages.run_data(tmp_path / "b", log=lambda m: None, **kw)
    assert bad["cache"]["key"] != good["cache"]["key"] and bad["rejected"]["train"]["images"] == 1
    image.write_bytes(original)                                 # repaired
    logs = []
    fixed = stages.run_data(tmp_path / "c", log=logs.append, **kw)
    assert fixed["rejected"]["train"]["images"] == 0 and fixed["train_size"] == good["train_size"]
    again = stages.run_data(tmp_path / "c", log=logs.append, refresh_cache=True, **kw)
    assert any("rebuild was asked for" in m for m in logs) and again["train_size"] == good["train_size"]


def test_a_run_folder_is_never_the_project(tmp_path):
    for where in (".", str(ROOT), str(ROOT / "notebooks"), str(ROOT / "notebooks" / "run"), str(ROOT.parent)):
        assert cli.main(["run", "-f", "params/smoke.yaml", "--run-dir", where]) == 2, where
    assert not (ROOT / "notebooks" / "notebooks").exists() and not (ROOT / "notebooks" / "run").exists()


@pytest.mark.e2e
def test_a_damaged_results_json_is_rebuilt(smoke_run, tmp_path):
    run_dir = copy_run(smoke_run, tmp_path)
    text = (run_dir / "results.json").read_text()
    (run_dir / "results.json").write_text(text[: len(text) // 2])
    proc = run_cli("run", "-f", "params/smoke.yaml", "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["prune"]["amount"] == 0.2
    assert started(proc.stdout) == []


# --------------------------------------------------------------------------- JupyterLab

def test_lab_command_works_as_root_and_settings_silence_the_news():
    args = lab.command(ROOT / "notebooks", port=1234, open_browser=False)
    assert ("--allow-root" in args) == (os.geteuid() == 0)
    assert "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate" in args
    path = lab.ensure_settings()
    assert json.loads(path.read_text())["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"


@pytest.mark.e2e
@pytest.mark.skipif(browser.chromium_path() is None, reason="no Chromium: `make setup` installs it (as root)")
def test_jupyter_in_the_tests_never_reads_the_developers_own_folders(tmp_path):
    """A developer's JupyterLab leaves a workspace (notebooks open, a layout) and settings in
    ~/.jupyter; the tests' Jupyter must not see them. Here a home folder holds such a workspace and
    settings, and JupyterLab, started as the tests start it, looks only in the test run's folders."""
    from conftest import HERMETIC_JUPYTER

    home = tmp_path / "home"
    spaces = home / ".jupyter" / "lab" / "workspaces"
    spaces.mkdir(parents=True)
    (spaces / "default-37a8.jupyterlab-workspace").write_text(json.dumps(
        {"data": {"layout-restorer:data": {"main": {"current": "notebook:05_analysis.ipynb"}},
                  "notebook:03_prune.ipynb": {"data": {"path": "03_prune.ipynb", "factory": "Notebook"}}},
         "metadata": {"id": "default"}}))
    probe = ("import json; from jupyterlab.labapp import LabApp; from jupyter_core import paths as p; a = LabApp(); "
             "print(json.dumps([a.workspaces_dir, a.user_settings_dir, p.jupyter_config_dir(), p.jupyter_data_dir(), "
             "p.jupyter_runtime_dir()]))")
    seen = json.loads(subprocess.run([sys.executable, "-c", probe], env={**os.environ, "HOME": str(home)},
                                     capture_output=True, text=True, check=True, timeout=120).stdout)
    ours = {os.environ[var] for var in HERMETIC_JUPYTER}
    assert all(not Path(d).is_relative_to(home) for d in seen), seen
    assert set(seen) == ours, (seen, ours)   # each of the five is the test run's own
    assert not any(Path(seen[0]).iterdir())   # the planted workspace is not where JupyterLab looks
