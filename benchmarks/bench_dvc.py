"""prunestudy's grid engine against DVC, the peer a user would pick instead, on bench_sweep.py's grid
(2 methods x 3 amounts x 2 seeds, smoke-sized), in one run on this machine, and the ratio of their
wall times:

  1. `prunestudy sweep --engine local --jobs 2` on a fresh store, as bench_sweep.py runs it;
  2. DVC, in a fresh git repository: a dvc.yaml whose stages run the project's five notebooks with
     papermill (kernel `prunestudy`), each given exactly what the project's runner gives it
     (execute.notebook_parameters: the stage's parameters, interpolated from params.yaml, and its
     input folders), its upstream stage folders as deps and its own folder as outs; each point
     queued with `dvc exp run --queue --set-param ...`, the queue run by `dvc queue start -j 2`,
     DVC's run-cache restoring the stages an earlier experiment computed with the same inputs.
     DVC's time runs from the first `dvc exp run --queue` to the last experiment's git ref.

Both sides compute every stage with 1 thread (2 jobs on 2 cores), each with a crop cache of its own
(PRUNESTUDY_CACHE), so the per-point test accuracies (trained, pruned, retrained, dense control) must
agree exactly, and so must the parameters each DVC notebook ran with and those the runner gives it:
both are checked. The sweep also renders each notebook's HTML page, each point's report and the grid
report, which the DVC side does not. DVC is installed once (not timed) into a virtualenv of its own,
outside the project's environment (--dvc-venv, default .bench/dvc-venv). Goal: the sweep at least
1.5x faster than DVC's queue. `--points N`: only the grid's first N points (1, 2, 4, 6 or 12).

    .venv/bin/python benchmarks/bench_dvc.py [--out DIR] [--points N] [--dvc-venv DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_sweep import CLI, GRID, ROOT, _base_args, timed

from prunestudy import config, execute, graph, grid, machine, paths, states, worker

DVC_VERSION = "3.67.1"
GOAL = 1.5
JOBS = 2
RUN = Path("run")   # the run folder in each DVC experiment's workspace
PAPERMILL = f"{shlex.quote(os.path.normpath(sys.executable))} -m papermill"   # the project's
EXP_REF = re.compile(r"refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/(.+)")   # a finished experiment's git ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="work folder (default: a temporary one)")
    ap.add_argument("--points", type=int, help="only the grid's first N points (default: all 12)")
    ap.add_argument("--dvc-venv", default=str(ROOT / ".bench" / "dvc-venv"),
                    help="DVC's virtualenv, made once and reused (default: %(default)s)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-dvc-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dvc, install_s = ensure_dvc(Path(args.dvc_venv))
    grid_file = out / "grid.yaml"
    grid_file.write_text(GRID)
    if args.points:
        common, axes = grid.read(grid_file)
        grid_file.write_text(yaml.safe_dump({**common, "grid": first(axes, args.points)}, sort_keys=False))
    points = grid.points(grid_file)
    base = config.load(_base_args(grid_file, out)[1])
    threads = worker.task_threads("local", JOBS)
    prepare(base)
    figures = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "points": len(points), "dvc": DVC_VERSION,
               "dvc_venv": str(dvc.parents[1]), "dvc_install_s": install_s and round(install_s, 1),
               "threads_per_stage": threads}

    # 1. prunestudy's sweep
    sweep_dir = out / "local" / "grid"
    seconds, _ = timed([*CLI, "sweep", "-f", str(grid_file), "--engine", "local", "--jobs", str(JOBS), "--store",
                        str(out / "local" / ".store"), "--sweep-dir", str(sweep_dir)], out / "local.log",
                       env={**os.environ, "PRUNESTUDY_CACHE": str(out / "cache-prunestudy")})
    figures["prunestudy_sweep_s"] = round(seconds, 1)
    print(f"prunestudy sweep, local engine, {JOBS} jobs: {seconds:.1f} s", flush=True)

    # 2. DVC's queue of experiments
    env = {**os.environ, "PRUNESTUDY_HOME": str(ROOT), "PRUNESTUDY_CACHE": str(out / "cache-dvc"),
           "PRUNESTUDY_PROGRESS": "log", "DVC_NO_ANALYTICS": "1", "JUPYTER_PATH": str(execute.kernel_dir().parents[1]),
           "PATH": f"{dvc.parent}{os.pathsep}{os.environ['PATH']}",   # the queue starts its workers as `dvc`
           **dict.fromkeys(machine.THREAD_VARS, str(threads))}
    repo = out / "dvc"
    dvc_cmd = make_repo(repo, base, dvc, env)
    names = {p.name: re.sub(r"[=,]", "-", p.name) for p in points}   # experiment names: git ref names
    flat = leaves(base)
    start = time.perf_counter()
    for p in points:
        sets = [x for k, v in leaves(p.cfg).items() if flat[k] != v for x in ("-S", f"{k}={json.dumps(v)}")]
        dvc_cmd("exp", "run", "--queue", "-n", names[p.name], *sets)
    queued = time.perf_counter() - start
    dvc_cmd("queue", "start", "-j", str(JOBS))
    refs, restarts = wait(repo, len(points), dvc_cmd)
    seconds = time.perf_counter() - start
    dvc_cmd("queue", "stop")
    figures |= {"dvc_queue_s": round(seconds, 1), "dvc_queueing_s": round(queued, 1), "dvc_queue_restarts": restarts}
    print(f"DVC: {len(points)} experiments queued ({queued:.1f} s), run by `dvc queue start -j {JOBS}`: "
          f"{seconds:.1f} s in all", flush=True)

    # what each side computed, and the same numbers?
    logs = {p.name: dvc_cmd("queue", "logs", names[p.name]).stdout for p in points}
    (out / "dvc.log").write_text("".join(f"=== {names[n]}\n{text}" for n, text in logs.items()))
    ran, restored = (re.findall(pattern, "".join(logs.values()))
                     for pattern in (r"Running stage '(\w+)'", r"Stage '(\w+)' is cached"))
    figures["stages_computed"] = {"prunestudy": computed(out / "local.log"),
                                  "dvc": {s: ran.count(s) for s in graph.CHAIN},
                                  "dvc_restored_from_run_cache": {s: restored.count(s) for s in graph.CHAIN}}
    locks = {p.name: yaml.safe_load(git(repo, "show", f"{refs[names[p.name]]}:dvc.lock")) for p in points}
    ours = {p.name: accuracies_of_sweep_point(sweep_dir, p.name) for p in points}
    theirs = {n: accuracies_of_experiment(repo, lock) for n, lock in locks.items()}
    figures["accuracies"] = {n: {"prunestudy": ours[n], "dvc": theirs[n]} for n in ours}
    figures["points_differing"] = [n for n in ours if ours[n] != theirs[n]]
    figures["notebook_parameters_differing"] = [f"{p.name} {stage}" for p in points for stage in graph.CHAIN
                                                if parameters_of_runner(p.cfg, stage)
                                                != parameters_of_experiment(repo, locks[p.name], stage)]
    figures["torch_threads"] = {"prunestudy": threads_of_sweep(sweep_dir), "dvc": sorted(
        {t for lock in locks.values() for t in threads_of_experiment(repo, lock)})}
    figures["notebook_seconds"] = {
        "prunestudy": notebook_seconds({*(out / "local" / ".store").glob(f"*/*/{paths.ENTRY_NOTEBOOK}"),
                                        *(paths.executed_notebook(paths.point_dir(sweep_dir, p.name), "analysis")
                                          for p in points)}),
        "dvc": notebook_seconds({cached(repo, lock, paths.executed_notebook(RUN, stage)) for lock in locks.values()
                                 for stage in graph.CHAIN})}
    figures["ratio_dvc_over_prunestudy"] = round(figures["dvc_queue_s"] / figures["prunestudy_sweep_s"], 2)
    figures["ratio_without_queueing"] = round((seconds - queued) / figures["prunestudy_sweep_s"], 2)
    (out / "bench_dvc.json").write_text(json.dumps(figures, indent=2))
    report(figures, out)


def ensure_dvc(venv: Path) -> tuple[Path, float | None]:
    """DVC_VERSION in a virtualenv of its own (made with pip when missing); the seconds that took, or None."""
    dvc = venv / "bin" / "dvc"
    if dvc.is_file() and subprocess.run([dvc, "--version"], capture_output=True, text=True).stdout.strip() \
            == DVC_VERSION:
        return dvc, None
    print(f"installing dvc=={DVC_VERSION} into {venv} (once) ...", flush=True)
    start = time.perf_counter()
    run([sys.executable, "-m", "venv", "--clear", venv], ROOT)
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", f"dvc=={DVC_VERSION}"], ROOT)
    return dvc, time.perf_counter() - start


def first(axes: dict[str, list], n: int) -> dict[str, list]:
    """The sub-grid of a grid's first n points (its last key varies fastest), when they make one."""
    out, left = {}, n
    for key in reversed(axes):
        values = axes[key]
        if left >= len(values) and left % len(values) == 0:
            out[key], left = values, left // len(values)
        elif left < len(values):
            out[key], left = values[:left], 1
        else:
            break
    if left != 1 or len(out) < len(axes):
        sys.exit(f"--points {n}: the grid's first {n} points do not make a grid of their own (1, 2, 4, 6, 12 do)")
    return dict(reversed(out.items()))


