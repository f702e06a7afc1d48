"""Magnitude pruning with torch.nn.utils.prune, sparsity accounting, masks kept through retraining.

torch's pruning reparametrises each pruned `weight` as `weight_orig * weight_mask`, recomputed
before every forward pass, so the optimizer may move `weight_orig` but pruned weights stay
exactly zero while fine-tuning.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune as tprune

METHODS = ("l1_unstructured",)
TARGETS = {"conv": (nn.Conv2d,), "linear": (nn.Linear,), "all": (nn.Conv2d, nn.Linear)}


def target_layers(model: nn.Module, targets: str = "all") -> list[tuple[str, nn.Module]]:
    if targets not in TARGETS:
        raise ValueError(f"prune.targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TARGETS[targets])]


def apply(model: nn.Module, method: str = "l1_unstructured", amount: float = 0.2, targets: str = "all") -> list[str]:
    """Prune the `weight` of every targeted layer in place; returns the layer names."""
    if method not in METHODS:
        raise ValueError(f"prune.method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0 <= amount < 1:
        raise ValueError(f"prune.amount must be in [0, 1), got {amount}")
    layers = target_layers(model, targets)
    for _, module in layers:
        tprune.l1_unstructured(module, "weight", amount=float(amount))
    return [name for name, _ in layers]


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """layer name -> boolean keep-mask of its pruned weight."""
    return {name: m.weight_mask.detach().bool().cpu() for name, m in model.named_modules() if hasattr(m, "weight_mask")}


def restore(model: nn.Module, saved_masks: dict[str, torch.Tensor]) -> None:
    """Re-attach saved masks (after loading weights) so they hold in further training."""
    modules = dict(model.named_modules())
    for name, mask in saved_masks.items():
        tprune.custom_from_mask(modules[name], "weight", mask.to(modules[name].weight.device))


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold masks into plain weights (zeros stay); the state_dict then loads into a dense model."""
    for _, module in model.named_modules():
        if tprune.is_pruned(module) and hasattr(module, "weight_mask"):
            tprune.remove(module, "weight")
    return model


def sparsity(model: nn.Module, targets: str = "all") -> dict:
    """Zeros per targeted weight tensor and overall; parameter counts of the whole model."""
    layers, zeros, total = {}, 0, 0
    for name, module in target_layers(model, targets):
        w = module.weight.detach()
        z = int((w == 0).sum())
        layers[name] = {"sparsity": z / w.numel(), "zeros": z, "size": w.numel()}
        zeros, total = zeros + z, total + w.numel()
    params = {n: t.detach() for n, t in _effective_params(model)}
    n_params = sum(t.numel() for t in params.values())
    nonzero = sum(int((t != 0).sum()) for t in params.values())
    return {"global_sparsity": zeros / max(total, 1), "targeted_weights": total, "zeros": zeros,
            "layers": layers, "params_total": n_params, "params_nonzero": nonzero}


def _effective_params(model: nn.Module):
    """(name, tensor) of every parameter as the forward pass sees it (masked weights, not _orig)."""
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if pname.endswith("_orig"):
                base = pname[: -len("_orig")]
                yield f"{mname}.{base}", getattr(module, base)
            else:
                yield f"{mname}.{pname}", p
