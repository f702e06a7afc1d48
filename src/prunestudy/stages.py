"""The five stages as plain functions. Each notebook is a parameters cell plus a call to one of
these and displays of what it returns; each reads its inputs from, and writes its outputs to,
a run folder:

    run_dir/data/      train/test uint8 crops, manifests, data.json        (stage 1)
    run_dir/train/     model.pt, history.json, metrics.json, [rewind.pt]  (stage 2)
    run_dir/prune/     model.pt, masks.pt, architecture.json, metrics.json, [rewound.pt,
                       history.json (between rounds), sweep/<method>-<amount>/]   (stage 3)
    run_dir/retrain/   model.pt, masks.pt, architecture.json, export.pt, export.json,
                       history.json, metrics.json, [control/, sweep/<method>-<amount>/]  (stage 4)
    run_dir/results.json                                                  (all, merged)

metrics.json is written last, atomically: it marks a stage (or a sweep point) as complete.
Every training call goes through `_fit`.
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from . import cache, config, data, distributed, efficiency, models, prune, store, synth, train

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
              rewind_step=None, precision="auto", channels_last="auto", compile="auto", fused="auto",
              weights=None, launcher="none", nproc_per_node=1, data_dir=None, out_dir=None, log=print) -> dict:
    """Train from scratch (or from local `weights`) on the crops; save weights, the loss of every step
    and per-epoch figures. With `rewind_step` (prune.rewind_step), the weights after that optimizer
    step (0 = the initialisation) are also saved, as rewind.pt, for lottery-ticket rewinding.

    Speed options (precision, channels_last, compile, fused; see train.resolve_speed) are recorded
    and reused by the later stages' fine-tuning. A checkpoint is written at the end of every epoch
    and an interrupted stage resumes from it. `launcher='torchrun'` reruns this function under
    torchrun with `nproc_per_node` processes (DistributedDataParallel; only rank 0 writes)."""
    if launcher == "torchrun" and not torch.distributed.is_initialized():
        kw = {k: str(v) if isinstance(v, Path) else v for k, v in locals().items() if k != "log"}
        return distributed.launch("run_train", kw, nproc_per_node, log=log)  # the workers see the process group
    run_dir = resolve_run_dir(run_dir)
    data_dir = require("data", stage_dir(run_dir, "data", data_dir))
    out = stage_dir(run_dir, "train", out_dir)
    dev = train.select_device(device)
    classes = data.read_info(data_dir)["classes"]
    trainset, testset = _load_data(data_dir, dev)
    torch.manual_seed(seed)
    net = models.build_model(model, len(classes))
    if weights:
        train.load_weights(net, config.resolve_path(weights))
    net = net.to(dev)
    speed = {"precision": precision, "channels_last": channels_last, "compile": compile, "fused": fused}
    on_step = _rewind_saver(out, rewind_step, net, steps=epochs * -(-len(trainset[0]) // batch_size))
    start = time.perf_counter()
    history = _fit(net, trainset, testset, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                   log=log, label="train", on_step=on_step, speed=speed, checkpoint=out / CHECKPOINT_FILE)
    ev = train.evaluate(net, *testset)
    if not train.is_main_process():
        return {}
    store.save_tensors(out / "model.pt", net.state_dict())
    _save_predictions(out, ev["predictions"])
    store.write_json(out / "history.json", history)
    metrics = {"model": model, "params_total": models.count_parameters(net), "test_accuracy": ev["accuracy"],
               "test_loss": ev["loss"], "epochs": history["epochs"], "seconds": time.perf_counter() - start,
               "params": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "weights": weights,
                          "launcher": launcher, "nproc_per_node": nproc_per_node},
               "speed_params": speed, "speed": history.get("speed"), "world_size": history.get("world_size", 1),
               "rewind_step": rewind_step, **environment(dev)}
    store.write_json(out / "metrics.json", metrics)
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)  # done: a later run with other settings starts afresh
    return metrics


# --- stage 3 -----------------------------------------------------------------------------------
def run_prune(run_dir=None, *, method="l1_unstructured", amount=0.2, targets="all", rounds=1, rewind_step=None,
              amounts=None, methods=None, epochs_per_round=1, lr=1e-4, batch_size=32, seed=0, device="auto",
              data_dir=None, model_dir=None, out_dir=None, log=print) -> dict:
    """Prune the trained model (one shot, or `rounds` rounds with `epochs_per_round` of fine-tuning
    between them, reaching `amount` after the last) and evaluate it before the final retraining.

    With `rewind_step`, the surviving weights are also reset to the training state saved at that
    step (train/rewind.pt; masks kept) and saved as rewound.pt: retraining starts from there.
    Efficiency figures (`efficiency.summary` against the dense model, latency measured in this
    run) go into metrics.json. With `amounts`, a sweep: each of `methods` (None = [method,
    random_unstructured]) prunes the trained model at each amount, one shot, into sweep/<point>/;
    points already done with the same inputs are skipped, so an interrupted sweep resumes.
    `epochs_per_round`, `lr`, `batch_size`, `seed`: fine-tuning between rounds (retrain.*)."""
    run_dir = resolve_run_dir(run_dir)
    data_dir = require("data", stage_dir(run_dir, "data", data_dir))
    model_dir = require("train", stage_dir(run_dir, "train", model_dir))
    out = stage_dir(run_dir, "prune", out_dir)
    arch = store.read_json(model_dir / "metrics.json")["model"]
    sweep_methods = config.sweep_methods({"method": method, "methods": methods}) if amounts else []
    for m in dict.fromkeys([method, *sweep_methods]):  # the same checks as the parameters, for notebook runs
        prune.check(m, amount if m == method else 0.0, targets, arch)
    rewind_state = _rewind_state(model_dir, rewind_step, method) if rewind_step is not None else None
    _SPEED.set(_train_speed(model_dir))
    (out / "metrics.json").unlink(missing_ok=True)  # complete again only once rewritten, last
    dev = train.select_device(device)
    trainset, testset = _load_data(data_dir, dev, train_split=rounds > 1 and epochs_per_round > 0)
    classes = data.read_info(data_dir)["classes"]
    dense = load_model(model_dir, dev)
    start = time.perf_counter()
    before = train.evaluate(dense, *testset)
    example = torch.zeros(1, *testset[0].shape[1:], device=dev)
    schedule = prune.round_amounts(amount, rounds)
    net, rows, steps = prune.clone(dense), [], []
    for r, fraction in enumerate(schedule, 1):
        prune.apply(net, method, fraction, targets, example_input=example, seed=seed + r - 1)
        ev = train.evaluate(net, *testset)
        sp = _sparsity_fields(net, dense, targets)
        row = {"round": r, "fraction_of_remaining": fraction, "global_sparsity": sp["global_sparsity"],
               "params_nonzero": sp["params_nonzero"], "test_accuracy": ev["accuracy"], "test_loss": ev["loss"]}
        log(f"[prune] round {r}/{rounds}: {method} {fraction:.4f} of what remained, sparsity "
            f"{sp['global_sparsity']:.2%}, test acc {ev['accuracy']:.1%}")
        if r < rounds and epochs_per_round > 0:
            hist = _fit(net, trainset, testset, epochs=epochs_per_round, batch_size=batch_size, lr=lr, seed=seed + r,
                        log=log, label=f"round {r}/{rounds} fine-tune")
            row["epochs"] = hist["epochs"]
            steps += hist["steps"]
        rows.append(row)
    rewind = None
    if rewind_state is not None:
        rewound = prune.rewind(prune.clone(net), rewind_state)
        ev_r = train.evaluate(rewound, *testset)
        store.save_tensors(out / REWOUND_FILE, prune.export(rewound)[0])
        rewind = {"step": rewind_step, "file": REWOUND_FILE, "test_accuracy": ev_r["accuracy"], "test_loss": ev_r["loss"]}
        log(f"[prune] surviving weights rewound to training step {rewind_step}: test acc {ev_r['accuracy']:.1%}")
    eff = _efficiency(net, dense, LATENCY, testset)
    _save_model(out, net, arch, len(classes))
    _save_predictions(out, ev["predictions"])
    if steps:
        store.write_json(out / "history.json", {"steps": steps, "epochs": [e for r in rows for e in r.get("epochs", [])]})
    else:
        (out / "history.json").unlink(missing_ok=True)
    if rewind is None:
        (out / REWOUND_FILE).unlink(missing_ok=True)
    names = _prune_sweep(out, dense, testset, example, amounts=amounts or [], methods=sweep_methods, targets=targets,
                         seed=seed, dense_key=_file_digest(model_dir / "model.pt"), arch=arch,
                         num_classes=len(classes), log=log)
    metrics = {"method": method, "amount": amount, "targets": targets, "kind": prune.METHODS[method]["kind"],
               "rounds": rounds, "round_amounts": schedule, "epochs_per_round": epochs_per_round if rounds > 1 else 0,
               "between_round_epochs": (rounds - 1) * epochs_per_round, "rounds_detail": rows,
               **_sparsity_fields(net, dense, targets), "test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
               "dense_test_accuracy": before["accuracy"], "dense_test_loss": before["loss"], "rewind": rewind,
               "efficiency": eff, "sweep": names, "seconds": time.perf_counter() - start,
               "params": {"seed": seed, "lr": lr, "batch_size": batch_size}, **environment(dev)}
    store.write_json(out / "metrics.json", metrics)
    return metrics


def _prune_sweep(out: Path, dense, testset, example, *, amounts, methods, targets, seed, dense_key, arch, num_classes,
                 log) -> list[str]:
    """Every (method, amount) of the sweep: prune the trained model one shot, evaluate it (no
    retraining), measure efficiency; out/sweep/<point>/ holds masks.pt (masked methods: the weights
    are the trained ones) or model.pt + architecture.json (channel), and metrics.json, written last.
    A point whose metrics.json has the same key (method, amount, targets, seed, trained weights)
    is skipped. Returns the point names in sweep order."""
    names = []
    for method in methods:
        for amount in amounts:
            name = point_name(method, amount)
            names.append(name)
            where = out / "sweep" / name
            key = config.stage_hash({"method": method, "amount": amount, "targets": targets, "seed": seed,
                                     "dense": dense_key})
            if _point_done(where, key):
                log(f"[sweep] {name}: done earlier with the same inputs, skipped")
                continue
            (where / "metrics.json").unlink(missing_ok=True)
            start = time.perf_counter()
            net = prune.clone(dense)
            prune.apply(net, method, amount, targets, example_input=example, seed=seed)
            ev = train.evaluate(net, *testset)
            eff = _efficiency(net, dense, SWEEP_LATENCY, testset)
            if prune.METHODS[method]["kind"] == "structural":
                _save_model(where, net, arch, num_classes)
            else:
                store.save_tensors(where / "masks.pt", prune.masks(net))
            sp = _sparsity_fields(net, dense, targets)
            metrics = {"key": key, "name": name, "method": method, "amount": amount, "targets": targets,
                       "kind": prune.METHODS[method]["kind"], **sp, "test_accuracy": ev["accuracy"],
                       "test_loss": ev["loss"], "efficiency": eff, "seconds": time.perf_counter() - start}
            store.write_json(where / "metrics.json", metrics)
            log(f"[sweep] {name}: sparsity {sp['global_sparsity']:.2%}, test acc {ev['accuracy']:.1%} before "
                f"retraining, measured speedup {eff['measured_speedup']:.2f}x ({metrics['seconds']:.1f} s)")
    return names


# --- stage 4 -----------------------------------------------------------------------------------
def run_retrain(run_dir=None, *, epochs=2, lr=1e-4, batch_size=32, epochs_per_round=1, control=True, device="auto",
                seed=0, data_dir=None, pruned_dir=None, model_dir=None, out_dir=None, launcher=None, log=print) -> dict:
    """Fine-tune the pruned model (from its rewound weights when the prune stage rewound) with its
    masks held: pruned weights stay exactly zero. Then export it (export.pt + export.json); with
    `control`, fine-tune the unpruned trained model for as many epochs (the prune stage's
    between-round epochs included) with the same settings, into control/; then retrain every
    sweep point of the prune stage for `epochs` into sweep/<point>/ (finished points skipped).
    `epochs_per_round` is the prune stage's (recorded there); a different value is reported.

    `launcher`: None = as the train stage ran (train.launcher and train.nproc_per_node, recorded in
    its metrics.json): under torchrun, this function reruns in that many processes and all its
    fine-tuning (the control and the sweep points included) is data-parallel; only rank 0 measures
    latency and writes. 'none' forces one process."""
    run_dir = resolve_run_dir(run_dir)
    data_dir = require("data", stage_dir(run_dir, "data", data_dir))
    pruned_dir = require("prune", stage_dir(run_dir, "prune", pruned_dir))
    model_dir = require("train", stage_dir(run_dir, "train", model_dir))
    out = stage_dir(run_dir, "retrain", out_dir)
    trained_with = store.read_json(model_dir / "metrics.json").get("params") or {}
    if launcher is None:
        launcher = trained_with.get("launcher", "none")
    if launcher == "torchrun" and not torch.distributed.is_initialized():
        args = set(inspect.signature(run_retrain).parameters) - {"log"}
        kw = {k: str(v) if isinstance(v, Path) else v for k, v in locals().items() if k in args}
        return distributed.launch("run_retrain", kw, int(trained_with.get("nproc_per_node") or 1), log=log)
    main = train.is_main_process()
    pm = store.read_json(pruned_dir / "metrics.json")
    if pm.get("rounds", 1) > 1 and pm.get("epochs_per_round") != epochs_per_round:
        log(f"[retrain] note: the prune stage fine-tuned {pm.get('epochs_per_round')} epochs per round, not "
            f"{epochs_per_round}: the control counts the epochs the prune stage really ran")
    (out / "metrics.json").unlink(missing_ok=True)  # complete again only once rewritten, last
    _SPEED.set(_train_speed(model_dir))
    dev = train.select_device(device)
    trainset, testset = _load_data(data_dir, dev)
    classes = data.read_info(data_dir)["classes"]
    arch = store.read_json(model_dir / "metrics.json")["model"]
    dense = load_model(model_dir, dev)
    rewind = pm.get("rewind")
    net = load_model(pruned_dir, dev, masks=True, weights=rewind["file"] if rewind else "model.pt")
    first = train.evaluate(net, *testset)
    start = time.perf_counter()
    history = _fit(net, trainset, testset, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, log=log,
                   label="retrain", checkpoint=out / CHECKPOINT_FILE)
    seconds = time.perf_counter() - start
    ev = train.evaluate(net, *testset)
    sp = _sparsity_fields(net, dense, pm["targets"])
    eff = export = None
    if main:  # under torchrun the other ranks go on to the control's fine-tuning and wait for rank 0 there
        eff = _efficiency(net, dense, LATENCY, testset)
        _save_model(out, net, arch, len(classes))
        export = _export(out, net, arch, classes, pm, ev)
        _save_predictions(out, ev["predictions"])
        store.write_json(out / "history.json", history)
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}
    control_epochs = epochs + pm.get("between_round_epochs", 0)
    if control:
        _control(out / "control", dense, trainset, testset, epochs=control_epochs, batch_size=batch_size, lr=lr,
                 seed=seed, log=log)
    names = _retrain_sweep(pruned_dir, out, pm.get("sweep") or [], dense, trainset, testset, settings, log)
    if not main:
        return {}
    metrics = {"test_accuracy": ev["accuracy"], "test_loss": ev["loss"], **sp,
               "start": {"weights": "rewound" if rewind else "pruned", "test_accuracy": first["accuracy"],
                         "test_loss": first["loss"]},
               "epochs": history["epochs"], "seconds": seconds, "params": settings, "efficiency": eff,
               "export": export, "control": bool(control), "control_epochs": control_epochs if control else None,
               "sweep": names, "speed": history.get("speed"), "launcher": launcher,
               "world_size": history.get("world_size", 1), **environment(dev)}
    store.write_json(out / "metrics.json", metrics)
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return metrics


def _control(out: Path, dense, trainset, testset, *, epochs, batch_size, lr, seed, log) -> dict:
    """The dense control: the trained model fine-tuned, unpruned, like the pruned one (control/)."""
    net = prune.clone(dense)
    start = time.perf_counter()
    history = _fit(net, trainset, testset, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, log=log,
                   label="control")
    ev = train.evaluate(net, *testset)
    if not train.is_main_process():
        return {}
    (out / "metrics.json").unlink(missing_ok=True)
    store.save_tensors(out / "model.pt", net.state_dict())
    _save_predictions(out, ev["predictions"])
    store.write_json(out / "history.json", history)
    metrics = {"what": "the trained dense model fine-tuned with the retraining's settings, unpruned",
               "test_accuracy": ev["accuracy"], "test_loss": ev["loss"], **_sparsity_fields(net, dense, "all"),
               "fine_tune_epochs": epochs, "epochs": history["epochs"], "seconds": time.perf_counter() - start,
               "params": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}}
    store.write_json(out / "metrics.json", metrics)
    log(f"[control] dense model fine-tuned {epochs} epoch{'s' * (epochs != 1)} without pruning: test acc "
        f"{ev['accuracy']:.1%}")
    return metrics


def _retrain_sweep(pruned_dir: Path, out: Path, names: list[str], dense, trainset, testset, settings: dict,
                   log) -> list[str]:
    """Retrain every sweep point for settings['epochs'] and evaluate it; out/sweep/<point>/metrics.json
    (no weights kept). A point already retrained from the same pruned point and settings is skipped."""
    for name in names:
        src = pruned_dir / "sweep" / name
        pm = store.read_json(src / "metrics.json")
        where = out / "sweep" / name
        key = config.stage_hash({"pruned": pm["key"], **settings})
        if _point_done(where, key):
            log(f"[sweep] {name}: retrained earlier with the same inputs, skipped")
            continue
        (where / "metrics.json").unlink(missing_ok=True)
        start = time.perf_counter()
        if (src / ARCH_FILE).is_file():
            net = load_model(src, next(dense.parameters()).device)
        else:
            net = prune.clone(dense)
            prune.restore(net, store.load_tensors(src / "masks.pt"))
        history = _fit(net, trainset, testset, **settings, log=log, label=f"sweep {name}")
        if not train.is_main_process():
            continue
        ev = train.evaluate(net, *testset)
        sp = _sparsity_fields(net, dense, pm["targets"])
        metrics = {"key": key, "pruned_key": pm["key"], "name": name, "method": pm["method"], "amount": pm["amount"],
                   "test_accuracy": ev["accuracy"], "test_loss": ev["loss"], "global_sparsity": sp["global_sparsity"],
                   "params_nonzero": sp["params_nonzero"], "epochs": history["epochs"], "params": settings,
                   "seconds": time.perf_counter() - start}
        store.write_json(where / "metrics.json", metrics)
        log(f"[sweep] {name}: test acc {pm['test_accuracy']:.1%} -> {ev['accuracy']:.1%} after "
            f"{settings['epochs']} epoch{'s' * (settings['epochs'] != 1)} ({metrics['seconds']:.1f} s)")
    return list(names)


# --- shared ------------------------------------------------------------------------------------
REWIND_FILE = "rewind.pt"          # train/: the weights after training step prune.rewind_step
REWOUND_FILE = "rewound.pt"        # prune/: the pruned model's surviving weights reset to that step
ARCH_FILE = "architecture.json"    # beside model.pt: the architecture and layer shapes (prune.rebuild)
EXPORT_FILE, EXPORT_META = "export.pt", "export.json"
# Latency settings of efficiency.summary: the main model states, and each sweep point (kept small).
LATENCY = {"batch_sizes": (1, 64), "repeats": 10, "warmup": 3, "devices": None}
SWEEP_LATENCY = {"batch_sizes": (64,), "repeats": 5, "warmup": 2, "devices": ("cpu",)}


CHECKPOINT_FILE = "checkpoint.pt"   # train/, retrain/: end-of-epoch state while a stage runs
_SPEED: contextvars.ContextVar[dict] = contextvars.ContextVar("speed", default={})


def _fit(net, trainset, testset, speed: dict | None = None, **kw) -> dict:
    """Every training call of the stages goes through here: the speed options of the train stage
    (given, or recorded in train/metrics.json and set by the calling stage) apply to all of them."""
    return train.fit(net, trainset, testset, **(speed if speed is not None else _SPEED.get()), **kw)


def _train_speed(model_dir: Path) -> dict:
    """The speed options the train stage ran with (fine-tuning uses the same)."""
    return store.read_json(Path(model_dir) / "metrics.json").get("speed_params") or {}


def point_name(method: str, amount: float) -> str:
    """Folder name of a sweep point, e.g. l1_unstructured-0.5."""
    return f"{method}-{float(amount)!r}"


def _point_done(where: Path, key: str) -> bool:
    try:
        return store.read_json(where / "metrics.json").get("key") == key
    except (OSError, ValueError):
        return False


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _rewind_saver(out: Path, step: int | None, net: torch.nn.Module, steps: int):
    """fit's on_step hook saving the weights after optimizer step `step` as out/rewind.pt (step 0:
    saved now, before training); None when not rewinding."""
    (out / REWIND_FILE).unlink(missing_ok=True)
    if step is None:
        return None
    if not 0 <= step <= steps:
        raise ValueError(f"prune.rewind_step={step} is not a step of this training (0..{steps}): choose a step "
                         f"in that range (0 = the initialisation)")
    if step == 0:
        store.save_tensors(out / REWIND_FILE, _cpu_state(net))
        return None

    def save(s: int, model: torch.nn.Module) -> None:
        if s == step and train.is_main_process():
            store.save_tensors(out / REWIND_FILE, _cpu_state(model))
    return save


def _rewind_state(model_dir: Path, step: int, method: str) -> dict:
    if prune.METHODS[method]["kind"] == "structural":
        raise ValueError(f"prune.rewind_step cannot be used with {method}: the pruned layers are smaller than any "
                         "saved training state")
    saved = store.read_json(model_dir / "metrics.json").get("rewind_step")
    if saved != step or not (model_dir / REWIND_FILE).is_file():
        raise FileNotFoundError(f"the train stage in {model_dir} saved no weights at step {step} (it saved: "
                                f"{saved}): rerun notebooks/02_train.ipynb with rewind_step = {step}, or the whole "
                                "chain with `prunestudy run`")
    return store.load_tensors(model_dir / REWIND_FILE)


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _efficiency(net, dense, settings: dict, testset) -> dict:
    """efficiency.summary of `net` against `dense` for inputs of the test images' shape."""
    return efficiency.summary(net, dense, batch_sizes=tuple(settings["batch_sizes"]), repeats=settings["repeats"],
                              warmup=settings["warmup"], devices=settings.get("devices"),
                              input_size=tuple(testset[0].shape[1:]))


