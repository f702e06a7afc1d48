"""Pruning: which layers a method may touch, applying it, sparsity accounting, masks kept through
retraining, exports without pickle. The methods themselves are records of `prunestudy.methods`.

Two kinds of method:

* masked (`l1_unstructured`, `global_magnitude`, `random_unstructured`, `ln_structured`):
  torch.nn.utils.prune reparametrises each pruned `weight` as `weight_orig * weight_mask`,
  recomputed before every forward pass, so the optimizer may move `weight_orig` but pruned
  weights stay exactly zero while fine-tuning. The model keeps its shape: dense kernels still run.
* structural (`channel`): Torch-Pruning removes whole output channels (and the matching inputs
  of the layers that consume them), so the model really becomes smaller. Its architecture then
  differs from `models.build_model`'s: save `export(model)` and load it with `rebuild`.

`amount` is the fraction of the weights (masked methods) or channels (`channel`) of what is still
unpruned that a call removes, so calls compose: `round_amounts` splits a target over rounds.
"""

from __future__ import annotations

import copy
import functools
from numbers import Real

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from . import methods, models

TARGETS = {"conv": (nn.Conv2d,), "linear": (nn.Linear,), "all": (nn.Conv2d, nn.Linear)}
# Attributes that describe a layer's width, recorded by `architecture` and set again by `rebuild`.
SHAPE_ATTRS = {"Conv2d": ("in_channels", "out_channels", "groups"), "Linear": ("in_features", "out_features"),
               "BatchNorm2d": ("num_features",)}
EXPORT_FORMAT = 1


