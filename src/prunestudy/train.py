"""Training and evaluation with the dataset resident on the device as uint8.

Batches are index slices of a per-epoch permutation; the seed report's augmentation (random
horizontal flip, random rotation within +-10 degrees, normalisation with mean = std = 0.5) runs
batched on the device with one random draw per sample, no per-sample Python.

Speed options (`precision`, `channels_last`, `compile`, `fused` Adam; each may be "auto") are
resolved by `resolve_speed`; the defaults (fp32, everything off) reproduce the plain loop bit
for bit. `fit(checkpoint=path)` writes a
resumable checkpoint at the end of every epoch; a rerun resumes from it and ends with the same
weights as an uninterrupted run. When torch.distributed is initialised (see `distributed.py`),
`fit` trains data-parallel: every rank draws the same permutation and augmentation for each
global batch and trains on its own slice of it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import atomic
from .progress import bar as progress_bar

MEAN = STD = 0.5
MAX_ROTATION_DEG = 10.0
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
CHECKPOINT_FORMAT = 1
# Batches up to this size count as "small" on CUDA: torch.compile uses mode="reduce-overhead"
# (CUDA graphs), since launch overhead dominates such steps.
SMALL_BATCH = 512
# A batch-mean cross-entropy above this has exploded: chance is ln(classes) (2.3 for 10), and even a
# confidently wrong model stays within tens; training stops there (DivergedError), as at NaN or inf.
DIVERGED_LOSS = 1e3
DIVERGENCE_CHECK = 20   # steps between checks of the loss (one device sync each) within an epoch


class EmptySetError(ValueError):
    """An evaluation of no samples: nothing can be measured (never reported as a loss or accuracy of 0)."""


class DivergedError(RuntimeError):
    """Training diverged (a non-finite or exploding loss) and was stopped; nothing of it is kept."""

    def __init__(self, label: str, step: int, loss: float, where: str, lr: float | None = None):
        self.step, self.loss = step, loss
        what = "not a finite number" if not math.isfinite(loss) else f"above {DIVERGED_LOSS:g}"
        fix = f"lower the learning rate (lr={lr:g} here)" if lr else "lower the learning rate"
        super().__init__(f"[{label}] diverged at step {step}: the {where} is {loss:.4g}, {what}. Training was "
                         f"stopped and nothing of it is kept or reported: {fix} and rerun")


def _first_bad(losses) -> int | None:
    """Index of the first loss that is not finite or has exploded, or None."""
    values = np.asarray(losses, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values) | (values > DIVERGED_LOSS))
    return int(bad[0]) if len(bad) else None


# --- devices and processes -----------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless torch.distributed is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (and in a plain run): the one process that writes artifacts."""
    return rank_and_world()[0] == 0