def _save_model(out: Path, net, arch: str, num_classes: int) -> None:
    """masks.pt, model.pt (masks folded: a plain state_dict) and architecture.json (rebuilds any
    model, channel-pruned ones included) of a model; `net` itself is not changed."""
    store.save_tensors(out / "masks.pt", prune.masks(net))
    store.save_tensors(out / "model.pt", prune.export(net)[0])
    store.write_json(out / ARCH_FILE, {"model": arch, "num_classes": num_classes, "layers": prune.architecture(net)})


def _export(out: Path, net, arch: str, classes: list[str], pm: dict, ev: dict) -> dict:
    """retrain/export.pt (a plain state_dict: dense with zeros for masked methods, the small model
    for channel) and export.json (how to rebuild it); see load_export."""
    state, meta = prune.export(net)
    kind = prune.METHODS[pm["method"]]["kind"]
    meta.update({"model": arch, "num_classes": len(classes), "classes": classes, "kind": kind,
                 "method": pm["method"], "amount": pm["amount"], "test_accuracy": ev["accuracy"],
                 "test_loss": ev["loss"],
                 "load": ("prune.rebuild(model, num_classes, architecture)" if kind == "structural"
                          else "models.build_model(model, num_classes)")
                 + ".load_state_dict(torch.load('export.pt', weights_only=True)); inputs uint8 images / 255, "
                   "normalised with mean = std = 0.5 (prunestudy.train.normalize)"})
    store.save_tensors(out / EXPORT_FILE, state)
    store.write_json(out / EXPORT_META, meta)
    return {"file": EXPORT_FILE, "meta": EXPORT_META, "kind": kind, "params_total": meta["params_total"],
            "params_nonzero": meta["params_nonzero"], "bytes": (out / EXPORT_FILE).stat().st_size}


