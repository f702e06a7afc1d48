"""results.json: the contract of a run, merged from the stage outputs completed so far; the seed
repeats' and the curve's figures; provenance (versions, lock file, commit, platform)."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import atomic, codedigest, config, data, graph, machine, methods, metrics, paths, records, states


def collect_results(run_dir, params: dict | None = None, timings: dict | None = None) -> dict:
    """results.json: the contract of a run, merged from the stages completed so far."""
    run_dir = Path(run_dir)
    res: dict = {}
    if paths.completion_marker(run_dir, "data").is_file():
        info = data.read_info(paths.stage_dir(run_dir, "data"))
        res["data"] = {k: info.get(k) for k in ("classes", "train_size", "test_size", "counts", "skipped", "root",
                                                 "image_size", "label_mode", "clipped", "rejected", "cache",
                                                 "manifest_sha256")}
    test = _test_set(run_dir, res.get("data"))
    for state in states.ALL:
        path = states.folder(run_dir, state.key) / paths.METRICS
        if path.is_file() and (state is not states.CONTROL or (res.get("retrain") or {}).get("control")):
            res[state.stage] = _scored(atomic.read_json(path), states.folder(run_dir, state.key), test)
    timing = timing_of(run_dir)
    if timing is not None:
        for stage in ("prune", "retrain"):
            if stage in res:
                res[stage]["efficiency"] = with_timing(res[stage].get("efficiency"), timing, stage)
        res["timing"] = {**{k: timing.get(k) for k in ("machine", "device", "measured")},
                         "times": times_file(run_dir, run_dir)}
    names = curve_names(run_dir, params)
    if names:
        res["curve"] = curve_results(run_dir, names)
    if test is not None:
        res.update(comparisons(run_dir, res, *test))
    if params is not None:
        res["params"] = params
        res["params_hash"] = config.stage_hash(params)
        if config.repeat_seeds(params):
            res["repeats"] = [seed_results(run_dir, s, paths.repeat_name(s)) for s in config.repeat_seeds(params)]
            if test is not None:
                res["seeds_paired"] = seeds_paired(run_dir, params, res["repeats"], *test)
    if timings is not None:
        res["timings_s"] = timings
    res["computed"] = computed(run_dir)
    res["provenance"] = provenance()
    return res


def timing_of(folder, run_dir=None) -> dict | None:
    """The timing stage's metrics of a chain (stages.run_timing), when it timed these very models (an
    in-run point without a train/ of its own: the study's, in run_dir)."""
    out = paths.timing_dir(folder)
    inputs = {s: paths.stage_dir(folder, s) for s in ("train", "prune", "retrain")}
    if run_dir is not None and not inputs["train"].exists():
        inputs["train"] = paths.stage_dir(run_dir, "train")
    if not (out / paths.METRICS).is_file() or records.problem(out, None, inputs) is not None:
        return None
    return atomic.read_json(out / paths.METRICS)


def times_file(folder, run_dir) -> str | None:
    """The file of a chain's timing that keeps every paired repeat (paths.TIMES), relative to the run
    folder; None for a timing made before the repeats were kept (its figures cannot be audited)."""
    path = paths.timing_dir(folder) / paths.TIMES
    return path.relative_to(run_dir).as_posix() if path.is_file() else None


def with_timing(eff: dict | None, timing: dict | None, stage: str) -> dict | None:
    """An efficiency summary with the latency its stage left to the timing stage, once measured."""
    fields = ((timing or {}).get("models") or {}).get(stage)
    if not eff or not fields or eff.get("latency_from") != graph.TIMING_PENDING:
        return eff
    return {**eff, **fields}


def computed(run_dir) -> dict:
    """{stage: its key, the digest of its code, the commit and time it was computed at, by whom}
    from the stage records of the run folder: a stage linked from the store was computed by the
    code of its own record, which may be another commit than the report's."""
    out = {}
    folders = {**{s: paths.stage_dir(run_dir, s) for s in graph.CHAIN}, "timing": paths.timing_dir(run_dir)}
    for stage, folder in folders.items():
        rec = records.read(folder)
        if rec:
            out[stage] = {"key": rec["key"], "code": codedigest.combined(rec["code"]) if rec.get("code") else None,
                          "commit": rec.get("commit"), "finished": rec.get("finished"), "by": rec.get("by")}
    return out