def prepare(cfg: dict) -> None:
    """Before any timing: the kernelspec both sides use, and the embedded images (in the project)."""
    from prunestudy import stages, synth  # imports PyTorch

    execute.ensure_kernel()
    where, params = stages.embedded_root(cfg["data"]["embedded"])
    synth.ensure(where, **params)


def leaves(d: dict, prefix: str = "") -> dict:
    """{'data': {'embedded': {'seed': 0}}} -> {'data.embedded.seed': 0}: what --set-param addresses."""
    out = {}
    for k, v in d.items():
        out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


# --- DVC's repository --------------------------------------------------------------------------------
def dvc_yaml(cfg: dict) -> dict:
    """One stage per notebook: papermill with the runner's parameters (params.yaml's values by DVC's
    `${key}` interpolation, the input folders as they are); deps its notebook and input folders, outs
    its stage folder and executed notebook."""
    stages = {}
    for stage in graph.CHAIN:
        notebook, executed = Path("notebooks") / paths.NOTEBOOK_OF[stage], paths.executed_notebook(RUN, stage)
        keys = stage_parameters(stage)
        args = [x for name, value in execute.notebook_parameters(stage, cfg, RUN).items()
                for x in argument(name, value, keys.get(name))]
        stages[stage] = {
            "cmd": f"mkdir -p {executed.parent} && {PAPERMILL} {notebook} {executed} "
                   f"-k {execute.KERNEL_NAME} --no-progress-bar {' '.join(args)}",
            "deps": [str(notebook), *(str(paths.stage_dir(RUN, up)) for up in graph.stage(stage).reads)],
            **({"params": sorted(set(keys.values()))} if keys else {}),
            "outs": [str(paths.stage_dir(RUN, stage)), str(executed)]}
    return {"stages": stages}


