"""Notebook work is kept (issue 31): a stage computed in a notebook goes into the stage store under
its own key, the report says at once that it is out of date, and the batch run that returns the
folder to its parameters says what it replaced and where that stays; code the notebook does not
hold keys its result apart."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prunestudy import atomic, codedigest, graph, paths, records, stagestore

ROOT = Path(__file__).resolve().parents[1]
PRUNE_NB = ROOT / "notebooks" / "03_prune.ipynb"


# --------------------------------------------------------------------------- which code ran

def test_literal_assignments_are_parameters_not_code():
    assert codedigest.assigns_literals('amount = 0.5\nmethod = "channel"  # a comment\n')
    assert codedigest.assigns_literals("# Parameters\nrun_dir = None\nembedded = {'seed': 0, 'n': [1, 2]}\n")
    assert codedigest.assigns_literals("")   # an empty cell
    assert not codedigest.assigns_literals("amount = 1 / 2")
    assert not codedigest.assigns_literals("import torch")
    assert not codedigest.assigns_literals("prune.apply = lambda *a: None")
    assert not codedigest.assigns_literals("x = y = f()")
    assert not codedigest.assigns_literals("%time x = 1")


def test_only_cells_the_notebook_does_not_hold_are_foreign():
    own = codedigest.code_cells(PRUNE_NB)
    assert len(own) >= 3
    typed = "amount = 0.5"   # a parameter typed into a cell of its own
    assert codedigest.foreign_cells(PRUNE_NB, ["run_dir = None\namount = 0.2", typed, *own]) == []
    edited = own[1].replace("stages.run_prune(**p)", "stages.run_prune(**{**p, 'amount': 0.9})")
    assert edited != own[1]
    assert codedigest.foreign_cells(PRUNE_NB, [own[0], edited]) == [edited]
    patch = "from prunestudy import prune\nprune.apply = print"
    assert codedigest.foreign_cells(PRUNE_NB, [patch, *own]) == [patch]
    # what keys a result apart: the cells that ran, parameters aside
    assert codedigest.ran_digest([typed, *own]) == codedigest.ran_digest(own)
    assert codedigest.ran_digest([own[0], edited]) != codedigest.ran_digest(own[:2])


# --------------------------------------------------------------------------- kept in the store

def _stage_folder(folder: Path, stage: str = "prune", key: str = "k" * 12, by: str = "notebook") -> dict:
    folder.mkdir(parents=True)
    atomic.write_bytes(folder / "model.pt", b"weights")
    atomic.write_json(folder / paths.METRICS, {"amount": 0.5})
    return records.write(folder, stage, key, {"amount": 0.5}, {}, 0.1, by)


def test_a_stage_computed_in_the_run_folder_is_moved_into_the_store_not_lost(tmp_path):
    folder, st = tmp_path / "run" / "prune", stagestore.Store(tmp_path / ".store")
    rec = _stage_folder(folder)
    entry = stagestore.keep(folder, st, log=lambda m: None)
    assert entry == st.entry("prune", rec["key"]) and stagestore.sealed(entry)
    assert folder.is_symlink() and folder.resolve() == entry
    assert records.read(folder)["id"] == rec["id"] and records.verify(folder) is None
    assert (folder / "model.pt").read_bytes() == b"weights"
    assert stagestore.keep(folder, st) is None   # a link already: nothing to do

    # a private copy of that entry (a notebook marked it stale here) links the entry again, no duplicate
    stagestore.privatize(folder)
    records.mark_stale(folder, "prune was recomputed after it")
    assert not folder.is_symlink()
    assert stagestore.keep(folder, st) == entry and folder.resolve() == entry
    assert [p.name for p in (tmp_path / ".store" / "prune").iterdir() if not p.name.startswith(".")] == [entry.name]

    # another computation of the same key: an entry of its own beside it; its stale mark (the run
    # folder's view) is dropped, the entry's inputs are those its record names
    other = tmp_path / "other" / "prune"
    _stage_folder(other)
    records.mark_stale(other, "prune was recomputed after it")
    second = stagestore.keep(other, st)
    assert second.name.startswith(f"{rec['key']}+") and "stale" not in records.read(second)


def test_a_folder_whose_files_changed_is_not_kept(tmp_path):
    folder, st = tmp_path / "run" / "prune", stagestore.Store(tmp_path / ".store")
    _stage_folder(folder)
    (folder / "model.pt").write_bytes(b"edited by hand")
    assert stagestore.keep(folder, st) is None
    assert not folder.is_symlink() and not (tmp_path / ".store" / "prune").exists()


# --------------------------------------------------------------------------- the report says so at once

def test_the_report_and_results_are_stamped_out_of_date_at_once(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert not records.mark_outdated(run, "prune was recomputed (notebook, 12:00)")   # no report yet
    (run / paths.REPORT).write_text('<html><head><title>r</title></head>\n<body class="jp">\n<h1>Pruning study</h1>'
                                    "</body></html>")
    atomic.write_json(run / paths.RESULTS, {"prune": {"amount": 0.2}})
    assert records.mark_outdated(run, "prune was recomputed (notebook, 12:00)")
    assert records.mark_outdated(run, "retrain was recomputed (notebook, 12:05)")
    assert records.mark_outdated(run, "retrain was recomputed (notebook, 12:05)")   # each reason once
    page = (run / paths.REPORT).read_text()
    assert page.count(f'id="{records.STAMP_ID}"') == 1
    banner = page[page.index("<body"):page.index("<h1>")]   # first on the page, before the title
    assert "This report is out of date" in banner
    assert re.findall(r"<li>(.*?)</li>", banner) == ["prune was recomputed (notebook, 12:00)",
                                                     "retrain was recomputed (notebook, 12:05)"]
    assert f"prunestudy run -f {run / paths.PARAMS} --run-dir {run}" in banner
    assert atomic.read_json(run / paths.RESULTS)["outdated"] == ["prune was recomputed (notebook, 12:00)",
                                                                 "retrain was recomputed (notebook, 12:05)"]


# --------------------------------------------------------------------------- the whole flow

def _sparsity(stage_dir: Path) -> float:
    masks = atomic.load_tensors(stage_dir / paths.MASKS)
    return 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def _papermill_prune(run_dir: Path, out: Path, amount: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "papermill", str(PRUNE_NB), str(out), "-k", "prunestudy",
                           "-p", "run_dir", str(run_dir), "-p", "amount", str(amount),
                           "-y", "{lr: 0.001, latency_repeats: 5}"],   # the smoke run's other values
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunestudy.cli", "run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PRUNESTUDY_HOME": str(ROOT)})


@pytest.mark.e2e
def test_a_notebooks_stage_is_kept_named_when_replaced_and_linked_when_asked_for(smoke_run, tmp_path):
    """make study; the pruning notebook at 0.5 (its notes, the later stages stale); the batch run
    back at 0.2 links what the store holds (nothing but the analysis is computed) and says where the
    notebook's prune stays; a run at 0.5 links that prune."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run[0], run_dir, symlinks=False)   # its stages as files, its store new: tmp/.store
    store = stagestore.recorded(run_dir)
    nb = _papermill_prune(run_dir, tmp_path / "out.ipynb", 0.5)
    assert nb.returncode == 0, nb.stderr[-3000:]
    out = json.dumps(json.loads((tmp_path / "out.ipynb").read_text())["cells"])
    assert "differ from the run folder's params.json" in out and "amount = 0.5 here, 0.2 in params.json" in out
    assert "retrain, analysis were computed from the previous prune stage" in out
    rec = records.read(run_dir / "prune")
    assert rec["by"] == "notebook" and rec["params"]["amount"] == 0.5
    assert _sparsity(run_dir / "prune") == pytest.approx(0.5, abs=1e-3)
    for later in ("retrain", "analysis"):
        assert "prune was recomputed" in records.read(run_dir / later)["stale"]
    assert [s for s, _ in records.chain_problems(run_dir)] == ["retrain"]
    entry = (run_dir / "prune").resolve()
    assert (run_dir / "prune").is_symlink() and entry.parent == store / "prune" and stagestore.sealed(entry)
    cfg = atomic.read_json(run_dir / paths.PARAMS)
    cfg["prune"]["amount"] = 0.5
    assert rec["key"] == graph.chain_keys(cfg)["prune"]   # the key `prunestudy run` computes for it
    # the runner's 0.2 prune it replaced went into the store too, and the report says at once that it is old
    old = [p for p in (store / "prune").iterdir() if not p.name.startswith(".") and p != entry]
    assert [records.read(p)["params"]["amount"] for p in old] == [0.2]
    page = (run_dir / paths.REPORT).read_text()
    assert page.index(records.STAMP_ID) < page.index("Pruning study") and "prune was recomputed (notebook" in page

    back = _run("-f", "params/smoke.yaml", "--run-dir", str(run_dir))
    assert back.returncode == 0, back.stdout[-3000:] + back.stderr[-3000:]
    said = [line for line in back.stdout.splitlines() if "replaces the notebook's prune here" in line]
    assert len(said) == 1 and "amount = 0.5" in said[0] and str(entry) in said[0] and "links it" in said[0], said
    assert re.findall(r"\] (\w+): start", back.stdout) == ["analysis"], back.stdout   # prune, retrain linked
    assert back.stdout.strip().splitlines()[-1] == f"prunestudy: report {run_dir / paths.REPORT}"
    assert entry.is_dir() and records.read(entry)["params"]["amount"] == 0.5
    page = (run_dir / paths.REPORT).read_text()
    assert records.STAMP_ID not in page and "l1_unstructured at 20%" in page
    res = atomic.read_json(run_dir / paths.RESULTS)
    assert "outdated" not in res and res["prune"]["amount"] == 0.2
    assert res["retrain"]["global_sparsity"] == pytest.approx(0.2, abs=1e-4)
    assert _sparsity(run_dir / "prune") == pytest.approx(0.2, abs=1e-3)
    assert _sparsity(run_dir / "retrain") == pytest.approx(0.2, abs=1e-3)
    assert records.chain_problems(run_dir) == []

    again = _run("-f", "params/smoke.yaml", "-p", "prune.amount=0.5", "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (run_dir / "prune").resolve() == entry, again.stdout
    assert re.findall(r"\] (\w+): start", again.stdout) == ["retrain", "analysis"], again.stdout
    assert json.loads((run_dir / paths.RESULTS).read_text())["prune"]["amount"] == 0.5
