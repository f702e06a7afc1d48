"""The five stages as plain functions. Each notebook is a parameters cell plus a call to one of
these and displays of what it returns; each reads its inputs from, and writes its outputs to,
a run folder laid out as `prunestudy.paths` says.

metrics.json is written last, atomically: it marks a stage as complete.
Parameter defaults are those of `config.SCHEMA` (read with `config.default`), so a stage called
from Python computes what its notebook and `prunestudy run` compute.
"""

from __future__ import annotations

import functools
import inspect
import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from . import (
    artifacts,
    atomic,
    cache,
    codedigest,
    config,
    data,
    distributed,
    efficiency,
    graph,
    models,
    notebook,
    paths,
    progress,
    prune,
    records,
    results,
    runlock,
    stagestore,
    synth,
    train,
)
from . import methods as pruning_methods
from . import metrics as scoring
from .artifacts import load_export, load_model  # noqa: F401  (notebooks and users call them from here)
from .config import default
from .paths import require, resolve_run_dir  # noqa: F401
from .results import collect_results, load_results  # noqa: F401


def stage_dir(run_dir: Path, stage: str, override: str | Path | None = None) -> Path:
    return config.resolve_path(override) if override else paths.stage_dir(run_dir, stage)


def embedded_root(embedded: dict | None) -> tuple[Path, dict]:
    """Where the embedded dataset with these parameters lives (generated once, then reused)."""
    params = {**default("data.embedded"), **(embedded or {})}
    return config.project_root() / "data" / "embedded" / config.stage_hash(params), params


# --- records: a stage function owns the record of what it computed --------------------------------
def _recorded(stage: str):
    """Make a stage function own its record (see prunestudy.records): it takes the run folder's
    lock (or shares that of the `prunestudy run` that started it), warns when it recomputes a
    stage that later stages were computed from, and writes `<stage>/stage.json` (its key, the
    inputs it read, its output files) after its outputs. torchrun workers leave the record to
    the process that launched them."""
    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*a, **kw):
            if torch.distributed.is_initialized():
                return fn(*a, **kw)
            bound = signature.bind(*a, **kw)
            bound.apply_defaults()
            args = bound.arguments
            run_dir = paths.resolve_run_dir(args["run_dir"])
            out = stage_dir(run_dir, stage, args["out_dir"])
            inputs = {up: stage_dir(run_dir, up, args.get(graph.stage(up).read_as))
                      for up in graph.stage(stage).reads}
            notebook.require_run(run_dir, inputs)   # before the lock: a mistyped run_dir leaves no folder
            with _computing(stage, run_dir, out, args, inputs, args["log"]):
                return fn(*a, **kw)
        return run
    return wrap


@contextmanager
def _computing(stage: str, run_dir: Path, out: Path, args: dict, inputs: dict[str, Path], log):
    params = json.loads(json.dumps({n: args[n] for n in config.stage_parameters(stage)}, default=str))
    up = graph.stage(stage).after
    after = (records.read(inputs[up]) or {}).get("key") if up else None
    runner = runlock.under_runner(run_dir)
    by = "prunestudy run" if runner else ("notebook" if progress.in_kernel() else "python")
    code, foreign = _code_that_ran(stage) if by == "notebook" else (None, [])
    key = graph.key(stage, params, after, code=None if code is None else codedigest.combined(code))
    with runlock.writing(run_dir, f"the {stage} stage ({by})"):
        later = [] if runner else _later_stages(run_dir, stage)
        store = None if runner else _store_of(run_dir, stage, out)
        if not runner:
            _announce(stage, run_dir, params, later, log)
            if foreign:
                log(f"[{stage}] NOTE: this kernel ran code that is not {paths.NOTEBOOK_OF[stage]}'s own "
                    f"({len(foreign)} cell(s), the first: {foreign[0].strip().splitlines()[0][:60]!r}): the result "
                    "is kept under a key of that code, which `prunestudy run` never links. Restart the kernel and "
                    "run all cells for the notebook's own.")
        with (nullcontext() if runner else _into(stage, out, key, store, log)) as entry:
            records.clear(out)
            start = time.perf_counter()
            yield key
            records.write(out, stage, key, params, records.input_ids(inputs), time.perf_counter() - start, by, code)
            if entry is not None:   # complete: other run folders may link it from now on
                stagestore.seal(entry)
                log(f"[{stage}] kept in the stage store under its key {key}: {entry}")
        if not runner:
            _outdate(stage, run_dir, by, later)


