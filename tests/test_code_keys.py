"""A result is keyed on the code that made it (issue 29): in a copy of the project, an edited pruning
method recomputes pruning, retraining and the analysis and links the data and the training; the
edit reverted, the old entries are linked again; an edit of the report reruns only the analysis;
`prunestudy status` and `run --dry-run` say what would run and why, with dvc-status exit codes."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prunestudy import codedigest, config, graph, machine, paths

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e
RUN = ["-f", "params/smoke.yaml", "-p", "prune.amounts=null"]   # the smoke study without its in-run points
LARGEST = '''        w = module.weight.detach().abs().flatten()
        keep = w.new_ones(w.shape)
        keep[w.topk(round(amount * w.numel())).indices] = 0   # edited: the largest weights
        tprune.custom_from_mask(module, "weight", keep.view_as(module.weight))
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project (its package, notebooks, parameters and lock), run from its own src/."""
    proj = tmp_path_factory.mktemp("codekeys") / "project"
    shutil.copytree(ROOT / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("notebooks", "params"):
        shutil.copytree(ROOT / name, proj / name)
    for name in ("pyproject.toml", codedigest.LOCK):
        shutil.copy(ROOT / name, proj / name)
    return proj


def cli(project: Path, *args, rc: int | None = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRUNESTUDY_HOME": str(project), "PYTHONPATH": str(project / "src"), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "prunestudy.cli", *map(str, args)], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    if rc is not None:
        assert proc.returncode == rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def lines_of(out: str) -> dict[str, str]:
    """`prunestudy status` lines of the run folder's own stages, by stage."""
    found = {}
    for line in out.splitlines():
        words = line.split()
        if line.startswith("  ") and words and words[0] in paths.NOTEBOOK_OF:
            found[words[0]] = line
    return found


def replace(path: Path, old: str, new: str) -> str:
    """Edit a file; returns its text before the edit."""
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    return text


def add_statement(path: Path, function: str) -> str:
    """A statement more at the end of a function's body; returns the text before."""
    text = path.read_text()
    fn = next(n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == function)
    lines = text.splitlines(keepends=True)
    lines.insert(fn.body[-1].lineno - 1, " " * fn.body[-1].col_offset + "_edited = 1\n")
    path.write_text("".join(lines))
    return text


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / paths.RESULTS).read_text())


def test_code_edits_recompute_what_they_compute_and_status_says_why(project):
    run_dir = project.parent / "run"
    cli(project, "run", *RUN, "--run-dir", run_dir)
    first = results(run_dir)
    up = cli(project, "status", run_dir)
    assert "every stage is up to date (5)" in up.stdout, up.stdout
    old_prune = json.loads(paths.stage_record(run_dir, "prune").read_text())
    masks = (paths.stage_dir(run_dir, "prune") / paths.MASKS).read_bytes()

    # 1. a pruning method edited: prune, retrain and analysis recomputed, data and training linked
    methods = project / "src/prunestudy/methods.py"
    original = replace(methods, '        tprune.l1_unstructured(module, "weight", amount=amount)\n', LARGEST)
    stale = cli(project, "status", run_dir, rc=1)
    lines = lines_of(stale.stdout)
    assert "up to date" in lines["data"] and "up to date" in lines["train"], stale.stdout
    assert "must be computed" in lines["prune"] and "code changed: src/prunestudy/methods.py" in lines["prune"]
    assert "must be computed" in lines["retrain"] and "must be computed" in lines["analysis"]
    as_json = json.loads(cli(project, "status", run_dir, "--json", rc=1).stdout)
    prune = next(s for s in as_json["stages"] if s["stage"] == "prune")
    assert prune["state"] == "compute" and prune["code"] == ["src/prunestudy/methods.py"] and prune["params"] == []
    out = cli(project, "run", *RUN, "--run-dir", run_dir).stdout
    assert "data: up to date" in out and "train: up to date" in out, out
    assert "prune: computed with another key" in out and "code changed: src/prunestudy/methods.py" in out
    for stage in ("prune", "retrain", "analysis"):
        assert f"] {stage}: start" in out, out
    edited = results(run_dir)
    assert (paths.stage_dir(run_dir, "prune") / paths.MASKS).read_bytes() != masks   # the largest weights went
    assert edited["prune"]["test_loss"] != first["prune"]["test_loss"]
    assert edited["stage_keys"]["train"] == first["stage_keys"]["train"]
    new_prune = json.loads(paths.stage_record(run_dir, "prune").read_text())
    assert new_prune["code"]["src/prunestudy/methods.py"] != old_prune["code"]["src/prunestudy/methods.py"]
    store = run_dir.parent / paths.STORE
    assert (store / "prune" / old_prune["key"] / paths.METRICS).is_file()   # the old code's entry stays

    # 2. reverted: the old entries are linked again, nothing is computed but the (unstored) analysis
    methods.write_text(original)
    out = cli(project, "run", *RUN, "--run-dir", run_dir).stdout
    assert "prune: found in the stage store" in out and "retrain: found in the stage store" in out, out
    assert "] prune: start" not in out and "] retrain: start" not in out
    again = results(run_dir)
    for stage in ("train", "prune", "retrain"):
        assert again[stage]["test_loss"] == first[stage]["test_loss"], stage
    assert again["stage_keys"] == first["stage_keys"]

    # 3. the report's code edited: only the analysis reruns
    summary = project / "src/prunestudy/report/summary.py"
    before = add_statement(summary, "summary_table")
    lines = lines_of(cli(project, "status", run_dir, rc=1).stdout)
    assert [s for s, line in lines.items() if "up to date" not in line] == ["analysis"], lines
    assert "code changed: src/prunestudy/report/summary.py" in lines["analysis"]
    out = cli(project, "run", *RUN, "--run-dir", run_dir).stdout
    assert [s for s in paths.NOTEBOOK_OF if f"] {s}: start" in out] == ["analysis"], out
    summary.write_text(before)

    # 4. the training loop edited: the training and everything after it, not the data
    train = project / "src/prunestudy/train.py"
    before = add_statement(train, "fit")
    lines = lines_of(cli(project, "status", run_dir, rc=1).stdout)
    assert "up to date" in lines["data"] and "code changed: src/prunestudy/train.py" in lines["train"], lines
    assert all("must be computed" in lines[s] for s in ("train", "prune", "retrain", "analysis"))
    train.write_text(before)