def seed_results(run_dir, seed: int, where: str = ".") -> dict:
    """What the report compares across seeds, from one run folder (`where` in run_dir: a repeat's,
    or the run itself): test accuracy and loss of each model state (and the dense control),
    sparsity, the folder."""
    out = {"seed": seed, "dir": where}
    run_dir = Path(run_dir) / where
    test = _test_set(run_dir)
    preds = {}
    for state in states.ALL:
        path = states.folder(run_dir, state.key) / paths.METRICS
        if path.is_file():
            m = _scored(atomic.read_json(path), states.folder(run_dir, state.key), test)
            out[state.key] = {k: m.get(k) for k in ("test_accuracy", "balanced_accuracy", "macro_f1", "test_loss",
                                                    "global_sparsity")}
            if (pred := _predictions(states.folder(run_dir, state.key), test)) is not None:
                preds[state.key] = pred
    if preds:   # a repeat is judged like the run: each of its states against the majority floor
        out["floor"] = metrics.floor(test[0], preds, test[1])
    return out


def seeds_paired(run_dir, params: dict, repeats: list[dict], labels: np.ndarray, classes: list[str]) -> list[dict]:
    """Each of states.COMPARED over the run's seed and its repeats, from the per-crop pairs of every
    seed (metrics.stratified, clustered by image where the manifest names them): pooled gains and
    losses, the stratified exact test, the clustered test and interval; `at_floor`: the seeds where
    either state is at the majority floor or collapsed (nothing can then be concluded)."""
    run_dir = Path(run_dir)
    folders = {params.get("seed"): run_dir, **{r["seed"]: run_dir / r["dir"] for r in repeats}}
    groups = test_groups(run_dir, labels)
    out = []
    for a, b in states.COMPARED:
        pairs, bad = {}, []
        for seed, folder in folders.items():
            pa, pb = (_predictions(states.folder(folder, k), (labels, classes)) for k in (a, b))
            if pa is not None and pb is not None:
                pairs[seed] = (pb, pa)
                if metrics.flagged(metrics.floor(labels, {a: pa, b: pb}, classes)):
                    bad.append(seed)
        if len(pairs) >= 2:
            out.append({"after": a, "before": b, **metrics.stratified(labels, pairs, groups), "at_floor": bad})
    return out


def test_groups(run_dir, labels: np.ndarray) -> np.ndarray | None:
    """The image of each test sample (its manifest's image_id, in the order of the test labels), or
    None where the manifest is missing or does not fit the labels."""
    path = paths.stage_dir(run_dir, "data") / paths.manifest("test")
    if not path.is_file():
        return None
    m = pd.read_csv(path, usecols=["index", "image_id"]).sort_values("index")
    ids = m["image_id"].to_numpy()
    return ids if ids.size == labels.size else None


def curve_names(run_dir, params: dict | None) -> list[str]:
    """The curve's points: from the parameters (methods, then amounts), or, without them
    (stages called from Python), every point folder with a finished pruning, by method and amount."""
    if params is not None:
        return [name for name, _ in paths.curve_points(params)]
    found = [atomic.read_json(m) for m in Path(run_dir).glob(f"{paths.CURVE}/*/prune/{paths.METRICS}")]
    return [paths.point_name(m["method"], m["amount"]) for m in sorted(found, key=lambda m: (m["method"], m["amount"]))]


