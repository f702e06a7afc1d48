"""A stage notebook's values are its run's (issue 31): what papermill was not given comes from the
run folder's params.json; an unknown parameter, a missing run folder or input stage stops the
notebook in its first cell with one line, and leaves no file behind (prunestudy.notebook)."""

from __future__ import annotations

import ast
import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from prunestudy import atomic, config, notebook, paths, records, stages

ROOT = Path(__file__).resolve().parents[1]
PAPERMILL = [sys.executable, "-m", "papermill"]
STAGE_FUNCTIONS = {"data": stages.run_data, "train": stages.run_train, "prune": stages.run_prune,
                   "retrain": stages.run_retrain}
# A stage function's parameters that its notebook does not offer: where its outputs go and how it
# logs (the notebook's are the run folder's and its output), and retrain's `launcher` (None: as
# the train stage ran, which the notebook always wants).
NOT_OFFERED = {"data": {"out_dir", "log"}, "train": {"out_dir", "log"}, "prune": {"out_dir", "log"},
               "retrain": {"out_dir", "log", "launcher"}}


def parameters_cell(stage: str) -> str:
    nb = nbformat.read(ROOT / "notebooks" / paths.NOTEBOOK_OF[stage], as_version=4)
    return next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))


def cell_namespace(stage: str) -> dict:
    """What a kernel holds after the parameters cell ran."""
    return {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(parameters_cell(stage)).body}


def papermill_history(stage: str, given: dict) -> tuple[list[str], dict]:
    """IPython's input history and the namespace as papermill leaves them in the first cell after
    the parameters cell: '', the parameters cell, the injected cell, the current cell."""
    injected = notebook.INJECTED + "\n" + "\n".join(f"{k} = {v!r}" for k, v in given.items())
    return ["", parameters_cell(stage), injected, "p = notebook.parameters(...)"], \
        {**cell_namespace(stage), **given}


@pytest.fixture
def smoke_folder(tmp_path) -> Path:
    """A run folder with the smoke parameters' params.json and complete (empty) data and train stages."""
    run_dir = tmp_path / "run"
    for stage in ("data", "train"):
        (run_dir / stage).mkdir(parents=True)
        (run_dir / stage / paths.marker(stage)).write_text("{}")
    atomic.write_json(run_dir / paths.PARAMS, config.load(ROOT / "params" / "smoke.yaml"))
    return run_dir


# --------------------------------------------------------------------------- the rules, without a kernel

def test_what_was_not_given_is_the_run_folders(smoke_folder, capsys):
    history, namespace = papermill_history("prune", {"run_dir": str(smoke_folder), "amount": 0.5})
    p = notebook.parameters("prune", namespace, history)
    assert p["amount"] == 0.5                                    # given
    assert p["lr"] == 0.001 and p["latency_repeats"] == 5        # retrain.lr, prune.latency_repeats of the run
    assert p["method"] == "l1_unstructured" and p["data_dir"] is None and p["model_dir"] is None
    assert set(p) == set(notebook.assigned(parameters_cell("prune")))
    assert namespace["lr"] == 0.001   # later cells see what runs
    out = capsys.readouterr().out.strip()
    assert out == f"[prune] latency_repeats = 5 and lr = 0.001 from {smoke_folder / paths.PARAMS} (not given)"


def test_given_values_win_and_nothing_is_said_when_nothing_differs(smoke_folder, capsys):
    given = {"run_dir": str(smoke_folder), **config.stage_params("prune", config.load(ROOT / "params" / "smoke.yaml"))}
    history, namespace = papermill_history("prune", {**given, "lr": 0.01})
    assert notebook.parameters("prune", namespace, history)["lr"] == 0.01
    assert capsys.readouterr().out == ""


def test_run_by_hand_the_parameters_cell_is_what_runs(smoke_folder, capsys):
    """JupyterLab (no injected cell): the cell's values, even where params.json has others; the
    current cell run twice, or a stray assignment run after the parameters cell, change nothing."""
    namespace = {**cell_namespace("prune"), "run_dir": str(smoke_folder)}
    cell = parameters_cell("prune").replace("run_dir = None", f"run_dir = {str(smoke_folder)!r}")
    for history in (["", cell, "x = 1"], ["", cell, "p = ...", "amount = 0.3", "p = ..."]):
        p = notebook.parameters("prune", dict(namespace), history)
        assert p["lr"] == 0.0001 and p["latency_repeats"] == 20
    assert capsys.readouterr().out == ""


def test_the_cells_found_in_the_history():
    params, injected = "run_dir = None\namount = 0.2", '# Parameters\namount = 0.5\nrun_dir = "r"'
    assert notebook.cells(["", params, injected, "now"]) == (params, injected)
    assert notebook.cells(["", params, "now"]) == (params, None)
    assert notebook.cells(["", params, injected, "now", params, "x = 1", "now"]) == (params, None)  # ran again
    with pytest.raises(notebook.NotebookError, match="no parameters cell"):
        notebook.cells(["", "import os", "now"])


