"""Interactive work happens in a run, not in the sources (issue 31): `prunestudy lab RUN` opens working
copies of the stage notebooks in RUN/lab/, with the run's parameters, kept as the user leaves them;
whatever JupyterLab saves under the project's notebooks/ is stripped to what git holds, so that
saving an unedited tracked notebook writes its bytes again."""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

from prunestudy import atomic, cli, config, lab, paths

ROOT = Path(__file__).resolve().parents[1]
STAGES = tuple(paths.NOTEBOOK_OF)


def tracked_bytes(name: str) -> bytes:
    """A tracked notebook as git's HEAD holds it (the file itself outside a git checkout)."""
    proc = subprocess.run(["git", "show", f"HEAD:notebooks/{name}"], cwd=ROOT, capture_output=True, timeout=60)
    return proc.stdout if proc.returncode == 0 else (ROOT / "notebooks" / name).read_bytes()


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run folder as `prunestudy lab` needs it: its params.json (the smoke run's: lr 0.001)."""
    run = tmp_path / "run"
    atomic.write_json(run / paths.PARAMS, config.load(ROOT / "params" / "smoke.yaml"))
    return run


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project of its own (PRUNESTUDY_HOME): its notebooks/ are git's, its tests may save into them."""
    home = tmp_path / "home"
    (home / "params").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", home)
    (home / "notebooks").mkdir()
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        (home / "notebooks" / path.name).write_bytes(tracked_bytes(path.name))
    monkeypatch.setenv("PRUNESTUDY_HOME", str(home))
    return home


def parameters(path: Path) -> tuple[dict, str]:
    """A notebook's parameters cell: its values (each must be a literal) and its source."""
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    values = {}
    for node in ast.parse(cell.source).body:
        assert isinstance(node, ast.Assign), ast.dump(node)
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values, cell.source


def code_cells(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])]


def edit_parameter(path: Path, line: str, new: str) -> None:
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert line in cell.source
    cell.source = cell.source.replace(line, new)
    nbformat.write(nb, path)


# --------------------------------------------------------------------------- the working copies

def test_lab_copies_hold_the_runs_values_as_literals_and_the_tracked_code(run_dir):
    lines, _ = lab.prepare(run_dir, config.load(run_dir / paths.PARAMS))
    assert lines == []
    for stage in STAGES:
        copy_path = paths.lab_notebook(run_dir, stage)
        values, source = parameters(copy_path)
        tracked, tracked_source = parameters(ROOT / "notebooks" / paths.NOTEBOOK_OF[stage])
        assert list(values) == list(tracked)   # the same names, in the same order
        assert values["run_dir"] == str(run_dir)
        assert code_cells(copy_path) == code_cells(ROOT / "notebooks" / paths.NOTEBOOK_OF[stage])
        assert all(not c.get("outputs") for c in nbformat.read(copy_path, as_version=4).cells)
        # each line's comment kept
        assert [line.partition("#")[2] for line in source.splitlines()] == \
               [line.partition("#")[2] for line in tracked_source.splitlines()]
    train, _ = parameters(paths.lab_notebook(run_dir, "train"))
    prune, source = parameters(paths.lab_notebook(run_dir, "prune"))
    assert train["lr"] == 0.001 and train["epochs"] == 1   # the smoke run's, not the defaults (0.0001, 10)
    assert prune["lr"] == 0.001 and prune["latency_repeats"] == 5   # retrain.lr, prune.latency_repeats
    assert prune["data_dir"] is None and prune["model_dir"] is None   # the inputs follow run_dir
    assert "lr = 0.001  # retrain.lr, for fine-tuning between rounds" in source
    analysis, _ = parameters(paths.lab_notebook(run_dir, "analysis"))
    assert analysis == {"run_dir": str(run_dir), "retime": False}


