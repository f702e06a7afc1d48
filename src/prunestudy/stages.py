"""The five stages as plain functions. Each notebook is a parameters cell plus a call to one of
these and displays of what it returns; each reads its inputs from, and writes its outputs to,
a run folder:

    run_dir/data/      train/test uint8 crops, manifests, data.json        (stage 1)
    run_dir/train/     model.pt, history.json, metrics.json               (stage 2)
    run_dir/prune/     model.pt, masks.pt, metrics.json                   (stage 3)
    run_dir/retrain/   model.pt, masks.pt, history.json, metrics.json     (stage 4)
    run_dir/results.json                                                  (all, merged)

metrics.json is written last, atomically: it marks a stage as complete.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from . import cache, config, data, models, prune, store, synth, train

STAGE_DIRS = {"data": "data", "train": "train", "prune": "prune", "retrain": "retrain"}
NOTEBOOK_OF = {"data": "01_data.ipynb", "train": "02_train.ipynb", "prune": "03_prune.ipynb",
               "retrain": "04_retrain.ipynb", "analysis": "05_analysis.ipynb"}


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    """None = runs/default of the project (what `make study` writes)."""
    return config.resolve_path(run_dir or "runs/default")


def stage_dir(run_dir: Path, stage: str, override: str | Path | None = None) -> Path:
    return config.resolve_path(override) if override else Path(run_dir) / STAGE_DIRS[stage]


def require(stage: str, directory: Path, marker: str = "metrics.json") -> Path:
    """The output folder of `stage`, or a FileNotFoundError saying which notebook makes it."""
    if stage == "data":
        marker = "data.json"
    if not (directory / marker).is_file():
        raise FileNotFoundError(
            f"no complete output of stage '{stage}' in {directory}: run notebooks/{NOTEBOOK_OF[stage]} "
            f"first with the same run_dir, or the whole chain with `make study` / `prunestudy run`")
    return directory


def embedded_root(embedded: dict | None) -> tuple[Path, dict]:
    """Where the embedded dataset with these parameters lives (generated once, then reused)."""
    params = {**config.SCHEMA["data.embedded"][0], **(embedded or {})}
    return config.project_root() / "data" / "embedded" / config.stage_hash(params), params


# --- stage 1 -----------------------------------------------------------------------------------
def run_data(run_dir=None, *, root="embedded", embedded=None, classes="top:10", image_size=64, context=0.2,
             min_box=16, max_per_class=None, max_test_per_class=None, seed=0, label_mode="crop",
             min_per_class=1, max_bad_fraction=0.01, workers=None, out_dir=None, log=print) -> dict:
    """The 10-class crop set of a COCO-format root ('embedded' = the embedded dataset), built once
    into the crop cache and linked into run_dir/data (see prunestudy.cache)."""
    run_dir = resolve_run_dir(run_dir)
    if root == "embedded":
        where, params = embedded_root(embedded)
        root = synth.ensure(where, **params)
    params = dict(classes=classes, image_size=image_size, context=context, min_box=min_box,
                  max_per_class=max_per_class, max_test_per_class=max_test_per_class, seed=seed,
                  label_mode=label_mode, min_per_class=min_per_class, max_bad_fraction=max_bad_fraction)
    return cache.crops(config.resolve_path(root), params, stage_dir(run_dir, "data", out_dir), workers=workers,
                       log=log)


# --- stage 2 -----------------------------------------------------------------------------------
def run_train(run_dir=None, *, model="seed_cnn", epochs=10, batch_size=32, lr=1e-4, device="auto", seed=0,
              data_dir=None, out_dir=None, log=print) -> dict:
    """Train from scratch on the crops; save weights, the loss of every step and per-epoch figures."""
    run_dir = resolve_run_dir(run_dir)
    data_dir = require("data", stage_dir(run_dir, "data", data_dir))
    out = stage_dir(run_dir, "train", out_dir)
    dev = train.select_device(device)
    classes = data.read_info(data_dir)["classes"]
    trainset, testset = _load_data(data_dir, dev)
    torch.manual_seed(seed)
    net = models.build_model(model, len(classes)).to(dev)
    start = time.perf_counter()
    history = train.fit(net, trainset, testset, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                        log=log, label="train")
    ev = train.evaluate(net, *testset)
    store.save_tensors(out / "model.pt", net.state_dict())
    _save_predictions(out, ev["predictions"])
    store.write_json(out / "history.json", history)
    metrics = {"model": model, "params_total": models.count_parameters(net), "test_accuracy": ev["accuracy"],
               "test_loss": ev["loss"], "epochs": history["epochs"], "seconds": time.perf_counter() - start,
               "params": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed},
               **environment(dev)}
    store.write_json(out / "metrics.json", metrics)
    return metrics


# --- stage 3 -----------------------------------------------------------------------------------
def run_prune(run_dir=None, *, method="l1_unstructured", amount=0.2, targets="all", device="auto",
              data_dir=None, model_dir=None, out_dir=None) -> dict:
    """Prune the trained model and evaluate it before any retraining."""
    run_dir = resolve_run_dir(run_dir)
    data_dir = require("data", stage_dir(run_dir, "data", data_dir))
    model_dir = require("train", stage_dir(run_dir, "train", model_dir))
    out = stage_dir(run_dir, "prune", out_dir)
    dev = train.select_device(device)
    _, testset = _load_data(data_dir, dev, train_split=False)
    net = load_model(model_dir, dev)
    before = train.evaluate(net, *testset)
    prune.apply(net, method=method, amount=amount, targets=targets)
    ev = train.evaluate(net, *testset)
    sp = prune.sparsity(net, targets)
    store.save_tensors(out / "masks.pt", prune.masks(net))
    store.save_tensors(out / "model.pt", prune.make_permanent(net).state_dict())
    _save_predictions(out, ev["predictions"])
    metrics = {"method": method, "amount": amount, "targets": targets, **_sparsity_fields(sp),
               "test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
               "dense_test_accuracy": before["accuracy"], "dense_test_loss": before["loss"], **environment(dev)}
    store.write_json(out / "metrics.json", metrics)
    return metrics


# --- stage 4 -----------------------------------------------------------------------------------
def run_retrain(run_dir=None, *, epochs=2, lr=1e-4, batch_size=32, device="auto", seed=0,
                data_dir=None, pruned_dir=None, out_dir=None, log=print) -> dict:
    """Fine-tune the pruned model with its masks held: pruned weights stay exactly zero."""
    run_dir = resolve_run_dir(run_dir)
    data_dir = require("data", stage_dir(run_dir, "data", data_dir))
    pruned_dir = require("prune", stage_dir(run_dir, "prune", pruned_dir))
    out = stage_dir(run_dir, "retrain", out_dir)
    dev = train.select_device(device)
    trainset, testset = _load_data(data_dir, dev)
    net = load_model(pruned_dir, dev, masks=True)
    targets = store.read_json(pruned_dir / "metrics.json")["targets"]
    start = time.perf_counter()
    history = train.fit(net, trainset, testset, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                        log=log, label="retrain")
    ev = train.evaluate(net, *testset)
    store.save_tensors(out / "masks.pt", prune.masks(net))
    sp = prune.sparsity(net, targets)
    store.save_tensors(out / "model.pt", prune.make_permanent(net).state_dict())
    _save_predictions(out, ev["predictions"])
    store.write_json(out / "history.json", history)
    metrics = {"test_accuracy": ev["accuracy"], "test_loss": ev["loss"], **_sparsity_fields(sp),
               "epochs": history["epochs"], "seconds": time.perf_counter() - start,
               "params": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed},
               **environment(dev)}
    store.write_json(out / "metrics.json", metrics)
    return metrics


# --- shared ------------------------------------------------------------------------------------
def load_model(stage_dir: Path, device="cpu", masks: bool = False) -> torch.nn.Module:
    """The model saved by a stage (architecture from train/metrics.json); masks re-attached if asked."""
    run_dir = Path(stage_dir).parent
    arch = store.read_json(run_dir / "train" / "metrics.json")["model"]
    classes = data.read_info(run_dir / "data")["classes"]
    net = models.build_model(arch, len(classes))
    net.load_state_dict(store.load_tensors(Path(stage_dir) / "model.pt"))
    if masks:
        prune.restore(net, store.load_tensors(Path(stage_dir) / "masks.pt"))
    return net.to(device)


def collect_results(run_dir, params: dict | None = None, timings: dict | None = None) -> dict:
    """results.json: the contract of a run, merged from the stages completed so far."""
    run_dir = Path(run_dir)
    res: dict = {}
    if (run_dir / "data" / "data.json").is_file():
        info = data.read_info(run_dir / "data")
        res["data"] = {k: info[k] for k in ("classes", "train_size", "test_size", "counts", "skipped", "root")}
    for stage in ("train", "prune", "retrain"):
        path = run_dir / stage / "metrics.json"
        if path.is_file():
            res[stage] = store.read_json(path)
    if params is not None:
        res["params"] = params
        res["params_hash"] = config.stage_hash(params)
    if timings is not None:
        res["timings_s"] = timings
    res["provenance"] = provenance()
    return res


def load_results(run_dir=None) -> dict:
    """Results of a run as the analysis sees them: fresh from the stage outputs, with the
    parameters and stage timings that `prunestudy run` recorded in results.json when present."""
    run_dir = resolve_run_dir(run_dir)
    require("data", run_dir / "data")
    saved = store.read_json(run_dir / "results.json") if (run_dir / "results.json").is_file() else {}
    params = saved.get("params")
    if params is None and (run_dir / "params.json").is_file():
        params = store.read_json(run_dir / "params.json")
    return collect_results(run_dir, params, saved.get("timings_s"))


def environment(device: torch.device) -> dict:
    return {"device": str(device), "python": sys.executable,
            "torch_threads": torch.get_num_threads()}


def provenance() -> dict:
    versions = {}
    for pkg in ("prunestudy", "torch", "torchvision", "numpy", "pycocotools", "papermill", "nbconvert",
                "seaborn", "matplotlib", "pandas"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"versions": versions, "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "git_commit": _git_commit(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=config.project_root(), capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=config.project_root(), capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _save_predictions(out: Path, predictions: np.ndarray) -> None:
    store.atomic_write(out / "predictions.npy", lambda f: np.save(f, predictions, allow_pickle=False))


def _load_data(data_dir: Path, dev: torch.device, train_split: bool = True):
    test = train.to_device(*data.load_split(data_dir, "test"), dev)
    return (train.to_device(*data.load_split(data_dir, "train"), dev) if train_split else None), test


def _sparsity_fields(sp: dict) -> dict:
    return {"global_sparsity": sp["global_sparsity"],
            "layers": {name: v["sparsity"] for name, v in sp["layers"].items()},
            "layer_counts": {name: {"zeros": v["zeros"], "size": v["size"]} for name, v in sp["layers"].items()},
            "params_total": sp["params_total"], "params_nonzero": sp["params_nonzero"]}