def test_an_unknown_parameter_is_one_line_with_the_closest_name(smoke_folder):
    history, namespace = papermill_history("prune", {"run_dir": str(smoke_folder), "amout": 0.5})
    with pytest.raises(notebook.UnknownParameter) as e:
        notebook.parameters("prune", namespace, history)
    assert str(e.value).startswith("unknown parameter 'amout' for 03_prune.ipynb: did you mean 'amount'? "
                                   "(its parameters: run_dir, method, amount,")
    assert e.value._render_traceback_() == [f"UnknownParameter: {e.value}"]   # IPython shows this line only
    history, namespace = papermill_history("train", {"run_dir": str(smoke_folder), "epoch": 1, "zzz": 2})
    with pytest.raises(notebook.UnknownParameter, match=r"parameters 'epoch' \(did you mean 'epochs'\?\), 'zzz' "
                                                        r"for 02_train.ipynb"):
        notebook.parameters("train", namespace, history)


def test_a_missing_run_folder_or_input_stage_is_one_line(tmp_path):
    history, namespace = papermill_history("prune", {"run_dir": str(tmp_path / "nope")})
    with pytest.raises(notebook.MissingInput, match=r"no run folder .*nope: notebooks/01_data.ipynb"):
        notebook.parameters("prune", namespace, history)
    (tmp_path / "half" / "data").mkdir(parents=True)
    (tmp_path / "half" / "data" / paths.DATA_INFO).write_text("{}")
    history, namespace = papermill_history("retrain", {"run_dir": str(tmp_path / "half")})
    with pytest.raises(notebook.MissingInput, match=r"stage 'train' .* run notebooks/02_train.ipynb"):
        notebook.parameters("retrain", namespace, history)
    history, namespace = papermill_history("data", {"run_dir": str(tmp_path / "new")})
    assert notebook.parameters("data", namespace, history)["run_dir"] == str(tmp_path / "new")   # 01 starts one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half"]


def test_a_stage_function_refuses_a_missing_run_folder_before_its_lock(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run folder"):
        stages.run_prune(tmp_path / "nope", log=lambda m: None)
    with pytest.raises(notebook.MissingInput):
        stages.run_retrain(tmp_path / "nope", log=lambda m: None)
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("stage", [*STAGE_FUNCTIONS, "analysis"])
def test_each_notebook_offers_its_stage_functions_parameters_and_asks_for_them(stage):
    """The names a notebook knows (its parameters cell's) are its stage function's, but NOT_OFFERED;
    its first cell after the parameters cell asks notebook.parameters for its own stage."""
    names = notebook.assigned(parameters_cell(stage))
    if stage == "analysis":
        assert names == ["run_dir", "retime"]
    else:
        signature = inspect.signature(STAGE_FUNCTIONS[stage]).parameters
        assert set(names) == set(signature) - NOT_OFFERED[stage]
    nb = nbformat.read(ROOT / "notebooks" / paths.NOTEBOOK_OF[stage], as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert f'notebook.parameters("{stage}", globals())' in code[1].source


# --------------------------------------------------------------------------- papermill's command line

def papermill(notebook_name: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PAPERMILL, str(ROOT / "notebooks" / notebook_name), str(out), "-k", "prunestudy",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def copy_run(smoke_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run[0], run_dir, symlinks=False)
    return run_dir


@pytest.mark.e2e
def test_papermill_stops_on_a_mistyped_parameter_and_changes_nothing(smoke_run, tmp_path):
    run_dir = copy_run(smoke_run, tmp_path)
    before = {p.name: p.read_bytes() for p in (run_dir / "prune").iterdir() if p.is_file()}
    proc = papermill("03_prune.ipynb", tmp_path / "out.ipynb", "-p", "run_dir", str(run_dir), "-p", "amout", "0.5")
    assert proc.returncode != 0
    assert last_line(proc.stderr).startswith("UnknownParameter: unknown parameter 'amout' for 03_prune.ipynb: "
                                             "did you mean 'amount'?"), proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in (run_dir / "prune").iterdir() if p.is_file()} == before


@pytest.mark.e2e
def test_papermill_takes_what_it_was_not_given_from_the_run_folder(smoke_run, tmp_path):
    """The smoke run's retrain.lr is 0.001 and prune.latency_repeats 5; the cell says 0.0001 and 20."""
    run_dir = copy_run(smoke_run, tmp_path)
    saved = atomic.read_json(run_dir / paths.PARAMS)
    assert (saved["retrain"]["lr"], saved["prune"]["latency_repeats"]) == (0.001, 5)
    proc = papermill("03_prune.ipynb", tmp_path / "out.ipynb", "-p", "run_dir", str(run_dir), "-p", "amount", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    params = records.read(run_dir / "prune")["params"]
    assert params["amount"] == 0.5 and params["lr"] == 0.001 and params["latency_repeats"] == 5
    out = json.dumps(nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[3].outputs)
    assert f"latency_repeats = 5 and lr = 0.001 from {run_dir / paths.PARAMS} (not given)" in out


@pytest.mark.e2e
def test_papermill_on_a_missing_run_folder_is_one_line_and_leaves_nothing(tmp_path):
    proc = papermill("03_prune.ipynb", tmp_path / "out.ipynb", "-p", "run_dir", str(tmp_path / "nope"))
    assert proc.returncode != 0
    assert last_line(proc.stderr).startswith(f"MissingInput: no run folder {tmp_path / 'nope'}: "), proc.stderr[-2000:]
    assert not (tmp_path / "nope").exists()