def select_device(name: str = "auto") -> torch.device:
    """'auto' = CUDA when available, else the CPU. Under torchrun, 'auto'/'cuda' mean this
    process's own GPU (cuda:LOCAL_RANK)."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available here: use 'auto' or 'cpu'")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        if rank_and_world()[1] > 1:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda")
    return torch.device("cpu" if name == "auto" else name)


def to_device(images: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N,H,W,C numpy images -> uint8 N,C,H,W tensor on device; labels -> int64."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(device)
    return x, torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)


# --- speed choices -------------------------------------------------------------------------------
def resolve_speed(device, precision: str = "fp32", channels_last: bool | str = False,
                  compile: bool | str = False, *, fused: bool | str = False, batch_size: int | None = None) -> dict:
    """The concrete speed choices for `device` (record them in metrics).

    Returns {"precision": fp32|bf16|fp16, "channels_last": bool, "compile": bool,
    "compile_mode": None|"default"|"reduce-overhead", "fused": bool (fused Adam kernel),
    "grad_scaler": bool, "notes": [str]}. Only fp32 with every option off reproduces the plain
    loop bit for bit; channels_last, compile and fused Adam change float rounding (~1 ulp).

    `auto` decisions, measured (benchmarks/README.md, ## Training):
    - CPU: fp32, channels_last, eager, fused Adam. On the study's CPU (AMD EPYC Zen 3: AVX2, no
      AVX-512, no AMX) a SeedCNN training step at batch 32 ran 10-15x *slower* with bf16
      autocast than in fp32 (no native bf16 arithmetic: every op converts; the claimed AVX-512
      BF16 speed-up needs hardware this CPU lacks), channels_last (fast max-pool path) and the
      fused Adam kernel were each ~1.1x faster, together ~1.2-1.3x, and torch.compile was
      *slower* (0.6x) after ~25 s of compilation. CPUs with AMX-BF16 may differ: not measured,
      so auto stays fp32 there too.
    - CUDA: bf16 where supported (else fp16 with a GradScaler), channels_last and fused Adam,
      the usual tensor-core set-up; compile stays off until measured on a GPU (tens of seconds
      of compilation per run, pruning's forward hooks).
    fp16 on the CPU is refused: CPU autocast in fp16 has no fast kernels and no loss scaling.
    """
    device = torch.device(device)
    notes: list[str] = []
    precision = _resolve_precision(device, precision, notes)
    channels_last = True if channels_last == "auto" else bool(channels_last)
    compile = False if compile == "auto" else bool(compile)
    fused = True if fused == "auto" else bool(fused)
    mode = None
    if compile:
        small = batch_size is None or batch_size <= SMALL_BATCH
        mode = "reduce-overhead" if device.type == "cuda" and small else "default"
    return {"precision": precision, "channels_last": channels_last, "compile": compile,
            "compile_mode": mode, "fused": fused, "grad_scaler": precision == "fp16", "notes": notes}


def _resolve_precision(device: torch.device, precision: str, notes: list[str]) -> str:
    cuda = device.type == "cuda"
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise ValueError("precision='fp16' is not supported on the CPU (no fast fp16 kernels, and fp16 "
                         "needs loss scaling): use 'bf16', 'fp32' or 'auto'")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='bf16' but {torch.cuda.get_device_name(device)} has no bf16 support: "
                         "use 'fp16' or 'auto'")
    if precision == "bf16" and not cuda:
        notes.append("bf16 on a CPU without AMX/AVX-512 BF16 is much slower than fp32 (see benchmarks)")
    return precision


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


# --- augmentation --------------------------------------------------------------------------------
def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 1] float) images -> float, normalised with mean = std = 0.5."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    return (x - MEAN) / STD


def augment_draws(n: int, generator: torch.Generator, device=None,
                  max_deg: float = MAX_ROTATION_DEG) -> tuple[torch.Tensor, torch.Tensor]:
    """The random draws of `n` samples: flip (bool, p=0.5) and angle (radians, U(-max, max)).
    Drawn flips first, then angles, so a batch's draws do not depend on how it is later split."""
    device = device or generator.device
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    angle = (torch.rand(n, generator=generator, device=device) * 2 - 1) * math.radians(max_deg)
    return flip, angle


def apply_augment(x: torch.Tensor, flip: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Flip where `flip`, rotate by `angle` (radians, counter-clockwise on screen, as
    torchvision's positive angles) about the centre (bilinear, black fill), normalise."""
    x = x.float().div_(255)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return normalize(x)


def augment(x: torch.Tensor, generator: torch.Generator, max_deg: float = MAX_ROTATION_DEG) -> torch.Tensor:
    """Batched seed augmentation of uint8 N,C,H,W images: flip (p=0.5), rotate U(-max_deg, max_deg)
    about the centre (bilinear, black fill as torchvision's RandomRotation), normalise."""
    return apply_augment(x, *augment_draws(x.shape[0], generator, x.device, max_deg))


# --- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500, *,
             precision: str = "fp32", channels_last: bool = False) -> dict:
    """True per-sample mean cross-entropy, accuracy (a fraction) and the predicted labels."""
    model.eval()
    total_loss, preds = 0.0, []
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i : i + batch_size])
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with _autocast(x.device, precision):
            logits = model(xb).float()
        total_loss += F.cross_entropy(logits, y[i : i + batch_size], reduction="sum").item()
        preds.append(logits.argmax(1))
    n = len(y)
    if not n:
        raise EmptySetError("evaluation of an empty set (0 samples): there is nothing to measure, and a loss or "
                            "accuracy of 0 would read as a result; the test split is empty (see the data stage's "
                            "data.json)")
    pred = torch.cat(preds)
    correct = int((pred == y).sum())
    return {"loss": total_loss / n, "accuracy": correct / n, "correct": correct, "n": n,
            "predictions": pred.cpu().numpy()}


