"""The project's shape: notebooks, parameters and environment files stay consistent."""

import ast
import re
import tomllib
from pathlib import Path

import nbformat
import pytest
import yaml

from prunestudy import config, execute, paths

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged 'parameters'"
    return cells[0]


def _defaults(nb) -> dict:
    """The parameters cell's assignments; each value must be a literal."""
    out = {}
    for node in ast.parse(_parameters_cell(nb).source).body:
        assert isinstance(node, ast.Assign), f"only assignments in the parameters cell: {ast.dump(node)}"
        out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def test_five_stage_notebooks_and_the_grid_report():
    assert [p.name for p in NOTEBOOKS] == [*paths.NOTEBOOK_OF.values(), paths.SWEEP_NOTEBOOK]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_literal_parameters_no_outputs_and_the_project_kernel(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    _defaults(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "commit notebooks without outputs"
    assert nb.metadata.kernelspec.name == execute.KERNEL_NAME


@pytest.mark.parametrize("stage", ["data", "train", "prune", "retrain", "analysis"])
def test_notebook_defaults_match_default_params_and_accept_every_runner_parameter(stage):
    nb = nbformat.read(ROOT / "notebooks" / paths.NOTEBOOK_OF[stage], as_version=4)
    defaults = _defaults(nb)
    cfg = config.load(ROOT / "params" / "default.yaml")
    injected = execute.notebook_parameters(stage, cfg, Path("/tmp/run"))
    assert set(injected) <= set(defaults), (
        f"runner passes parameters the notebook lacks: {set(injected) - set(defaults)}")
    section = cfg.get(stage, {})
    for key, value in section.items():
        if f"{stage}.{key}" in config.RUNNER_KEYS:   # the runner's (a sweep's points), not the notebook's
            assert key not in defaults, f"{stage}.{key} is the runner's: the notebook must not take it"
            continue
        assert defaults[key] == value, f"{stage}.{key}: notebook default {defaults[key]!r} != default.yaml {value!r}"


def test_notebooks_hold_no_logic():
    """Notebooks call the package: no def/class/loops in them."""
    for path in NOTEBOOKS:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code":
                assert not re.search(r"^\s*(def|class|for|while)\s", cell.source, re.M), (path.name, cell.source)


def _names(reqs):
    return {re.split(r"[<>=!\[ ]", r.strip())[0].lower().replace("_", "-") for r in reqs}


def test_environment_yml_names_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = _names(project["dependencies"]) | _names(project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip = set(), []
    for d in env["dependencies"]:
        if isinstance(d, dict):
            pip += [p for p in d["pip"] if not p.startswith("-e")]
        else:
            conda.add(d)
    env_names = (_names(conda) | _names(pip)) - {"python", "pip"}
    assert env_names == deps
    pinned = {p for p in project["dependencies"] if "==" in p}
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= pinned  # the builds this machine holds on disk
    assert pinned == set(pip)  # every pin is installed by pip in environment.yml too


def test_readme_documents_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make study" in text and "make test" in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_reads_every_parameter(path):
    """papermill's own parser sees exactly the parameters (e.g. no '=' inside a comment)."""
    from papermill.translators import PythonTranslator

    nb = nbformat.read(path, as_version=4)
    found = [p.name for p in PythonTranslator.inspect(_parameters_cell(nb))]
    assert found == list(_defaults(nb))
