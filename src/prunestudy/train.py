"""Training and evaluation with the dataset resident on the device as uint8.

Batches are index slices of a per-epoch permutation; the seed report's augmentation (random
horizontal flip, random rotation within +-10 degrees, normalisation with mean = std = 0.5) runs
batched on the device with one random draw per sample, no per-sample Python.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN = STD = 0.5
MAX_ROTATION_DEG = 10.0


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available here: use 'auto' or 'cpu'")
    return torch.device(name)


def to_device(images: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N,H,W,C numpy images -> uint8 N,C,H,W tensor on device; labels -> int64."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(device)
    return x, torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 1] float) images -> float, normalised with mean = std = 0.5."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    return (x - MEAN) / STD


def augment(x: torch.Tensor, generator: torch.Generator, max_deg: float = MAX_ROTATION_DEG) -> torch.Tensor:
    """Batched seed augmentation of uint8 N,C,H,W images: flip (p=0.5), rotate U(-max_deg, max_deg)
    about the centre (bilinear, black fill as torchvision's RandomRotation), normalise."""
    n = x.shape[0]
    x = x.float().div_(255)
    flip = torch.rand(n, generator=generator, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    angle = (torch.rand(n, generator=generator, device=x.device) * 2 - 1) * math.radians(max_deg)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return normalize(x)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> dict:
    """True per-sample mean cross-entropy, accuracy (a fraction) and the predicted labels."""
    model.eval()
    total_loss, preds = 0.0, []
    for i in range(0, len(x), batch_size):
        logits = model(normalize(x[i : i + batch_size])).float()
        total_loss += F.cross_entropy(logits, y[i : i + batch_size], reduction="sum").item()
        preds.append(logits.argmax(1))
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    n = len(y)
    correct = int((pred == y).sum())
    return {"loss": total_loss / max(n, 1), "accuracy": correct / max(n, 1), "correct": correct, "n": n,
            "predictions": pred.cpu().numpy()}


def fit(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], *,
        epochs: int, batch_size: int, lr: float, seed: int, log: Callable[[str], None] = print,
        label: str = "train") -> dict:
    """Adam + cross-entropy for `epochs` epochs; returns the loss of every step and per-epoch figures.

    Per epoch: `train_loss` (per-sample mean over the epoch), the first / min / max / last step
    loss (each a batch mean, as the seed report's ranges), `test_loss` (true per-sample mean),
    `test_accuracy` (fraction), `seconds`, `images_per_s`.
    """
    x, y = train
    device = x.device
    torch.manual_seed(seed)  # dropout
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    history: dict = {"steps": [], "epochs": []}
    n = len(x)
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        perm = torch.randperm(n, generator=gen, device=device)
        losses, sizes = [], []
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(augment(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            sizes.append(len(idx))
        step_losses = torch.stack(losses).float().cpu().numpy()
        seconds = time.perf_counter() - start
        ev = evaluate(model, *test)
        row = {
            "epoch": epoch,
            "train_loss": float(np.dot(step_losses, sizes) / n),
            "step_loss_first": float(step_losses[0]),
            "step_loss_min": float(step_losses.min()),
            "step_loss_max": float(step_losses.max()),
            "step_loss_last": float(step_losses[-1]),
            "test_loss": ev["loss"],
            "test_accuracy": ev["accuracy"],
            "seconds": seconds,
            "images_per_s": n / seconds,
        }
        history["steps"].extend(float(v) for v in step_losses)
        history["epochs"].append(row)
        log(f"[{label}] epoch {epoch}/{epochs}: train loss {row['train_loss']:.4f} "
            f"(steps {row['step_loss_min']:.3f}..{row['step_loss_max']:.3f}), "
            f"test loss {row['test_loss']:.4f}, test acc {row['test_accuracy']:.1%}, "
            f"{seconds:.1f} s, {row['images_per_s']:.0f} img/s")
    return history
