"""What keying stages on their code costs a no-op rerun (issue 29's goal: at most 1 s more).

In one run on this machine:

  1. the smoke study run once into a temporary folder (not timed);
  2. a no-op `prunestudy run` of it, five times: the median wall time (the code's parsed summaries
     cached, as after any earlier run of the same code);
  3. the same with an empty summary cache (as after an edit of every file): the median;
  4. in one process, the keys of every stage (`graph.all_keys`, after the parameters are loaded:
     what keying on the code adds to a rerun that keyed stages on parameters only, the digests of
     every stage's code and the hashing): cold (nothing cached, every file parsed) and warm (the
     summaries on disk), the median of five fresh processes each.

The goal holds when the cold digest of every stage costs at most 1 s.

    .venv/bin/python benchmarks/bench_keys.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prunestudy import machine

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "prunestudy.cli"]
RUN = ["run", "-f", "params/smoke.yaml", "-p", "prune.amounts=null"]
GOAL_S = 1.0
DIGEST = ("import time, json; from prunestudy import config, graph; cfg = config.load('params/default.yaml'); "
          "t = time.perf_counter(); graph.all_keys(cfg); print(json.dumps(time.perf_counter() - t))")


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def digest_seconds(env: dict) -> float:
    proc = subprocess.run([sys.executable, "-c", DIGEST], cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="a folder for the figures (JSON); default: a temporary one")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-keys-"))
    out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="bench-keys-runs-"))
    env = {**os.environ, "PRUNESTUDY_HOME": str(ROOT), "PRUNESTUDY_CACHE": str(base / "cache")}
    run = [*CLI, *RUN, "--run-dir", str(base / "run")]
    timed(run, env)
    warm_runs = [timed(run, env) for _ in range(5)]
    cold_runs = []
    for i in range(5):
        cold_env = {**env, "PRUNESTUDY_CACHE": str(base / f"empty-{i}")}   # crop cache unused by a no-op rerun
        cold_runs.append(timed(run, cold_env))
    cold = [digest_seconds({**env, "PRUNESTUDY_CACHE": str(base / f"digest-cold-{i}")}) for i in range(5)]
    warm = [digest_seconds(env) for _ in range(5)]
    figures = {"noop_rerun_s_warm_summaries": statistics.median(warm_runs),
               "noop_rerun_s_cold_summaries": statistics.median(cold_runs),
               "digest_all_stages_s_cold": statistics.median(cold), "digest_all_stages_s_warm": statistics.median(warm),
               "goal_s": GOAL_S, "goal_met": statistics.median(cold) <= GOAL_S,
               "cpu": machine.cpu_name()}
    print(f"no-op rerun of the smoke study: {figures['noop_rerun_s_warm_summaries']:.2f} s (summaries cached), "
          f"{figures['noop_rerun_s_cold_summaries']:.2f} s (none cached), median of 5")
    print(f"digest of every stage's code: {figures['digest_all_stages_s_cold']:.3f} s cold, "
          f"{figures['digest_all_stages_s_warm']:.3f} s warm (median of 5 processes)")
    print(f"goal: at most {GOAL_S:.1f} s added to a no-op rerun: {'met' if figures['goal_met'] else 'NOT met'} "
          f"({figures['cpu']})")
    (out / "bench_keys.json").write_text(json.dumps(figures, indent=1))
    print(f"figures: {out / 'bench_keys.json'}")


if __name__ == "__main__":
    main()
