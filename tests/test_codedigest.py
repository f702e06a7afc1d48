"""What a stage key's code digest covers (prunestudy.codedigest, graph.code_files): the code a stage
reaches, its notebook's code cells and the lock file; an edit there changes it, an edit elsewhere,
formatting, comments and a move of code the stage never reaches do not. Each edit is made in a
temporary copy of the package and its notebooks."""

import ast
import json
import shutil
from pathlib import Path

import pytest

from prunestudy import codedigest, graph, paths

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "prunestudy"


def digests(project: Path, cache: Path | None = None) -> dict[str, dict[str, str]]:
    """{stage: {file: digest}} of every kind of stage, for the package copy in project/src (parsed
    files' summaries cached in project/.summaries: an edited file is parsed again)."""
    index = codedigest.Index(project / "src" / "prunestudy", cache or project / ".summaries")
    return {name: codedigest.files(s.code, project, paths.NOTEBOOK_OF.get(name), s.follow_notebook, s.files,
                                   index=index)
            for name, s in graph.STAGES.items()}


def changed(before: dict, after: dict) -> set[str]:
    return {s for s in before if codedigest.combined(before[s]) != codedigest.combined(after[s])}


@pytest.fixture
def project(tmp_path) -> Path:
    shutil.copytree(PKG, tmp_path / "src" / "prunestudy", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    shutil.copy(ROOT / codedigest.LOCK, tmp_path / codedigest.LOCK)
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {path.name}"
    path.write_text(text.replace(old, new))


def test_what_each_stage_is_computed_by():
    """The files of each stage's digest follow from what its entry points reach, not from a list:
    the data and the training never reach the pruning methods, only the analysis reaches the report."""
    files = {name: set(graph.code_files(name)) for name in graph.STAGES}
    methods, report, train = "src/prunestudy/methods.py", "src/prunestudy/report/summary.py", "src/prunestudy/train.py"
    assert methods not in files["data"] | files["train"] | files["control"]
    assert methods in files["prune"] and methods in files["retrain"]
    assert train in files["train"] and train not in files["data"]
    assert {s for s in files if report in files[s]} == {"analysis"}
    assert "src/prunestudy/templates/prunestudy_report/index.html.j2" in files["analysis"]
    for name, found in files.items():
        assert codedigest.LOCK in found
        assert any(f.startswith("notebooks/") for f in found) == (name in graph.CHAIN)
        assert not {f for f in found if any(f"/{m}.py" in f for m in codedigest.BOOKKEEPING)}, name


def test_an_edit_of_a_pruning_method_changes_prune_retrain_and_analysis_only(project):
    before = digests(project)
    edit(project / "src/prunestudy/methods.py", 'tprune.l1_unstructured(module, "weight", amount=amount)',
         'tprune.l1_unstructured(module, "weight", amount=amount / 2)')
    after = digests(project)
    assert changed(before, after) == {"prune", "retrain", "analysis"}
    assert {f for f in after["prune"] if after["prune"][f] != before["prune"][f]} == {"src/prunestudy/methods.py"}


def test_an_edit_of_the_report_changes_only_the_analysis(project):
    before = digests(project)
    module = project / "src/prunestudy/report/summary.py"
    tree = ast.parse(module.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "summary_table")
    lines = module.read_text().splitlines(keepends=True)
    lines.insert(fn.body[-1].lineno - 1, " " * fn.body[-1].col_offset + "_unused = 1\n")   # a statement more
    module.write_text("".join(lines))
    assert changed(before, digests(project)) == {"analysis"}


def test_an_edit_of_the_training_loop_changes_the_training_and_what_follows(project):
    before = digests(project)
    text = (project / "src/prunestudy/train.py").read_text()
    tree = ast.parse(text)
    fit = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "fit")
    lines = text.splitlines(keepends=True)
    lines.insert(fit.body[-1].lineno - 1, " " * fit.body[-1].col_offset + "_unused = 1\n")
    (project / "src/prunestudy/train.py").write_text("".join(lines))
    after = digests(project)
    assert {"train", "prune", "retrain", "control"} <= changed(before, after) and "data" not in changed(before, after)