@contextmanager
def _into(stage: str, out: Path, key: str, store: stagestore.Store | None, log):
    """Where a stage computed outside the runner writes (the runner chooses its own). With the run
    folder's stage store: a new entry of its key (claimed while it computes), which the run folder
    links, so that the runner, once it relinks the folder to other parameters, replaces nothing it
    cannot find again, and a run with these parameters links it. Without one: the run folder's own
    folder, never a shared entry. What was computed here before is moved into the store first
    (stagestore.keep)."""
    if store is None:
        stagestore.detach(out)   # never write other parameters into a shared store entry
        yield None
        return
    stagestore.keep(out, store, log)
    with store.claim(stage, key, log):
        entry = store.fresh(stage, key)
        with stagestore.linking(entry):   # `store gc` cannot remove it before the link is made
            stagestore.link(out, entry)
        yield entry


def _store_of(run_dir: Path, stage: str, out: Path) -> stagestore.Store | None:
    """The stage store a stage computed outside the runner goes into: the one the run folder
    recorded (a folder `prunestudy run` made), for a stored stage written to its own place."""
    root = stagestore.recorded(run_dir) if stage in graph.STORED else None
    own = Path(out).absolute() == paths.stage_dir(run_dir, stage).absolute()
    return stagestore.Store(root) if root is not None and own else None


def _code_that_ran(stage: str) -> tuple[dict | None, list[str]]:
    """In a kernel: (None, []) when every cell it ran is the stage notebook's own code or a literal
    assignment (codedigest.foreign_cells), so that the stage's key is the notebook's. Else the code
    files with the notebook's digest that of the cells it ran, and those cells: an edited or added
    cell keys its result apart, never under the key `prunestudy run` would link."""
    from IPython import get_ipython

    shell = get_ipython()
    ran = list(getattr(getattr(shell, "history_manager", None), "input_hist_raw", None) or [])[1:]
    notebook = config.project_root() / "notebooks" / paths.NOTEBOOK_OF[stage]
    foreign = codedigest.foreign_cells(notebook, ran)
    if not foreign:
        return None, []
    return {**graph.code_files(stage), f"notebooks/{paths.NOTEBOOK_OF[stage]}": codedigest.ran_digest(ran)}, foreign


def _outdate(stage: str, run_dir: Path, by: str, later: list[str]) -> None:
    """After a stage computed outside the runner: its later stages in this run folder are marked
    stale (in private copies, never through the link into the store), its page removed (it shows an
    older computation), the report and results.json stamped out of date at once."""
    reason = f"{stage} was recomputed ({by}, {time.strftime('%Y-%m-%d %H:%M:%S')}) after it"
    for name in later:   # in this run folder only: a linked store entry is copied here first
        stagestore.privatize(paths.stage_dir(run_dir, name))
        records.mark_stale(paths.stage_dir(run_dir, name), reason)
    for page in (paths.executed_notebook(run_dir, stage), paths.executed_notebook(run_dir, stage)
                 .with_suffix(".html")):
        page.unlink(missing_ok=True)
    if stage != "analysis":
        records.mark_outdated(run_dir, f"{stage} was recomputed ({by}, {time.strftime('%Y-%m-%d %H:%M:%S')})")


def _later_stages(run_dir: Path, stage: str) -> list[str]:
    """The stages after `stage` that have a record in the run folder (computed from the old one)."""
    return [s for s in graph.later(stage) if records.read(paths.stage_dir(run_dir, s))]


def _announce(stage: str, run_dir: Path, params: dict, later: list[str], log) -> None:
    """First lines of a stage computed outside `prunestudy run`: how its parameters differ from the
    run folder's params.json, and which later stages it makes stale."""
    try:
        saved = json.loads(json.dumps(config.stage_params(stage, atomic.read_json(run_dir / paths.PARAMS)),
                                      default=str))
    except (OSError, ValueError, KeyError):
        saved = None
    diffs = [f"{k} = {v!r} here, {saved[k]!r} in params.json" for k, v in params.items()
             if saved is not None and saved.get(k) != v]
    if diffs:
        log(f"[{stage}] NOTE: these parameters differ from the run folder's params.json: {'; '.join(diffs)}.")
    if later:
        log(f"[{stage}] NOTE: {', '.join(later)} {'was' if len(later) == 1 else 'were'} computed from the previous "
            f"{stage} stage: once this one finishes {'it is' if len(later) == 1 else 'they are'} marked stale "
            f"(the report warns, and `prunestudy run` reruns {'it' if len(later) == 1 else 'them'}). Rerun "
            f"{', '.join(paths.NOTEBOOK_OF[s] for s in later)} in order, or `prunestudy run` with the parameters "
            "you want.")


