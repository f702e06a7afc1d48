"""What pruning saves: parameters, FLOPs, bytes on disk and measured inference time.

Works for any model: dense, masked (torch.nn.utils.prune) or channel-pruned (smaller layers).
Everything returned is plain JSON data (numbers, strings, lists, dicts with string keys).

Definitions
-----------
* MACs: multiply-accumulates of the conv and linear layers for one input of `input_size`
  (default 3x64x64), counted with forward hooks: a conv gives out_elements * in_channels/groups
  * kh * kw, a linear out_elements * in_features. Other layers (pooling, norms, activations,
  additions) are left out. *Effective* MACs scale each layer by the density (nonzero fraction) of
  its weight: what a kernel that skipped zeros could save; dense kernels do not skip them.
* Sizes, in bytes: `state_dict` = torch.save of the plain state_dict (masks folded, as
  `prune.export` gives it); `masked` = that plus the boolean masks (what stage outputs hold);
  `sparse_compressed` = per tensor (in state_dict order) its nonzero values in their dtype plus a
  bitmask of where they are (numpy.packbits, 1 bit per element), all concatenated and compressed
  with zlib at level 9. A format for size only: reading it back needs the shapes (see
  `prune.architecture`).
* Latency: median wall time of one forward pass in torch.inference_mode, after warm-up runs, at
  a fixed thread count that is recorded; models are timed interleaved (every repeat runs each
  model once per batch size, in an order drawn at random for each repeat and batch size, seeded),
  so a slow spell of a shared machine hits them all alike and no model is always timed first.
  Models and inputs are in a given memory format, recorded in the table (`memory_format`): by
  default MEMORY_FORMAT (channels_last, NHWC); the stages pass the training's (train.channels_last,
  auto = channels_last), so a model is timed as it was trained and evaluated. The format matters
  on the CPU: in NCHW this CPU's max-pool kernel alone took 49 ms of the seed CNN's 188 ms at
  batch 64 (1 thread), against 4 ms in NHWC, so NCHW timed a slow pooling path more than the
  convolutions that pruning shrinks; ResNet-18 (no pooling but its stem's) ran batch 64 about 15%
  faster in NCHW (benchmarks/README.md, ## Pruning). The malloc settings matter as much: each
  table records the process's (`allocator`: its GLIBC_TUNABLES, which the project's kernels set,
  prunestudy.kernels.MALLOC_TUNABLES, or "default").
* Speed ratio and "saves time?": each repeat gives one paired ratio, the dense model's time over
  the other model's, measured back to back. The speedup is the geometric mean of these ratios,
  and its CONFIDENCE interval the Student-t interval of their mean logarithm, exponentiated.
  `saves_time` is true only when that interval lies above MIN_SPEEDUP (1.05, at the largest batch
  size measured): two models of the same computation (the dense model and a masked one folded to
  the dense shape) were measured up to 1.02x apart with intervals above 1 (95% CI 1.01-1.03x, 20
  paired runs, on ../shared/coco-sample), so a smaller gain is not told from the machine's drift.
  When the interval holds 1, or lies above 1 but not above the margin, the remark says so, with
  the interval at every batch size measured.
* Repeats kept: each table holds every repeat's time (`times_ms`: batch -> model -> one time per
  repeat, repeat i of every model timed in the same shuffled round), so that a median, a speedup
  and its interval can be recomputed from the numbers alone. The timing stage moves them out of
  its metrics.json into a file of their own beside it (`split_times`, paths.TIMES), which keeps
  the metrics (and results.json) short.
* Not timed: a model that runs the dense model's computation (every conv and linear layer of the
  same shape: masked pruning folded to the dense shape, or nothing pruned) multiplies its zeros by
  the same dense kernels, so its speed is the dense model's: `measured_speedup` 1.0, no interval,
  `saves_time` false, `latency` empty and `latency_from` saying so (`untimed`). Timing such a pair
  measured only the machine's drift (0.97-1.05x in benchmarks/README.md, ## Pruning; once 1.36x,
  95% CI 1.05-1.75x, with 5 paired repeats on a machine shared with a test suite) and was most of
  a curve point's pruning stage. benchmarks/bench_prune.py still times masked models, for whoever
  wants to see it on their machine.
"""