def test_existing_lab_copies_are_kept_reported_and_reset_moves_them_aside(run_dir):
    cfg = config.load(run_dir / paths.PARAMS)
    lab.prepare(run_dir, cfg)
    prune = paths.lab_notebook(run_dir, "prune")
    edit_parameter(prune, "amount = 0.2", "amount = 0.5")
    retrain = paths.lab_notebook(run_dir, "retrain")
    nb = nbformat.read(retrain, as_version=4)
    nb.cells[-1].source += "\nprint('mine')"
    nbformat.write(nb, retrain)
    mine = {p: p.read_bytes() for p in (prune, retrain)}

    lines, applied = lab.prepare(run_dir, cfg)
    assert {p: p.read_bytes() for p in mine} == mine   # the user's work, never overwritten
    assert len(lines) == 2, lines
    assert "03_prune.ipynb" in lines[0] and "amount = 0.5 (the run: 0.2)" in lines[0]
    assert "04_retrain.ipynb" in lines[1] and "code cells differ" in lines[1]
    assert applied == {"prune.amount": 0.5}
    assert "-p prune.amount=0.5" in lab.apply_command(run_dir, applied)

    lines, _ = lab.prepare(run_dir, cfg, reset=True)
    old = sorted((paths.lab_dir(run_dir) / paths.LAB_OLD).iterdir())
    assert [p.name.split("-")[0] for p in old] == ["03_prune", "04_retrain"] and len(lines) == 2, lines
    assert {p.read_bytes() for p in old} == set(mine.values())   # moved aside, not deleted
    for stage in STAGES:
        assert paths.lab_notebook(run_dir, stage).read_bytes() == lab.lab_copy(stage, cfg, run_dir)
    assert lab.prepare(run_dir, cfg) == ([], {})


@pytest.mark.parametrize("given", ["missing", "empty", None])
def test_lab_on_no_run_folder_is_one_line_exit_2_and_creates_nothing(given, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRUNESTUDY_HOME", str(tmp_path))   # runs/default of a project without runs
    (tmp_path / "empty").mkdir()
    folder = tmp_path / given if given else tmp_path / "runs" / "default"
    for name in ("execv", "execve"):   # JupyterLab must not start
        monkeypatch.setattr(os, name, lambda *a: pytest.fail(f"JupyterLab started on {folder}"))
    before = sorted(tmp_path.rglob("*"))
    assert cli.main(["lab", *([str(folder)] if given else [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(folder) in err and "make study" in err and "prunestudy run" in err, err
    assert sorted(tmp_path.rglob("*")) == before


# --------------------------------------------------------------------------- the server, end to end

def free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


class Lab:
    """`prunestudy lab ...` started as a user starts it (its token from JUPYTER_TOKEN), in the
    test run's Jupyter folders, and its REST API."""

    def __init__(self, args: list[str], home: Path, log: Path):
        self.port, self.token = free_port(), "prunestudy-test"
        env = {**os.environ, "PRUNESTUDY_HOME": str(home), "JUPYTER_TOKEN": self.token}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "prunestudy.cli", "lab", *args, "--no-browser",
                                      "--port", str(self.port)], env=env, stdout=open(log, "w"),
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(240):
            try:
                self.api("GET", "status")
                return
            except OSError:
                assert self.proc.poll() is None, log.read_text()
                time.sleep(0.5)
        raise AssertionError(f"JupyterLab did not start: {log.read_text()}")

    def api(self, method: str, path: str, body: dict | None = None):
        request = urllib.request.Request(f"{self.url}/api/{path}", method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read() or b"null")

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)


@pytest.mark.e2e
def test_prunestudy_lab_serves_the_run_folder_and_its_working_copies(project, run_dir, tmp_path):
    server = Lab([str(run_dir)], project, tmp_path / "lab.log")
    try:
        listed = sorted(e["name"] for e in server.api("GET", f"contents/{paths.LAB}")["content"])
        top = {e["name"] for e in server.api("GET", "contents")["content"]}
        name = f"{paths.LAB}/{paths.NOTEBOOK_OF['train']}"
        content = server.api("GET", f"contents/{name}")["content"]
        assert content["cells"]
        opener = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                                                  {"redirect_request": lambda *a, **k: None}))
        with pytest.raises(urllib.error.HTTPError) as redirect:
            opener.open(f"{server.url}/?token={server.token}", timeout=30)
    finally:
        server.close()
    log = (tmp_path / "lab.log").read_text()
    assert listed == sorted(paths.NOTEBOOK_OF.values()) and {paths.PARAMS, paths.LAB} <= top
    assert redirect.value.headers["Location"].split("?")[0].endswith(f"/lab/tree/{paths.LAB}")
    values, _ = parameters(paths.lab_notebook(run_dir, "train"))
    assert values["lr"] == 0.001 and values["run_dir"] == str(run_dir)
    assert f"JupyterLab on the run folder {run_dir}" in log and "tracked notebooks/ are not touched" in log
    assert f"prunestudy run -f {run_dir / paths.PARAMS}" in log
    assert all(tracked_bytes(p.name) == p.read_bytes() for p in (project / "notebooks").glob("*.ipynb"))