# --- stage 1 -----------------------------------------------------------------------------------
@_recorded("data")
def run_data(run_dir=None, *, root=default("data.root"), embedded=default("data.embedded"),
             classes=default("data.classes"), image_size=default("data.image_size"), context=default("data.context"),
             min_box=default("data.min_box"), max_per_class=default("data.max_per_class"),
             max_test_per_class=default("data.max_test_per_class"), seed=default("seed"),
             label_mode=default("data.label_mode"), min_per_class=default("data.min_per_class"),
             max_bad_fraction=default("data.max_bad_fraction"), workers=default("data.workers"),
             min_test_per_class=default("data.min_test_per_class"), out_dir=None, refresh_cache=False,
             log=print) -> dict:
    """The 10-class crop set of a COCO-format root ('embedded' = the embedded dataset), built once
    into the crop cache and linked into run_dir/data (see prunestudy.cache). `refresh_cache`:
    build the crop set again even if the cache holds it (`prunestudy run --force data`).
    `min_test_per_class`: a class without test samples is an error unless it is 0 (the report
    marks classes with fewer test samples as too few to read); it does not change the crops."""
    run_dir = paths.resolve_run_dir(run_dir)
    if root == "embedded":
        where, params = embedded_root(embedded)
        root = synth.ensure(where, **params)
    params = dict(classes=classes, image_size=image_size, context=context, min_box=min_box,
                  max_per_class=max_per_class, max_test_per_class=max_test_per_class, seed=seed,
                  label_mode=label_mode, min_per_class=min_per_class, max_bad_fraction=max_bad_fraction)
    out = stage_dir(run_dir, "data", out_dir)
    info = cache.crops(config.resolve_path(root), params, out, workers=workers, log=log, refresh=refresh_cache)
    empty = [c for c, n in info["counts"]["test"].items() if n == 0]
    if empty and min_test_per_class > 0:
        (out / paths.DATA_INFO).unlink(missing_ok=True)   # not a complete data stage
        raise data.DataError(f"no test samples for {', '.join(repr(c) for c in empty)}: nothing can be said about "
                             f"{'this class' if len(empty) == 1 else 'these classes'}; choose other classes, or set "
                             "data.min_test_per_class=0 to keep them without per-class figures")
    return info


# --- stage 2 -----------------------------------------------------------------------------------
@_recorded("train")
def run_train(run_dir=None, *, model=default("train.model"), epochs=default("train.epochs"),
              batch_size=default("train.batch_size"), lr=default("train.lr"), device=default("train.device"),
              seed=default("seed"), rewind_step=default("prune.rewind_step"), precision=default("train.precision"),
              channels_last=default("train.channels_last"), compile=default("train.compile"),
              fused=default("train.fused"), weights=default("train.weights"), launcher=default("train.launcher"),
              nproc_per_node=default("train.nproc_per_node"), data_dir=None, out_dir=None, log=print) -> dict:
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
    run_dir = paths.resolve_run_dir(run_dir)
    data_dir = paths.require("data", stage_dir(run_dir, "data", data_dir))
    out = stage_dir(run_dir, "train", out_dir)
    dev = train.select_device(device)
    classes = data.read_info(data_dir)["classes"]
    models.check_input_size(model, data.read_info(data_dir)["image_size"], default("data.image_size"))  # notebooks
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
                   log=log, label="train", on_step=on_step, speed=speed, checkpoint=out / paths.CHECKPOINT)
    ev = _evaluate(net, testset, speed)
    if not train.is_main_process():
        return {}
    atomic.save_tensors(out / paths.MODEL, net.state_dict())
    artifacts.save_predictions(out, ev["predictions"])
    atomic.write_json(out / paths.HISTORY, history)
    metrics = {"model": model, "params_total": models.count_parameters(net), "test_accuracy": ev["accuracy"],
               **_scores(ev, testset, classes), "test_loss": ev["loss"], "epochs": history["epochs"],
               "seconds": time.perf_counter() - start,
               "params": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "weights": weights,
                          "launcher": launcher, "nproc_per_node": nproc_per_node},
               "speed_params": speed, "speed": history.get("speed"), "world_size": history.get("world_size", 1),
               "rewind_step": rewind_step, **results.environment(dev)}
    atomic.write_json(out / paths.METRICS, metrics)
    (out / paths.CHECKPOINT).unlink(missing_ok=True)  # done: a later run with other settings starts afresh
    return metrics