from __future__ import annotations

import io
import math
import os
import random
import statistics
import time
import zlib

import numpy as np
import torch
from torch import nn

from . import graph, prune

INPUT_SIZE = (3, 64, 64)
CONFIDENCE = 0.95   # of the speed ratio's interval
ZLIB_LEVEL = 9
MEMORY_FORMAT = "channels_last"   # of latency measurements by default: see the module's docstring
_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


# --- parameters ------------------------------------------------------------------------------
def parameters(model: nn.Module, dense_model: nn.Module | None = None) -> dict:
    """Total and nonzero parameters (as the forward pass sees them), global and per-layer weight
    sparsity, and the compression ratio: parameters of the dense model / nonzero parameters."""
    sp = prune.sparsity(model)
    dense_total = prune.sparsity(dense_model)["params_total"] if dense_model is not None else sp["params_total"]
    return {"params_total": sp["params_total"], "params_nonzero": sp["params_nonzero"],
            "dense_params_total": dense_total, "global_sparsity": sp["global_sparsity"],
            "layer_sparsity": {name: v["sparsity"] for name, v in sp["layers"].items()},
            "compression_ratio": dense_total / max(sp["params_nonzero"], 1)}


# --- FLOPs -----------------------------------------------------------------------------------
def flops(model: nn.Module, input_size: tuple[int, ...] = INPUT_SIZE) -> dict:
    """Dense and effective MACs per conv/linear layer and in total for one input (see module doc);
    theoretical_speedup = dense / effective MACs of this model."""
    layers: dict[str, dict] = {}

    def hook(name):
        def count(module, inputs, output):
            w = module.weight.detach()
            per_out = w[0].numel() if isinstance(module, nn.Conv2d) else module.in_features
            macs = output.numel() // output.shape[0] * per_out
            density = float((w != 0).sum()) / w.numel()
            layers[name] = {"macs": int(macs), "density": density, "effective_macs": macs * density}
        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    device = next(model.parameters()).device
    try:
        with _eval(model), torch.inference_mode():
            model(torch.zeros(1, *input_size, device=device))
    finally:
        for h in handles:
            h.remove()
    dense = sum(v["macs"] for v in layers.values())
    effective = sum(v["effective_macs"] for v in layers.values())
    return {"macs": dense, "effective_macs": effective, "theoretical_speedup": dense / max(effective, 1e-9),
            "layers": layers}