def load_export(directory, device="cpu") -> torch.nn.Module:
    """The model exported by the retrain stage (export.pt + export.json), loaded without pickle:
    masked methods into the dense architecture, channel-pruned ones into the rebuilt small one."""
    directory = Path(directory)
    meta = store.read_json(directory / EXPORT_META)
    if meta["kind"] == "structural":
        net = prune.rebuild(meta["model"], meta["num_classes"], meta["architecture"])
    else:
        net = models.build_model(meta["model"], meta["num_classes"])
    net.load_state_dict(torch.load(directory / EXPORT_FILE, map_location="cpu", weights_only=True))
    return net.to(device)


def load_model(stage_dir: Path, device="cpu", masks: bool = False, *, weights: str = "model.pt",
               run_dir: Path | None = None) -> torch.nn.Module:
    """The model saved by a stage: rebuilt from its architecture.json when it has one (the prune and
    retrain stages write it; channel-pruned layers are smaller), else the architecture of
    train/metrics.json; `weights` names the state_dict file; masks re-attached if asked."""
    stage_dir = Path(stage_dir)
    if (stage_dir / ARCH_FILE).is_file():
        spec = store.read_json(stage_dir / ARCH_FILE)
        net = prune.rebuild(spec["model"], spec["num_classes"], spec["layers"])
    else:
        run_dir = Path(run_dir) if run_dir is not None else stage_dir.parent
        arch = store.read_json(run_dir / "train" / "metrics.json")["model"]
        classes = data.read_info(run_dir / "data")["classes"]
        net = models.build_model(arch, len(classes))
    net.load_state_dict(store.load_tensors(stage_dir / weights))
    if masks:
        prune.restore(net, store.load_tensors(stage_dir / "masks.pt"))
    return net.to(device)