def argument(name: str, value, key: str | None) -> list[str]:
    """papermill's argument for one notebook parameter: `${key}` for a parameter of params.yaml (DVC
    writes its value in), else the value. papermill's -p reads True, False, None and numbers, but DVC
    writes booleans as true and false: booleans and mappings go as YAML (-y)."""
    if key is None:
        return ["-p", name, shlex.quote(str(value))]
    if isinstance(value, list):
        sys.exit(f"{key}: a list, which DVC does not interpolate into a command")
    if isinstance(value, (bool, dict)):
        return ["-y", shlex.quote(f"{name}: {template(key, value)}")]
    return ["-p", name, shlex.quote(template(key, value))]


def template(key: str, value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {template(f'{key}.{k}', v)}" for k, v in value.items()) + "}"
    return "${" + key + "}"


def stage_parameters(stage: str) -> dict[str, str]:
    """A stage's notebook parameters that are study parameters: name -> key (the analysis has none)."""
    return {} if stage == "analysis" else config.stage_parameters(stage)


def make_repo(repo: Path, cfg: dict, dvc: Path, env: dict):
    """A fresh git + DVC repository: the five notebooks, params.yaml (cfg) and dvc.yaml, committed.
    Returns a function that runs a dvc command in it."""
    (repo / "notebooks").mkdir(parents=True)
    for stage in graph.CHAIN:
        shutil.copy2(ROOT / "notebooks" / paths.NOTEBOOK_OF[stage], repo / "notebooks")
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml(cfg), sort_keys=False, width=1 << 16))
    (repo / ".gitignore").write_text(f"/{paths.lock_file(RUN)}\n")   # the stage functions' lock of run/

    def dvc_cmd(*a: str) -> subprocess.CompletedProcess:
        return run([dvc, *a], repo, env)

    git(repo, "init", "-q")
    git(repo, "config", "user.name", "bench")
    git(repo, "config", "user.email", "bench@localhost")
    dvc_cmd("init", "-q")
    dvc_cmd("config", "core.analytics", "false")
    dvc_cmd("config", "core.site_cache_dir", str(repo.parent / "dvc-site-cache"))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "the study as a DVC pipeline")
    return dvc_cmd


