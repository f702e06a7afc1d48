"""`prunestudy compare`: finished runs side by side on one self-contained HTML page."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import HOSTILE, ROOT
from matplotlib.colors import to_rgb

from prunestudy import browser, cli, report, states

pytestmark = pytest.mark.e2e   # every test here compares finished `prunestudy run`s

STATES = {"trained": "train", "pruned": "prune", "retrained": "retrain", "dense control": "control"}


class Tables(HTMLParser):
    """Every <table> of a page as a list of rows of cell texts (entities decoded: what a reader sees)."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def table_with(page: str, header_cell: str) -> list[list[str]]:
    return next(t for t in Tables(page).tables if header_cell in t[0])


def summary_cells(page: str) -> dict[tuple[str, str], dict[str, str]]:
    """{(model state, run name): {column: cell}} from the summary table (the state cell spans its block)."""
    rows = table_with(page, report.ACC)
    header, out, state = rows[0], {}, None
    for row in rows[1:]:
        if len(row) == len(header):
            state, row = row[0], row[1:]
        out[(state, row[0])] = dict(zip(header[2:], row[1:]))
    return out


def run_compare(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRUNESTUDY_HOME": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "prunestudy.cli", "compare", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def compared(smoke_run, coco_run, tmp_path_factory):
    """The smoke run and the COCO run (hostile names) compared through the real command line."""
    out = tmp_path_factory.mktemp("compare") / "smoke-vs-coco.html"
    proc = run_compare(smoke_run[0], coco_run[0], "-o", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [smoke_run[0], coco_run[0]], out, proc


def results_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_page_shows_each_runs_numbers_from_its_results(compared):
    runs, out, proc = compared
    assert str(out) in proc.stdout
    page = out.read_text()
    cells = summary_cells(page)
    for run_dir in runs:
        res = results_of(run_dir)
        for state, key in STATES.items():
            row = cells[(state, run_dir.name)]  # the run's name as a reader sees it, hostile or not
            assert row[report.ACC] == f"{round(100 * res[key]['test_accuracy'], 2):.2f}", (run_dir.name, state)
            assert row[report.LOSS] == f"{round(res[key]['test_loss'], 4):.4f}", (run_dir.name, state)
        sp = res["retrain"]["global_sparsity"]
        assert cells[("retrained", run_dir.name)][report.SPARSITY] == f"{round(100 * sp, 2):.2f}"
        assert cells[("trained", run_dir.name)][report.SPARSITY] == "—"  # the dense model: not measured
        size = next(c for c in cells[("retrained", run_dir.name)] if "MB" in c)  # model size, from the report
        mb = res["retrain"]["efficiency"]["state_dict_bytes"] / 1e6
        assert float(cells[("retrained", run_dir.name)][size]) == pytest.approx(mb, abs=0.006)
        latency = [c for c in cells[("pruned", run_dir.name)] if "latency" in c]
        if res["prune"]["efficiency"]["latency"]:
            assert latency and all(float(cells[("pruned", run_dir.name)][c]) > 0 for c in latency)
        else:   # masked pruning, the dense computation: not timed
            assert all(cells[("pruned", run_dir.name)][c] == "—" for c in latency)
    first, second = (results_of(r)["train"]["test_accuracy"] for r in runs)
    delta = cells[("trained", runs[1].name)]["Δ test accuracy vs first run (points)"]
    assert float(delta) == pytest.approx(round(100 * second, 2) - round(100 * first, 2), abs=0.006)

    meta = {row[0]: row for row in table_with(page, "params hash")[1:]}
    for run_dir in runs:
        res = results_of(run_dir)
        row = meta[run_dir.name]
        assert res["params_hash"] in row and res["provenance"]["git_commit"][:12] in row[3]


def test_only_the_parameters_that_differ_are_listed(compared):
    runs, out, _ = compared
    rows = {row[0]: row[1:] for row in table_with(out.read_text(), "parameter")[1:]}
    params = [results_of(r)["params"] for r in runs]
    assert rows["data.root"] == [json.dumps(p["data"]["root"]) for p in params]
    assert rows["train.lr"] == [json.dumps(p["train"]["lr"]) for p in params]
    assert params[0]["prune"]["amount"] == params[1]["prune"]["amount"]
    for same in ("prune.amount", "train.epochs", "seed", "prune.method", "data.classes"):
        assert same not in rows


def test_hostile_names_are_escaped_text(compared):
    _, out, _ = compared
    page = out.read_text()
    for raw in [*HOSTILE.values(), "<img src=x onerror=alert(3)>", "<script>alert", "<img src=x"]:
        assert raw not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page          # a class name of the COCO run
    assert "&lt;img src=x onerror=alert(2)&gt;" in page             # another
    assert "run&lt;img src=x onerror=alert(3)&gt;" in page          # the run folder's name


def test_page_is_self_contained_with_one_figure_in_the_state_colours(compared):
    _, out, _ = compared
    page = out.read_text()
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert "url(" not in page and "href=" not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,")
    import matplotlib.image

    png = matplotlib.image.imread(io.BytesIO(base64.b64decode(srcs[0].split(",", 1)[1])), format="png")
    rgb = png[..., :3]
    assert png.shape[1] > 600 and png.shape[0] > 300
    for state in ("trained", "pruned", "retrained", "control"):
        colour = np.array(to_rgb(states.get(state).color))
        assert (np.abs(rgb - colour).max(axis=-1) < 0.02).sum() > 200, state  # its bars are drawn


def test_identical_parameters_said_so_and_default_output_in_cwd(smoke_run, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(smoke_run[0], copy, symlinks=False, ignore=shutil.ignore_patterns("*.pt", "*.npy", "notebooks"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compare", str(smoke_run[0]), str(copy)]) == 0
    assert "compare.html" in capsys.readouterr().out
    page = (tmp_path / "compare.html").read_text()
    assert "have identical parameters" in page and results_of(copy)["params_hash"] in page
    assert not any("parameter" in t[0] for t in Tables(page).tables)
    cells = summary_cells(page)
    delta = "Δ test accuracy vs first run (points)"
    for state in STATES:
        assert cells[(state, "run")] == cells[(state, "copy")] | {delta: "reference"}
        assert cells[(state, "copy")][delta] == "+0.00"


def test_unfinished_folder_exits_2_naming_it_and_writes_nothing(smoke_run, tmp_path):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    out = tmp_path / "out.html"
    proc = run_compare(smoke_run[0], empty, "-o", out)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(empty) in lines[0] and "no results.json" in lines[0]
    assert "prunestudy run" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [empty] and proc.stdout == ""


@pytest.mark.parametrize("case", ["one run", "missing folder", "no data", "no trained model", "given twice",
                                  "output is a folder"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, smoke_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = str(smoke_run[0])
    bad = tmp_path / "bad"
    out = tmp_path / "out.html"
    args, expect = {
        "one run": ([run], "at least two run folders"),
        "missing folder": ([run, str(bad)], "no such folder"),
        "no data": ([run, str(bad)], "no data/data.json"),
        "no trained model": ([run, str(bad)], "no trained model"),
        "given twice": ([run, run + "/"], "given twice"),
        "output is a folder": ([run, run], "is a folder"),
    }[case]
    if case in ("no data", "no trained model"):
        bad.mkdir()
        (bad / "results.json").write_text("{}")
    if case == "no trained model":
        shutil.copytree(smoke_run[0] / "data", bad / "data", ignore=shutil.ignore_patterns("*.npy"))
    if case == "output is a folder":
        out = tmp_path / "folder"
        out.mkdir()
    before = sorted(tmp_path.rglob("*"))
    assert cli.main(["compare", *args, "-o", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], captured.err
    if case not in ("one run", "given twice", "output is a folder"):
        assert str(bad) in lines[0] and "prunestudy run" in lines[0]
    assert sorted(tmp_path.rglob("*")) == before and captured.out == ""


@pytest.mark.skipif(browser.chromium_path() is None,
                    reason="no Chromium on this machine: `make setup` installs Debian's chromium package (as root)")
def test_page_opens_cleanly_offline_in_a_browser(compared):
    _, out, _ = compared
    found = browser.inspect(out, first_screen="table")
    assert found["console_errors"] == [] and found["page_errors"] == [] and found["dialogs"] == []
    assert found["failed_requests"] == [] and found["external_requests"] == []
    assert len(found["images"]) == 1 and found["broken_images"] == []
    assert found["first_screen_visible"], found["first_screen_box"]
    assert all(name in found["text"] for name in HOSTILE.values())  # readable as text
