"""Interactive work happens in a run, not in the sources (issue 31): `prunestudy lab RUN` opens working
copies of the stage notebooks in RUN/lab/, with the run's parameters, kept as the user leaves them;
whatever JupyterLab saves under the project's notebooks/ is stripped to what git holds, so that
saving an unedited tracked notebook writes its bytes again."""

from __future__ import annotations

import ast
import copy
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

from prunestudy import atomic, browser, cli, config, lab, paths

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
        # each line's comment kept, but run_dir's, which told what None meant
        comments = [line.partition("#")[2] for line in source.splitlines()]
        assert comments[0] == " the run folder of this copy" and "None means" in tracked_source.splitlines()[0]
        assert comments[1:] == [line.partition("#")[2] for line in tracked_source.splitlines()[1:]]
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


# --------------------------------------------------------------------------- saving a tracked notebook

def as_jupyterlab_saves(content: dict) -> dict:
    """A tracked notebook's JSON as JupyterLab sends it after Run All: outputs, execution counts and
    the metadata it adds, at the notebook's level and the cells'."""
    content = copy.deepcopy(content)
    content["metadata"]["language_info"] = {"codemirror_mode": {"name": "ipython", "version": 3},
                                            "file_extension": ".py", "name": "python", "version": "3.11.7"}
    content["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    for n, cell in enumerate(content["cells"]):
        cell["metadata"].update({"trusted": True, "collapsed": False, "scrolled": True,
                                 "jupyter": {"outputs_hidden": False},
                                 "execution": {"iopub.execute_input": "2026-01-01T00:00:00.000Z"}})
        if cell["cell_type"] == "code":
            cell["execution_count"] = n
            cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["done\n"]}]
    return content


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_the_pre_save_hook_gives_back_the_tracked_bytes(name):
    on_disk = json.loads(tracked_bytes(name))
    saved = lab.as_committed(as_jupyterlab_saves(on_disk), on_disk)
    assert (nbformat.writes(nbformat.from_dict(saved)) + "\n").encode() == tracked_bytes(name)
    # a code edit is saved (its outputs are not); an upgrade to nbformat 4.5 (cell ids) is undone
    edited = as_jupyterlab_saves(on_disk)
    code = next(c for c in edited["cells"] if c["cell_type"] == "code")
    code["source"] = "x = 1  # mine\n"
    edited["nbformat_minor"] = 5
    for n, cell in enumerate(edited["cells"]):
        cell.setdefault("id", f"cell-{n}")
    saved = lab.as_committed(edited, on_disk)
    nbformat.validate(nbformat.from_dict(saved))
    assert "x = 1  # mine\n" in [c["source"] for c in saved["cells"]]
    assert saved["nbformat_minor"] == on_disk["nbformat_minor"]
    assert all(("id" in c) == (on_disk["nbformat_minor"] >= 5) for c in saved["cells"])
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in saved["cells"])


def test_a_contents_manager_with_the_hook_saves_tracked_notebooks_as_git_holds_them(project, run_dir):
    """The hook as the command line configures it (ContentsManager.pre_save_hook) in a real
    FileContentsManager: a tracked notebook saved after Run All is git's bytes; a run's lab copy
    keeps its outputs."""
    from jupyter_server.services.contents.filemanager import FileContentsManager
    from traitlets.config import Config

    hook = next(a for a in lab.command(project / "notebooks") if ".pre_save_hook=" in a)
    section, _, value = hook.removeprefix("--").partition("=")
    settings = Config({section.split(".")[0]: {section.split(".")[1]: value}})
    manager = FileContentsManager(root_dir=str(project / "notebooks"), config=settings)
    name = paths.NOTEBOOK_OF["prune"]
    model = manager.get(name)
    manager.save({"type": "notebook", "format": "json",
                  "content": as_jupyterlab_saves(json.loads(json.dumps(model["content"])))}, name)
    assert (project / "notebooks" / name).read_bytes() == tracked_bytes(name)

    lab.prepare(run_dir, config.load(run_dir / paths.PARAMS))
    runs = FileContentsManager(root_dir=str(run_dir), config=settings)
    path = f"{paths.LAB}/{name}"
    content = as_jupyterlab_saves(json.loads(json.dumps(runs.get(path)["content"])))
    runs.save({"type": "notebook", "format": "json", "content": content}, path)
    saved = nbformat.read(paths.lab_notebook(run_dir, "prune"), as_version=4)
    assert any(c.get("outputs") for c in saved.cells) and "language_info" in saved.metadata


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
def test_jupyterlab_saves_an_unedited_tracked_notebook_as_git_holds_it(project, tmp_path):
    """`prunestudy lab --source`, a tracked notebook PUT through the REST API as JupyterLab saves it
    after Run All (outputs, counts, metadata): the file is git's bytes; a code edit is saved."""
    server = Lab(["--source"], project, tmp_path / "lab.log")
    try:
        for name in (paths.NOTEBOOK_OF["prune"], paths.NOTEBOOK_OF["analysis"]):
            content = as_jupyterlab_saves(server.api("GET", f"contents/{name}")["content"])
            server.api("PUT", f"contents/{name}", {"type": "notebook", "format": "json", "content": content})
            assert (project / "notebooks" / name).read_bytes() == tracked_bytes(name), name
        name = paths.NOTEBOOK_OF["train"]
        content = as_jupyterlab_saves(server.api("GET", f"contents/{name}")["content"])
        content["cells"][-1]["source"] += "\nprint('edited on purpose')"
        server.api("PUT", f"contents/{name}", {"type": "notebook", "format": "json", "content": content})
    finally:
        server.close()
    saved = nbformat.read(project / "notebooks" / name, as_version=4)
    assert saved.cells[-1].source.endswith("print('edited on purpose')")
    assert all(not c.get("outputs") for c in saved.cells) and "language_info" in saved.metadata
    assert saved.metadata == json.loads(tracked_bytes(name))["metadata"]
    assert "Pre-save hook" not in (tmp_path / "lab.log").read_text()   # the hook ran without an error