# --- stage 3 -----------------------------------------------------------------------------------
@_recorded("prune")
def run_prune(run_dir=None, *, method=default("prune.method"), amount=default("prune.amount"),
              targets=default("prune.targets"), rounds=default("prune.rounds"),
              rewind_step=default("prune.rewind_step"), latency_repeats=default("prune.latency_repeats"),
              epochs_per_round=default("retrain.epochs_per_round"),
              lr=default("retrain.lr"), batch_size=default("retrain.batch_size"), seed=default("seed"),
              device=default("train.device"), data_dir=None, model_dir=None, out_dir=None, log=print) -> dict:
    """Prune the trained model (one shot, or `rounds` rounds with `epochs_per_round` of fine-tuning
    between them, reaching `amount` after the last) and evaluate it before the final retraining.

    With `rewind_step`, the surviving weights are also reset to the training state saved at that
    step (train/rewind.pt; masks kept) and saved as rewound.pt: retraining starts from there.
    Efficiency figures (`efficiency.summary` against the dense model, latency measured in this
    run) go into metrics.json. (A curve over methods and amounts is the runner's: each of its
    points runs this stage with its own method and amount, prunestudy.pipeline.)
    `epochs_per_round`, `lr`, `batch_size`, `seed`: fine-tuning between rounds (retrain.*)."""
    run_dir = paths.resolve_run_dir(run_dir)
    data_dir = paths.require("data", stage_dir(run_dir, "data", data_dir))
    model_dir = paths.require("train", stage_dir(run_dir, "train", model_dir))
    out = stage_dir(run_dir, "prune", out_dir)
    arch = atomic.read_json(model_dir / paths.METRICS)["model"]
    prune.check(method, amount, targets, arch)   # the same checks as the parameters, for notebook runs
    rewind_state = _rewind_state(model_dir, rewind_step, method) if rewind_step is not None else None
    speed = _train_speed(model_dir)
    (out / paths.METRICS).unlink(missing_ok=True)  # complete again only once rewritten, last
    dev = train.select_device(device)
    trainset, testset = _load_data(data_dir, dev, train_split=rounds > 1 and epochs_per_round > 0)
    classes = data.read_info(data_dir)["classes"]
    dense = artifacts.load_model(model_dir, dev)
    start = time.perf_counter()
    before = _evaluate(dense, testset, speed)
    example = torch.zeros(1, *testset[0].shape[1:], device=dev)
    schedule = prune.round_amounts(amount, rounds)
    net, rows, steps = prune.clone(dense), [], []
    for r, fraction in enumerate(schedule, 1):
        prune.apply(net, method, fraction, targets, example_input=example, seed=seed + r - 1)
        ev = _evaluate(net, testset, speed)
        sp = _sparsity_fields(net, dense, targets)
        row = {"round": r, "fraction_of_remaining": fraction, "global_sparsity": sp["global_sparsity"],
               "params_nonzero": sp["params_nonzero"], "test_accuracy": ev["accuracy"], "test_loss": ev["loss"]}
        log(f"[prune] round {r}/{rounds}: {method} {fraction:.4f} of what remained, sparsity "
            f"{sp['global_sparsity']:.2%}, test acc {ev['accuracy']:.1%}")
        if r < rounds and epochs_per_round > 0:
            hist = _fit(net, trainset, testset, epochs=epochs_per_round, batch_size=batch_size, lr=lr, seed=seed + r,
                        log=log, label=f"round {r}/{rounds} fine-tune", speed=speed)
            row["epochs"] = hist["epochs"]
            steps += hist["steps"]
        rows.append(row)
    rewind = None
    if rewind_state is not None:
        rewound = prune.rewind(prune.clone(net), rewind_state)
        ev_r = _evaluate(rewound, testset, speed)
        atomic.save_tensors(out / paths.REWOUND, prune.export(rewound)[0])
        rewind = {"step": rewind_step, "file": paths.REWOUND, "test_accuracy": ev_r["accuracy"],
                  "test_loss": ev_r["loss"]}
        log(f"[prune] surviving weights rewound to training step {rewind_step}: test acc {ev_r['accuracy']:.1%}")
    eff = _efficiency(net, dense, latency_repeats, speed, testset)   # its latency: the timing stage's
    artifacts.save_model(out, net, arch, len(classes))
    artifacts.save_predictions(out, ev["predictions"])
    if steps:
        epochs = [e for r in rows for e in r.get("epochs", [])]
        atomic.write_json(out / paths.HISTORY, {"steps": steps, "epochs": epochs})
    else:
        (out / paths.HISTORY).unlink(missing_ok=True)
    if rewind is None:
        (out / paths.REWOUND).unlink(missing_ok=True)
    metrics = {"method": method, "amount": amount, "targets": targets, "kind": pruning_methods.get(method).kind,
               "rounds": rounds, "round_amounts": schedule, "epochs_per_round": epochs_per_round if rounds > 1 else 0,
               "between_round_epochs": (rounds - 1) * epochs_per_round, "rounds_detail": rows,
               **_sparsity_fields(net, dense, targets), "test_accuracy": ev["accuracy"],
               **_scores(ev, testset, classes), "test_loss": ev["loss"], "dense_test_accuracy": before["accuracy"],
               "dense_test_loss": before["loss"], "rewind": rewind,
               "efficiency": eff, "seconds": time.perf_counter() - start,
               "params": {"seed": seed, "lr": lr, "batch_size": batch_size}, **results.environment(dev)}
    atomic.write_json(out / paths.METRICS, metrics)
    return metrics