def test_formatting_and_comments_change_nothing(project):
    before = digests(project)
    for name in ("methods.py", "train.py", "stages.py"):
        path = project / "src/prunestudy" / name
        text = path.read_text()
        text = text.replace("\n\n\ndef ", "\n\n\n# a comment\n\n\ndef ").replace(", *, ", ",  *,  ")
        path.write_text(text + "\n# the end\n")
        assert ast.dump(ast.parse(text)) == ast.dump(ast.parse(path.read_text()))   # formatting only
    assert changed(before, digests(project)) == set()


def test_a_docstring_edit_of_reached_code_recomputes(project):
    """Documented: docstrings are part of a definition's syntax tree."""
    before = digests(project)
    edit(project / "src/prunestudy/methods.py", "def _l1_unstructured(model, layers, amount, *, seed=0, "
         "example_input=None) -> None:\n", "def _l1_unstructured(model, layers, amount, *, seed=0, "
         "example_input=None) -> None:\n    \"\"\"Edited.\"\"\"\n")
    assert changed(before, digests(project)) == {"prune", "retrain", "analysis"}


def test_moving_a_helper_the_stage_never_reaches_changes_nothing_moving_reached_code_does(project):
    """The rule (docs/faults.md): the digest is of the code that runs. A definition the prune stage
    never reaches moves from a module it uses to another: no change. A function it runs moves (its
    caller now names the new module): its key changes."""
    index = codedigest.Index(project / "src/prunestudy")
    reached = index.reach([("prunestudy.stages", "run_prune")])
    module = project / "src/prunestudy/efficiency.py"
    tree = ast.parse(module.read_text())
    helper = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
                  and n.name not in reached.get("prunestudy.efficiency", {}))
    before = digests(project)
    lines = module.read_text().splitlines(keepends=True)
    start = (helper.decorator_list[0].lineno if helper.decorator_list else helper.lineno) - 1
    moved = "".join(lines[start:helper.end_lineno])
    module.write_text("".join(lines[:start] + lines[helper.end_lineno:]))
    with open(project / "src/prunestudy/compare.py", "a") as f:
        f.write("\n\n" + moved)
    after = digests(project)
    assert {s for s in ("prune", "retrain") if codedigest.combined(before[s]) != codedigest.combined(after[s])} \
        == set(), helper.name
    # a function the prune stage runs, moved to another module and called from there
    module = project / "src/prunestudy/prune.py"
    tree = ast.parse(module.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "round_amounts")
    lines = module.read_text().splitlines(keepends=True)
    moved = "".join(lines[fn.lineno - 1:fn.end_lineno])
    module.write_text("".join(lines[:fn.lineno - 1] + lines[fn.end_lineno:]))
    with open(project / "src/prunestudy/efficiency.py", "a") as f:
        f.write("\n\n" + moved)
    edit(project / "src/prunestudy/stages.py", "prune.round_amounts(", "efficiency.round_amounts(")
    moved_reached = changed(after, digests(project))
    assert "prune" in moved_reached and not {"data", "train"} & moved_reached


def test_the_notebooks_code_cells_count_not_its_parameters_cell_nor_outputs(project):
    before = digests(project)
    nb_path = project / "notebooks" / paths.NOTEBOOK_OF["prune"]
    nb = json.loads(nb_path.read_text())
    params = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    params["source"] = ["amount = 0.5\n"]
    code = next(c for c in nb["cells"] if c["cell_type"] == "code" and c is not params)
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hello\n"]}]
    code["execution_count"] = 3
    nb["metadata"]["edited"] = True
    nb_path.write_text(json.dumps(nb))
    assert changed(before, digests(project)) == set()
    code["source"] = ["# a line of code more\n", "x = 1\n", *code["source"]]
    nb_path.write_text(json.dumps(nb))
    assert changed(before, digests(project)) == {"prune"}


def test_the_lock_file_is_in_every_key(project):
    before = digests(project)
    with open(project / codedigest.LOCK, "a") as f:
        f.write("# another package version\n")
    assert changed(before, digests(project)) == set(graph.STAGES)


def test_summaries_are_cached_and_a_damaged_one_is_parsed_again(project, tmp_path):
    cache = tmp_path / "summaries"
    first = digests(project, cache)
    files = sorted(cache.glob("*.json"))
    assert files and digests(project, cache) == first
    files[0].write_text("{not json")
    files[1].write_text(json.dumps({"format": codedigest.SUMMARY_FORMAT, "name": "x"}))   # a field missing
    assert digests(project, cache) == first
    assert json.loads(files[0].read_text())["format"] == codedigest.SUMMARY_FORMAT   # replaced by a good one