# --- validation ------------------------------------------------------------------------------
def target_layers(model: nn.Module, targets: str = "all") -> list[tuple[str, nn.Module]]:
    """(name, module) of every conv and/or linear layer, in model order."""
    if targets not in TARGETS:
        raise ValueError(f"prune.targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TARGETS[targets])]


def classifier_name(model: nn.Module) -> str:
    """Name of the final classifier: the last nn.Linear of the model."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("the model has no nn.Linear classifier")
    return names[-1]


def eligible_layers(model: nn.Module, method: str, targets: str = "all") -> list[tuple[str, nn.Module]]:
    """The layers `method` may prune: the targeted ones, less the classifier for the methods that
    remove output rows or channels (the classifier's outputs are the classes)."""
    layers = target_layers(model, targets)
    if methods.get(method).keeps_classifier:
        head = classifier_name(model)
        layers = [(name, m) for name, m in layers if name != head]
    return layers


def _check_params(method: str, amount, targets: str) -> None:
    m = methods.get(method)
    if isinstance(amount, bool) or not isinstance(amount, Real) or not 0 <= amount < 1:
        raise ValueError(f"prune.amount must be a number in [0, 1), got {amount!r}")
    if targets not in TARGETS:
        raise ValueError(f"prune.targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    if targets not in m.targets:
        raise ValueError(f"prune.method {method!r} cannot prune prune.targets={targets!r}: it accepts "
                         f"{', '.join(m.targets)}")


def _check_model(model: nn.Module, method: str, targets: str, label: str = "the model") -> None:
    if not eligible_layers(model, method, targets):
        valid = [t for t in TARGETS if eligible_layers(model, method, t)]
        raise ValueError(f"prune.method {method!r} cannot apply to {label} with prune.targets={targets!r}: no "
                         f"prunable layer (the classifier's outputs are kept); valid targets here: "
                         f"{', '.join(valid) or 'none'}")
    if not methods.get(method).masked and masks(model):
        raise ValueError(f"prune.method {method!r} cannot apply to a model that carries pruning masks: fold them "
                         f"first with prune.make_permanent (or prune channels before masking)")


def check(method: str, amount, targets: str = "all", model_name: str | None = None) -> None:
    """Raise ValueError (naming the problem and the valid choices) if these parameters cannot work;
    builds nothing real (the model, if named, is built on the meta device)."""
    _check_params(method, amount, targets)
    if model_name is None:
        return
    if model_name not in models.MODELS:
        raise ValueError(f"train.model must be one of {', '.join(models.MODELS)}, got {model_name!r}")
    _check_model(_meta_model(model_name), method, targets, label=model_name)


@functools.cache
def _meta_model(model_name: str) -> nn.Module:
    """The model's layout without memory or initialisation cost (tensors on the meta device)."""
    with torch.device("meta"):
        return models.build_model(model_name)


def round_amounts(amount: float, rounds: int) -> list[float]:
    """Per-round fractions of the *remaining* weights (or channels) whose composition prunes
    `amount` in all: 1 - (1 - amount) ** (1 / rounds) each."""
    _check_params("l1_unstructured", amount, "all")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    return [1 - (1 - amount) ** (1 / rounds)] * rounds


# --- pruning ---------------------------------------------------------------------------------
def apply(model: nn.Module, method: str = "l1_unstructured", amount: float = 0.2, targets: str = "all",
          example_input: torch.Tensor | None = None, seed: int = 0) -> list[str]:
    """Prune `model` in place; returns the names of the layers it may have pruned.

    `amount` is the fraction of what is still unpruned in each layer (all targeted weights together
    for global_magnitude; output channels for ln_structured and channel), so repeated calls
    compose. `seed` makes random_unstructured reproducible (the global torch RNG is left as it was).
    `example_input` is traced by structural methods (`channel`: default zeros of shape 1x3x64x64).
    Every check runs before the model is touched.
    """
    _check_params(method, amount, targets)
    _check_model(model, method, targets)
    layers = eligible_layers(model, method, targets)
    methods.get(method).apply(model, layers, float(amount), seed=seed, example_input=example_input)
    if not methods.get(method).masked and masks(model):
        raise RuntimeError(f"structural method {method!r} left pruning masks on the model: a structural method "
                           "must remove weights, not mask them")
    return [name for name, _ in layers]


# --- masks -----------------------------------------------------------------------------------
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


def rewind(model: nn.Module, saved_state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Lottery-ticket rewinding: every parameter and buffer back to `saved_state_dict` (an early,
    e.g. dense, state of the same architecture), masks unchanged, so the surviving weights restart
    from their early values and the pruned ones stay zero. A masked layer's early weight is copied
    into its `weight_orig`. A channel-pruned model has no early state of its own shape: ValueError."""
    new, problems = {}, []
    for key, current in model.state_dict().items():
        if key.endswith("_mask"):
            new[key] = current
            continue
        source = key if key in saved_state_dict else key.removesuffix("_orig")
        if source not in saved_state_dict:
            problems.append(f"{source} missing")
        elif tuple(saved_state_dict[source].shape) != tuple(current.shape):
            problems.append(f"{source}: saved {tuple(saved_state_dict[source].shape)} != model {tuple(current.shape)}")
        else:
            new[key] = saved_state_dict[source]
    if problems:
        raise ValueError("cannot rewind to this state (channel-pruned models cannot rewind to a dense state): "
                         + "; ".join(problems[:5]))
    model.load_state_dict(new)
    _refresh_masked_weights(model)
    return model


def clone(model: nn.Module) -> nn.Module:
    """A deep copy that also works for masked models (copy.deepcopy alone fails on the non-leaf
    `weight = weight_orig * weight_mask` that torch keeps between forward passes)."""
    _refresh_masked_weights(model)
    return copy.deepcopy(model)


@torch.no_grad()
def _refresh_masked_weights(model: nn.Module) -> None:
    """Recompute `weight = weight_orig * weight_mask` now rather than at the next forward pass
    (as a leaf tensor; each forward pass recomputes it with autograd as usual)."""
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, tprune.BasePruningMethod):
                setattr(module, hook._tensor_name, hook.apply_mask(module))


# --- accounting ------------------------------------------------------------------------------
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


# --- export and rebuild (no pickle) ----------------------------------------------------------
def architecture(model: nn.Module) -> dict:
    """Plain JSON data: for every module holding tensors, its type, its width attributes
    (`SHAPE_ATTRS`) and the shape of each parameter and buffer (masked weights under `weight`)."""
    arch = {}
    for name, module in model.named_modules():
        tensors = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        tensors = {k.removesuffix("_orig"): list(t.shape) for k, t in tensors.items()
                   if t is not None and not k.endswith("_mask")}
        if tensors:
            kind = type(module).__name__
            arch[name] = {"type": kind, **{a: getattr(module, a) for a in SHAPE_ATTRS.get(kind, ())},
                          "tensors": tensors}
    return arch


def rebuild(arch_name: str, num_classes: int, shapes: dict) -> nn.Module:
    """`models.build_model(arch_name, num_classes)` with its layers resized to `shapes` (from
    `architecture`, or `export`'s meta["architecture"]), ready for `load_state_dict`.
    The tensors are left uninitialised: load weights next."""
    model = models.build_model(arch_name, num_classes)
    modules = dict(model.named_modules())
    for name, spec in shapes.items():
        module = modules.get(name)
        if module is None or type(module).__name__ != spec["type"]:
            raise ValueError(f"layer {name!r} ({spec['type']}) does not exist in {arch_name}: wrong architecture")
        for attr in SHAPE_ATTRS.get(spec["type"], ()):
            setattr(module, attr, spec[attr])
        for tname, shape in spec["tensors"].items():
            old = getattr(module, tname)
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            setattr(module, tname, nn.Parameter(new, old.requires_grad) if isinstance(old, nn.Parameter) else new)
    return model


def export(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, meta) to save without pickle (tensors: atomic.save_tensors / torch.save,
    meta: JSON). Masks are folded into plain weights (the model itself is not changed), so the
    state_dict of a masked model loads into `models.build_model`; that of a channel-pruned model
    loads into `rebuild(arch_name, num_classes, meta["architecture"])`, which works for any export."""
    state = {}
    raw = model.state_dict()
    for key, value in raw.items():
        if key.endswith("_mask"):
            continue
        if key.endswith("_orig"):
            base = key.removesuffix("_orig")
            state[base] = (value * raw[base + "_mask"]).detach().clone()
        else:
            state[key] = value.detach().clone()
    sp = sparsity(model)
    meta = {"format": EXPORT_FORMAT, "masked_layers": sorted(masks(model)), "architecture": architecture(model),
            "params_total": sp["params_total"], "params_nonzero": sp["params_nonzero"]}
    return state, meta
