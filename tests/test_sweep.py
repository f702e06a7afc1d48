"""Study grids (issue 16): `prunestudy sweep` computes each unique stage once, on a local process
pool or a Ray cluster, retries a dead worker, reports a failing stage without stopping the rest,
and reruns only what is missing."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import built_once, completed, saved, terminal_sigint

from prunestudy import (
    browser,
    cli,
    config,
    execute,
    graph,
    grid,
    kernels,
    machine,
    metrics,
    paths,
    records,
    runlock,
    schedule,
    stagestore,
    sweep,
    worker,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "params" / "grid-small.yaml"
CLI = [sys.executable, "-m", "prunestudy.cli"]


def run_sweep(*args, timeout=1500, env=None):
    return subprocess.run([*CLI, "sweep", "-f", str(SMALL), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def accuracies(sweep_dir: Path) -> dict:
    """Every point's accuracies before and after retraining (what an uninterrupted sweep gives)."""
    table = json.loads((sweep_dir / "sweep.json").read_text())["points"]
    return {r["point"]: (r["accuracy_before"], r["accuracy_after"], r["control_accuracy"]) for r in table}


def living(group: int) -> list[str]:
    """The processes of a process group that still run (zombies waiting for init left out)."""
    ps = subprocess.run(["ps", "-o", "stat=,args=", "-g", str(group)], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if line.strip() and not line.strip().startswith("Z")]


def started(out: str) -> list[str]:
    return re.findall(r"\] (\w+): start \(\S+, key (\w+)\)", out)


# --------------------------------------------------------------------------- the grid file

def test_grid_points_share_stages_and_are_named_by_their_values():
    pts = grid.points(SMALL)
    assert len(pts) == 8 and len({p.name for p in pts}) == 8
    assert pts[0].name == "method=l1_unstructured,amount=0.5,seed=0"
    plan = grid.plan(pts)
    assert {k: len(v) for k, v in plan.items()} == {"data": 1, "train": 2, "control": 2, "prune": 8, "retrain": 8,
                                                    "analysis": 8}
    # a point's keys are those of the same study run alone: a later `prunestudy run` reuses them
    alone = config.load(ROOT / "params" / "smoke.yaml", ["prune.method=random_unstructured", "prune.amount=0.8",
                                                          "seed=1", "prune.amounts=null"])
    point = next(p for p in pts if p.values == {"prune.method": "random_unstructured", "prune.amount": 0.8, "seed": 1})
    assert graph.chain_keys(point.cfg)["train"] == graph.chain_keys(alone)["train"]


def test_every_bad_point_is_listed_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 1}\ngrid:\n  prune.amount: [0.5, 1.5, -1]\n"
                   "  prune.method: [l1_unstructured, nope]\n  trian.lr: [0.1]\n")
    with pytest.raises(config.ParamsError) as err:
        grid.points(bad)
    assert "grid key 'trian.lr' is not a parameter" in str(err.value)
    bad.write_text("grid:\n  prune.amount: [0.5, 1.5]\n  prune.method: [l1_unstructured, nope]\n")
    with pytest.raises(config.ParamsError) as err:
        grid.points(bad)
    text = str(err.value)
    assert "point prune.amount=1.5, prune.method=l1_unstructured: prune.amount must be in [0, 1)" in text
    assert "point prune.amount=0.5, prune.method=nope: prune.method must be one of" in text
    assert cli.main(["sweep", "-f", str(bad), "--sweep-dir", str(tmp_path / "s")]) == 2
    assert not (tmp_path / "s").exists()
    seeds = tmp_path / "seeds.yaml"
    seeds.write_text("seeds: [0, 1]\ngrid:\n  prune.amount: [0.5]\n")
    with pytest.raises(config.ParamsError, match=r"seeds is the one-run shorthand of a grid: .*grid: \{seed"):
        grid.points(seeds)


def test_grid_overrides_and_a_1000_point_dry_run(tmp_path, capsys):
    pts = grid.points(SMALL, ["train.epochs=2"], ["prune.amount=0.1,0.2,0.3"])
    assert len(pts) == 12 and all(p.cfg["train"]["epochs"] == 2 for p in pts)
    big = tmp_path / "big.yaml"
    amounts = [round(0.05 * i, 2) for i in range(1, 19)] + [0.91, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995]
    big.write_text("grid:\n  prune.method: [l1_unstructured, global_magnitude, random_unstructured, ln_structured]\n"
                   f"  prune.amount: {amounts}\n  seed: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n")
    assert cli.main(["sweep", "-f", str(big), "--dry-run", "--sweep-dir", str(tmp_path / "big")]) == 0
    out = capsys.readouterr().out
    assert "1000 points" in out and re.search(r"train\s+10 unique", out) and re.search(r"prune\s+1000 unique", out)
    assert re.search(r"data\s+1 unique", out)   # seeds share the data (no subset is drawn)
    assert not (tmp_path / "big").exists()      # a dry run writes nothing


def test_the_dry_run_counts_a_stale_analysis_as_to_run(tmp_path):
    """A point's analysis is done in the plan only as the sweep would skip it: a record of its key,
    not marked stale (records.recorded, the check the sweep's worker count uses too)."""
    pts = grid.points(SMALL)
    folder = paths.stage_dir(paths.point_dir(tmp_path / "grid", pts[0].name), "analysis")
    folder.mkdir(parents=True)
    records.write(folder, "analysis", graph.all_keys(pts[0].cfg)["analysis"], {}, {}, 1.0, "test")

    def analyses() -> str:
        plan = grid.dry_run_text(pts, tmp_path / "grid", tmp_path / "store")
        return re.search(r"analysis\s+8 unique,\s+(\d+) done", plan).group(1)
    assert analyses() == "1"
    assert records.mark_stale(folder, "its retraining was computed again")
    assert analyses() == "0"


