"""The dry run of large grids (`prunestudy sweep --dry-run`, issue 30 item 6: 100,000 points in under
20 s and 300 MB), against the code of a baseline commit, in one run on this machine.

For each grid (the smoke study with `-p prune.amounts=null`; 100 amounts x 10, 100 and 1,000 seeds,
and bench_sweep.py's 4 methods x 1,000 amounts x 25 seeds), the whole command is run in a fresh
process, `--repeat` times, by this project's code and by the baseline's (`git archive <commit> src`
into a temporary folder, run with PYTHONPATH there; default: the commit before the one that made the
plan arithmetic). Each run is measured from outside: its wall time, and its peak resident memory
(ru_maxrss of the process, and separately of its children: the project's plan asks a child
process for the checks that need PyTorch when their answers are not cached yet, see
prunestudy/torchchecks.py). Ours is measured with its check cache warm (as after any earlier plan,
run or sweep of the same code); `cold` first runs the 1,000-point grid once with an empty cache.
Both sides get the same empty stage store and a sweep folder that does not exist.

    .venv/bin/python benchmarks/bench_plan.py [--baseline COMMIT] [--repeat 3] [--sizes 1k,10k,100k,100k-methods]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "1248912"   # the last commit before the plan stopped importing PyTorch and validating every point
GOAL_S, GOAL_MB = 20.0, 300.0
METHODS = "l1_unstructured,global_magnitude,random_unstructured,ln_structured"


def _values(n: int) -> str:
    return ",".join(f"{(i + 1) / (n + 1):.6f}" for i in range(n))


def _seeds(n: int) -> str:
    return ",".join(str(s) for s in range(n))


GRIDS = {   # name: (points, -g overrides)
    "1k": (1_000, [f"prune.amount={_values(100)}", f"seed={_seeds(10)}"]),
    "10k": (10_000, [f"prune.amount={_values(100)}", f"seed={_seeds(100)}"]),
    "100k": (100_000, [f"prune.amount={_values(100)}", f"seed={_seeds(1000)}"]),
    "100k-methods": (100_000, [f"prune.method={METHODS}", f"prune.amount={_values(1000)}", f"seed={_seeds(25)}"]),
}
# run in a process of its own: the command, then its own peak RSS and its children's (KB on Linux)
MEASURE = """if True:
    import json, resource, sys, time
    start = time.perf_counter()
    from prunestudy import cli
    rc = cli.main(sys.argv[1:])
    seconds = time.perf_counter() - start
    print(json.dumps({"rc": rc, "s": seconds, "self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      "torch": "torch" in sys.modules}))
"""


def baseline_src(commit: str, into: Path) -> Path:
    """The baseline commit's src/ (git archive), extracted under `into`."""
    blob = subprocess.run(["git", "archive", commit, "src"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def dry_run(src: Path, grid: list[str], work: Path, cache: Path) -> dict:
    """One dry run in a fresh process: wall time (outside, start to exit), peak RSS, its answer."""
    args = ["sweep", "-f", "params/smoke.yaml", "-p", "prune.amounts=null", *(x for g in grid for x in ("-g", g)),
            "--dry-run", "--sweep-dir", str(work / "sweep"), "--store", str(work / "store")]
    env = {**os.environ, "PYTHONPATH": str(src), "PRUNESTUDY_CACHE": str(cache)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    try:
        got = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        sys.exit(f"the dry run failed ({src}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    if got["rc"] != 0:
        sys.exit(f"the dry run exited {got['rc']} ({src}):\n{proc.stderr[-3000:]}")
    plan = [line for line in proc.stdout.splitlines() if line.startswith("  ")]
    return {"wall_s": wall, "peak_mb": got["self_mb"], "children_peak_mb": got["children_mb"],
            "imports_torch": got["torch"], "plan": plan}


def measure(src: Path, grid: list[str], work: Path, cache: Path, repeat: int) -> dict:
    runs = [dry_run(src, grid, work, cache) for _ in range(repeat)]
    return {"wall_s": statistics.median(r["wall_s"] for r in runs), "runs_s": [round(r["wall_s"], 2) for r in runs],
            "peak_mb": max(r["peak_mb"] for r in runs), "children_peak_mb": max(r["children_peak_mb"] for r in runs),
            "imports_torch": any(r["imports_torch"] for r in runs), "plan": runs[-1]["plan"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=BASELINE, help=f"the commit to compare with (default {BASELINE})")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each grid and side (the median is shown)")
    ap.add_argument("--sizes", default=",".join(GRIDS), help=f"grids, of {', '.join(GRIDS)}")
    ap.add_argument("--skip-baseline", action="store_true", help="time this project's code only")
    ap.add_argument("--out", help="a folder for the figures (JSON); default: a temporary one")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-plan-"))
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    ours_src = ROOT / "src"
    base_src = None if args.skip_baseline else baseline_src(args.baseline, out / "baseline")
    figures = {"baseline": args.baseline, "load_average_before": round(load, 2), "cpus": os.cpu_count(), "grids": {}}

    cache = out / "cache-ours"   # ours: a cold run first (fills the check cache), then warm runs
    cold = dry_run(ours_src, GRIDS["1k"][1], out / "cold", cache)
    figures["ours_cold_1k"] = {k: v for k, v in cold.items() if k != "plan"}
    print(f"ours, 1k points, empty check cache: {cold['wall_s']:.2f} s, peak {cold['peak_mb']:.0f} MB "
          f"(its PyTorch child: {cold['children_peak_mb']:.0f} MB)", flush=True)
    print(f"{'grid':14s} {'points':>7s} {'ours s':>8s} {'ours MB':>8s} {'base s':>8s} {'base MB':>8s} "
          f"{'time x':>7s} {'memory x':>8s}  same plan")
    for name in args.sizes.split(","):
        points, grid = GRIDS[name]
        ours = measure(ours_src, grid, out / f"ours-{name}", cache, args.repeat)
        base = None if base_src is None else measure(base_src, grid, out / f"base-{name}", out / "cache-base",
                                                     args.repeat)
        row = {"points": points, "ours": ours, "baseline": base}
        if base:
            row["time_ratio"] = round(base["wall_s"] / ours["wall_s"], 2)
            row["memory_ratio"] = round(base["peak_mb"] / ours["peak_mb"], 2)
            row["same_plan"] = base["plan"] == ours["plan"]
        figures["grids"][name] = row
        print(f"{name:14s} {points:7d} {ours['wall_s']:8.2f} {ours['peak_mb']:8.0f} "
              + (f"{base['wall_s']:8.2f} {base['peak_mb']:8.0f} {row['time_ratio']:6.2f}x {row['memory_ratio']:7.2f}x"
                 f"  {row['same_plan']}" if base else f"{'-':>8s} {'-':>8s} {'-':>7s} {'-':>8s}  -"), flush=True)
    biggest = [figures["grids"][n]["ours"] for n in figures["grids"] if n.startswith("100k")]
    if biggest:
        worst_s, worst_mb = max(b["wall_s"] for b in biggest), max(b["peak_mb"] for b in biggest)
        met = worst_s < GOAL_S and worst_mb < GOAL_MB and not any(b["imports_torch"] for b in biggest)
        print(f"goal (100,000 points under {GOAL_S:.0f} s and {GOAL_MB:.0f} MB, no PyTorch in the plan process): "
              f"{'MET' if met else 'NOT MET'}, {worst_s:.1f} s and {worst_mb:.0f} MB at worst "
              f"(load average {load:.1f} before the run)")
    (out / "bench_plan.json").write_text(json.dumps(figures, indent=2))
    print(f"figures: {out / 'bench_plan.json'}")


if __name__ == "__main__":
    main()