def collect_results(run_dir, params: dict | None = None, timings: dict | None = None) -> dict:
    """results.json: the contract of a run, merged from the stages completed so far."""
    run_dir = Path(run_dir)
    res: dict = {}
    if (run_dir / "data" / "data.json").is_file():
        info = data.read_info(run_dir / "data")
        res["data"] = {k: info.get(k) for k in ("classes", "train_size", "test_size", "counts", "skipped", "root",
                                                 "image_size", "label_mode", "clipped", "rejected", "cache",
                                                 "manifest_sha256")}
    for stage in ("train", "prune", "retrain"):
        path = run_dir / stage / "metrics.json"
        if path.is_file():
            res[stage] = store.read_json(path)
    control = run_dir / "retrain" / "control" / "metrics.json"
    if (res.get("retrain") or {}).get("control") and control.is_file():
        res["control"] = store.read_json(control)
    if (res.get("prune") or {}).get("sweep"):
        res["sweep"] = sweep_results(run_dir, res["prune"]["sweep"])
    if params is not None:
        res["params"] = params
        res["params_hash"] = config.stage_hash(params)
        if config.repeat_seeds(params):
            res["repeats"] = [seed_results(run_dir, s, f"repeats/seed-{s}") for s in config.repeat_seeds(params)]
    if timings is not None:
        res["timings_s"] = timings
    res["provenance"] = provenance()
    return res


