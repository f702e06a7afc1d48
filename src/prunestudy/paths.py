"""The run folder's layout: every file and folder a stage reads or writes is named here, once.

    <run>/
      params.json                 PARAMS       the effective parameters
      results.json                RESULTS      the machine-readable results
      report.html                 REPORT       the report (the analysis notebook, code hidden)
      notebooks/0N_<stage>.ipynb  executed_notebook(run, stage), and its .html page
      data/                       stage_dir(run, "data"): images(split), labels(split), manifest(split),
                                  rejects(split) for split in train / test, DATA_INFO
      train/                      MODEL, HISTORY, METRICS, PREDICTIONS, [REWIND], [CHECKPOINT]
      prune/                      MODEL, MASKS, ARCHITECTURE, METRICS, PREDICTIONS, [HISTORY, REWOUND]
      retrain/                    MODEL, MASKS, ARCHITECTURE, EXPORT, EXPORT_META, HISTORY, METRICS,
                                  PREDICTIONS, [CHECKPOINT], control/ (control_dir)
      timing/                     timing_dir(run): METRICS, the latency of the pruned and retrained models
                                  against the dense one on this machine (when they are not of its shape);
                                  TIMES, every paired repeat's time behind those figures
      analysis/figures/*.png      figures_dir(run)
      <stage>/stage.json          stage_record(run, stage): what the stage was computed from (records)
      run.lock                    lock_file(run): the lock of the process writing the folder
      store.json                  STORE_RECORD: the stage store its stages link into (a sweep folder's too)
      repeats/seed-<s>/           repeat_dir(run, s): a run folder of its own (data/ linked)
      curve/<method>-<amount>/    curve_point_dir(run, name): a curve point's run folder (data/ and
                                  train/ linked; its own prune/, retrain/ and notebooks/)
      lab/0N_<stage>.ipynb        lab_notebook(run, stage): `prunestudy lab`'s working copies of the stage
                                  notebooks, the run's parameters in them (the user's: never overwritten);
                                  lab/.old/<name>-<time>.ipynb: lab_old(run, stage), a copy --reset moved aside

Functions take the run folder and return paths; constants are bare file names.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import config

# each stage of a run folder and its notebook (the stage graph, prunestudy.graph, orders them)
NOTEBOOK_OF = {"data": "01_data.ipynb", "train": "02_train.ipynb", "prune": "03_prune.ipynb",
               "retrain": "04_retrain.ipynb", "analysis": "05_analysis.ipynb"}

# files at the top of a run folder
PARAMS = "params.json"
RESULTS = "results.json"
REPORT = "report.html"
NOTEBOOKS = "notebooks"
REPEATS = "repeats"
CURVE = "curve"                    # curve/<point>/: the points of a run's curve (prune.amounts x prune.methods)
OLD_CURVE = "sweep"                # what curve/ was called before (a run folder of then is renamed once)
LAB = "lab"                        # lab/: `prunestudy lab`'s working copies of the stage notebooks
LAB_OLD = ".old"                   # lab/.old/: the copies `prunestudy lab --reset` moved aside (never deleted)
PARALLEL = ".parallel"             # `prunestudy run --jobs N`: its chains computed as a sweep of their own
LOCK = "run.lock"                  # held by the process writing the run folder (runlock.RunLock)
COMPARE_PAGE = "compare.html"      # prunestudy compare's page, in the current folder unless -o names another
STORE = ".store"                   # beside the run folders: the stage store (stagestore.py)
STORE_RECORD = "store.json"        # a run or sweep folder's stage store, relative to it (stagestore.recorded)
ENTRY_NOTEBOOK = ".executed.ipynb"  # a store entry's executed notebook (run/notebooks/ links to it)
QUARANTINE = ".quarantine"          # <store>/.quarantine/<stage>/<key>-<time>/: entries whose bytes changed
STORE_USERS = ".users"             # <store>/.users/<hash>: a folder that links into the store (its absolute path)
TRASH = ".trash-"                  # <store>/.trash-<pid>/: entries `store gc` is removing (renamed there first)
GC_LOCK = ".gc.lock"               # <store>/.gc.lock: held by `store gc` while it rescans and removes

# files inside a stage folder
STAGE_RECORD = "stage.json"        # the stage key, written by the runner when the stage finished
METRICS = "metrics.json"           # written last, atomically: marks a stage (or curve point) complete
DATA_INFO = "data.json"            # the data stage's metrics.json
MODEL = "model.pt"                 # state_dict, masks folded (loads with weights_only=True)
MASKS = "masks.pt"                 # boolean keep-masks of the pruned weights
HISTORY = "history.json"           # the loss of every step and per-epoch figures
PREDICTIONS = "predictions.npy"    # the test-set predictions, in test-set order
ARCHITECTURE = "architecture.json"  # layer shapes: channel-pruned models are rebuilt from it
EXPORT = "export.pt"               # retrain/: the final model, a plain state_dict
EXPORT_META = "export.json"        # retrain/: how to rebuild it
REWIND = "rewind.pt"               # train/: the weights after training step prune.rewind_step
REWOUND = "rewound.pt"             # prune/: the surviving weights reset to that step
CHECKPOINT = "checkpoint.pt"       # train/, retrain/: end-of-epoch state while a stage runs
TIMES = "times.json"               # timing/: every repeat's time behind its figures (efficiency.split_times)
CONTROL = "control"                # retrain/control/: the dense control
TIMING = "timing"                  # timing/: the latency of a chain's models on one machine (the timing stage)
FIGURES = Path("analysis") / "figures"
# what a run writes at the top of its folder besides its stages: a folder that holds one of these (or a
# stage folder) without a params.json is not a run folder, and a run there would replace them
RUN_NAMES = (PARAMS, RESULTS, REPORT, NOTEBOOKS, REPEATS, CURVE, TIMING)

SPLITS = ("train", "test")

# a sweep's folder (prunestudy sweep): the grid, a run folder per point, the grid report
SWEEP_GRID = "grid.json"           # the points: name, grid values, parameters hash, stage keys
SWEEP_POINTS = "points"            # points/<point>/: a run folder per point
SWEEP_JSON = "sweep.json"          # one row per point and per operating point
SWEEP_CSV = "sweep.csv"            # one row per point
SWEEP_REPORT = "sweep.html"        # the grid report
SWEEP_NOTEBOOK = "06_sweep.ipynb"  # the grid report's notebook (notebooks/ of the project and of the sweep)
SWEEP_BEGUN = (LOCK, SWEEP_POINTS)  # all a sweep's first start leaves before its grid.json (cut short)


def point_dir(sweep_dir: str | Path, name: str) -> Path:
    return Path(sweep_dir) / SWEEP_POINTS / name


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    """None = runs/default of the project (what `make study` writes); a relative folder is taken
    from the current directory."""
    return config.resolve_path(run_dir) if run_dir else config.resolve_path("runs/default", config.project_root())


def require(stage: str, directory: Path) -> Path:
    """The output folder of `stage`, or a FileNotFoundError saying which notebook makes it (or, for a
    link into a stage store that is not there, `dangling`'s line)."""
    gone = dangling(directory)
    if gone:
        raise FileNotFoundError(gone)
    if not (Path(directory) / marker(stage)).is_file():
        raise FileNotFoundError(
            f"no complete output of stage '{stage}' in {directory}: run notebooks/{NOTEBOOK_OF[stage]} "
            f"first with the same run_dir, or the whole chain with `make study` / `prunestudy run`")
    return directory


def rerun_command(run_dir: str | Path) -> str:
    """The command that computes a run folder's stages again, with its own parameters."""
    return f"`prunestudy run -f {Path(run_dir) / PARAMS} --run-dir {run_dir}`"


def dangling(path: str | Path, fix: bool = True) -> str | None:
    """The one line that says a run folder's link (a stage folder, a notebook, timing/) leads nowhere,
    why that happens and what to do (None when `path` is no such link): a run folder's stages are
    links into its stage store, and `cp -r` / `cp -a` copy the links, not the stages. `fix=False`:
    without the fix (the runner, which applies it)."""
    path = Path(path)
    if not path.is_symlink() or path.exists():
        return None
    run, link = run_folder_of(path), os.readlink(path)
    target = Path(os.path.normpath(path.parent / link))
    for entry in (target, target.parent):   # a stage folder's link, a notebook's (<store>/<stage>/<key>/<file>)
        moved = sorted((entry.parent.parent / QUARANTINE / entry.parent.name).glob(f"{entry.name}-*"))
        if moved:   # stagestore.quarantine: its files were not the bytes its stage wrote
            line = (f"{path} links to {link}, which was moved to {moved[-1]} (its files were not the bytes its "
                    "stage wrote)")
            return f"{line}: rerun {rerun_command(run)} to compute it again" if fix else line
    line = (f"{path} links to {link}, which does not exist: the run folder was copied or moved "
            "without its stage store (cp -r copies the links, not the stages), or the store was deleted")
    if not fix:
        return line
    return (f"{line}: copy a run folder with `prunestudy export SRC DEST`, or rerun {rerun_command(run)} to "
            "compute its stages again")


def dangling_stage(run_dir: str | Path) -> str | None:
    """`dangling`'s line for the first stage folder of a run folder (timing/ too) that leads nowhere."""
    return next(filter(None, (dangling(Path(run_dir) / name) for name in (*NOTEBOOK_OF, TIMING))), None)


def run_folder_of(path: str | Path) -> Path:
    """The run folder a path lies in (a repeat's or curve point's: its run's): the nearest folder above
    it that holds a params.json, else the folder it lies in."""
    path = Path(path)
    for folder in path.parents:
        if (folder / PARAMS).is_file():
            if folder.parent.name in (REPEATS, CURVE) and (folder.parent.parent / PARAMS).is_file():
                return folder.parent.parent
            return folder
        if folder.name in (REPEATS, CURVE) and (folder.parent / PARAMS).is_file():
            return folder.parent
    return path.parent


def images(split: str) -> str:
    return f"{split}_images.npy"


def labels(split: str) -> str:
    return f"{split}_labels.npy"


def manifest(split: str) -> str:
    return f"{split}_manifest.csv"


def rejects(split: str) -> str:
    return f"{split}_rejects.csv"


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    """run/<stage>/ (data, train, prune, retrain, analysis)."""
    if stage not in NOTEBOOK_OF:
        raise ValueError(f"unknown stage {stage!r}: one of {', '.join(NOTEBOOK_OF)}")
    return Path(run_dir) / stage


def stage_record(run_dir: str | Path, stage: str) -> Path:
    return stage_dir(run_dir, stage) / STAGE_RECORD


def marker(stage: str) -> str:
    """The file, written last, whose presence in a stage's folder says the stage finished."""
    return DATA_INFO if stage == "data" else METRICS


def completion_marker(run_dir: str | Path, stage: str) -> Path:
    """The file whose presence says a stage finished in a run folder: report.html for the analysis."""
    return Path(run_dir) / REPORT if stage == "analysis" else stage_dir(run_dir, stage) / marker(stage)


def control_dir(run_dir: str | Path) -> Path:
    return stage_dir(run_dir, "retrain") / CONTROL


def timing_dir(run_dir: str | Path) -> Path:
    """A chain's timing stage (latency measured on this machine): run/timing/ (a point's: its own)."""
    return Path(run_dir) / TIMING


def curve_point_dir(run_dir: str | Path, name: str) -> Path:
    """A curve point's own run folder."""
    return Path(run_dir) / CURVE / name


def curve_point(run_dir: str | Path, stage: str, name: str) -> Path:
    """A curve point's stage folder (prune or retrain)."""
    return stage_dir(curve_point_dir(run_dir, name), stage)


def point_name(method: str, amount: float) -> str:
    """Folder name of a curve point, e.g. l1_unstructured-0.5."""
    return f"{method}-{float(amount)!r}"


def curve_points(cfg: dict) -> list[tuple[str, dict]]:
    """The curve's points (config.curve_points): (folder name, parameters), in order."""
    return [(point_name(p["prune"]["method"], p["prune"]["amount"]), p) for p in config.curve_points(cfg)]


def notebooks_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / NOTEBOOKS


def executed_notebook(run_dir: str | Path, stage: str) -> Path:
    return notebooks_dir(run_dir) / NOTEBOOK_OF[stage]


def repeat_name(seed: int) -> str:
    """A repeat's folder relative to its run folder, e.g. repeats/seed-1."""
    return f"{REPEATS}/seed-{seed}"


def repeat_dir(run_dir: str | Path, seed: int) -> Path:
    return Path(run_dir) / repeat_name(seed)


def lab_dir(run_dir: str | Path) -> Path:
    """run/lab/: the working copies `prunestudy lab` opens (the tracked notebooks/ stay untouched)."""
    return Path(run_dir) / LAB


def lab_notebook(run_dir: str | Path, stage: str) -> Path:
    return lab_dir(run_dir) / NOTEBOOK_OF[stage]


def lab_old(run_dir: str | Path, stage: str, stamp: str) -> Path:
    """Where `prunestudy lab --reset` moves a stage's working copy aside: lab/.old/<name>-<stamp>.ipynb."""
    name = Path(NOTEBOOK_OF[stage])
    return lab_dir(run_dir) / LAB_OLD / f"{name.stem}-{stamp}{name.suffix}"


def lock_file(run_dir: str | Path) -> Path:
    """The run folder's lock (one writer at a time): a repeat and a curve point share the lock of
    their run."""
    run_dir = Path(run_dir)
    if run_dir.parent.name in (REPEATS, CURVE) and (run_dir.parent.parent / PARAMS).is_file():
        run_dir = run_dir.parent.parent
    return run_dir / LOCK


def figures_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / FIGURES