# --- stage 4 -----------------------------------------------------------------------------------
@_recorded("retrain")
def run_retrain(run_dir=None, *, epochs=default("retrain.epochs"), lr=default("retrain.lr"),
                batch_size=default("retrain.batch_size"), epochs_per_round=default("retrain.epochs_per_round"),
                control=default("retrain.control"), device=default("train.device"), seed=default("seed"),
                latency_repeats=default("prune.latency_repeats"), data_dir=None, pruned_dir=None, model_dir=None,
                out_dir=None, launcher=None, log=print) -> dict:
    """Fine-tune the pruned model (from its rewound weights when the prune stage rewound) with its
    masks held: pruned weights stay exactly zero. Then export it (export.pt + export.json); with
    `control`, fine-tune the unpruned trained model for as many epochs (the prune stage's
    between-round epochs included) with the same settings, into control/.
    `epochs_per_round` is the prune stage's (recorded there); a different value is reported.

    `launcher`: None = as the train stage ran (train.launcher and train.nproc_per_node, recorded in
    its metrics.json): under torchrun, this function reruns in that many processes and all its
    fine-tuning (the control included) is data-parallel; only rank 0 measures
    latency and writes. 'none' forces one process."""
    run_dir = paths.resolve_run_dir(run_dir)
    data_dir = paths.require("data", stage_dir(run_dir, "data", data_dir))
    pruned_dir = paths.require("prune", stage_dir(run_dir, "prune", pruned_dir))
    model_dir = paths.require("train", stage_dir(run_dir, "train", model_dir))
    out = stage_dir(run_dir, "retrain", out_dir)
    trained_with = atomic.read_json(model_dir / paths.METRICS).get("params") or {}
    if launcher is None:
        launcher = trained_with.get("launcher", "none")
    if launcher == "torchrun" and not torch.distributed.is_initialized():
        args = set(inspect.signature(run_retrain).parameters) - {"log"}
        kw = {k: str(v) if isinstance(v, Path) else v for k, v in locals().items() if k in args}
        return distributed.launch("run_retrain", kw, int(trained_with.get("nproc_per_node") or 1), log=log)
    main = train.is_main_process()
    pm = atomic.read_json(pruned_dir / paths.METRICS)
    if pm.get("rounds", 1) > 1 and pm.get("epochs_per_round") != epochs_per_round:
        log(f"[retrain] note: the prune stage fine-tuned {pm.get('epochs_per_round')} epochs per round, not "
            f"{epochs_per_round}: the control counts the epochs the prune stage really ran")
    (out / paths.METRICS).unlink(missing_ok=True)  # complete again only once rewritten, last
    speed = _train_speed(model_dir)
    dev = train.select_device(device)
    trainset, testset = _load_data(data_dir, dev)
    classes = data.read_info(data_dir)["classes"]
    arch = atomic.read_json(model_dir / paths.METRICS)["model"]
    dense = artifacts.load_model(model_dir, dev)
    rewind = pm.get("rewind")
    net = artifacts.load_model(pruned_dir, dev, masks=True, weights=rewind["file"] if rewind else paths.MODEL)
    first = _evaluate(net, testset, speed)
    start = time.perf_counter()
    history = _fit(net, trainset, testset, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, log=log,
                   label="retrain", checkpoint=out / paths.CHECKPOINT, speed=speed)
    seconds = time.perf_counter() - start
    ev = _evaluate(net, testset, speed)
    sp = _sparsity_fields(net, dense, pm["targets"])
    eff = export = None
    if main:  # under torchrun the other ranks go on to the control's fine-tuning and wait for rank 0 there
        eff = _efficiency(net, dense, latency_repeats, speed, testset, same_as=pm.get("efficiency"))
        artifacts.save_model(out, net, arch, len(classes))
        export = artifacts.export(out, net, arch, classes, pm, ev)
        artifacts.save_predictions(out, ev["predictions"])
        atomic.write_json(out / paths.HISTORY, history)
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}
    control_epochs = epochs + pm.get("between_round_epochs", 0)
    if control:
        params = graph.control_params(control_epochs, lr, batch_size, seed, device)
        with _shared_control(out / paths.CONTROL, model_dir, params, log) as todo:
            if todo:
                _control(out / paths.CONTROL, dense, trainset, testset, epochs=control_epochs, batch_size=batch_size,
                         lr=lr, seed=seed, log=log, speed=speed, classes=classes)
    if not main:
        return {}
    metrics = {"test_accuracy": ev["accuracy"], **_scores(ev, testset, classes), "test_loss": ev["loss"], **sp,
               "start": {"weights": "rewound" if rewind else "pruned", "test_accuracy": first["accuracy"],
                         "test_loss": first["loss"]},
               "epochs": history["epochs"], "seconds": seconds, "params": settings, "efficiency": eff,
               "export": export, "control": bool(control), "control_epochs": control_epochs if control else None,
               "speed": history.get("speed"), "launcher": launcher,
               "world_size": history.get("world_size", 1), **results.environment(dev)}
    atomic.write_json(out / paths.METRICS, metrics)
    (out / paths.CHECKPOINT).unlink(missing_ok=True)
    return metrics