def test_a_stage_that_raises_outside_its_notebook_is_a_failed_stage_not_the_end_of_the_sweep(tmp_path, monkeypatch,
                                                                                             capsys):
    """An error outside the notebook's code (papermill saving the notebook: 'Too many open files',
    a full disk, a bug) used to leave the task as an exception, which ended the local engine's
    driver with a traceback and without the other points; it is a failed stage like any other."""
    for var in (*machine.THREAD_VARS, "PRUNESTUDY_PROGRESS"):   # run_task sets the task's threads here
        monkeypatch.setenv(var, os.environ.get(var, ""))
    pts = grid.points(SMALL)[:1]
    st = stagestore.Store(tmp_path / "store")
    worker.prepare(pts, tmp_path / "grid", st)
    todo = worker.tasks(pts)
    tid = next(t for t in todo if todo[t].stage == "data")
    spec = worker.spec(todo[tid], {p.name: p for p in pts}, tmp_path / "grid", st, {}, 1)

    def save_fails(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(execute, "execute_stage", save_fails)
    r = worker.run_task(spec)
    assert r["status"] == "failed" and r["error"] == "OSError: [Errno 24] Too many open files", r
    assert r["id"] == tid and r["point"] == pts[0].name
    out = capsys.readouterr().out
    assert f"==> [{pts[0].name}] data: Traceback" in out and "in save_fails" in out
    runlock.RunLock(paths.point_dir(tmp_path / "grid", pts[0].name), "the test").release()   # not left locked


def test_a_pool_workers_warm_kernel_is_the_one_its_notebooks_run_in(tmp_path):
    """The local engine's workers start their kernel as they start (while the data stage runs
    elsewhere) and the grid report runs in one of them. A kernel is reused only while its
    kernelspec, folder and environment are those a notebook is run with (kernels.fingerprint): the
    warm-up must set what each task sets, or every worker would silently start a second kernel."""
    pts = grid.points(SMALL)
    st = stagestore.Store(tmp_path / "store")
    by_name = {p.name: p for p in pts}
    execute.ensure_kernel()
    specs = {tid: worker.spec(t, by_name, tmp_path / "grid", st, worker.task_env(), worker.task_threads("local", 2))
             for tid, t in worker.tasks(pts).items()}
    warm = worker.warm_settings(specs)
    assert warm and warm["threads"] == worker.task_threads("local", 2)
    saved = dict(os.environ)   # a worker process starts with the driver's environment; this one's is restored
    try:
        schedule.apply_env(warm["env"], warm["threads"])   # what _worker_init does before kernels.warm
        warmed = kernels.fingerprint(warm["kernel"], warm["cwd"])
        notebooks = [execute.notebooks_dir() / paths.NOTEBOOK_OF[s] for s in graph.CHAIN]
        for spec in specs.values():   # what run_task does before its notebook
            schedule.apply_env(spec["env"], spec["threads"])
            os.environ[runlock.TOKEN_ENV] = "a run lock's token"   # PRUNESTUDY_*: reset, not fingerprinted
            for nb in [*notebooks, execute.notebooks_dir() / paths.SWEEP_NOTEBOOK]:
                fp = kernels.fingerprint(execute.ensure_kernel(), kernels.notebook_cwd(nb))
                assert fp == warmed, (spec["id"], nb)
        os.environ["OMP_NUM_THREADS"] = "7"   # another environment: another kernel
        assert kernels.fingerprint(warm["kernel"], warm["cwd"]) != warmed
    finally:   # OMP_NUM_THREADS=1 left behind would make this process's later runs compute with 1 thread
        os.environ.clear()
        os.environ.update(saved)
    assert worker.warm_settings({k: {**v, "fresh_kernels": True} for k, v in specs.items()}) is None
    one = next(iter(specs))
    assert worker.warm_settings({**specs, one: {**specs[one], "threads": 5}}) is None   # tasks differ: no warm-up
    # nothing done yet: every task is to run, so every worker is started and warmed at once
    assert worker.to_run(worker.tasks(pts), tmp_path / "grid", st) == len(specs)


def _worker_gpu(barrier):
    """A task of the GPU-pinning test: it waits until every worker holds one (so each takes one),
    then says which worker ran it, with which GPUs."""
    barrier.wait(timeout=120)
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")


def test_the_local_engines_workers_take_the_gpus_in_turn():
    """On a box of several GPUs, worker i of the pool sees only GPU i mod the count (its
    CUDA_VISIBLE_DEVICES, set before its kernel starts), for every task it runs: N jobs use every
    GPU instead of all training on the first. Without GPUs nothing is set."""
    import multiprocessing

    with multiprocessing.Manager() as manager:
        for jobs, gpus, expected in ((3, ["0", "1"], ["0", "0", "1"]), (2, [], [None, None])):
            barrier = manager.Barrier(jobs)
            pool = schedule.pool(jobs, None, gpus)
            try:
                seen: dict[int, set] = {}
                for pid, dev in pool.map(_worker_gpu, [barrier] * (2 * jobs)):
                    seen.setdefault(pid, set()).add(dev)
            finally:
                pool.shutdown()
            assert len(seen) == jobs and all(len(devs) == 1 for devs in seen.values()), seen   # each keeps its GPU
            assert sorted((d for devs in seen.values() for d in devs), key=str) == expected


def test_threads_and_jobs_follow_the_cores_this_process_may_use(monkeypatch):
    """Under SLURM, taskset or a container's cpuset a process may use fewer cores than the machine
    has: the sweep's threads per job, its default --jobs, torchrun's threads per process and the
    crop workers follow its affinity, not os.cpu_count (which would oversubscribe the job)."""
    from prunestudy import crops, distributed

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert machine.usable_cpus() == crops.default_workers() == 6
    assert worker.task_threads("local", 2) == 3 and worker.task_threads("local", 8) == 1
    assert distributed._child_env(2, None)["OMP_NUM_THREADS"] == "3"
    import argparse

    parser = argparse.ArgumentParser()
    cli._add_sweep_cli(parser.add_subparsers())
    assert parser.parse_args(["sweep", "-f", "g.yaml"]).jobs == 6


def gpu_ids(gpus, pts):
    return schedule.gpu_ids(gpus, [p.cfg["train"] for p in pts])


def test_which_gpus_the_local_engine_pins(monkeypatch, tmp_path, capsys):
    pts = grid.points(SMALL)   # smoke-sized points: train.device auto
    on = [grid.Point(p.name, p.values, {**p.cfg, "train": {**p.cfg["train"], "device": "cuda"}}) for p in pts]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpu_ids("auto", on) == ["2", "3"]   # auto: what this process was given
    assert gpu_ids(None, pts) == ["2", "3"]
    cpu = [grid.Point(p.name, p.values, {**p.cfg, "train": {**p.cfg["train"], "device": "cpu"}}) for p in pts]
    assert gpu_ids("auto", cpu) == []          # nothing trains on a GPU: nothing pinned
    assert gpu_ids(" 0, 1 ", cpu) == ["0", "1"]   # asked for: pinned
    assert gpu_ids("none", on) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_ids("auto", on) == []           # given no GPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    import torch

    assert gpu_ids("auto", on) == [str(i) for i in range(torch.cuda.device_count())]
    indexed = on[:1] + [grid.Point(p.name, p.values, {**p.cfg, "train": {**p.cfg["train"], "device": "cuda:1"}})
                        for p in on[1:]]
    assert gpu_ids("auto", indexed) == []      # a point chose its device: left as it is
    with pytest.raises(ValueError, match=r"asks for train.device cuda:1: use train.device: cuda"):
        gpu_ids("0,1", indexed)
    several = [grid.Point(p.name, p.values, {**p.cfg, "train": {**p.cfg["train"], "launcher": "torchrun",
                                                                  "nproc_per_node": 2}}) for p in on]
    assert gpu_ids("auto", several) == []     # each training spans GPUs: not pinned
    with pytest.raises(ValueError, match=r"torchrun with train.nproc_per_node 2"):
        gpu_ids("0,1", several)
    on_cpu = [grid.Point(p.name, p.values, {**p.cfg, "train": {**p.cfg["train"], "device": "cpu"}}) for p in several]
    assert gpu_ids("0,1", on_cpu) == ["0", "1"]   # torchrun on the CPU (gloo): pinning is harmless
    for bad in ("0,,1", "0, 1 2", ","):
        with pytest.raises(ValueError, match="comma-separated list of GPU ids"):
            gpu_ids(bad, on)
    # the command refuses them before any work, naming the fix
    out = tmp_path / "s"
    assert cli.main(["sweep", "-f", str(SMALL), "--sweep-dir", str(out), "--gpus", "0,,1"]) == 2
    assert cli.main(["sweep", "-f", str(SMALL), "--sweep-dir", str(out), "--engine", "ray", "--gpus", "0"]) == 2
    err = capsys.readouterr().err
    assert "comma-separated list of GPU ids such as 0,1; got '0,,1'" in err and "drop --gpus" in err
    assert not out.exists()


# --------------------------------------------------------------------------- the local engine

@pytest.fixture(scope="session")
def local_sweep(tmp_path_factory):
    """The small grid on the local engine with 2 jobs, then the same command again: built once for all
    pytest-xdist workers (the tests that read it run in two groups). Tests must not change it."""
    with built_once(tmp_path_factory, "sweep") as (base, box):
        if box.result is None:
            # --gpus 0,1: the workers are pinned to two GPU ids, harmless on a CPU (checked below)
            first = run_sweep("--sweep-dir", str(base / "grid"), "--jobs", "2", "--gpus", "0,1")
            assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-3000:]
            again = run_sweep("--sweep-dir", str(base / "grid"), "--jobs", "2")
            box.result = {"first": saved(first), "again": saved(again)}
    return base, completed(box.result["first"]), completed(box.result["again"])


