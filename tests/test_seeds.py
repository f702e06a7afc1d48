"""`seeds: [..]`: the study repeated over seeds, with mean, spread and paired confidence intervals
in the report (issue 6, uncertainty), through the real command line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prunestudy import browser, config, paths, pipeline

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "prunestudy.cli"]


def run_cli(*args):
    return subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def started(stdout: str) -> list[str]:
    return re.findall(r"==> \[([^\]]+)\] (\w+): start", stdout)


CHANGES = ("-p", "seeds=[0, 1]", "-p", "prune.amount=0.5")


@pytest.fixture(scope="module")
def seeded_run(smoke_run, tmp_path_factory):
    """The finished smoke run, rerun with seeds [0, 1] and prune.amount 0.5: the data and the
    training are kept; pruning and retraining rerun, then the repeat with seed 1, then the analysis."""
    run_dir = tmp_path_factory.mktemp("seeds") / "run"
    shutil.copytree(smoke_run[0], run_dir, symlinks=False)
    trained = (run_dir / "train" / "model.pt").stat().st_mtime_ns
    proc = run_cli("run", "-f", "params/smoke.yaml", "--run-dir", str(run_dir), *CHANGES)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run_dir / "train" / "model.pt").stat().st_mtime_ns == trained
    return run_dir, proc


@pytest.mark.e2e
def test_changes_rerun_only_what_they_change_and_the_repeat(seeded_run):
    run_dir, proc = seeded_run
    # the sweep's random point does not depend on the study's amount: up to date; its l1 point at 0.5
    # is now the study's own chain (linked to it, computed once)
    assert re.findall(r"\[([^\]]+)\] (\w+): up to date", proc.stdout) == [
        ("1/5", "data"), ("2/5", "train"), ("curve random_unstructured-0.5: point 2/2", "prune"),
        ("curve random_unstructured-0.5: point 2/2", "retrain")]
    assert "[curve l1_unstructured-0.5: point 1/2]: the study's own method and amount" in proc.stdout
    # the sweep is not repeated over the seeds: the run and its report say so, and where the bands are
    assert "==> note: the curve (prune.amounts) runs on the study's seed (0) only" in proc.stdout
    assert "The curve ran on the study's seed (0) only: the repeats (seed 1) do not repeat it" in \
        (run_dir / "report.html").read_text()
    assert started(proc.stdout) == [("3/5", "prune"), ("4/5", "retrain"), ("seed 1: repeat 1/1", "train"),
                                     ("seed 1: repeat 1/1", "prune"), ("seed 1: repeat 1/1", "retrain"),
                                     ("5/5", "analysis")]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["prune"]["amount"] == 0.5 and res["retrain"]["global_sparsity"] > 0.45
    rep = run_dir / "repeats" / "seed-1"
    assert json.loads((rep / "prune" / "metrics.json").read_text())["amount"] == 0.5
    for i, name in enumerate(("train", "prune", "retrain"), 2):
        assert (rep / name / "metrics.json").is_file() and (rep / "notebooks" / f"0{i}_{name}.html").is_file()
    assert json.loads((rep / "train" / "metrics.json").read_text())["params"]["seed"] == 1
    assert json.loads((rep / "retrain" / "metrics.json").read_text())["params"]["seed"] == 1
    # the repeat trains on the run's own data files (hard links: the same bytes, not a second crop)
    for f in (run_dir / "data").glob("*.npy"):
        assert os.path.samefile(f, rep / "data" / f.name)
    assert not (rep / paths.CURVE).exists() and (run_dir / paths.CURVE).is_dir()   # the sweep runs once: the study's


@pytest.mark.e2e
def test_results_and_report_hold_the_spread_and_the_paired_intervals(seeded_run):
    from scipy import stats

    run_dir, _ = seeded_run
    res = json.loads((run_dir / "results.json").read_text())
    rep = run_dir / "repeats" / "seed-1"
    [r1] = res["repeats"]
    assert r1["seed"] == 1 and r1["dir"] == "repeats/seed-1"
    acc = {"trained": [res["train"]["test_accuracy"], json.loads((rep / "train" / "metrics.json").read_text())
                       ["test_accuracy"]],
           "pruned": [res["prune"]["test_accuracy"], json.loads((rep / "prune" / "metrics.json").read_text())
                      ["test_accuracy"]]}
    assert r1["trained"]["test_accuracy"] == acc["trained"][1]
    drop = 100 * (np.array(acc["pruned"]) - np.array(acc["trained"]))
    half = stats.t.ppf(0.975, 1) * drop.std(ddof=1) / np.sqrt(2)
    html = (run_dir / "report.html").read_text()
    assert "Is it noise?" in html and "2 seeds (0, 1)" in html
    assert f"pruned − trained: {drop.mean():+.2f} points on average over 2 seeds" in html
    if drop.std() > 0:
        assert f"[{drop.mean() - half:+.2f}, {drop.mean() + half:+.2f}]" in html
    for name in ("02_train", "03_prune", "04_retrain"):
        assert f'href="repeats/seed-1/notebooks/{name}.html"' in html
    assert (run_dir / "analysis" / "figures" / "seeds.png").stat().st_size > 0


@pytest.mark.e2e
def test_seeded_report_opens_cleanly_in_a_browser(seeded_run):
    if browser.chromium_path() is None:
        pytest.skip("no Chromium on this machine: `make setup` installs Debian's chromium package (as root)")
    run_dir, _ = seeded_run
    found = browser.inspect(run_dir / "report.html")
    assert found["console_errors"] == [] and found["page_errors"] == [] and found["failed_requests"] == []
    assert found["external_requests"] == [] and found["broken_images"] == [] and found["first_screen_visible"]
    assert "paired change" in found["text"]


@pytest.mark.e2e
def test_rerun_with_the_same_seeds_does_nothing_and_a_data_change_is_noticed(seeded_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(seeded_run[0], run_dir, symlinks=False)
    proc = run_cli("run", "-f", "params/smoke.yaml", "--run-dir", str(run_dir), *CHANGES)
    assert proc.returncode == 0 and started(proc.stdout) == [] and "nothing to do" in proc.stdout
    # the run's data changed (as when the data stage reran): the repeat's links are refreshed, and the
    # runner then reruns the repeat's stages (link_data's True is their `after_change`)
    labels = run_dir / "data" / "test_labels.npy"
    data = np.load(labels)
    labels.unlink()
    np.save(labels, data[::-1].copy())
    cfg = config.load(ROOT / "params" / "smoke.yaml", list(CHANGES[1::2]))
    assert pipeline.link_data(run_dir / "data", run_dir / "repeats" / "seed-1" / "data") is True
    assert np.array_equal(np.load(run_dir / "repeats" / "seed-1" / "data" / "test_labels.npy"), data[::-1])
    assert pipeline.link_data(run_dir / "data", run_dir / "repeats" / "seed-1" / "data") is False
    assert config.repeat_seeds(cfg) == [1]


def test_seeds_parameter_is_checked_before_any_work(tmp_path, capsys):
    from prunestudy import cli

    rd = str(tmp_path / "r")
    assert cli.main(["run", "-f", "params/smoke.yaml", "--run-dir", rd, "-p", "seeds=[0]"]) == 2
    assert "holds no seed besides seed=0" in capsys.readouterr().err
    assert cli.main(["run", "-f", "params/smoke.yaml", "--run-dir", rd, "-p", "seeds=[1, 1]"]) == 2
    assert "seeds lists a seed twice" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.e2e
def test_jobs_computes_the_chains_as_grid_points_in_parallel_then_links_them(tmp_path):
    """`--jobs 2`: the study's chain, its sweep point and its repeat are points of one stage graph,
    computed first on the local pool (prunestudy.worker), 2 stages at a time, into the store; the run links
    them all."""
    run_dir = tmp_path / "run"
    proc = run_cli("run", "-f", "params/smoke.yaml", "-p", "prune.amounts=[0.5]", "-p",
                   "prune.methods=[random_unstructured]", "-p", "seeds=[0, 1]", "--jobs", "2",
                   "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("==> --jobs 2: 3 chains (the study, 1 curve point(s), 1 repeat(s)) computed 2 stages at a time"
            in proc.stdout)
    ran = started(proc.stdout)
    pool_names = {"seed=0", "seed=1", "random_unstructured-0.5"}
    pool = [stage for where, stage in ran if where in pool_names]
    # one data stage; the sweep point trains as the study does: 2 trainings for 3 chains
    assert sorted(pool) == sorted(["data"] + ["train"] * 2 + ["prune"] * 3 + ["retrain"] * 3), proc.stdout
    assert [what for what in ran if what[0] not in pool_names] == [("5/5", "analysis")], proc.stdout
    linked = re.findall(r"\] (\w+): found in the stage store", proc.stdout)
    assert linked == ["data", "train", "prune", "retrain"] + ["prune", "retrain"] + ["train", "prune", "retrain"], \
        proc.stdout
    threads = max(1, (os.cpu_count() or 1) // 2)   # each pool stage computed with the cores shared by 2 jobs
    point = paths.curve_point_dir(run_dir, "random_unstructured-0.5")
    for folder in (run_dir, paths.repeat_dir(run_dir, 1), point):
        for stage in ("train", "prune", "retrain"):
            assert (folder / stage).is_symlink(), f"{folder / stage} is not linked into the store"
            assert json.loads((folder / stage / "metrics.json").read_text())["torch_threads"] == threads
    assert not (run_dir / paths.PARALLEL).exists()   # the pool's own folder: gone once all is stored
    res = json.loads((run_dir / "results.json").read_text())
    assert [r["seed"] for r in res["repeats"]] == [1]
    assert all(r["retrained"]["test_accuracy"] is not None for r in res["repeats"]), res["repeats"]
    assert [(e["name"], e["test_accuracy_after"] is not None) for e in res["curve"]] == [("random_unstructured-0.5",
                                                                                          True)]
    assert (run_dir / "report.html").is_file()


# --------------------------------------------------------------------------- wording (issue 32)

def test_seeds_wording_never_says_beyond_noise_for_a_t_interval_on_one_test_set():
    """The issue's case: 3 seeds, pruned − trained +2, +2, +1 crops of 93 (a Student-t interval over
    seeds that excludes 0), pooled 15 gained and 10 lost (exact p = 0.42): no "beyond noise"."""
    from prunestudy import metrics, report

    labels = np.zeros(93, dtype=int)
    pairs = {}
    for seed, (g, l) in enumerate([(5, 3), (6, 4), (4, 3)]):
        before, after = np.ones(93, dtype=int), np.ones(93, dtype=int)
        after[:g], before[g:g + l] = 0, 0
        pairs[seed] = (before, after)
    runs = [{"seed": s, "dir": f"repeats/seed-{s}", "trained": {"test_accuracy": float((b == 0).mean())},
             "pruned": {"test_accuracy": float((a == 0).mean())}} for s, (b, a) in pairs.items()]
    res = {"params": {"seed": 0}, "train": {"test_accuracy": runs[0]["trained"]["test_accuracy"]},
           "prune": {"test_accuracy": runs[0]["pruned"]["test_accuracy"]}, "repeats": runs[1:],
           "seeds_paired": [{"after": "pruned", "before": "trained", **metrics.stratified(labels, pairs),
                             "at_floor": []}]}
    row = report.paired_table(res).loc["pruned − trained"]
    assert row["95% CI low"] > 0                                   # the t-interval alone would call it a gain
    text = report.seeds_markdown(res) + " ".join(filter(None, [report.seeds.f_seeds(res)]))
    assert "beyond" not in text and "15 crop answers gained and 10 lost" in text
    assert "stratified exact McNemar p = 0.42" in text and "no significant change" in text
    caption = report.paired_styler(res).to_html()
    assert "not distinguishable from seed-to-seed noise" not in caption and "spread of training" in caption
    res["seeds_paired"][0]["at_floor"] = [1]                       # a repeat's model at the majority floor
    assert "nothing can be concluded" in report.seeds_markdown(res)
