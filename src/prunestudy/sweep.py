"""`prunestudy sweep`: a grid of studies (prunestudy.grid), every unique stage computed once, in the
stage store, on this machine (`--engine local --jobs N`: a process pool) or on a Ray cluster
(`--engine ray`: one Ray task per unique stage, its inputs as dependencies, a GPU each for the
training stages on CUDA).

    runs/<sweep>/
      grid.json                 the points: name, grid values, parameters hash, stage keys
      store.json                the stage store its points link into (stagestore.record)
      points/<point>/           a run folder per point: its stages link into the store; its own
                                analysis, report.html and results.json
      sweep.json, sweep.csv     one row per point (report.grid_table); written by the sweep notebook
      sweep.html                the grid report (notebooks/06_sweep.ipynb, code hidden)
      notebooks/06_sweep.ipynb  the executed sweep notebook

Each stage runs as its stage notebook under papermill, in its worker process's kernel (reset
between notebooks, prunestudy.kernels; `--fresh-kernels`: a kernel per notebook), so every stage
keeps its executed notebook and HTML page. A stage whose process dies (SIGKILL, a lost
Ray worker) is retried; a stage that raises is not: it is reported with its point, notebook and
last error line, the points that do not depend on it still finish, and the sweep exits 1. A rerun
does only what is missing or failed. Two sweeps over overlapping stages compute each stage once:
its store entry is claimed while it runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from . import config, execute, graph, grid, paths, runlock, schedule, stagestore, worker


def run(pts: list[grid.Point], sweep_dir: str | Path, *, engine: str = "local", jobs: int = 2,
        address: str | None = None, store_root: str | Path | None = None, log: Callable[[str], None] = print,
        ray_init: dict | None = None, fresh_kernels: bool = False, gpus: str | None = "auto",
        kinds: tuple[str, ...] = graph.CHAIN) -> dict:
    """Run every point of the grid into sweep_dir, each unique stage once (prunestudy.worker on the
    scheduling loop, prunestudy.schedule); then the grid report. Each worker runs its stages'
    notebooks in one kernel, reset between them (prunestudy.kernels); `fresh_kernels`: a kernel per
    notebook. `kinds`: only these stage kinds (a prefix of the chain; without the analysis there is
    no grid report). `gpus`: the local engine's workers' GPUs (`schedule.gpu_ids`; Ray gives each GPU task
    its own itself). Returns {"results": {task id: result}, "failed": [...], "ran": {stage: count}, ...}."""
    sweep_dir = config.resolve_path(sweep_dir)
    pinned = schedule.gpu_ids(gpus, [p.cfg["train"] for p in pts]) if engine == "local" else []
    root = stagestore.choose(sweep_dir, store_root)   # the one the sweep folder recorded, if any
    if root is None:
        raise execute.PreflightError("a sweep computes its stages in a stage store: drop --store none")
    execute.check_folder(sweep_dir, "sweep", root)   # before anything is written: not the project, not the store
    for p in pts:
        execute.preflight(p.cfg, paths.point_dir(sweep_dir, p.name), root)
    st = stagestore.Store(root)
    execute.ensure_kernel()
    with runlock.RunLock(sweep_dir, f"prunestudy sweep (pid {os.getpid()})"):
        summary = worker.compute(pts, sweep_dir, st, engine=engine, jobs=jobs, gpus=pinned, address=address,
                                 ray_init=ray_init, log=log, fresh_kernels=fresh_kernels, kinds=kinds,
                                 report="analysis" in kinds)
        if summary["page"]:   # a worker of the pool or of Ray rendered it
            log(f"==> sweep report: {summary['page']}")
        elif "analysis" in kinds and not summary["halted"]:
            execute.sweep_report(sweep_dir, log, fresh_kernels)
    return summary