def _evaluate_sharded(model: nn.Module, x: torch.Tensor, y: torch.Tensor, speed: dict) -> tuple[float, float]:
    """(loss, accuracy) on the test set: each rank evaluates its shard, the sums are all-reduced."""
    rank, world = rank_and_world()
    part = torch.tensor_split(torch.arange(len(x), device=x.device), world)[rank]
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)
    if len(part):   # a rank's shard is empty when the test set has fewer samples than ranks
        ev = evaluate(model, x[part], y[part], precision=speed["precision"], channels_last=speed["channels_last"])
        sums = torch.tensor([ev["loss"] * ev["n"], ev["correct"], ev["n"]], dtype=torch.float64, device=x.device)
    torch.distributed.all_reduce(sums)
    n = sums[2].item()
    if not n:
        evaluate(model, x[:0], y[:0])   # raises EmptySetError, on every rank alike
    return sums[0].item() / n, sums[1].item() / n


# --- weights and checkpoints ---------------------------------------------------------------------
def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a local state_dict (or a `fit` checkpoint's model) into `model`; nothing is downloaded.
    Clear errors for a missing file, a file that is not a plain state_dict, or keys/shapes that
    do not match the model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found: train.weights must be the path of a local "
                                "state_dict saved with torch.save(model.state_dict(), path) (nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a plain state_dict loadable with torch.load(weights_only=True): {e}") from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors)")
    own = model.state_dict()
    problems = [f"missing in file: {k}" for k in own if k not in state]
    problems += [f"not in model: {k}" for k in state if k not in own]
    problems += [f"shape of {k}: file {tuple(v.shape)} != model {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
    if problems:
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise ValueError(f"weights in {path} do not fit the model ({type(model).__name__}):\n  "
                         + "\n  ".join(problems[:8]) + more)
    model.load_state_dict(state)
    return model


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _data_digest(x: torch.Tensor, y: torch.Tensor) -> str:
    """All labels and up to 64 evenly spaced images: cheap, and catches another data set."""
    rows = torch.linspace(0, len(x) - 1, min(64, len(x)), device=x.device).long() if len(x) else []
    return _digest([y, x[rows]] if len(x) else [y])


def _run_config(model, train, test, *, epochs, batch_size, lr, seed, speed, world) -> dict:
    """What a checkpoint must match to be resumed (plain values; the key is their hash)."""
    return {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "optimizer": "adam",
            "precision": speed["precision"], "channels_last": speed["channels_last"],
            "compile": speed["compile"], "fused": speed["fused"], "world_size": world,
            "initial_weights": _digest(model.state_dict().values()),
            "train_data": _data_digest(*train), "test_data": _data_digest(*test)}


def _config_key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _rng_state(gen: torch.Generator, device: torch.device) -> dict:
    """RNG states as tensors: torch CPU, this process's CUDA device, and the batch generator.
    (numpy's and Python's RNGs are not used by fit.)"""
    state = {"torch": torch.get_rng_state(), "generator": gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather_rng(gen: torch.Generator, device: torch.device) -> list[dict]:
    """Every rank's RNG states, in rank order (rank 0 stores them all in the checkpoint)."""
    state = _rng_state(gen, device)
    if rank_and_world()[1] == 1:
        return [state]
    out: list = [None] * rank_and_world()[1]
    torch.distributed.all_gather_object(out, {k: v.cpu() for k, v in state.items()})
    return out


def _save_checkpoint(path: Path, *, key, config, epoch, step, model, opt, scaler, rngs, history) -> None:
    atomic.save_tensors(path, {
        "format": CHECKPOINT_FORMAT, "config_key": key, "config": config, "epoch": epoch, "step": step,
        "model": model.state_dict(), "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rngs, "history": history})


def _load_checkpoint(path: Path, key: str, config: dict) -> dict:
    """The checkpoint at path, refused clearly if it belongs to another configuration."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a prunestudy training checkpoint (format {ckpt.get('format')!r})")
    if ckpt["config_key"] != key:
        old = ckpt.get("config", {})
        diff = [f"{k}: checkpoint {old.get(k)!r} != now {v!r}" for k, v in config.items() if old.get(k) != v]
        raise ValueError(f"checkpoint {path} was written by a different training configuration "
                         f"({'; '.join(diff) or 'key mismatch'}): delete it or pass another checkpoint path")
    return ckpt


# --- progress ------------------------------------------------------------------------------------
class _Progress:
    """Bar updates with the running loss, read from the device only when the bar may redraw."""

    def __init__(self, bar):
        self.bar, self.last = (None if bar is None or bar.disable else bar), 0.0

    def update(self, images: int, loss: Callable[[], float]) -> None:
        if self.bar is None:
            return
        self.bar.update(images)
        now = time.monotonic()
        if now - self.last >= self.bar.mininterval:
            self.last = now
            self.bar.set_postfix(loss=f"{loss():.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- training ------------------------------------------------------------------------------------
class _Trainer:
    """State of one `fit` call: the (possibly DDP-wrapped, compiled) network, optimiser, scaler,
    generator, global step; `epoch()` runs one epoch and returns its local statistics."""

    def __init__(self, model, x, y, *, batch_size, lr, seed, speed, device, on_step):
        self.model, self.x, self.y, self.batch_size = model, x, y, batch_size
        self.speed, self.device, self.on_step = speed, device, on_step
        self.rank, self.world = rank_and_world()
        torch.manual_seed(seed + self.rank)  # dropout; rank 0 (and a plain run) uses `seed`
        self.gen = torch.Generator(device=device).manual_seed(seed)  # permutation + augmentation
        if speed["channels_last"]:
            model.to(memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=lr, fused=True) if speed["fused"] else torch.optim.Adam(params, lr=lr)
        self.scaler = torch.amp.GradScaler(device.type) if speed["grad_scaler"] else None
        net = model
        if self.world > 1:
            ids = [device.index or 0] if device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.net = torch.compile(net, mode=speed["compile_mode"]) if speed["compile"] else net
        self.step = 0
        self.lr, self.label = lr, "train"

    def _batch(self, idx: torch.Tensor):
        """(images, labels, loss scale) of this rank's part of a global batch; the draws are made
        for the whole global batch on every rank, so each sample gets the same draw as in a
        single-process run."""
        flip, angle = augment_draws(len(idx), self.gen, self.device)
        if self.world > 1:
            part = torch.tensor_split(torch.arange(len(idx), device=self.device), self.world)[self.rank]
            idx, flip, angle = idx[part], flip[part], angle[part]
        xb = apply_augment(self.x[idx], flip, angle)
        if self.speed["channels_last"]:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, self.y[idx]

    def _loss(self, xb, yb, global_n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to back-propagate, its statistic): in a plain run the batch mean, both times
        (as the plain loop records it); distributed, the local sum scaled so that DDP's gradient
        average equals the global batch mean's gradient, and the local sum."""
        if self.speed["compile_mode"] == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with _autocast(self.device, self.speed["precision"]):
            logits = self.net(xb)
        if self.world == 1:
            loss = F.cross_entropy(logits, yb)
            return loss, loss.detach()
        total = F.cross_entropy(logits.float(), yb, reduction="sum")
        return total * (self.world / global_n), total.detach()

    def _optimise(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        self.step += 1
        if self.on_step is not None:
            self.on_step(self.step, self.model)

    def epoch(self, bar: _Progress) -> tuple[torch.Tensor, list[int], int]:
        """One epoch: (statistic of every step (see _loss), global batch sizes, local samples seen)."""
        self.model.train()
        n = len(self.x)
        perm = torch.randperm(n, generator=self.gen, device=self.device)
        sums, sizes, seen = [], [], 0
        first = self.step + 1   # the global step of this epoch's first batch
        for i in range(0, n, self.batch_size):
            idx = perm[i : i + self.batch_size]
            xb, yb = self._batch(idx)
            loss, local_sum = self._loss(xb, yb, len(idx))
            self._optimise(loss)
            sums.append(local_sum)
            sizes.append(len(idx))
            seen += len(yb)
            bar.update(len(idx), lambda s=local_sum, b=yb: s.item() / (max(len(b), 1) if self.world > 1 else 1))
            if self.world == 1 and len(sums) % DIVERGENCE_CHECK == 0:   # distributed: at the epoch's end, together
                self.check(torch.stack(sums[-DIVERGENCE_CHECK:]).float().cpu().numpy(),
                           first + len(sums) - DIVERGENCE_CHECK)
        return torch.stack(sums).float(), sizes, seen

    def check(self, losses, first_step: int) -> None:
        """DivergedError at the first non-finite or exploding loss among steps first_step, ..."""
        bad = _first_bad(losses)
        if bad is not None:
            raise DivergedError(self.label, first_step + bad, float(losses[bad]), "training batch's loss", self.lr)


def _epoch_row(epoch: int, step_losses: np.ndarray, sizes: list[int], test: tuple[float, float],
               seconds: float) -> dict:
    n = sum(sizes)
    return {"epoch": epoch, "train_loss": float(np.dot(step_losses, sizes) / n),
            "step_loss_first": float(step_losses[0]), "step_loss_min": float(step_losses.min()),
            "step_loss_max": float(step_losses.max()), "step_loss_last": float(step_losses[-1]),
            "test_loss": test[0], "test_accuracy": test[1], "seconds": seconds, "images_per_s": n / seconds}


def _step_losses(trainer: _Trainer, sums: torch.Tensor, sizes: list[int], seen: int) -> tuple[np.ndarray, list[int]]:
    """Global per-step batch-mean losses, and samples seen per rank (all-reduced when distributed)."""
    if trainer.world == 1:
        return sums.cpu().numpy(), [seen]  # already batch means
    sums = sums.double()
    torch.distributed.all_reduce(sums)
    seen_all = [torch.zeros(1, dtype=torch.long, device=sums.device) for _ in range(trainer.world)]
    torch.distributed.all_gather(seen_all, torch.tensor([seen], device=sums.device))
    losses = (sums / torch.tensor(sizes, dtype=torch.float64, device=sums.device)).float().cpu().numpy()
    return losses, [int(s) for s in seen_all]


def fit(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], *,
        epochs: int, batch_size: int, lr: float, seed: int, log: Callable[[str], None] = print,
        label: str = "train", precision: str = "fp32", channels_last: bool | str = False,
        compile: bool | str = False, fused: bool | str = False, progress: bool | str = "auto",
        on_step: Callable[[int, nn.Module], None] | None = None,
        checkpoint: str | os.PathLike | None = None) -> dict:
    """Adam + cross-entropy for `epochs` epochs; returns the loss of every step and per-epoch figures.

    Per epoch: `train_loss` (per-sample mean over the epoch), the first / min / max / last step
    loss (each a batch mean, as the seed report's ranges), `test_loss` (true per-sample mean),
    `test_accuracy` (fraction), `seconds`, `images_per_s`. Also `speed` (resolve_speed's
    choices), `world_size` and `samples_per_rank` (training samples each rank saw, all epochs).

    precision / channels_last / compile / fused: see `resolve_speed`; the defaults reproduce the
    plain fp32 loop exactly. progress: `show` of `progress.bar`. on_step(step, model) is called after every
    optimiser step (global step from 1, continuing across a resume; on every rank).
    checkpoint: a path written atomically at the end of every epoch (by rank 0); if it exists
    when fit starts, training resumes from it (refused if written by another configuration) and
    ends as the uninterrupted run would. It loads with torch.load(weights_only=True).
    Distributed (torch.distributed initialised): every rank trains on its slice of each global
    batch of `batch_size`; statistics are all-reduced; only rank 0 logs epochs and checkpoints.
    """
    x, y = train
    device = x.device
    speed = resolve_speed(device, precision, channels_last, compile, fused=fused, batch_size=batch_size)
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    rank, world = rank_and_world()
    config = key = None
    if ckpt_path is not None:
        config = _run_config(model, train, test, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                             speed=speed, world=world)
        key = _config_key(config)
    tr = _Trainer(model, x, y, batch_size=batch_size, lr=lr, seed=seed, speed=speed, device=device, on_step=on_step)
    tr.label = label
    history: dict = {"steps": [], "epochs": [], "speed": speed, "world_size": world, "samples_per_rank": [0] * world}
    start_epoch = _resume(ckpt_path, key, config, tr, history, log, label) if ckpt_path is not None else 1
    for epoch in range(start_epoch, epochs + 1):
        seen_all = _run_epoch(tr, test, history, epoch, f"[{label}] epoch {epoch}/{epochs}", progress)
        _log_epoch(log, label, history["epochs"][-1], epochs, seen_all if world > 1 else None, rank)
        if ckpt_path is not None:
            rngs = _gather_rng(tr.gen, device)
            if rank == 0:
                _save_checkpoint(ckpt_path, key=key, config=config, epoch=epoch, step=tr.step, model=model,
                                 opt=tr.opt, scaler=tr.scaler, rngs=rngs, history=history)
    if world > 1:
        log(f"[{label}] rank {rank}/{world}: {history['samples_per_rank'][rank]} training samples seen")
    if speed["channels_last"]:
        model.to(memory_format=torch.contiguous_format)
    return history


def _run_epoch(tr: _Trainer, test, history: dict, epoch: int, desc: str, progress) -> list[int]:
    """Train one epoch, evaluate, append to history; returns the samples each rank saw."""
    start = time.perf_counter()
    shown = progress_bar(len(tr.x), desc, unit="img", show=progress, unit_scale=True, leave=False) \
        if tr.rank == 0 else None
    bar = _Progress(shown)
    try:
        sums, sizes, seen = tr.epoch(bar)
    finally:
        bar.close()
    step_losses, seen_all = _step_losses(tr, sums, sizes, seen)
    tr.check(step_losses, tr.step - len(step_losses) + 1)   # every step of the epoch (the same on every rank)
    seconds = time.perf_counter() - start
    test_metrics = _test_metrics(tr.model, test, tr.speed, tr.world)
    if _first_bad([test_metrics[0]]) is not None:
        raise DivergedError(tr.label, tr.step, test_metrics[0], f"test loss after epoch {epoch}", tr.lr)
    history["epochs"].append(_epoch_row(epoch, step_losses, sizes, test_metrics, seconds))
    history["steps"].extend(float(v) for v in step_losses)
    history["samples_per_rank"] = [a + b for a, b in zip(history["samples_per_rank"], seen_all)]
    return seen_all


def _resume(path: Path, key: str, config: dict, tr: _Trainer, history: dict, log, label: str) -> int:
    """Restore the trainer and history from the checkpoint at path, if any; the next epoch."""
    if not path.is_file():
        return 1
    ckpt = _load_checkpoint(path, key, config)
    tr.model.load_state_dict(ckpt["model"])
    tr.opt.load_state_dict(ckpt["optimizer"])
    if tr.scaler is not None and ckpt["scaler"]:
        tr.scaler.load_state_dict(ckpt["scaler"])
    _set_rng_state(ckpt["rng"][tr.rank], tr.gen, tr.device)
    tr.step = int(ckpt["step"])
    history.update(ckpt["history"])
    if tr.rank == 0:
        log(f"[{label}] resumed from {path}: epoch {ckpt['epoch']} done, step {tr.step}")
    return int(ckpt["epoch"]) + 1


def _test_metrics(model: nn.Module, test, speed: dict, world: int) -> tuple[float, float]:
    if world > 1:
        return _evaluate_sharded(model, *test, speed)
    ev = evaluate(model, *test, precision=speed["precision"], channels_last=speed["channels_last"])
    return ev["loss"], ev["accuracy"]


def _log_epoch(log, label: str, row: dict, epochs: int, seen_all: list[int] | None, rank: int) -> None:
    if rank != 0:
        return
    ranks = f", samples per rank {seen_all}" if seen_all else ""
    log(f"[{label}] epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} "
        f"(steps {row['step_loss_min']:.3f}..{row['step_loss_max']:.3f}), "
        f"test loss {row['test_loss']:.4f}, test acc {row['test_accuracy']:.1%}, "
        f"{row['seconds']:.1f} s, {row['images_per_s']:.0f} img/s{ranks}")