def seed_results(run_dir, seed: int, where: str = ".") -> dict:
    """What the report compares across seeds, from one run folder (`where` in run_dir: a repeat's,
    or the run itself): test accuracy and loss of each model state (and the dense control),
    sparsity, the folder."""
    out = {"seed": seed, "dir": where}
    run_dir = Path(run_dir) / where
    for state, stage in (("trained", "train"), ("pruned", "prune"), ("retrained", "retrain"),
                         ("control", "retrain/control")):
        path = run_dir / stage / "metrics.json"
        if path.is_file():
            m = store.read_json(path)
            out[state] = {k: m.get(k) for k in ("test_accuracy", "test_loss", "global_sparsity")}
    return out


def sweep_results(run_dir, names: list[str]) -> list[dict]:
    """One entry per sweep point finished by the prune stage: method, amount, sparsity (of the
    targeted weights, against the dense model), test accuracy / loss before and after retraining
    (None until the retrain stage has run it), measured and theoretical speedup, sizes."""
    run_dir, out = Path(run_dir), []
    for name in names:
        path = run_dir / "prune" / "sweep" / name / "metrics.json"
        if not path.is_file():
            continue
        p = store.read_json(path)
        r_path = run_dir / "retrain" / "sweep" / name / "metrics.json"
        r = store.read_json(r_path) if r_path.is_file() else None
        if r is not None and r.get("pruned_key") != p.get("key"):
            r = None  # retrained from another pruned model: stale
        eff = p["efficiency"]
        table = eff["latency"].get("cpu") or next(iter(eff["latency"].values()))
        batch = max(row["batch"] for row in table["rows"])
        ms = {row["model"]: row["median_ms"] for row in table["rows"] if row["batch"] == batch}
        out.append({"name": name, "method": p["method"], "amount": p["amount"], "kind": p["kind"],
                    "targets": p["targets"], "sparsity": p["global_sparsity"], "param_sparsity": p["param_sparsity"],
                    "params_total": p["params_total"], "params_nonzero": p["params_nonzero"],
                    "dense_params_total": p["dense_params_total"],
                    "test_accuracy_before": p["test_accuracy"], "test_loss_before": p["test_loss"],
                    "test_accuracy_after": r["test_accuracy"] if r else None,
                    "test_loss_after": r["test_loss"] if r else None,
                    "retrain_epochs": len(r["epochs"]) if r else None,
                    "speedup_measured": eff["measured_speedup"], "speedup_theoretical": eff["theoretical_speedup"],
                    "latency_device": table["device"], "latency_batch": batch, "latency_ms": ms.get("pruned"),
                    "dense_latency_ms": ms.get("dense"), "latency_threads": table["threads"],
                    "saves_time": eff["saves_time"], "remark": eff["remark"],
                    "macs": eff["macs"], "effective_macs": eff["effective_macs"], "dense_macs": eff["dense_macs"],
                    "sizes": {k: eff[k] for k in ("state_dict_bytes", "masked_bytes", "sparse_compressed_bytes",
                                                  "dense_state_dict_bytes")}})
    return out