class _eval:
    """Context: the model in eval mode, its former mode restored afterwards."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


# --- sizes -----------------------------------------------------------------------------------
def _saved_bytes(tensors: dict) -> int:
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.tell()


def sparse_compressed(state_dict: dict[str, torch.Tensor], level: int = ZLIB_LEVEL) -> bytes:
    """Per tensor: nonzero values + packed bitmask, concatenated, zlib-compressed (see module doc)."""
    parts = []
    for tensor in state_dict.values():
        a = tensor.detach().cpu().contiguous().numpy().ravel()
        nonzero = a != 0
        parts += [np.packbits(nonzero).tobytes(), a[nonzero].tobytes()]
    return zlib.compress(b"".join(parts), level)


def sizes(model: nn.Module) -> dict:
    """Bytes on disk: plain state_dict, masked form (weights + boolean masks), sparse compressed."""
    state, _ = prune.export(model)
    masks = prune.masks(model)
    return {"state_dict_bytes": _saved_bytes(state), "masked_bytes": _saved_bytes({**state, **{
            f"{name}.weight_mask": m for name, m in masks.items()}}),
            "sparse_compressed_bytes": len(sparse_compressed(state)), "compression": f"zlib-{ZLIB_LEVEL}"}


# --- latency ---------------------------------------------------------------------------------
def deployable(model: nn.Module) -> nn.Module:
    """A copy with masks folded into plain weights: how a masked model would be deployed (the
    forward pre-hooks that re-multiply weight_orig by the mask would otherwise be timed too)."""
    return prune.make_permanent(prune.clone(model)) if prune.masks(model) else model


def latency_table(models: dict[str, nn.Module], batch_sizes=(1, 64), repeats: int = 20, device: str = "cpu",
                  threads: int | None = None, warmup: int = 3, input_size: tuple[int, ...] = INPUT_SIZE,
                  seed: int = 0, memory_format: str = MEMORY_FORMAT) -> dict:
    """Median forward time of every model at every batch size, measured in one interleaved run in
    random order (`seed`); with a model named 'dense', each row also gives speedup_vs_dense (the
    geometric mean of the paired ratios dense time / this model's time) and its CONFIDENCE interval
    (`speed_ratio`). Models are timed as given (use `deployable` for masked ones); each is copied
    to `device` and to `memory_format` ('channels_last' or 'contiguous', i.e. NCHW; the models
    given are left as they are). The thread count is set for the run and restored afterwards."""
    if repeats < 1 or not batch_sizes or not models:
        raise ValueError("latency needs at least one model, one batch size and repeats >= 1")
    if memory_format not in _FORMATS:
        raise ValueError(f"memory_format {memory_format!r}: choose one of {', '.join(_FORMATS)}")
    dev = torch.device(device)
    prev_threads = torch.get_num_threads()
    threads = threads or prev_threads
    torch.set_num_threads(threads)
    try:
        times = _measure(models, batch_sizes, repeats, dev, warmup, input_size, seed, _FORMATS[memory_format])
    finally:
        torch.set_num_threads(prev_threads)
    rows = []
    for name in models:
        for bs in batch_sizes:
            median = statistics.median(times[name, bs])
            ratio = speed_ratio(times["dense", bs], times[name, bs]) if "dense" in models else {}
            rows.append({"model": name, "batch": bs, "median_ms": median * 1e3, "min_ms": min(times[name, bs]) * 1e3,
                         "per_sample_ms": median * 1e3 / bs, "speedup_vs_dense": ratio.get("speedup"),
                         "speedup_ci_low": ratio.get("low"), "speedup_ci_high": ratio.get("high")})
    return {"device": str(dev), "threads": threads, "repeats": repeats, "warmup": warmup,
            "memory_format": memory_format, "allocator": allocator(),
            "order": f"random per repeat and batch size (seed {seed})", "confidence": CONFIDENCE,
            "input_size": list(input_size), "rows": rows,
            TIMES: {str(bs): {name: [t * 1e3 for t in times[name, bs]] for name in models} for bs in batch_sizes}}


TIMES = "times_ms"   # a latency table's every repeat: batch (a string) -> model -> ms, repeat i paired across models


def split_times(timing: dict) -> tuple[dict, dict]:
    """The timing stage's metrics without the repeats' times, and those times apart: {stage:
    {device: table[TIMES]}}. The metrics stay short enough to read; the times, kept in a file of
    their own, let anyone recompute each median, speedup and interval (docs/results.md)."""
    models, times = {}, {}
    for stage, fields in timing.get("models", {}).items():
        tables = fields.get("latency") or {}
        times[stage] = {dev: t[TIMES] for dev, t in tables.items() if TIMES in t}
        models[stage] = {**fields, "latency": {dev: {k: v for k, v in t.items() if k != TIMES}
                                               for dev, t in tables.items()}}
    return {**timing, "models": models}, times


def allocator() -> str:
    """The malloc settings this process was started with ("default", or its GLIBC_TUNABLES): on the
    CPU they change a forward pass's time by tens of percent (prunestudy.kernels.MALLOC_TUNABLES)."""
    return os.environ.get("GLIBC_TUNABLES") or "default"


def speed_ratio(dense_s, model_s, confidence: float = CONFIDENCE) -> dict:
    """The speedup of a model over the dense one from paired timings (repeat i of each, timed back
    to back): the geometric mean of dense_i / model_i and the Student-t interval of the mean log
    ratio, exponentiated (low = high = the ratio with a single repeat: no interval)."""
    from scipy import stats

    logs = [math.log(d / m) for d, m in zip(dense_s, model_s, strict=True)]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return {"speedup": math.exp(mean), "low": None, "high": None}
    half = float(stats.t.ppf(0.5 + confidence / 2, len(logs) - 1)) * statistics.stdev(logs) / math.sqrt(len(logs))
    return {"speedup": math.exp(mean), "low": math.exp(mean - half), "high": math.exp(mean + half)}


def _measure(models, batch_sizes, repeats, dev, warmup, input_size, seed: int, memory_format) -> dict:
    """(name, batch) -> list of seconds; every repeat runs each model once at each batch size, the
    models in an order drawn anew (seeded) for every repeat and batch size."""
    placed = {n: _placed(m, dev, memory_format) for n, m in models.items()}
    modes = {n: m.training for n, m in placed.items()}
    gen = torch.Generator().manual_seed(0)
    inputs = {bs: _formatted(torch.randn(bs, *input_size, generator=gen).to(dev), memory_format) for bs in batch_sizes}
    times = {(n, bs): [] for n in placed for bs in batch_sizes}
    order = random.Random(seed)
    try:
        with torch.inference_mode():
            for m in placed.values():
                m.eval()
                for bs in batch_sizes:
                    for _ in range(warmup):
                        m(inputs[bs])
            for _ in range(repeats):
                for bs in batch_sizes:
                    names = list(placed)
                    order.shuffle(names)
                    for n in names:
                        times[n, bs].append(_time_once(placed[n], inputs[bs], dev))
    finally:
        for n, m in placed.items():
            m.train(modes[n])
    return times


def _placed(model: nn.Module, dev: torch.device, memory_format) -> nn.Module:
    """The model on `dev` in `memory_format`: itself when it is so already, else a copy."""
    on_dev = next(model.parameters()).device == dev
    if memory_format == torch.contiguous_format and on_dev:
        return model
    copy = prune.clone(model) if on_dev else prune.clone(model).to(dev)
    return copy.to(memory_format=memory_format)


def _formatted(x: torch.Tensor, memory_format) -> torch.Tensor:
    return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x


def _time_once(model: nn.Module, x: torch.Tensor, dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    model(x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - start


def latency(model: nn.Module, batch_sizes=(1, 64), repeats: int = 20, device: str = "cpu",
            threads: int | None = None, warmup: int = 3) -> dict:
    """Median forward time of one model (see latency_table)."""
    return latency_table({"model": model}, batch_sizes, repeats, device, threads, warmup)


# --- summary ---------------------------------------------------------------------------------
MIN_SPEEDUP = 1.05   # "saves time": the speedup's interval lies above this (see the module's docstring)



def summary(model: nn.Module, dense_model: nn.Module, batch_sizes=(1, 64), repeats: int = 20,
            threads: int | None = None, devices: tuple[str, ...] | None = None,
            input_size: tuple[int, ...] = INPUT_SIZE, warmup: int = 3, same_as: dict | None = None,
            memory_format: str = MEMORY_FORMAT, measure: bool = True) -> dict:
    """Parameters, FLOPs, sizes and measured latency of `model` against `dense_model`, as plain
    JSON data. Latency is measured on the CPU (and CUDA when available, unless `devices` says
    otherwise) with masks folded (`deployable`), in `memory_format`. `saves_time` is judged on the CPU (else the first
    device) at the largest batch size: true only when the CONFIDENCE interval of the speedup lies
    above MIN_SPEEDUP; `remark` says why, with the speedup and its interval at every batch size.

    `same_as`: the summary of a model that runs the same computation (the pruned model, for the
    model retrained from it with its masks held): its latency is taken over, not measured again,
    when its MACs, nonzero weights, parameter count and latency settings are this model's: the
    dense kernels' time does not depend on the weights' values. `latency_from` says which.
    A model that runs the dense model's computation (masked pruning: the same layer shapes) is not
    timed at all (`untimed`): its speed is the dense model's. With `measure` False, a model of its
    own computation is left to the timing stage (`pending`; `measured` times it there): a time is a
    measurement of a machine, keyed on it, while these figures are the model's."""
    f, fd = flops(model, input_size), flops(dense_model, input_size)
    out = {**parameters(model, dense_model), "macs": f["macs"], "effective_macs": f["effective_macs"],
           "dense_macs": fd["macs"], "theoretical_speedup": fd["macs"] / max(f["effective_macs"], 1e-9),
           "layer_macs": {n: {"macs": v["macs"], "effective_macs": v["effective_macs"]}
                          for n, v in f["layers"].items()},
           **sizes(model), "dense_state_dict_bytes": _saved_bytes(prune.export(dense_model)[0]), "latency": {}}
    if _dense_computation(f, fd, out):
        out.update(untimed(out["theoretical_speedup"]))
    elif not measure:
        out.update(pending())
    else:
        out.update(measured(model, dense_model, out, batch_sizes, repeats, threads, devices, input_size, warmup,
                            same_as, memory_format))
    return out


LATENCY_FIELDS = ("latency", "latency_from", "measured_speedup", "speedup_ci", "verdict_batch", "saves_time", "remark")


def measured(model: nn.Module, dense_model: nn.Module, costs: dict, batch_sizes=(1, 64), repeats: int = 20,
             threads: int | None = None, devices: tuple[str, ...] | None = None,
             input_size: tuple[int, ...] = INPUT_SIZE, warmup: int = 3, same_as: dict | None = None,
             memory_format: str = MEMORY_FORMAT) -> dict:
    """The latency fields (LATENCY_FIELDS) of `model` against `dense_model`, whose other figures
    (`costs`: MACs, parameters) `summary` computed: taken over from `same_as` when it measured the
    same computation with these settings, else timed now."""
    devices = devices or (("cpu", "cuda") if torch.cuda.is_available() else ("cpu",))
    if _same_computation(costs, same_as, batch_sizes, repeats, devices, memory_format):
        out = {field: same_as[field] for field in LATENCY_FIELDS}
        out["latency_from"] = same_as.get("latency_from") or "the pruned model (same MACs and nonzero weights)"
        return out
    pair = {"dense": deployable(dense_model), "pruned": deployable(model)}
    out = {"latency": {dev: latency_table(pair, batch_sizes, repeats, dev, threads, warmup, input_size=input_size,
                                          memory_format=memory_format) for dev in devices},
           "latency_from": None}   # measured here
    table = out["latency"]["cpu" if "cpu" in devices else devices[0]]
    rows = {r["batch"]: r for r in table["rows"] if r["model"] == "pruned"}
    largest = max(batch_sizes)
    out["measured_speedup"] = rows[largest]["speedup_vs_dense"]
    out["speedup_ci"] = [rows[largest]["speedup_ci_low"], rows[largest]["speedup_ci_high"]]
    out["verdict_batch"] = largest
    out["saves_time"], out["remark"] = _verdict(rows, largest, costs["theoretical_speedup"],
                                                f"{table['repeats']} paired runs in random order on {table['device']}, "
                                                f"{memory_format.replace('_', ' ')}")
    return out


def pending() -> dict:
    """The latency fields of a model of its own computation before the timing stage timed it."""
    return {"latency": {}, "latency_from": graph.TIMING_PENDING, "measured_speedup": None, "speedup_ci": None,
            "verdict_batch": None, "saves_time": None,
            "remark": ("not timed yet: its latency is measured by the timing stage, on the machine of the run that "
                       "reads it (the analysis runs it; `prunestudy run --force timing` measures again).")}


def is_pending(eff: dict | None) -> bool:
    """Whether an efficiency summary's latency is left to the timing stage (and not taken yet)."""
    return bool(eff) and eff.get("latency_from") == graph.TIMING_PENDING


DENSE_COMPUTATION = ("the dense model: the same layers with weights of the same shapes, its zeros multiplied by "
                     "dense kernels like any other weight")


def _dense_computation(f: dict, fd: dict, out: dict) -> bool:
    """Whether a model runs the dense model's computation: every conv and linear layer with the
    dense one's MACs (the same shapes) and as many parameters, whatever their values (masked
    pruning, folded as deployed; or nothing pruned)."""
    return (out["params_total"] == out["dense_params_total"] and f["layers"].keys() == fd["layers"].keys()
            and all(f["layers"][n]["macs"] == fd["layers"][n]["macs"] for n in f["layers"]))


def untimed(theoretical: float) -> dict:
    """The latency fields of a model that runs the dense model's computation (`_dense_computation`):
    not timed, its speed is the dense model's (measured_speedup 1.0, no interval, saves no time).
    Timing the pair would measure the machine's drift between two runs of one computation (masked
    models measured 0.97-1.05x the dense model's speed, benchmarks/README.md, ## Pruning) and costs
    each curve point most of its pruning stage's time."""
    return {"latency": {}, "latency_from": DENSE_COMPUTATION, "measured_speedup": 1.0, "speedup_ci": None,
            "verdict_batch": None, "saves_time": False,
            "remark": ("saves no time: it runs the dense model's computation, so its speed is the dense model's "
                       "(1.00x; not timed, since timing two runs of one computation measures only the machine's "
                       f"drift). {same_shape_note(theoretical)}")}


def timed(eff: dict) -> bool:
    """Whether an efficiency summary holds a latency measurement (its own or one taken over)."""
    return bool(eff.get("latency"))


def _same_computation(out: dict, other: dict | None, batch_sizes, repeats: int, devices,
                      memory_format: str = MEMORY_FORMAT) -> bool:
    """Whether `other` (an efficiency summary) measured a model with `out`'s computation, with these
    latency settings and this process's allocator (a table without `memory_format` was timed NCHW:
    'contiguous'; one without `allocator` with glibc's defaults)."""
    if not other or not other.get("latency"):
        return False
    same = ("macs", "effective_macs", "dense_macs", "params_total", "params_nonzero", "layer_macs")
    if any(other.get(k) != out.get(k) for k in same) or set(other["latency"]) != set(devices):
        return False
    return all(t.get("repeats") == repeats and sorted({r["batch"] for r in t["rows"]}) == sorted(batch_sizes)
               and t.get("memory_format", "contiguous") == memory_format
               and t.get("allocator", "default") == allocator() for t in other["latency"].values())


def _ratio_text(row: dict) -> str:
    lo, hi = row["speedup_ci_low"], row["speedup_ci_high"]
    ci = f" ({CONFIDENCE:.0%} CI {lo:.2f}-{hi:.2f}x)" if lo is not None else " (one run: no interval)"
    return f"{row['speedup_vs_dense']:.2f}x{ci}"


def same_shape_note(theoretical: float) -> str:
    """Why a model of the dense shape (masked) cannot save time on dense kernels."""
    return (f"The model keeps the dense shape: its zeroed weights are still multiplied by dense kernels, so the "
            f"{theoretical:.2f}x fewer effective FLOPs are saved only on paper.")


def _verdict(rows: dict[int, dict], batch: int, theoretical: float, how: str) -> tuple[bool, str]:
    """(saves_time, remark) from the pruned model's latency rows by batch size (speedup over the
    dense model and its interval), judged at `batch`. (A model of the dense computation is not
    timed, `untimed`, so it never comes here.)"""
    row = rows[batch]
    others = [f"at batch {b}: {_ratio_text(r)}" for b, r in sorted(rows.items()) if b != batch]
    measured = (f"measured {_ratio_text(row)} the dense model's speed at batch {batch}"
                + "".join(f"; {o}" for o in others) + f" ({how})")
    lo, hi = row["speedup_ci_low"], row["speedup_ci_high"]
    if lo is None:
        return False, f"not judged: {measured}; one run gives no interval, so no verdict."
    if lo > MIN_SPEEDUP:
        return True, f"saves time: {measured}; theoretical {theoretical:.2f}x."
    if hi < 1:
        return False, f"saves no time, it is slower: {measured}."
    if lo > 1:
        return False, (f"saves no time that counts: {measured}; the interval at batch {batch} lies above 1 but not "
                       f"above {MIN_SPEEDUP:.2f}x, the margin a verdict needs (two models of the same computation "
                       f"can be measured that far apart).")
    return False, (f"saves no time that this measurement can show: {measured}; the interval at batch {batch} "
                   f"holds 1.")