@pytest.mark.e2e
def test_prunestudy_lab_serves_the_run_folder_and_its_working_copies(project, run_dir, tmp_path):
    server = Lab([str(run_dir)], project, tmp_path / "lab.log")
    try:
        listed = sorted(e["name"] for e in server.api("GET", f"contents/{paths.LAB}")["content"])
        top = {e["name"] for e in server.api("GET", "contents")["content"]}
        name = f"{paths.LAB}/{paths.NOTEBOOK_OF['train']}"
        content = server.api("GET", f"contents/{name}")["content"]
        opener = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                                                  {"redirect_request": lambda *a, **k: None}))
        with pytest.raises(urllib.error.HTTPError) as redirect:
            opener.open(f"{server.url}/?token={server.token}", timeout=30)
        saved = as_jupyterlab_saves(content)
        server.api("PUT", f"contents/{name}", {"type": "notebook", "format": "json", "content": saved})
    finally:
        server.close()
    log = (tmp_path / "lab.log").read_text()
    assert listed == sorted(paths.NOTEBOOK_OF.values()) and {paths.PARAMS, paths.LAB} <= top
    assert redirect.value.headers["Location"].split("?")[0].endswith(f"/lab/tree/{paths.LAB}")
    values, _ = parameters(paths.lab_notebook(run_dir, "train"))
    assert values["lr"] == 0.001 and values["run_dir"] == str(run_dir)
    assert any(c.get("outputs") for c in nbformat.read(paths.lab_notebook(run_dir, "train"), as_version=4).cells)
    assert f"JupyterLab on the run folder {run_dir}" in log and "tracked notebooks/ are not touched" in log
    assert f"prunestudy run -f {run_dir / paths.PARAMS}" in log
    assert all(tracked_bytes(p.name) == p.read_bytes() for p in (project / "notebooks").glob("*.ipynb"))


@pytest.mark.e2e
@pytest.mark.skipif(browser.chromium_path() is None, reason="no Chromium: `make setup` installs it (as root)")
def test_a_tracked_notebook_run_and_saved_in_jupyterlabs_ui_stays_gits(project, tmp_path):
    """The issue as a user meets it: `prunestudy lab --source`, a tracked notebook opened in headless
    Chromium, a cell run (an execution count, language_info from the kernel), Ctrl+S: git's bytes."""
    from playwright.sync_api import sync_playwright

    name = paths.NOTEBOOK_OF["prune"]
    server = Lab(["--source"], project, tmp_path / "lab.log")
    try:
        with sync_playwright() as p:
            chrome = p.chromium.launch(executable_path=browser.chromium_path(), args=["--no-sandbox", "--disable-gpu"])
            page = chrome.new_page(viewport={"width": 1366, "height": 900})
            page.goto(f"{server.url}/lab/tree/{name}?token={server.token}")
            page.wait_for_selector("text=Python (prunestudy) | Idle", timeout=120_000)
            page.locator(".jp-CodeCell .jp-InputArea-editor").first.click()
            page.keyboard.press("Shift+Enter")   # the parameters cell: no file is read
            page.wait_for_selector(".jp-CodeCell .jp-InputPrompt:has-text('[1]')", timeout=60_000)
            page.keyboard.press("Escape")
            page.keyboard.press("Control+s")
            deadline = time.time() + 30
            while time.time() < deadline and page.locator(".jp-mod-dirty").count():   # saved: clean
                time.sleep(0.5)
            time.sleep(2)
            chrome.close()
    finally:
        server.close()
    assert "Saving file at /" + name in (tmp_path / "lab.log").read_text()
    assert (project / "notebooks" / name).read_bytes() == tracked_bytes(name)


def _started(out: str) -> list[str]:
    import re

    return re.findall(r"\] (\w+): start", out)


def _run(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunestudy.cli", "run", *args], cwd=project, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PRUNESTUDY_HOME": str(project)})


