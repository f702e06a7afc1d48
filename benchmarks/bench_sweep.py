"""A 12-point grid (2 methods x 3 amounts x 2 seeds, smoke-sized training) computed three ways in
one run on this machine, and the ratio of their wall times:

  1. 12 separate `prunestudy run` calls in a row, without the stage store (`--store none`): each
     point trains its own dense model and its own dense control, as before sweeps existed;
  2. `prunestudy sweep --engine local --jobs 2`, a fresh store;
  3. `prunestudy sweep --engine ray` on a local Ray (a fresh store).

Per-point accuracies (before and after retraining, dense control) are compared: the two sweeps run
each stage with the same threads (1 per job here) and must agree exactly; the separate runs use all
cores, and PyTorch's CPU results depend on the thread count, so they may differ in the last digits.
Each point where they differ is then run once more as a separate run with the sweep's thread count
(OMP_NUM_THREADS and MKL_NUM_THREADS = 1), not timed, to tell the thread count from the sweep:
that run must agree with the sweep exactly. Each sweep's output is kept beside its folder (local.log,
ray.log). Then the dry-run plan of a 1,000-point grid, and how long it takes; and of a
100,000-point grid, its time and peak RSS (`--huge-dry-run-only`: only that one).

    .venv/bin/python benchmarks/bench_sweep.py [--out DIR] [--skip-ray]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "prunestudy.cli"]
GRID = """seed: 0
data:
  root: embedded
  embedded: {seed: 0, train_images: 40, val_images: 20, image_size: 160}
  min_box: 16
  min_per_class: 1
train: {epochs: 1, batch_size: 32, lr: 0.001}
retrain: {epochs: 1, lr: 0.001, control: true}
grid:
  prune.method: [l1_unstructured, random_unstructured]
  prune.amount: [0.3, 0.6, 0.9]
  seed: [0, 1]
"""
BIG = """grid:
  prune.method: [l1_unstructured, global_magnitude, random_unstructured, ln_structured]
  prune.amount: [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85,
                 0.9, 0.91, 0.92, 0.93, 0.95, 0.97, 0.98, 0.99]
  seed: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