def run(cmd: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def git(repo: Path, *a: str) -> str:
    return run(["git", *a], repo).stdout


def experiments(repo: Path) -> dict[str, str]:
    """{name: git ref} of the finished experiments."""
    return {m[1]: m[0] for ref in git(repo, "for-each-ref", "--format=%(refname)", "refs/exps").split()
            if (m := EXP_REF.fullmatch(ref))}


def wait(repo: Path, n: int, dvc_cmd) -> tuple[dict[str, str], int]:
    """Until the n experiments are finished: their git refs, read every second. Every 20 s the queue's
    status (its `Worker status` line is no help: 0 active while tasks run, treeverse/dvc#10427): a
    failed task stops the benchmark; when no task runs, `dvc queue start` again (workers that stop
    with tasks left, treeverse/dvc#10562), and a third check in a row without one stops it too.
    Returns the refs and the number of restarts."""
    checked, idle, restarts = time.perf_counter(), 0, 0
    while len(refs := experiments(repo)) < n:
        time.sleep(1)
        if time.perf_counter() - checked < 20:
            continue
        status = dvc_cmd("queue", "status").stdout
        if len(refs := experiments(repo)) == n:
            break
        idle = 0 if "Running" in status else idle + 1
        if "Failed" in status or idle == 3:
            sys.exit(f"DVC's queue stopped with {len(refs)} of {n} experiments done:\n{status}\n"
                     f"see `dvc queue logs NAME` and .dvc/tmp/exps/celery/*.out in {repo}")
        if idle:
            dvc_cmd("queue", "start", "-j", str(JOBS))
            restarts += 1
        checked = time.perf_counter()
    return refs, restarts


# --- what each side computed ---------------------------------------------------------------------------
def computed(log: Path) -> dict[str, int]:
    """The stages the sweep computed, from its last line ("computed 1 data, 2 train, ...")."""
    done = re.findall(r"unique stages; computed ([^;]*)", log.read_text())
    return {stage: int(count) for count, stage in re.findall(r"(\d+) (\w+)", done[-1])} if done else {}


def accuracies_of_sweep_point(sweep_dir: Path, name: str) -> dict:
    r = json.loads((paths.point_dir(sweep_dir, name) / paths.RESULTS).read_text())
    return {s.key: r[s.stage]["test_accuracy"] for s in states.ALL}


def cached(repo: Path, lock: dict, path: Path) -> Path:
    """A file of an experiment's outputs, in DVC's cache (its dvc.lock names each output's hash)."""
    obj = lambda md5: repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]  # noqa: E731
    for out in (o for stage in lock["stages"].values() for o in stage.get("outs", [])):
        if path == Path(out["path"]):
            return obj(out["md5"])
        if path.is_relative_to(out["path"]):
            rel = str(path.relative_to(out["path"]))
            return obj(next(e["md5"] for e in json.loads(obj(out["md5"]).read_text()) if e["relpath"] == rel))
    raise KeyError(path)