def curve_results(run_dir, names: list[str]) -> list[dict]:
    """One entry per curve point whose pruning finished (curve/<point>/, its own run folder):
    method, amount, sparsity (of the targeted weights, against the dense model), test accuracy /
    loss before and after retraining (None until its retraining has run on this pruning), measured
    and theoretical speedup, sizes."""
    run_dir, out = Path(run_dir), []
    for name in names:
        pruned = paths.curve_point(run_dir, "prune", name)
        if not (pruned / paths.METRICS).is_file():
            continue
        p = atomic.read_json(pruned / paths.METRICS)
        retrained = paths.curve_point(run_dir, "retrain", name)
        r = None   # retrained from this very pruning (its record says so), or not yet
        if (retrained / paths.METRICS).is_file() and records.problem(retrained, None, {"prune": pruned}) is None:
            r = atomic.read_json(retrained / paths.METRICS)
        eff = with_timing(p["efficiency"], timing_of(paths.curve_point_dir(run_dir, name), run_dir), "prune")
        # none for a model of the dense computation (efficiency.untimed): its speed is the dense model's
        table = eff["latency"].get("cpu") or next(iter(eff["latency"].values()), None)
        batch = max(row["batch"] for row in table["rows"]) if table else None
        ms = {row["model"]: row["median_ms"] for row in table["rows"] if row["batch"] == batch} if table else {}
        out.append({"name": name, "dir": f"{paths.CURVE}/{name}", "method": p["method"], "amount": p["amount"],
                    "kind": p["kind"], "rounds": p.get("rounds", 1), "rewound": bool(p.get("rewind")),
                    "targets": p["targets"], "sparsity": p["global_sparsity"], "param_sparsity": p["param_sparsity"],
                    "params_total": p["params_total"], "params_nonzero": p["params_nonzero"],
                    "dense_params_total": p["dense_params_total"],
                    "test_accuracy_before": p["test_accuracy"], "test_loss_before": p["test_loss"],
                    "test_accuracy_after": r["test_accuracy"] if r else None,
                    "test_loss_after": r["test_loss"] if r else None,
                    **{f"{k}_{when}": (m or {}).get(k) for k in ("balanced_accuracy", "macro_f1")
                       for when, m in (("before", p), ("after", r))},
                    "retrain_epochs": len(r["epochs"]) if r else None,
                    "speedup_measured": eff["measured_speedup"], "speedup_ci": eff.get("speedup_ci"),
                    "speedup_theoretical": eff["theoretical_speedup"],
                    "timed": table is not None,
                    "times": times_file(paths.curve_point_dir(run_dir, name), run_dir) if table else None,
                    "latency_device": table and table["device"], "latency_batch": batch,
                    "latency_ms": ms.get("pruned"), "dense_latency_ms": ms.get("dense"),
                    "latency_threads": table and table["threads"],
                    "saves_time": eff["saves_time"], "remark": eff["remark"],
                    "macs": eff["macs"], "effective_macs": eff["effective_macs"], "dense_macs": eff["dense_macs"],
                    "sizes": {k: eff[k] for k in ("state_dict_bytes", "masked_bytes", "sparse_compressed_bytes",
                                                  "dense_state_dict_bytes")}})
    return out


def _test_set(run_dir: Path, info: dict | None = None) -> tuple[np.ndarray, list[str]] | None:
    """The test labels and the class names of a run folder (None before the data stage)."""
    data_dir = paths.stage_dir(run_dir, "data")
    labels = data_dir / paths.labels("test")
    if not labels.is_file() or not (info or (data_dir / paths.DATA_INFO).is_file()):
        return None
    classes = (info or data.read_info(data_dir))["classes"]
    labels = np.load(labels)
    return (labels, classes) if labels.size else None


def _predictions(folder: Path, test) -> np.ndarray | None:
    """The test predictions saved in a folder, if they are there and fit the test set."""
    path = Path(folder) / paths.PREDICTIONS
    if test is None or not path.is_file():
        return None
    pred = np.load(path)
    return pred if pred.shape == test[0].shape else None


def _scored(m: dict, folder: Path, test) -> dict:
    """A state's metrics with its balanced accuracy, macro-F1 and top prediction; computed from
    its saved predictions where its metrics.json predates them."""
    if all(k in m for k in metrics.SCORE_KEYS):
        return m
    pred = _predictions(folder, test)
    return m if pred is None else {**m, **{k: v for k, v in metrics.scores(test[0], pred, test[1]).items()
                                          if k in metrics.SCORE_KEYS}}


