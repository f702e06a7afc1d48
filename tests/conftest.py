import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COCO_SAMPLE = ROOT.parent / "shared" / "coco-sample"

# `make test` runs the suite on pytest-xdist workers (--dist loadgroup): each file is a group, so a
# module's fixtures are built once, unless its tests name another group (test_sweep.py splits in
# two; the session fixtures it and others share are built once for all workers: built_once). The
# longest files go first, so that no worker is left with a long one at the end.
LONGEST_FIRST = ("test_sweep.py", "test_records.py", "test_reruns.py", "test_seeds.py", "test_bad_input.py",
                 "test_kernels.py", "test_claims.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: each file's own order kept
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.name))


@pytest.fixture(autouse=True)
def _project_home(monkeypatch):
    """The project's own places (notebooks/, runs/, data/cache) are the checkout's, whatever the cwd
    (relative paths given as parameters are taken from the cwd)."""
    monkeypatch.setenv("PRUNESTUDY_HOME", str(ROOT))


# Every Jupyter the tests start (JupyterLab, papermill's kernels, nbconvert) reads and writes these
# folders of the test run, never the developer's own: a workspace left by `make lab` with other
# notebooks open made the JupyterLab UI test run "Run All Cells" in the restored layout and fail.
HERMETIC_JUPYTER = {"JUPYTER_CONFIG_DIR": "config", "JUPYTER_DATA_DIR": "data", "JUPYTER_RUNTIME_DIR": "runtime",
                    "JUPYTERLAB_WORKSPACES_DIR": "workspaces", "JUPYTERLAB_SETTINGS_DIR": "settings"}


@pytest.fixture(scope="session", autouse=True)
def _hermetic_jupyter(tmp_path_factory):
    """JUPYTER_CONFIG_DIR, JUPYTER_DATA_DIR, JUPYTER_RUNTIME_DIR, JUPYTERLAB_WORKSPACES_DIR and
    JUPYTERLAB_SETTINGS_DIR: empty folders of this test process (subprocesses inherit them). The
    kernelspec is found all the same: it lives in the environment (sys.prefix, first on JUPYTER_PATH)."""
    base = tmp_path_factory.mktemp("jupyter")
    patch = pytest.MonkeyPatch()
    for var, name in HERMETIC_JUPYTER.items():
        (base / name).mkdir()
        patch.setenv(var, str(base / name))
    yield base
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def _crop_cache(tmp_path_factory):
    """The crop sets the tests build go to the test run's temp folder, shared by its workers, not to
    the checkout's data/cache: most of their COCO roots are temp folders, which are part of a set's
    key, so each `make test` left a dozen sets there for good (116 MB after three runs)."""
    from prunestudy import cache

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    folder = shared / "crop-cache"
    folder.mkdir(exist_ok=True)
    patch = pytest.MonkeyPatch()
    patch.setenv(cache.ENV, str(folder))
    yield folder
    patch.undo()


@pytest.fixture
def coco_sample() -> Path:
    if not (COCO_SAMPLE / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"real COCO sample not found at {COCO_SAMPLE} (CI provides ../shared/coco-sample)")
    return COCO_SAMPLE


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str):
    """A session fixture's folder, built once for the whole test run: with pytest-xdist each worker asks,
    the first builds it under a lock in the run's shared temp folder (pytest-xdist's own recipe) and the
    others wait, then reuse it. Yields (folder, box): box.result is the saved result (JSON) of the build,
    or None, and then the caller builds into folder and sets box.result, which is saved for the others."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    folder, record = shared / name, shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes, also if this worker dies
        box = types.SimpleNamespace(result=json.loads(record.read_text()) if record.is_file() else None)
        if box.result is None:
            shutil.rmtree(folder, ignore_errors=True)   # a build that failed half-way in another worker
        yield folder, box
        if not record.is_file() and box.result is not None:
            record.write_text(json.dumps(box.result))


def saved(proc: subprocess.CompletedProcess) -> dict:
    """A finished process as JSON, for built_once."""
    return {"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def completed(result: dict) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(result["args"], result["returncode"], result["stdout"], result["stderr"])


def _cli_run(args: list[str]) -> dict:
    env = {**os.environ, "PRUNESTUDY_HOME": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "prunestudy.cli", "run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return saved(proc)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One complete `prunestudy run -f params/smoke.yaml` through the real command line, shared by
    the tests that read a finished run (they must not change it: copy it first)."""
    with built_once(tmp_path_factory, "smoke") as (base, box):
        if box.result is None:
            box.result = _cli_run(["-f", "params/smoke.yaml", "--run-dir", str(base / "run")])
    return base / "run", completed(box.result)


def terminal_sigint() -> None:
    """`preexec_fn` of a child that a test Ctrl-Cs: SIGINT at its default, as a terminal's foreground
    job has it. A suite started as a background job (`make test &` in a script) runs with SIGINT
    ignored, and an ignored signal stays ignored in children (POSIX), so the child would not react
    at all; that is the launch, not the code under test."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


HOSTILE = {"car": "<script>alert(1)</script>", "bottle": "<img src=x onerror=alert(2)>"}


@pytest.fixture(scope="session")
def coco_run(tmp_path_factory):
    """The whole study on real COCO files (a copy of ../shared/coco-sample) with params/coco2017.yaml,
    where two categories are renamed to HTML/script and the run folder's name holds HTML too."""
    if not (COCO_SAMPLE / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"real COCO sample not found at {COCO_SAMPLE} (CI provides ../shared/coco-sample)")
    with built_once(tmp_path_factory, "coco") as (base, box):
        root, run_dir = base / "coco", base / "run<img src=x onerror=alert(3)>"
        if box.result is None:
            shutil.copytree(COCO_SAMPLE, root, copy_function=lambda s, d: Path(d).symlink_to(s))
            for split in ("train2017", "val2017"):
                path = root / "annotations" / f"instances_{split}.json"
                d = json.loads(path.read_text())
                for c in d["categories"]:
                    c["name"] = HOSTILE.get(c["name"], c["name"])
                path.unlink()
                path.write_text(json.dumps(d))
            box.result = _cli_run(["-f", "params/coco2017.yaml", "--run-dir", str(run_dir), "-p", f"data.root={root}",
                                   "-p", "train.epochs=1", "-p", "retrain.epochs=1", "-p", "data.min_per_class=1"])
    return run_dir, root, completed(box.result)


def curve_by_hand(run_dir: Path, methods: list[str], amounts: list[float], *, retrain: dict | None = None,
                  log=lambda m: None, **prune_kw) -> list[str]:
    """The curve's points computed with the stage functions, as the runner lays them out:
    curve/<method>-<amount>/ with its own prune/ (and retrain/, with `retrain`'s arguments), reading
    the run's data/ and train/. Returns the point names."""
    from prunestudy import paths, stages

    names = []
    for method in methods:
        for amount in amounts:
            name = paths.point_name(method, amount)
            pdir = paths.curve_point_dir(run_dir, name)
            inputs = {"data_dir": paths.stage_dir(run_dir, "data"), "model_dir": paths.stage_dir(run_dir, "train")}
            stages.run_prune(pdir, method=method, amount=amount, log=log, **inputs, **prune_kw)
            if retrain is not None:
                stages.run_retrain(pdir, log=log, **inputs, **retrain)
            names.append(name)
    return names