def load_results(run_dir=None) -> dict:
    """Results of a run as the analysis sees them: fresh from the stage outputs, with the
    parameters, stage timings and stage keys that `prunestudy run` recorded in results.json."""
    run_dir = resolve_run_dir(run_dir)
    require("data", run_dir / "data")
    saved = store.read_json(run_dir / "results.json") if (run_dir / "results.json").is_file() else {}
    params = saved.get("params")
    if params is None and (run_dir / "params.json").is_file():
        params = store.read_json(run_dir / "params.json")
    res = collect_results(run_dir, params, saved.get("timings_s"))
    if saved.get("stage_keys"):
        res["stage_keys"] = saved["stage_keys"]
    return res


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


def _sparsity_fields(net, dense, targets: str) -> dict:
    """Sparsity measured against the dense model, so that masked and channel pruning compare: a
    targeted layer's sparsity is the fraction of the dense layer's weights that are zero *or
    removed* (masked methods: its zeros; channel: the weights gone with the removed channels);
    `param_sparsity` the same over every parameter of the model (biases and norms included)."""
    sp, dsp = prune.sparsity(net, targets), prune.sparsity(dense, targets)
    counts = {}
    for name, d in dsp["layers"].items():
        p = sp["layers"].get(name, {"zeros": 0, "size": 0})
        counts[name] = {"zeros": d["size"] - (p["size"] - p["zeros"]), "size": d["size"]}
    zeros = sum(c["zeros"] for c in counts.values())
    return {"global_sparsity": zeros / max(dsp["targeted_weights"], 1),
            "layers": {name: c["zeros"] / c["size"] for name, c in counts.items()}, "layer_counts": counts,
            "params_total": sp["params_total"], "params_nonzero": sp["params_nonzero"],
            "dense_params_total": dsp["params_total"],
            "param_sparsity": 1 - sp["params_nonzero"] / max(dsp["params_total"], 1)}