def comparisons(run_dir, res: dict, labels: np.ndarray, classes: list[str]) -> dict:
    """What results.json says about comparisons on the test set (prunestudy.metrics), from the saved
    predictions: `floor` (the majority class and each state against it), `paired` (the exact
    McNemar test and Newcombe interval of each of states.COMPARED) and, per curve point, its
    balanced metrics, `paired_before` / `paired_after` against the trained model and
    `vs_floor_before` / `vs_floor_after` against the floor method (random pruning) at the same
    amount; each of these four is one Holm-corrected family over the curve points."""
    run_dir = Path(run_dir)
    preds = {s.key: p for s in states.ALL if s.stage in res
             and (p := _predictions(states.folder(run_dir, s.key), (labels, classes))) is not None}
    groups = test_groups(run_dir, labels)

    def pair(before: np.ndarray, after: np.ndarray) -> dict:
        c = metrics.paired(labels, before, after)
        return c if groups is None else metrics.clustered(c, labels, before, after, groups)
    out: dict = {"floor": metrics.floor(labels, preds, classes) if preds else None,
                 "paired": [{"after": a, "before": b, **pair(preds[b], preds[a])}
                            for a, b in states.COMPARED if a in preds and b in preds]}
    if groups is not None:
        out["test_clusters"] = metrics.cluster_sizes(groups)
        for state, e in ((out["floor"] or {}).get("states") or {}).items():
            e["accuracy_clustered"] = metrics.cluster_interval(groups, preds[state] == labels)
    dense = preds.get("trained")
    families: dict[str, list[dict]] = {}
    points: dict[tuple[str, float, str], np.ndarray] = {}   # (method, amount, when) -> predictions
    for e in res.get("curve") or []:
        for when, stage in (("before", "prune"), ("after", "retrain")):
            pred = _predictions(paths.curve_point(run_dir, stage, e["name"]), (labels, classes))
            if pred is None or e.get(f"test_accuracy_{when}") is None:
                continue
            points[e["method"], e["amount"], when] = pred
            s = metrics.scores(labels, pred, classes)
            for k in ("balanced_accuracy", "macro_f1"):
                e[f"{k}_{when}"] = s[k]
            e[f"floor_{when}"] = metrics.floor(labels, {"point": pred}, classes)["states"]["point"]
            if dense is not None:
                e[f"paired_{when}"] = pair(dense, pred)
                families.setdefault(f"paired_{when}", []).append(e[f"paired_{when}"])
    floor = methods.floor()
    for e in res.get("curve") or []:   # each method against random pruning at the same amount
        for when in ("before", "after"):
            base, pred = points.get((floor, e["amount"], when)), points.get((e["method"], e["amount"], when))
            if e["method"] != floor and base is not None and pred is not None:
                e[f"vs_floor_{when}"] = pair(base, pred)
                families.setdefault(f"vs_floor_{when}", []).append(e[f"vs_floor_{when}"])
    for family in families.values():
        metrics.correct(family)
    return out


def load_results(run_dir=None) -> dict:
    """Results of a run as the analysis sees them: fresh from the stage outputs, with the
    parameters, stage timings and stage keys that `prunestudy run` recorded in results.json."""
    run_dir = paths.resolve_run_dir(run_dir)
    paths.require("data", paths.stage_dir(run_dir, "data"))
    try:
        saved = atomic.read_json(run_dir / paths.RESULTS)
    except (OSError, ValueError):   # missing or damaged: everything is rebuilt from the stage outputs
        saved = {}
    params = saved.get("params")
    if params is None and (run_dir / paths.PARAMS).is_file():
        params = atomic.read_json(run_dir / paths.PARAMS)
    res = collect_results(run_dir, params, saved.get("timings_s"))
    if saved.get("stage_keys"):
        res["stage_keys"] = saved["stage_keys"]
    res["chain"] = records.chain_problems(run_dir)
    return res


def environment(device: torch.device) -> dict:
    """Where a stage computed: its device (and GPU model), the GPUs its process was given
    (CUDA_VISIBLE_DEVICES: a sweep's worker, a Ray task, a SLURM job), its Python, its threads, its
    malloc settings (GLIBC_TUNABLES: the project's kernels set them, prunestudy.kernels), the CPU
    and the instruction set of PyTorch's CPU kernels (`cpu_capability`, e.g. AVX2 or AVX512), and
    any variable that restricts them (CPU_DISPATCH_VARS)."""
    return {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "python": sys.executable,
            "torch_threads": torch.get_num_threads(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            "cpu": machine.cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_dispatch": machine.cpu_dispatch()}


LOCK_FILE = codedigest.LOCK   # the project's pinned environment (make setup installs it)


def provenance() -> dict:
    versions = {}
    for pkg in ("prunestudy", "torch", "torchvision", "numpy", "pycocotools", "papermill", "nbconvert",
                "seaborn", "matplotlib", "pandas"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    lock = config.project_root() / LOCK_FILE
    return {"versions": versions, "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu": machine.cpu_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "git_commit": config.git_commit(),
            "lock_file": LOCK_FILE, "lock_sha256": data.sha256_file(lock) if lock.is_file() else None,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}