# the tests that run sweeps of their own on copies of its store: a second pytest-xdist group
FAULTS = pytest.mark.xdist_group("test_sweep.py: faults")


@pytest.mark.e2e
def test_each_unique_stage_runs_once_and_the_rerun_runs_nothing(local_sweep):
    base, first, again = local_sweep
    kinds = [s for s, _ in started(first.stdout)]
    assert kinds.count("train") == 2 and kinds.count("data") == 1   # not 8
    assert kinds.count("prune") == kinds.count("retrain") == kinds.count("analysis") == 8
    controls = [e for e in (base / ".store" / "control").iterdir() if e.is_dir()]
    assert len(controls) == 2 and all(records.read(e)["key"] == e.name for e in controls)
    assert "computed 1 data, 2 train, 8 prune, 8 retrain, 8 analysis" in first.stdout
    # --gpus 0,1: each worker saw one of them, the whole sweep through, and each stage recorded which
    assert "engine local (2 jobs, GPUs 0,1 in turn)" in first.stdout
    seen = {json.loads((e / paths.METRICS).read_text())["cuda_visible_devices"]
            for kind in schedule.GPU_STAGES for e in (base / ".store" / kind).iterdir() if e.is_dir()}
    assert seen == {"0", "1"}, seen
    assert again.returncode == 0 and started(again.stdout) == []
    assert "computed nothing (every stage was done)" in again.stdout
    table = json.loads((base / "grid" / "sweep.json").read_text())["points"]
    assert len(table) == 8 and all(r["finished"] and r["accuracy_after"] is not None for r in table)
    assert all(0 <= r["balanced_accuracy_after"] <= 1 for r in table)
    for r in table:   # every point has its own report, its stages linked into the store
        point = base / "grid" / "points" / r["point"]
        assert (point / "report.html").is_file() and (point / "train").is_symlink()
    assert (base / "grid" / "sweep.csv").read_text().count("\n") == 9
    flagged = 0   # each point's floor flags are its own report's (smoke-sized training: often at the floor)
    for r in table:
        res = json.loads((base / "grid" / "points" / r["point"] / "results.json").read_text())
        own = metrics.flagged(res["floor"])
        assert (r["dense_at_floor"], r["after_at_floor"]) == ("trained" in own, "retrained" in own)
        flagged += r["dense_at_floor"] or r["after_at_floor"]
    page = (base / "grid" / "sweep.html").read_text()
    assert ("Warning: majority-class floor" in page) == bool(flagged)
    # the plan of a grid with new amounts: every stage kind measured (the analyses in the points)
    plan = grid.dry_run_text(grid.points(SMALL, [], ["prune.amount=0.3"]), base / "other", base / ".store")
    assert re.search(r"prune\s+4 unique,\s+0 done", plan) and "about" in plan and "no measurement" not in plan, plan