@contextmanager
def _shared_control(out: Path, model_dir: Path, params: dict, log):
    """The dense control is a stage of its own within retraining: keyed by the training it starts
    from and its settings, so that points of a sweep (or runs) with the same training and
    retraining settings share one (`out` then links into the stage store). Yields True when it must
    be computed (under an exclusive claim), False when a complete one is there; records it after."""
    key = graph.key("control", params, (records.read(model_dir) or {}).get("key"))
    inputs = {"train": model_dir}
    if torch.distributed.is_initialized():   # every rank decides alike; rank 0 records
        todo = records.problem(out, key, inputs) is not None
        yield todo
        if todo and train.is_main_process():
            records.write(out, "control", key, params, records.input_ids(inputs), 0.0, "prunestudy run")
        return
    out.mkdir(parents=True, exist_ok=True)
    with stagestore.claim_dir(out, log):
        todo = records.problem(out, key, inputs) is not None
        if not todo:
            log(f"[control] the dense control with these settings is done already (key {key}): reused")
        start = time.perf_counter()
        yield todo
        if todo:
            records.write(out, "control", key, params, records.input_ids(inputs), time.perf_counter() - start,
                          "prunestudy run" if runlock.under_runner(out.parent.parent) else "python")


def _control(out: Path, dense, trainset, testset, *, epochs, batch_size, lr, seed, log, speed, classes) -> dict:
    """The dense control: the trained model fine-tuned, unpruned, like the pruned one (control/)."""
    net = prune.clone(dense)
    start = time.perf_counter()
    history = _fit(net, trainset, testset, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, log=log,
                   label="control", speed=speed)
    ev = _evaluate(net, testset, speed)
    if not train.is_main_process():
        return {}
    (out / paths.METRICS).unlink(missing_ok=True)
    atomic.save_tensors(out / paths.MODEL, net.state_dict())
    artifacts.save_predictions(out, ev["predictions"])
    atomic.write_json(out / paths.HISTORY, history)
    metrics = {"what": "the trained dense model fine-tuned with the retraining's settings, unpruned",
               "test_accuracy": ev["accuracy"], **_scores(ev, testset, classes), "test_loss": ev["loss"],
               **_sparsity_fields(net, dense, "all"),
               "fine_tune_epochs": epochs, "epochs": history["epochs"], "seconds": time.perf_counter() - start,
               "params": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}}
    atomic.write_json(out / paths.METRICS, metrics)
    log(f"[control] dense model fine-tuned {epochs} epoch{'s' * (epochs != 1)} without pruning: test acc "
        f"{ev['accuracy']:.1%}")
    return metrics


# --- shared ------------------------------------------------------------------------------------
# Latency settings of efficiency.summary. Every repeat gives one paired speed ratio: enough of them
# for an interval of the speedup.
LATENCY = {"batch_sizes": (1, 64), "warmup": 3, "devices": None}   # repeats: prune.latency_repeats;
# memory format: the training's (_memory_format)