def accuracies_of_experiment(repo: Path, lock: dict) -> dict:
    return {s.key: json.loads(cached(repo, lock, states.folder(RUN, s.key) / paths.METRICS).read_text())
            ["test_accuracy"] for s in states.ALL}


def parameters_of_experiment(repo: Path, lock: dict, stage: str) -> dict:
    """What papermill gave an experiment's notebook of the stage (but the folders)."""
    notebook = json.loads(cached(repo, lock, paths.executed_notebook(RUN, stage)).read_text())
    return {k: notebook["metadata"]["papermill"]["parameters"][k] for k in stage_parameters(stage)}


def parameters_of_runner(cfg: dict, stage: str) -> dict:
    """What the project's runner gives the notebook of the stage for these parameters (but the folders)."""
    given = json.loads(json.dumps(execute.notebook_parameters(stage, cfg, RUN)))
    return {k: given[k] for k in stage_parameters(stage)}


def notebook_seconds(notebooks: set[Path]) -> float:
    """papermill's durations of these executed notebooks, summed (each from its kernel's start)."""
    return round(sum(json.loads(nb.read_text())["metadata"]["papermill"]["duration"] for nb in notebooks), 1)


def threads_of_sweep(sweep_dir: Path) -> list[int]:
    return sorted({json.loads(f.read_text())["torch_threads"]
                   for f in (sweep_dir / paths.SWEEP_POINTS).glob(f"*/*/{paths.METRICS}")})


def threads_of_experiment(repo: Path, lock: dict) -> set[int]:
    return {json.loads(cached(repo, lock, paths.stage_dir(RUN, s) / paths.METRICS).read_text())["torch_threads"]
            for s in ("train", "prune", "retrain")}


def report(f: dict, out: Path) -> None:
    c = f["stages_computed"]
    print(f"\n{'':<46} {'wall s':>7} {'ratio':>6}  stages computed")
    print(f"{f'prunestudy sweep --engine local --jobs {JOBS}':<46} {f['prunestudy_sweep_s']:>7} {1:>6}  "
          f"{c['prunestudy']}")
    dvc = f"DVC: {f['points']} x dvc exp run --queue, dvc queue start"
    print(f"{dvc:<46} {f['dvc_queue_s']:>7} "
          f"{f['ratio_dvc_over_prunestudy']:>6}  {c['dvc']}, restored from DVC's run-cache: "
          f"{c['dvc_restored_from_run_cache']}")
    print(f"  of which queueing the experiments {f['dvc_queueing_s']} s (without it: "
          f"{f['ratio_without_queueing']}x); `dvc queue start` again, its workers gone: "
          f"{f['dvc_queue_restarts']} times")
    print(f"the stage notebooks' time (papermill's, summed): prunestudy {f['notebook_seconds']['prunestudy']} s, "
          f"DVC {f['notebook_seconds']['dvc']} s (a process and a kernel of its own for every notebook)")
    install = "reused" if f["dvc_install_s"] is None else f"installed in this run, {f['dvc_install_s']} s"
    print(f"DVC {f['dvc']} in {f['dvc_venv']} ({install}); torch threads per stage: prunestudy "
          f"{f['torch_threads']['prunestudy']}, DVC {f['torch_threads']['dvc']}")
    same = f["points"] - len(f["points_differing"])
    print(f"test accuracies (trained, pruned, retrained, dense control) identical at {same} of {f['points']} points")
    for n in f["points_differing"]:
        print(f"  DIFFERENT at {n}: prunestudy {f['accuracies'][n]['prunestudy']}, DVC {f['accuracies'][n]['dvc']}")
    print("DVC's notebook parameters identical to the runner's at every point and stage"
          if not f["notebook_parameters_differing"] else
          f"DVC's notebook parameters DIFFER from the runner's: {f['notebook_parameters_differing']}")
    met = "MET" if f["ratio_dvc_over_prunestudy"] >= GOAL else "NOT MET"
    print(f"\nDVC / prunestudy: {f['ratio_dvc_over_prunestudy']}x; goal (prunestudy at least {GOAL}x faster "
          f"than DVC's queue): {met}\nfigures: {out / 'bench_dvc.json'}")


if __name__ == "__main__":
    main()