"""


def timed(cmd: list[str], log: Path | None = None, **kw) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    return seconds, proc


def accuracies_of_run(run_dir: Path) -> tuple:
    r = json.loads((run_dir / "results.json").read_text())
    return _rounded(r["prune"]["test_accuracy"], r["retrain"]["test_accuracy"], r["control"]["test_accuracy"])


def digest_cost(store: Path) -> dict:
    """{stage: [median seconds, entries]} the stages spent hashing their outputs (their records')."""
    import statistics

    from prunestudy import records, stagestore

    spent: dict[str, list[float]] = {}
    for entry in stagestore.entries(store):
        rec = records.read(entry) or {}
        if "digest_seconds" in rec:
            spent.setdefault(rec["stage"], []).append(rec["digest_seconds"])
    return {stage: [round(statistics.median(v), 4), len(v)] for stage, v in spent.items()}


def accuracies_of_sweep(sweep_dir: Path) -> dict:
    rows = json.loads((sweep_dir / "sweep.json").read_text())["points"]
    return {r["point"]: _rounded(r["accuracy_before"], r["accuracy_after"], r["control_accuracy"]) for r in rows}


def _rounded(*values: float) -> tuple:
    """To 9 digits: sweep.json keeps 10 (pandas' to_json), results.json all 17."""
    return tuple(round(v, 9) for v in values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="work folder (default: a temporary one)")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--methods", default="l1_unstructured,random_unstructured",
                    help="the grid's two methods (default: the masked ones the figures are for; channel points are "
                         "timed against the dense model at every point, masked ones are not)")
    ap.add_argument("--huge-dry-run-only", action="store_true", help="only the 100,000-point dry run")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-sweep-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.huge_dry_run_only:
        (out / "big.yaml").write_text(BIG)
        print(json.dumps(huge_dry_run(out / "big.yaml", out), indent=2))
        return
    grid_file = out / "grid.yaml"
    grid_file.write_text(GRID.replace("[l1_unstructured, random_unstructured]", f"[{args.methods}]"))
    from prunestudy import grid, machine, worker

    points = grid.points(grid_file)
    figures = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "points": len(points),
               "methods": args.methods.split(",")}

    # 1. separate runs, no store: what a user had before sweeps
    separate, acc_separate, base = 0.0, {}, _base_args(grid_file, out)
    for p in points:
        overrides = [x for k, v in p.values.items() for x in ("-p", f"{k}={v}")]
        seconds, _ = timed([*CLI, "run", *base, *overrides, "--run-dir", str(out / "separate" / p.name),
                            "--store", "none"])
        separate += seconds
        acc_separate[p.name] = accuracies_of_run(out / "separate" / p.name)
        print(f"separate run {p.name}: {seconds:.1f} s", flush=True)
    figures["separate_runs_s"] = round(separate, 1)

    # 2. the sweep, local engine, 2 jobs
    seconds, _ = timed([*CLI, "sweep", "-f", str(grid_file), "--sweep-dir", str(out / "local" / "grid"),
                        "--jobs", "2"], out / "local.log")
    figures["sweep_local_2_jobs_s"] = round(seconds, 1)
    acc_local = accuracies_of_sweep(out / "local" / "grid")
    print(f"sweep, local engine, 2 jobs: {seconds:.1f} s", flush=True)
    figures["digest_seconds_per_stage"] = digest_cost(out / "local" / ".store")
    print(f"hashing the outputs (records.DIGEST), median seconds per stage: {figures['digest_seconds_per_stage']}",
          flush=True)

    # 3. the sweep on a local Ray
    acc_ray = None
    if not args.skip_ray:
        seconds, _ = timed([*CLI, "sweep", "-f", str(grid_file), "--sweep-dir", str(out / "ray" / "grid"),
                            "--engine", "ray"], out / "ray.log")
        figures["sweep_ray_s"] = round(seconds, 1)
        acc_ray = accuracies_of_sweep(out / "ray" / "grid")
        print(f"sweep, local Ray: {seconds:.1f} s", flush=True)

    figures["identical_local_and_ray"] = None if acc_ray is None else acc_ray == acc_local
    figures["identical_separate_and_local"] = acc_separate == acc_local
    diffs = [abs(a - b) for name in acc_local for a, b in zip(acc_separate[name], acc_local[name])]
    figures["points_differing_separate_vs_local"] = {
        what: sum(acc_separate[n][i] != acc_local[n][i] for n in acc_local)
        for i, what in enumerate(("before retraining", "after retraining", "dense control"))}
    figures["max_accuracy_difference_separate_vs_local"] = max(diffs)
    # the points that differ, once more as separate runs with the sweep's threads: the same as the sweep?
    one = {**os.environ, **dict.fromkeys(machine.THREAD_VARS, str(worker.task_threads("local", 2)))}
    again = {}
    for p in points:
        if acc_separate[p.name] != acc_local[p.name]:
            overrides = [x for k, v in p.values.items() for x in ("-p", f"{k}={v}")]
            timed([*CLI, "run", *base, *overrides, "--run-dir", str(out / "separate-1-thread" / p.name), "--store",
                   "none"], env=one)
            again[p.name] = accuracies_of_run(out / "separate-1-thread" / p.name) == acc_local[p.name]
    figures["differing_points_identical_at_the_sweeps_threads"] = again
    figures["threads"] = {"separate runs": "all cores", "sweep local": f"{worker.task_threads('local', 2)} per job",
                          "sweep ray": worker.task_threads("ray", 1)}
    figures["speedup_local"] = round(separate / figures["sweep_local_2_jobs_s"], 2)
    if acc_ray is not None:
        figures["speedup_ray"] = round(separate / figures["sweep_ray_s"], 2)

    big = out / "big.yaml"
    big.write_text(BIG)
    seconds, proc = timed([*CLI, "sweep", "-f", str(big), "--dry-run", "--sweep-dir", str(out / "big")])
    figures["dry_run_1000_points_s"] = round(seconds, 2)
    figures["dry_run_1000_points_plan"] = proc.stdout.strip().splitlines()
    figures.update(huge_dry_run(big, out))
    print(json.dumps(figures, indent=2))
    print(f"speedup of the sweep (local, 2 jobs) over 12 separate runs: {figures['speedup_local']}x "
          f"(goal: at least 4x); per-point accuracies identical, local and Ray: {figures['identical_local_and_ray']}; "
          f"separate runs and local sweep: {figures['identical_separate_and_local']} "
          f"(points that differ: {figures['points_differing_separate_vs_local']}, by at most "
          f"{figures['max_accuracy_difference_separate_vs_local']:.4f}: threads differ, see docs/sweeps.md); "
          f"those points run separately with the sweep's threads, identical to the sweep: {again}")
    (out / "bench_sweep.json").write_text(json.dumps(figures, indent=2))


def huge_dry_run(grid_file: Path, out: Path) -> dict:
    """The dry run of a 100,000-point grid (1,000 amounts x 25 seeds x 4 methods, as -g overrides of
    `grid_file`): its wall time and its peak RSS (getrusage of a process that runs only it)."""
    amounts = ",".join(f"{(i + 1) / 1001:.6f}" for i in range(1000))
    seeds = ",".join(str(s) for s in range(25))
    cmd = [*CLI, "sweep", "-f", str(grid_file), "-g", f"prune.amount={amounts}", "-g", f"seed={seeds}",
           "--dry-run", "--sweep-dir", str(out / "huge")]
    measure = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(json.dumps({'rc': p.returncode, 's': time.perf_counter() - t, "
               "'rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 'out': p.stdout + p.stderr}))")
    result = json.loads(subprocess.run([sys.executable, "-c", measure, *cmd], cwd=ROOT, capture_output=True,
                                       text=True, check=True).stdout)
    if result["rc"] != 0:
        sys.exit(f"the 100,000-point dry run failed:\n{result['out'][-3000:]}")
    print(f"dry run of 100,000 points: {result['s']:.1f} s, peak RSS {result['rss_mb']:.0f} MB", flush=True)
    return {"dry_run_100000_points_s": round(result["s"], 1), "dry_run_100000_points_rss_mb": round(result["rss_mb"]),
            "dry_run_100000_points_plan": result["out"].strip().splitlines()[1:3]}


def _base_args(grid_file: Path, out: Path) -> list[str]:
    """The grid file's common parameters as a parameter file of its own (the `grid:` mapping left out)."""
    import yaml

    base = yaml.safe_load(grid_file.read_text())
    base.pop("grid")
    path = out / "base.yaml"
    path.write_text(yaml.safe_dump(base))
    return ["-f", str(path)]


if __name__ == "__main__":
    main()