def _scores(ev: dict, testset, classes: list[str]) -> dict:
    """Balanced accuracy, macro-F1 and the top prediction of an evaluation (prunestudy.metrics)."""
    s = scoring.scores(testset[1].cpu().numpy(), ev["predictions"], classes)
    return {k: s[k] for k in scoring.SCORE_KEYS}


def _fit(net, trainset, testset, *, speed: dict, **kw) -> dict:
    """Every training call of the stages goes through here, with the speed options of the train
    stage (given by the caller; later stages read them with `_train_speed`)."""
    return train.fit(net, trainset, testset, **speed, **kw)


def _train_speed(model_dir: Path) -> dict:
    """The speed options the train stage ran with (fine-tuning uses the same)."""
    return atomic.read_json(Path(model_dir) / paths.METRICS).get("speed_params") or {}


def _channels_last(speed: dict) -> bool:
    """Whether the training ran channels-last (`speed`: the train stage's speed options; auto = yes):
    the stages evaluate and time the models in the same memory format."""
    return train.resolve_speed("cpu", channels_last=speed.get("channels_last", False))["channels_last"]


def _memory_format(speed: dict) -> str:
    """The latency measurement's memory format (efficiency.summary): the training's."""
    return "channels_last" if _channels_last(speed) else "contiguous"


def _evaluate(net, testset, speed: dict) -> dict:
    """train.evaluate on the test set, in fp32 and in the memory format the training used:
    channels_last by default, about 2x faster than NCHW for the seed CNN on the CPU, whose NCHW
    max-pool kernel is slow (efficiency's docstring)."""
    return train.evaluate(net, *testset, channels_last=_channels_last(speed))


def _rewind_saver(out: Path, step: int | None, net: torch.nn.Module, steps: int):
    """fit's on_step hook saving the weights after optimizer step `step` as out/rewind.pt (step 0:
    saved now, before training); None when not rewinding."""
    (out / paths.REWIND).unlink(missing_ok=True)
    if step is None:
        return None
    if not 0 <= step <= steps:
        raise ValueError(f"prune.rewind_step={step} is not a step of this training (0..{steps}): choose a step "
                         f"in that range (0 = the initialisation)")
    if step == 0:
        atomic.save_tensors(out / paths.REWIND, artifacts.cpu_state(net))
        return None

    def save(s: int, model: torch.nn.Module) -> None:
        if s == step and train.is_main_process():
            atomic.save_tensors(out / paths.REWIND, artifacts.cpu_state(model))
    return save


def _rewind_state(model_dir: Path, step: int, method: str) -> dict:
    if not pruning_methods.get(method).masked:
        raise ValueError(f"prune.rewind_step cannot be used with {method}: the pruned layers are smaller than any "
                         "saved training state")
    saved = atomic.read_json(model_dir / paths.METRICS).get("rewind_step")
    if saved != step or not (model_dir / paths.REWIND).is_file():
        raise FileNotFoundError(f"the train stage in {model_dir} saved no weights at step {step} (it saved: "
                                f"{saved}): rerun notebooks/02_train.ipynb with rewind_step = {step}, or the whole "
                                "chain with `prunestudy run`")
    return atomic.load_tensors(model_dir / paths.REWIND)


def _efficiency(net, dense, repeats: int, speed: dict, testset, same_as: dict | None = None) -> dict:
    """efficiency.summary of `net` against `dense` for inputs of the test images' shape, its latency
    left to the timing stage (`run_timing`, which times it with the LATENCY settings, `repeats` and
    the training's memory format on the machine of the run that reads it); `same_as` is unused then."""
    return efficiency.summary(net, dense, batch_sizes=tuple(LATENCY["batch_sizes"]), repeats=repeats,
                              same_as=same_as, memory_format=_memory_format(speed), warmup=LATENCY["warmup"],
                              devices=LATENCY["devices"], input_size=tuple(testset[0].shape[1:]), measure=False)


# --- the timing stage ----------------------------------------------------------------------------
def run_timing(run_dir=None, *, force: bool = False, log=print) -> dict:
    """Time the pruned and retrained models of the run folder (the study's, and each in-run point's)
    against the dense model on this machine: the timing stage. A model of the dense computation is
    never timed (efficiency.untimed); one of its own computation was left here by its stage
    (efficiency.pending). Each chain's timing is keyed on its retraining, the latency settings and
    this machine (graph.timing_key), kept in <chain>/timing/ (an entry of the stage store when the
    runner linked it), and reused while that key holds; `force` measures again. Returns
    {chain folder: its timing metrics} for the chains that needed one; `log` None: silent."""
    run_dir = paths.resolve_run_dir(run_dir)
    say = log or (lambda _: None)
    chains = [run_dir] + sorted({c.parent for c in Path(run_dir).glob(f"{paths.CURVE}/*/prune")})
    out = {}
    for folder in chains:
        timing = _chain_timing(run_dir, folder, force, say)
        if timing is not None:
            out[str(folder)] = timing
    return out


