import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COCO_SAMPLE = ROOT.parent / "shared" / "coco-sample"


@pytest.fixture(autouse=True)
def _project_home(monkeypatch):
    """The project's own places (notebooks/, runs/, data/cache) are the checkout's, whatever the cwd
    (relative paths given as parameters are taken from the cwd)."""
    monkeypatch.setenv("PRUNESTUDY_HOME", str(ROOT))


@pytest.fixture
def coco_sample() -> Path:
    if not (COCO_SAMPLE / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"real COCO sample not found at {COCO_SAMPLE} (CI provides ../shared/coco-sample)")
    return COCO_SAMPLE


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One complete `prunestudy run -f params/smoke.yaml` through the real command line, shared by
    the tests that read a finished run (they must not change it: copy it first)."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    env = {**os.environ, "PRUNESTUDY_HOME": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "prunestudy.cli", "run", "-f", "params/smoke.yaml",
                           "--run-dir", str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc


HOSTILE = {"car": "<script>alert(1)</script>", "bottle": "<img src=x onerror=alert(2)>"}


@pytest.fixture(scope="session")
def coco_run(tmp_path_factory):
    """The whole study on real COCO files (a copy of ../shared/coco-sample) with params/coco2017.yaml,
    where two categories are renamed to HTML/script and the run folder's name holds HTML too."""
    if not (COCO_SAMPLE / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"real COCO sample not found at {COCO_SAMPLE} (CI provides ../shared/coco-sample)")
    base = tmp_path_factory.mktemp("coco")
    root = base / "coco"
    shutil.copytree(COCO_SAMPLE, root, copy_function=lambda s, d: Path(d).symlink_to(s))
    for split in ("train2017", "val2017"):
        path = root / "annotations" / f"instances_{split}.json"
        d = json.loads(path.read_text())
        for c in d["categories"]:
            c["name"] = HOSTILE.get(c["name"], c["name"])
        path.unlink()
        path.write_text(json.dumps(d))
    run_dir = base / "run<img src=x onerror=alert(3)>"
    env = {**os.environ, "PRUNESTUDY_HOME": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "prunestudy.cli", "run", "-f", "params/coco2017.yaml",
                           "--run-dir", str(run_dir), "-p", f"data.root={root}", "-p", "train.epochs=1",
                           "-p", "retrain.epochs=1", "-p", "data.min_per_class=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, root, proc