@pytest.mark.e2e
@pytest.mark.skipif(browser.chromium_path() is None, reason="no Chromium: `make setup` installs it (as root)")
def test_an_afternoon_in_jupyterlab_loses_nothing_dirties_nothing_and_shows_nothing_stale(project, smoke_run,
                                                                                            tmp_path):
    """Issue 31's flow as a user meets it: `prunestudy lab RUN` on a finished run; in Chromium the
    pruning notebook opened from the lab's file browser, `amount = 0.5` typed into its parameters
    cell, Run > Run All Cells, Ctrl+S. The tracked notebooks keep their bytes, the cells ran without
    an error in the project's kernel, and the report is stamped out of date at once. The batch run
    afterwards names the notebook's prune as it replaces it, keeps it and links what the store holds;
    a run with the notebook's amount links that prune without computing it."""
    from playwright.sync_api import sync_playwright

    from prunestudy import records, stagestore

    shutil.copy(ROOT / "requirements.lock", project)   # the smoke run's code digests
    shutil.copy(ROOT / "params" / "seed_report.yaml", project / "params")   # the report reads it
    run = project / "runs" / "default"
    shutil.copytree(smoke_run[0], run, symlinks=False)   # its stages as files; its store: runs/.store, new
    before = {p.name: p.read_bytes() for p in (project / "notebooks").glob("*.ipynb")}
    server = Lab([str(run)], project, tmp_path / "lab.log")
    copy = paths.lab_notebook(run, "prune")
    _, source = parameters(copy)
    assert "amount = 0.2" in source
    try:
        with sync_playwright() as p:
            chrome = p.chromium.launch(executable_path=browser.chromium_path(), args=["--no-sandbox", "--disable-gpu"])
            page = chrome.new_page(viewport={"width": 1366, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{server.url}/lab/tree/{paths.LAB}?token={server.token}")   # where `prunestudy lab` opens
            try:
                page.locator(".jp-DirListing-item", has_text=copy.name).dblclick(timeout=120_000)
            except Exception:
                page.screenshot(path=str(tmp_path / "lab-start.png"), full_page=True)
                raise
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            page.wait_for_selector("text=Python (prunestudy) | Idle", timeout=120_000)
            page.locator(".jp-CodeCell .cm-content").first.click()   # the parameters cell
            page.keyboard.press("Control+a")
            page.keyboard.insert_text(source.replace("amount = 0.2", "amount = 0.5"))
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_text("Run All Cells", exact=True).click()
            time.sleep(3)
            deadline = time.time() + 300
            while time.time() < deadline and (page.locator(".jp-InputPrompt:has-text('[*]')").count()
                                              or not page.locator("text=Python (prunestudy) | Idle").count()):
                time.sleep(1)
            page.keyboard.press("Control+s")
            deadline = time.time() + 30
            while time.time() < deadline and page.locator(".jp-mod-dirty").count():
                time.sleep(0.5)
            prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
            errors += page.locator("[data-mime-type='application/vnd.jupyter.error']").all_inner_texts()
            images = page.eval_on_selector_all(".jp-RenderedImage img",
                                               "els => els.map(e => e.complete && e.naturalWidth > 100)")
            news = page.locator("text=official Jupyter news").count()
            page.screenshot(path=str(tmp_path / "lab.png"), full_page=True)
            chrome.close()
    finally:
        server.close()
    assert errors == [], errors
    assert prompts and all(p.strip().startswith("[") and "*" not in p and p.strip() != "[ ]:" for p in prompts), prompts
    assert len(images) >= 1 and all(images) and news == 0
    assert f"Saving file at /{paths.LAB}/{copy.name}" in (tmp_path / "lab.log").read_text()
    assert {p.name: p.read_bytes() for p in (project / "notebooks").glob("*.ipynb")} == before   # git's bytes
    assert parameters(copy)[0]["amount"] == 0.5   # the user's copy, saved with its outputs
    assert any(c.get("outputs") for c in nbformat.read(copy, as_version=4).cells)

    rec = records.read(run / "prune")   # computed into the stage store under its key
    entry = (run / "prune").resolve()
    assert rec["by"] == "notebook" and rec["params"]["amount"] == 0.5 and stagestore.sealed(entry)
    page = (run / paths.REPORT).read_text()   # the report says at once that it is out of date
    assert page.index(records.STAMP_ID) < page.index("Pruning study") and "prune was recomputed (notebook" in page

    back = _run(project, "-f", str(run / paths.PARAMS), "--run-dir", str(run))
    assert back.returncode == 0, back.stdout[-3000:] + back.stderr[-3000:]
    said = [line for line in back.stdout.splitlines() if "replaces the notebook's prune here" in line]
    assert len(said) == 1 and "amount = 0.5" in said[0] and str(entry) in said[0], back.stdout
    assert _started(back.stdout) == ["analysis"], back.stdout   # prune and retrain linked from the store
    assert back.stdout.strip().splitlines()[-1] == f"prunestudy: report {run / paths.REPORT}"
    assert records.STAMP_ID not in (run / paths.REPORT).read_text() and records.read(entry)["params"]["amount"] == 0.5

    again = _run(project, "-f", str(run / paths.PARAMS), "-p", "prune.amount=0.5", "--run-dir", str(run))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (run / "prune").resolve() == entry and _started(again.stdout) == ["retrain", "analysis"], again.stdout