def test_dry_run_shows_the_plan_for_other_parameters_and_a_fresh_folder(project):
    run_dir = project.parent / "dry"
    cli(project, "run", *RUN, "--run-dir", run_dir)
    saved = (run_dir / paths.PARAMS).read_text()
    plan = cli(project, "run", *RUN, "-p", "prune.amount=0.5", "--run-dir", run_dir, "--dry-run")
    lines = lines_of(plan.stdout)
    assert "up to date" in lines["data"] and "up to date" in lines["train"], plan.stdout
    assert "parameters changed: amount 0.2 -> 0.5" in lines["prune"] and "must be computed" in lines["retrain"]
    assert (run_dir / paths.PARAMS).read_text() == saved   # nothing written
    fresh = cli(project, "run", *RUN, "--run-dir", project.parent / "fresh", "--dry-run", "--store", "none")
    lines = lines_of(fresh.stdout)
    assert all("must be computed" in lines[s] and "not computed yet" in lines[s] for s in paths.NOTEBOOK_OF)
    linked = lines_of(cli(project, "run", *RUN, "--run-dir", project.parent / "fresh", "--dry-run").stdout)
    assert all("linked from the stage store" in linked[s] for s in ("data", "train", "prune", "retrain")), linked
    assert not (project.parent / "fresh").exists()
    bad = cli(project, "status", project.parent / "nowhere", rc=2)
    assert "neither a run folder" in bad.stderr


def record(folder: Path) -> dict:
    return json.loads((folder / paths.STAGE_RECORD).read_text())


def test_latency_is_keyed_on_the_machine_and_timed_again_without_recomputing_a_model(project):
    """A channel-pruned model is timed by the timing stage, keyed on the machine's description: under
    another description (here other threads) the analysis reruns and the models are timed again,
    while pruning and retraining are linked; `--force timing` times again and computes nothing else;
    the report says where and when the times were taken."""
    run_dir = project.parent / "timed"
    args = [*RUN, "-p", "prune.method=channel", "--run-dir", run_dir]
    cli(project, "run", *args, env={"OMP_NUM_THREADS": "2"})
    res = results(run_dir)
    eff, timing = res["prune"]["efficiency"], res["timing"]
    assert eff["latency_from"] is None and eff["latency"]["cpu"]["threads"] == timing["machine"]["threads"] == 2
    assert timing["machine"]["cpu"] == machine.cpu_name() and timing["machine"]["isa"] == machine.cpu_isa()
    assert res["retrain"]["efficiency"]["measured_speedup"] == eff["measured_speedup"]   # the same computation
    html = (run_dir / paths.REPORT).read_text()
    assert "timed on" in html and machine.cpu_name() in html and timing["measured"][:10] in html
    first = {s: record(paths.stage_dir(run_dir, s)) for s in ("prune", "retrain")}
    first_timing = record(paths.timing_dir(run_dir))

    out = cli(project, "run", *args, env={"OMP_NUM_THREADS": "1"}).stdout
    assert "prune: up to date" in out and "retrain: up to date" in out, out
    assert "analysis: computed with another key" in out and "machine.threads 2 -> 1" in out
    again = results(run_dir)
    assert again["timing"]["machine"]["threads"] == 1 and again["prune"]["efficiency"]["latency"]["cpu"]["threads"] == 1
    assert record(paths.timing_dir(run_dir))["key"] != first_timing["key"]
    assert all(record(paths.stage_dir(run_dir, s))["id"] == first[s]["id"] for s in first)   # not recomputed
    store = run_dir.parent / paths.STORE
    assert (store / "timing" / first_timing["key"] / paths.METRICS).is_file()   # the other machine's, kept

    timed = record(paths.timing_dir(run_dir))
    out = cli(project, "run", *args, "--force", "timing", env={"OMP_NUM_THREADS": "1"}).stdout
    assert [s for s in paths.NOTEBOOK_OF if f"] {s}: start" in out] == ["analysis"], out
    retimed = record(paths.timing_dir(run_dir))
    assert retimed["key"] == timed["key"] and retimed["id"] != timed["id"]
    assert all(record(paths.stage_dir(run_dir, s))["id"] == first[s]["id"] for s in first)


def test_the_timing_key_and_the_analysis_key_hold_the_machine(monkeypatch):
    """Another processor (faked), another instruction set or other threads: another timing key and
    another analysis key; the keys of every stage that computes a model stay."""
    cfg = config.load(ROOT / "params" / "smoke.yaml")
    keys, timing = graph.all_keys(cfg), graph.timing_key("r" * 12, 5, "auto")
    for var, value in (("cpu_name", lambda: "Another CPU"), ("cpu_isa", lambda: "avx512"),
                       ("threads", lambda: 7)):
        with monkeypatch.context() as m:
            m.setattr(machine, var, value)
            other = graph.all_keys(cfg)
            assert graph.timing_key("r" * 12, 5, "auto") != timing, var
            assert other["analysis"] != keys["analysis"], var
            assert {s: other[s] for s in other if s != "analysis"} == {s: keys[s] for s in keys if s != "analysis"}