def _chain_timing(run_dir: Path, folder: Path, force: bool, log) -> dict | None:
    """One chain's timing (see run_timing), or None when it has nothing to time (or no retraining)."""
    dirs = {s: _chain_dir(run_dir, folder, s) for s in ("data", "train", "prune", "retrain")}
    recs = {s: records.read(d) for s, d in dirs.items()}
    if any(r is None for r in recs.values()) or not (dirs["retrain"] / paths.METRICS).is_file():
        return None
    pm, rm = (atomic.read_json(dirs[s] / paths.METRICS) for s in ("prune", "retrain"))
    if not (efficiency.is_pending(pm.get("efficiency")) or efficiency.is_pending(rm.get("efficiency"))):
        return None
    repeats, device = recs["prune"]["params"]["latency_repeats"], recs["prune"]["params"]["device"]
    params = graph.timing_params(repeats, device)
    key = graph.key("timing", params, recs["retrain"]["key"])
    out, inputs = paths.timing_dir(folder), {s: dirs[s] for s in ("train", "prune", "retrain")}
    with runlock.writing(run_dir, "the timing stage"):
        if not runlock.under_runner(run_dir):
            stagestore.detach(out)   # never write another key into a shared store entry
        out.mkdir(parents=True, exist_ok=True)
        with stagestore.claim_dir(out, log):
            if not force and records.problem(out, key, inputs) is None:
                log(f"[timing] timed on this machine already (key {key}): reused")
                return atomic.read_json(out / paths.METRICS)
            records.clear(out)
            (out / paths.METRICS).unlink(missing_ok=True)
            start = time.perf_counter()
            timing, times = efficiency.split_times(_time_models(dirs, pm, rm, repeats, device, params["machine"]))
            atomic.write_json(out / paths.TIMES, times)
            atomic.write_json(out / paths.METRICS, timing)
            records.write(out, "timing", key, params, records.input_ids(inputs), time.perf_counter() - start,
                          "prunestudy run" if runlock.under_runner(run_dir) else "python")
            if out.is_symlink():   # a store entry (execute.link_timing): complete, read-only from now on
                stagestore.seal(out.resolve())
            said = "; ".join(f"{name}: {t['remark'].split(':')[0]}" for name, t in timing["models"].items())
            log(f"[timing] {said} ({time.perf_counter() - start:.1f} s on this machine, key {key})")
            return timing


def _chain_dir(run_dir: Path, folder: Path, stage: str) -> Path:
    """A chain's stage folder; an in-run point without data/ or train/ of its own reads the study's."""
    own = paths.stage_dir(folder, stage)
    return own if own.exists() or stage in ("prune", "retrain") else paths.stage_dir(run_dir, stage)


def _time_models(dirs: dict, pm: dict, rm: dict, repeats: int, device: str, machine: dict) -> dict:
    """The latency fields of the pruned and the retrained model (the latter taken over when it runs
    the pruned model's computation), timed against the dense model with the LATENCY settings."""
    dev = train.select_device(device)
    speed = _train_speed(dirs["train"])
    size = data.read_info(dirs["data"])["image_size"]
    dense = artifacts.load_model(dirs["train"], dev)
    settings = {"batch_sizes": tuple(LATENCY["batch_sizes"]), "repeats": repeats, "threads": machine["threads"],
                "devices": LATENCY["devices"], "input_size": (3, size, size), "warmup": LATENCY["warmup"],
                "memory_format": _memory_format(speed)}
    models, pruned = {}, None
    if efficiency.is_pending(pm.get("efficiency")):
        net = artifacts.load_model(dirs["prune"], dev, masks=True)
        pruned = models["prune"] = efficiency.measured(net, dense, pm["efficiency"], **settings)
    if efficiency.is_pending(rm.get("efficiency")):
        net = artifacts.load_model(dirs["retrain"], dev, masks=True)
        same = {**pm["efficiency"], **pruned} if pruned else None
        models["retrain"] = efficiency.measured(net, dense, rm["efficiency"], same_as=same, **settings)
    return {"models": models, "machine": machine, "device": str(dev), "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": results.environment(dev)}


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