@pytest.mark.e2e
def test_status_of_a_finished_sweep_is_every_point_and_stage_up_to_date(local_sweep):
    """`prunestudy status` on a sweep folder: one line per point and stage, exit 0 when all are done."""
    base, _, _ = local_sweep
    proc = subprocess.run([sys.executable, "-m", "prunestudy.cli", "status", str(base / "grid"), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["kind"] == "sweep" and result["stale"] == 0 and len(result["stages"]) == 8 * len(graph.CHAIN)
    assert {s["where"] for s in result["stages"]} == {f"points/{p.name}" for p in grid.points(SMALL)}


@pytest.mark.e2e
def test_a_later_run_reuses_the_sweeps_stages(local_sweep):
    base, _, _ = local_sweep
    proc = subprocess.run([*CLI, "run", "-f", "params/smoke.yaml", "-p", "prune.amounts=null", "-p",
                           "prune.method=random_unstructured", "-p", "prune.amount=0.8", "-p", "seed=1",
                           "--run-dir", str(base / "alone"), "--store", str(base / ".store")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert [s for s, _ in started(proc.stdout)] == ["analysis"], proc.stdout   # data .. retrain: linked
    # a run's `seeds` repeats and its `prune.amounts` sweep are points of the same stage graph: each
    # repeat's training, pruning and retraining is the grid point with that seed, each sweep point's
    # pruning and retraining the grid point with that method and amount; all found in the store
    proc = subprocess.run([*CLI, "run", "-f", "params/smoke.yaml", "-p", "prune.amounts=[0.5, 0.8]", "-p",
                           "prune.method=l1_unstructured", "-p", "prune.amount=0.5", "-p", "seeds=[0,1]",
                           "--run-dir", str(base / "repeats"), "--store", str(base / ".store")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert [s for s, _ in started(proc.stdout)] == ["analysis"], proc.stdout
    linked = re.findall(r"\[seed 1: repeat 1/1\] (\w+): found in the stage store", proc.stdout)
    assert linked == ["train", "prune", "retrain"], proc.stdout
    point = base / "grid" / "points" / "method=l1_unstructured,amount=0.5,seed=1"
    repeat = paths.repeat_dir(base / "repeats", 1)
    for stage in ("train", "prune", "retrain"):   # the same store entries, so the same results
        assert (repeat / stage).resolve() == (point / stage).resolve()
    assert "[curve l1_unstructured-0.5: point 1/4]: the study's own method and amount" in proc.stdout
    res = json.loads((base / "repeats" / "results.json").read_text())
    assert [e["name"] for e in res["curve"]] == ["l1_unstructured-0.5", "l1_unstructured-0.8",
                                                 "random_unstructured-0.5", "random_unstructured-0.8"]
    grid_rows = {(r["method"], r["amount"]): r for r in json.loads((base / "grid" / "sweep.json").read_text())["points"]
                 if r["seed"] == 0}
    for e in res["curve"]:
        point = base / "grid" / "points" / f"method={e['method']},amount={e['amount']},seed=0"
        for stage in ("prune", "retrain"):
            assert paths.curve_point(base / "repeats", stage, e["name"]).resolve() == (point / stage).resolve()
        assert e["test_accuracy_after"] == pytest.approx(grid_rows[(e["method"], e["amount"])]["accuracy_after"])


@pytest.mark.e2e
@pytest.mark.skipif(browser.chromium_path() is None, reason="no Chromium: `make setup` installs it (as root)")
def test_the_grid_report_opens_cleanly_offline(local_sweep):
    base, _, _ = local_sweep
    found = browser.inspect(base / "grid" / "sweep.html", first_screen="table")
    assert found["console_errors"] == [] and found["page_errors"] == [] and found["dialogs"] == []
    assert found["failed_requests"] == [] and found["external_requests"] == []
    assert len(found["images"]) >= 1 and found["broken_images"] == []
    assert "8 points" in found["text"] and "random_unstructured" in found["text"]


def seeded_store(base: Path, store: Path, stages=("data", "train", "control")) -> Path:
    """A new store holding copies of the fixture's entries of `stages` (the shared, slow part of
    the grid), so a test computes only the stages it is about."""
    for stage in stages:
        for entry in (base / ".store" / stage).iterdir():
            if entry.is_dir() and records.read(entry):
                shutil.copytree(entry, store / stage / entry.name, symlinks=True)
    return store


@FAULTS
@pytest.mark.e2e
def test_a_failing_stage_and_a_killed_worker(local_sweep, tmp_path):
    """One point's pruning raises (injected); a worker is SIGKILLed mid-stage. The killed stage is
    retried, every independent point finishes with the uninterrupted sweep's accuracies, the sweep
    exits 1 naming the failed point; the rerun computes only that point. (The grid's two points of
    seed 0 at amount 0.5, on a store that already holds their data and training: the pruning
    stages are the test.)"""
    base, _, _ = local_sweep
    store = seeded_store(base, tmp_path / "store")
    args = ["--sweep-dir", str(tmp_path / "grid"), "--store", str(store), "--jobs", "2", "-g", "seed=0",
            "-g", "prune.amount=0.5"]
    target = next(p for p in grid.points(SMALL, [], ["seed=0", "prune.amount=0.5"])
                  if p.values["prune.method"] == "random_unstructured")
    prune_key = graph.all_keys(target.cfg)["prune"]
    env = {**os.environ, "PRUNESTUDY_INJECT_FAULT": f"prune:{prune_key}"}
    proc = subprocess.Popen([*CLI, "sweep", "-f", str(SMALL), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    killed = None
    deadline = time.time() + 600
    while killed is None and time.time() < deadline and proc.poll() is None:
        for claim in (store / "retrain").glob("*.claim"):
            pid = claim.read_text().strip()
            if pid and stagestore.held(claim):
                time.sleep(1.5)   # inside the stage (a smoke-sized retraining takes about 3 s)
                os.kill(int(pid), signal.SIGKILL)
                killed = pid
                break
        time.sleep(0.5)
    out, _ = proc.communicate(timeout=1500)
    assert killed, out[-3000:]
    assert proc.returncode == 1, out[-4000:]
    assert "its worker process died; trying again" in out
    assert f"prune:{prune_key} (point {target.name}): injected fault" in out
    ours, uninterrupted = accuracies(tmp_path / "grid"), accuracies(base / "grid")
    assert len(ours) == 2 and ours[target.name][1] is None
    assert {k: v for k, v in ours.items() if k != target.name} == \
        {k: v for k, v in uninterrupted.items() if k in ours and k != target.name}
    rerun = run_sweep(*args)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-2000:]
    assert sorted(s for s, _ in started(rerun.stdout)) == ["analysis", "prune", "retrain"]
    assert accuracies(tmp_path / "grid") == {k: v for k, v in uninterrupted.items() if k in ours}


# --------------------------------------------------------------------------- Ray

@pytest.mark.e2e
def test_ray_engine_with_fake_gpus(local_sweep, tmp_path):
    """A local Ray cluster of 2 CPUs and 2 (fake) GPUs, over the whole 2 x 2 x 2 grid on an empty
    store, from the data stage (a CPU task) to the retraining (the analyses and the grid report are
    the local engine's code, tested above): 2 trainings, not 8; each GPU stage on its own
    CUDA_VISIBLE_DEVICES; never more tasks at once than resources; Ray's workers reuse their
    kernels; the same accuracies as the local engine's."""
    pytest.importorskip("ray")
    base, _, _ = local_sweep
    pts = grid.points(SMALL)
    summary = sweep.run(pts, tmp_path / "grid", engine="ray", log=lambda m: None, store_root=tmp_path / "store",
                        ray_init={"num_cpus": 2, "num_gpus": 2}, kinds=graph.CHAIN[:4])
    assert summary["failed"] == [] and summary["ran"]["data"] == 1 and summary["ran"]["train"] == 2
    assert summary["ran"]["prune"] == summary["ran"]["retrain"] == 8 and summary["ran"]["analysis"] == 0
    results = [r for r in summary["results"].values() if r["status"] == "ran"]
    starts = {}   # kernels started per worker process (a count that only grows)
    for r in results:
        starts[r["pid"]] = max(starts.get(r["pid"], 0), r["kernel_starts"])
    assert sum(starts.values()) < len(results), (starts, len(results))
    gpu = [r for r in results if r["stage"] in schedule.GPU_STAGES]
    assert gpu and all(r["cuda_visible_devices"] in ("0", "1") for r in gpu)
    for a in gpu:   # two GPU tasks that overlap in time never share a device
        for b in gpu:
            if a is not b and a["start"] < b["end"] and b["start"] < a["end"]:
                assert a["cuda_visible_devices"] != b["cuda_visible_devices"]
    events = sorted([(r["start"], 1) for r in results] + [(r["end"], -1) for r in results])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2
    cpu = [r for r in results if r["stage"] not in schedule.GPU_STAGES]
    assert [r["stage"] for r in cpu] == ["data"] and cpu[0]["cuda_visible_devices"] in (None, "")
    assert not (tmp_path / "grid" / "sweep.html").exists()   # no analysis: no grid report
    for p in pts:   # each point's stages: the local engine's accuracies and losses
        assert stage_scores(paths.point_dir(tmp_path / "grid", p.name)) == \
            stage_scores(paths.point_dir(base / "grid", p.name)), p.name


def test_ray_runs_the_final_task_in_a_worker_once_the_stages_are_done(tmp_path):
    """The grid report is Ray's last task (a worker whose kernel is warm), not a new kernel in the
    driver; a final task that fails there comes back as False, and the driver then renders the
    report itself (`sweep.run`). Ray is the loop's executor (prunestudy.schedule)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        def final(*task):
            with schedule.Ray(options=lambda *a: {}) as executor:
                return schedule.run({}, executor, lambda t: (), lambda m: None, final=task or None)
        results, out = final(platform.python_version)
        assert results == {} and out == platform.python_version()
        # the grid report of a folder that is no sweep fails in the worker: False, for the driver to retry
        _, failed = final(worker.report_task, str(tmp_path / "not-a-sweep"), False, {}, 1)
        assert failed is False
        _, raised = final(json.loads, "not json")
        assert raised is False
        _, none = final()
        assert none is None
    finally:
        ray.shutdown()


def test_ray_gives_a_training_stage_a_gpu_per_process():
    """A stage that trains on CUDA asks Ray for a GPU, or one per torchrun process (and a CPU per
    process); the data stage, the analysis and any stage on the CPU or on a cluster without GPUs ask
    for no GPU."""
    pts = grid.points(SMALL)
    todo = worker.tasks(pts)
    by_stage = {t.stage: t for t in todo.values()}
    cuda = {**pts[0].cfg, "train": {**pts[0].cfg["train"], "device": "cuda"}}
    two = {**cuda, "train": {**cuda["train"], "launcher": "torchrun", "nproc_per_node": 2}}
    for stage, task in by_stage.items():
        trains = stage in schedule.GPU_STAGES
        assert schedule.ray_options(task, cuda, gpus=True)["num_gpus"] == (1 if trains else 0), stage
        assert schedule.ray_options(task, two, gpus=True)["num_gpus"] == (2 if trains else 0), stage
        assert schedule.ray_options(task, two, gpus=False)["num_gpus"] == 0
        assert schedule.ray_options(task, cuda, gpus=True)["num_cpus"] == 1
        cpu = {**two, "train": {**two["train"], "device": "cpu"}}   # torchrun on the CPU: 2 processes
        options = schedule.ray_options(task, cpu, gpus=True)
        assert options["num_gpus"] == 0 and options["num_cpus"] == (2 if trains else 1)
        assert options["max_retries"] == schedule.RETRIES
        assert options["retry_exceptions"] is False and options["name"] == task.id


def stage_scores(point: Path) -> dict:
    """Test accuracy and loss of a point's pruned, retrained and control models, from their stages."""
    found = {}
    for name, folder in (("pruned", point / "prune"), ("retrained", point / "retrain"),
                         ("control", point / "retrain" / paths.CONTROL)):
        m = json.loads((folder / paths.METRICS).read_text())
        found[name] = (m["test_accuracy"], m["test_loss"])
    return found


# --------------------------------------------------------------------------- two sweeps at once

@FAULTS
@pytest.mark.e2e
def test_two_sweeps_over_overlapping_stages_compute_each_once(local_sweep, tmp_path):
    """Two sweeps started together on one store (1 point and 2 points, sharing one): each stage
    is computed by one of them, the other waits for it and links it."""
    base, _, _ = local_sweep
    store = seeded_store(base, tmp_path / "store")
    common = ["-g", "prune.amount=0.5", "-g", "seed=0", "--store", str(store), "--jobs", "2"]
    methods = {"a": "l1_unstructured", "b": "l1_unstructured,random_unstructured"}
    procs = [subprocess.Popen([*CLI, "sweep", "-f", str(SMALL), "--sweep-dir", str(tmp_path / name),
                               "-g", f"prune.method={methods[name]}", *common],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in ("a", "b")]
    outs = [p.communicate(timeout=1500)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    computed = [(s, k) for out in outs for s, k in re.findall(r"==> done (\w+):(\w+) ", out) if s != "analysis"]
    assert sorted(s for s, _ in computed) == ["prune", "prune", "retrain", "retrain"], outs   # l1's and random's
    assert len(set(computed)) == 4
    waited = sum(out.count("completed meanwhile by another process") for out in outs)
    assert waited == sum(1 for out in outs for s, _ in started(out) if s != "analysis") - 4   # the rest: linked
    local = accuracies(base / "grid")
    for name in ("a", "b"):
        assert all(v == local[k] for k, v in accuracies(tmp_path / name).items())


# --------------------------------------------------------------------------- Ctrl-C

@FAULTS
@pytest.mark.e2e
def test_ctrl_c_cancels_the_sweep_cleanly_and_keeps_what_finished(local_sweep, tmp_path):
    """SIGINT to the sweep's process group (a terminal's Ctrl-C) while pruning stages run: exit 130
    with the message, no claim left held, no process left behind, and the stages finished
    before it still counted as done by the next plan."""
    base, _, _ = local_sweep
    store = seeded_store(base, tmp_path / "store")
    # channel pruning, timed at length: stages that are still running when the Ctrl-C comes (masked
    # pruning is not timed, and its stages end within the 2 s below)
    args = ["--sweep-dir", str(tmp_path / "grid"), "--store", str(store), "--jobs", "2", "-g", "seed=0",
            "-g", "prune.method=channel", "-p", "prune.latency_repeats=200"]
    proc = subprocess.Popen([*CLI, "sweep", "-f", str(SMALL), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=terminal_sigint)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and \
            not any(stagestore.held(c) for c in (store / "prune").glob("*.claim")):
        time.sleep(0.3)
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted; finished stages are kept in the store" in out
    assert "Traceback" not in out, out[-3000:]
    assert not any(stagestore.held(c) for c in store.rglob("*.claim"))
    deadline = time.time() + 15
    while time.time() < deadline and living(proc.pid):
        time.sleep(0.5)
    assert living(proc.pid) == []   # no worker or kernel left running
    assert out.count(": start (") <= 2, out   # 2 jobs: no stage queued before the Ctrl-C started after it
    plan = subprocess.run([*CLI, "sweep", "-f", str(SMALL), *args, "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert re.search(r"train\s+1 unique,\s+1 done", plan.stdout), plan.stdout
    assert re.search(r"prune\s+2 unique,\s+\d done", plan.stdout), plan.stdout


@FAULTS
@pytest.mark.e2e
def test_ctrl_c_stops_the_grid_report_in_its_pool_worker(local_sweep, tmp_path):
    """The local engine renders the grid report in a pool worker: a SIGINT to the sweep while it runs
    stops it there as it stops a stage, even when only the driver got it (exit 130 with the
    message, no traceback, no new page, no process left behind). (A rerun of a copy of the finished sweep: every stage
    is done, so the report is all that runs.)"""
    base, _, _ = local_sweep
    copy = tmp_path / "copy"
    for part in ("grid", ".store"):   # relative links: the points still reach the copied store
        shutil.copytree(base / part, copy / part, symlinks=True)
    nb = copy / "grid" / "notebooks" / paths.SWEEP_NOTEBOOK
    before, page = nb.stat().st_mtime_ns, (copy / "grid" / paths.SWEEP_REPORT).stat().st_mtime_ns
    proc = subprocess.Popen([*CLI, "sweep", "-f", str(SMALL), "--sweep-dir", str(copy / "grid"), "--jobs", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=terminal_sigint)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and nb.stat().st_mtime_ns == before:
        time.sleep(0.1)   # papermill writes the notebook as it starts it
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    status = Path(f"/proc/{proc.pid}/status")   # the driver's signal state (blocked, ignored, caught), if it fails
    masks = [line for line in status.read_text().splitlines() if line.startswith("Sig")] if status.exists() else []
    os.kill(proc.pid, signal.SIGINT)   # the driver only (a terminal's Ctrl-C reaches all): it passes it on
    started_at = time.time()
    out, _ = proc.communicate(timeout=120)
    ran = json.loads(nb.read_text())["metadata"]["papermill"]   # when the report ran, against when SIGINT went
    when = (f"SIGINT sent {time.strftime('%H:%M:%S', time.gmtime(started_at))}; report notebook {ran}; driver {masks}; "
            f"this process: blocked {signal.pthread_sigmask(signal.SIG_BLOCK, [])}, "
            f"SIGINT {signal.getsignal(signal.SIGINT)}\n")
    assert proc.returncode == 130, when + out[-3000:]
    assert time.time() - started_at < 30, when + out[-3000:]   # stopped, not finished first
    assert "interrupted; finished stages are kept in the store" in out and "==> sweep report" not in out
    assert "Traceback" not in out and started(out) == [], out[-3000:]
    assert (copy / "grid" / paths.SWEEP_REPORT).stat().st_mtime_ns == page   # no new page
    counts = [c["execution_count"] for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
    assert None in counts, counts   # cut short, not run to its end first
    deadline = time.time() + 15
    while time.time() < deadline and living(proc.pid):
        time.sleep(0.5)
    assert living(proc.pid) == []   # no worker or kernel left running


# --------------------------------------------------------------------------- the grid report at scale

def test_the_grid_report_stays_readable_with_60_points():
    """72 points (3 methods x 6 amounts x 4 seeds): 18 operating rows with mean ± SD over the 4
    seeds, one solid and one dashed curve per method and panel (not one per point), a link per point."""
    import matplotlib.pyplot as plt
    from scipy import stats

    from prunestudy import report

    rng = np.random.default_rng(0)
    rows = []
    for method in ("l1_unstructured", "global_magnitude", "random_unstructured"):
        for amount in (0.2, 0.4, 0.6, 0.8, 0.9, 0.95):
            for seed in range(4):
                dense, after = 0.6 + 0.01 * rng.standard_normal(), 0.6 - amount * 0.3 + 0.01 * rng.standard_normal()
                name = f"method={method},amount={amount},seed={seed}"
                rows.append({"point": name, "method": method, "amount": amount, "seed": seed, "sparsity": amount,
                             "compression_ratio": 1 / (1 - amount), "theoretical_speedup": 1 / (1 - amount),
                             "measured_speedup": 1.0, "dense_accuracy": dense, "accuracy_before": after - 0.1,
                             "accuracy_after": after, "balanced_accuracy_after": after - 0.02,
                             "control_accuracy": dense + 0.01, "change_vs_dense": after - dense,
                             "change_vs_control": after - dense - 0.01, "finished": True,
                             "report": f"points/{name}/report.html", "prune.method": method, "prune.amount": amount,
                             "floor_share": 0.3, "floor_class": "person", "dense_at_floor": False,
                             "before_at_floor": False, "after_at_floor": False})
    table = pd.DataFrame(rows)
    ops = report.operating_points(table)
    assert len(ops) == 18 and (ops["seeds"] == 4).all()
    one = table[(table["prune.method"] == "l1_unstructured") & (table["prune.amount"] == 0.9)]["accuracy_after"]
    row = ops[(ops["prune.method"] == "l1_unstructured") & (ops["prune.amount"] == 0.9)].iloc[0]
    half = stats.t.ppf(0.975, 3) * one.std(ddof=1) / 2
    assert row["accuracy_after"] == pytest.approx(one.mean()) and row["accuracy_after_sd"] == pytest.approx(one.std())
    assert row["accuracy_after_hi"] - row["accuracy_after"] == pytest.approx(half)
    html = report.grid_operating_styler(table).to_html()
    assert html.count("<tr>") == 19 and "±" in html
    fig = report.plot_grid_tradeoff(table)
    for ax in fig.axes[:3]:
        method_lines = [ln for ln in ax.get_lines() if "(after)" in ln.get_label() or "(before)" in ln.get_label()]
        assert len(method_lines) == 6 and all(len(ln.get_xdata()) == 6 for ln in method_lines)
    plt.close(fig)
    links = report.grid_points_markdown(table)
    assert links.count("](points/") == 72 and "majority-class floor" not in links
    assert report.floor_markdown(table) == ""   # no point flagged: no warning

    # random pruning at 0.9 and 0.95 leaves models at the majority-class floor (8 points, 4 seeds each)
    hit = (table["prune.method"] == "random_unstructured") & (table["prune.amount"] >= 0.9)
    table.loc[hit, "after_at_floor"] = True
    table.loc[hit & (table["seed"] == 0), "dense_at_floor"] = True
    warning = report.floor_markdown(table)
    assert "In 2 of 72 finished points the dense model and in 8 of 72 the retrained model" in warning
    assert "30.0% of the test set, always answering 'person'" in warning
    ops = report.grid_operating_styler(table).data
    cells = dict(zip(zip(ops["prune.method"], ops["prune.amount"]), ops["at the majority floor"]))
    assert cells[("random_unstructured", "0.9")] == "dense 1 of 4, retrained 4 of 4"
    assert cells[("l1_unstructured", "0.9")] == "—"
    assert report.grid_points_markdown(table).count("model at the majority-class floor") == 6
    assert report.grid_points_markdown(table).count("models at the majority-class floor") == 2
    fig = report.plot_grid_tradeoff(table)
    floor_lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "majority-class floor"]
    assert len(floor_lines) == 1 and floor_lines[0].get_ydata()[0] == pytest.approx(30.0)
    plt.close(fig)


def test_the_grid_reports_bands_stay_within_0_and_100_and_its_speedup_axis_names_untimed_points():
    """Two seeds far apart give a t-band of about ±250 points: drawn within 0-100%. With no point
    timed (masked pruning: 1x by construction) there is no speedup panel; with some, the axis names the
    untimed ones. The log axis has plain tick labels; the two reference lines differ in style."""
    import matplotlib.pyplot as plt

    from prunestudy import report

    rows = [{"point": f"p{seed}", "method": "l1_unstructured", "amount": 0.5, "seed": seed, "sparsity": 0.5,
             "compression_ratio": 2.0, "theoretical_speedup": 2.0, "measured_speedup": 1.0, "speedup_timed": False,
             "dense_accuracy": 0.6, "accuracy_before": acc, "accuracy_after": acc, "balanced_accuracy_after": acc,
             "control_accuracy": 0.6, "change_vs_dense": acc - 0.6, "change_vs_control": acc - 0.6,
             "finished": True, "report": None, "prune.method": "l1_unstructured", "prune.amount": 0.5,
             "floor_share": 0.1, "dense_at_floor": False, "before_at_floor": False, "after_at_floor": False}
            for seed, acc in ((0, 0.05), (1, 0.45))]
    table = pd.DataFrame(rows)
    ops = report.operating_points(table)
    assert ops["accuracy_after_lo"].iloc[0] < 0 < 1 < ops["accuracy_after_hi"].iloc[0]
    fig = report.plot_grid_tradeoff(table)
    for ax in fig.axes[:2]:
        band = np.concatenate([p.vertices for c in ax.collections for p in c.get_paths()])
        assert band[:, 1].min() >= 0 and band[:, 1].max() <= 100
    assert not any("speedup" in ax.get_xlabel() for ax in fig.axes)   # no point timed: no speedup panel
    assert "speed" not in fig._suptitle.get_text()
    fig.canvas.draw()
    labels = [t.get_text() for t in [*fig.axes[1].get_xticklabels(), *fig.axes[1].get_xticklabels(minor=True)]]
    assert "2" in labels and not any("times" in t or "^" in t for t in labels), labels   # not 2x10^0
    styles = {ln.get_label(): ln.get_linestyle() for ln in fig.axes[0].get_lines()}
    assert styles["dense (trained)"] != styles["dense control"]   # told apart by style, not colour alone
    plt.close(fig)
    table.loc[0, "speedup_timed"] = True   # one point timed: the panel, its axis naming the untimed ones
    fig = report.plot_grid_tradeoff(table)
    assert "masked: 1x, not timed" in fig.axes[2].get_xlabel()
    plt.close(fig)
    table["speedup_timed"] = False
    speed = report.grid_operating_styler(table).data["measured speedup (x)"]
    assert list(speed) == ["1.00 (not timed)"]   # not "1.00 ± 0.00", as if measured
    table["speedup_timed"] = True
    fig = report.plot_grid_tradeoff(table)
    assert fig.axes[2].get_xlabel() == "measured speedup (x)"
    plt.close(fig)
    table["measured_speedup"] = [1.4, 1.6]
    assert list(report.grid_operating_styler(table).data["measured speedup (x)"]) == ["1.50 ± 0.14"]


@pytest.mark.e2e
def test_the_grid_report_flags_a_real_coco_point_at_the_floor(coco_run, tmp_path):
    """A grid of one point: the one-epoch study on ../shared/coco-sample (every model answers
    'person'). The grid report warns first, with the floor its own report found."""
    from prunestudy import atomic, metrics, report

    run_dir, _, _ = coco_run
    sweep_dir = tmp_path / "grid"
    (sweep_dir / "points").mkdir(parents=True)
    (sweep_dir / "points" / "seed=0").symlink_to(run_dir, target_is_directory=True)
    atomic.write_json(sweep_dir / "grid.json", {"points": [{"name": "seed=0", "values": {"seed": 0}}]})
    table = report.grid_table(sweep_dir)
    res = json.loads((run_dir / "results.json").read_text())
    flagged = metrics.flagged(res["floor"])
    assert "trained" in flagged   # what the point's own report says
    row = table.iloc[0]
    assert row["dense_at_floor"] and row["floor_class"] == "person"
    assert bool(row["after_at_floor"]) == ("retrained" in flagged)
    heading = report.grid_heading(sweep_dir, table)
    assert "**Warning: majority-class floor.** In 1 of 1 finished points the dense model" in heading
    assert f"{100 * res['floor']['share']:.1f}% of the test set, always answering 'person'" in heading
    report.save_grid_tables(sweep_dir, table)
    saved = json.loads((sweep_dir / "sweep.json").read_text())["points"][0]
    assert saved["dense_at_floor"] is True and saved["floor_share"] == pytest.approx(res["floor"]["share"])
