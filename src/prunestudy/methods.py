"""The pruning methods: one record each. Everything that depends on the method (validation of the
parameters, the sweep's default methods, how it is applied, the findings' wording, the colour and
marker of its curves, the export's format) reads it from here; adding a method is one `register`.

This module imports no torch at import time (config validates method names without it); the
`apply` functions import what they need.

A method's `apply(model, layers, amount, *, seed, example_input)` prunes `layers` (a list of
(name, module) pairs, chosen by `prune.eligible_layers`) of `model` in place. `amount` is the
fraction of what is still unpruned that the call removes, so calls compose over rounds.

* masked methods leave the model's shape alone and zero weights with `torch.nn.utils.prune`
  (a `weight_mask` buffer per layer, held through fine-tuning);
* structural methods make layers smaller (Torch-Pruning) and must not leave masks behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

KINDS = ("masked", "structural")
TARGETS = ("conv", "linear", "all")


@dataclass(frozen=True)
class Method:
    name: str
    kind: str                      # masked (zeros, dense shape) | structural (smaller layers)
    apply: Callable[..., None]     # apply(model, layers, amount, *, seed, example_input)
    about: str                     # one line: what it removes
    phrase: str                    # findings: "{amount} of ..." (str.format with amount="20%")
    color: str                     # hex colour of its curves
    marker: str                    # matplotlib marker of its points
    keeps_classifier: bool = False  # True: the final classifier is never pruned (its outputs are the classes)
    targets: tuple[str, ...] = TARGETS  # the prune.targets it accepts
    unit: str = "weights"          # what `amount` counts: weights | channels
    floor: bool = False            # the baseline any method must beat (drawn as the floor)
    notes: str = field(default="")  # findings: said after the measured sparsity, if anything

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"method {self.name!r}: targets must be a non-empty subset of {TARGETS}, got "
                             f"{self.targets!r}")
        if "{amount}" not in self.phrase:
            raise ValueError(f"method {self.name!r}: phrase must contain '{{amount}}', got {self.phrase!r}")

    @property
    def masked(self) -> bool:
        return self.kind == "masked"

    def describe(self, amount: float) -> str:
        """What pruning `amount` with this method does, e.g. '20% of the weights of each layer'."""
        return self.phrase.format(amount=f"{100 * amount:.0f}%")


REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add a method to the registry (every part of the study sees it at once)."""
    if method.name in REGISTRY and not replace:
        raise ValueError(f"a pruning method named {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Method:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"prune.method must be one of {', '.join(REGISTRY)}, got {name!r}") from None


def floor() -> str:
    """The floor method of the sweep's curves (random pruning)."""
    return next(m.name for m in REGISTRY.values() if m.floor)


# --- the methods ------------------------------------------------------------------------------
def _l1_unstructured(model, layers, amount, *, seed=0, example_input=None) -> None:
    from torch.nn.utils import prune as tprune

    for _, module in layers:
        tprune.l1_unstructured(module, "weight", amount=amount)


def _global_magnitude(model, layers, amount, *, seed=0, example_input=None) -> None:
    from torch.nn.utils import prune as tprune

    tprune.global_unstructured([(m, "weight") for _, m in layers], tprune.L1Unstructured, amount=amount)


def _random_unstructured(model, layers, amount, *, seed=0, example_input=None) -> None:
    import torch
    from torch.nn.utils import prune as tprune

    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # masks drawn on a GPU come from its own RNG stream
        for _, module in layers:
            tprune.random_unstructured(module, "weight", amount=amount)


def _ln_structured(model, layers, amount, *, seed=0, example_input=None) -> None:
    from torch.nn.utils import prune as tprune

    for _, module in layers:
        tprune.ln_structured(module, "weight", amount=amount, n=2, dim=0)


def _channel(model, layers, amount, *, seed=0, example_input=None) -> None:
    """Torch-Pruning, per layer: each prunable group loses `amount` of its output channels by L2
    norm; every conv/linear layer not in `layers` (the classifier, untargeted types) is ignored."""
    import torch
    import torch_pruning as tp
    from torch import nn

    keep = {id(m) for _, m in layers}
    ignored = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in keep]
    if example_input is None:
        example_input = torch.zeros(1, 3, 64, 64, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()  # tracing must not update BatchNorm statistics
    try:
        pruner = tp.pruner.BasePruner(model, example_input, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=amount, ignored_layers=ignored)
        pruner.step()
    finally:
        model.train(was_training)


register(Method("l1_unstructured", "masked", _l1_unstructured,
                about="per layer: the smallest |w| of each targeted weight tensor",
                phrase="{amount} of the weights of each layer", color="#4c72b0", marker="o"))
register(Method("global_magnitude", "masked", _global_magnitude,
                about="one |w| threshold over all targeted weights together",
                phrase="{amount} of the targeted weights together (one threshold)", color="#c44e52", marker="^"))
register(Method("random_unstructured", "masked", _random_unstructured,
                about="per layer: weights chosen at random (seeded); the floor any method must beat",
                phrase="{amount} of the weights of each layer, chosen at random", color="#808080", marker="x",
                floor=True))
register(Method("ln_structured", "masked", _ln_structured,
                about="per layer: whole output channels (rows) of least L2 norm, zeroed",
                phrase="{amount} of the output channels of each layer zeroed", color="#8172b3", marker="D",
                keeps_classifier=True, unit="channels"))
register(Method("channel", "structural", _channel,
                about="Torch-Pruning: output channels of least L2 norm removed (smaller layers)",
                phrase="{amount} of the output channels of each layer removed", color="#55a868", marker="s",
                keeps_classifier=True, unit="channels",
                notes=("of channels (weights removed with their channels count as zero, and removing a layer's "
                       "output channels also removes the matching inputs of the next layer, so more weights go "
                       "than channels)")))
