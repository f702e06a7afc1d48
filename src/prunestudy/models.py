"""Models: the seed report's CNN, and torchvision's ResNet-18 / EfficientNet-B0 (random init)."""

from __future__ import annotations

import functools

import torch
from torch import nn

MODELS = ("seed_cnn", "resnet18", "efficientnet_b0")


class SeedCNN(nn.Module):
    """The seed report's CNN for 64x64 RGB inputs (4,293,194 parameters with 10 classes).

    conv 3->32 (3x3) | max-pool 2x2 | conv 32->64 (3x3) | max-pool | conv 64->128 (3x3) |
    max-pool | linear 128*8*8 -> 512 | dropout 0.25 | linear 512 -> num_classes.
    Convolutions are padded by 1 so that 64 -> 32 -> 16 -> 8, as 128*8*8 requires; ReLU follows
    each convolution and the first linear layer. After a convolution it is applied after the
    max-pool: the two commute exactly (max(relu(a), relu(b)) = relu(max(a, b)), and the gradients
    agree too, bit for bit), and the ReLU then touches a quarter of the values: the forward pass at
    batch 64 ran 16-27% faster on the CPU (1 thread; tests/test_models.py checks both orders agree).
    """

    RELU_AFTER = ("conv1", "conv2", "conv3", "fc1")   # the layers whose outputs go straight through a ReLU

    def __init__(self, num_classes: int = 10, dropout: float = 0.25):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(128 * 8 * 8, 512)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.pool(self.conv1(x)))   # = pool(relu(conv1(x))), on a quarter of the values
        x = torch.relu(self.pool(self.conv2(x)))
        x = torch.relu(self.pool(self.conv3(x)))
        x = torch.flatten(x, 1)
        x = self.dropout(torch.relu(self.fc1(x)))
        return self.fc2(x)


def build_model(name: str = "seed_cnn", num_classes: int = 10) -> nn.Module:
    """A freshly initialised model; nothing is downloaded (torchvision models get weights=None)."""
    if name == "seed_cnn":
        return SeedCNN(num_classes)
    if name == "resnet18":
        from torchvision.models import resnet18

        return resnet18(weights=None, num_classes=num_classes)
    if name == "efficientnet_b0":
        from torchvision.models import efficientnet_b0

        return efficientnet_b0(weights=None, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)} (train.model)")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- input sizes ---------------------------------------------------------------------------------
LARGEST_TRACED = 4096   # input sides are traced up to this; a model taking it is taken to have no upper limit


def _meta_model(name: str) -> nn.Module:
    with torch.device("meta"):   # shapes only: no memory, no arithmetic, nothing initialised for real
        return build_model(name, 2).train()


def _fault(model: nn.Module, size: int) -> str | None:
    """None when the model runs a one-sample training batch of size x size RGB images (the last batch
    of an epoch may hold one sample, and batch norm then needs more than 1x1 maps), else torch's error."""
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, size, size, device="meta"))
    except (RuntimeError, ValueError) as e:
        return str(e).strip().splitlines()[0][:160].rstrip(".")
    return None


@functools.cache
def input_sizes(name: str, anchor: int) -> tuple[int, int | None]:
    """(smallest, largest) side of the square inputs model `name` takes; largest None = no limit (up
    to LARGEST_TRACED). Found by tracing the model on the meta device from `anchor`, a side it takes:
    each layer's output size grows with its input's, so the sides a model takes form one interval,
    whose ends are found by bisection (the seed CNN: exactly those its fc1 fits; ResNet-18 and
    EfficientNet-B0: from the side that leaves their last feature map larger than 1x1)."""
    model = _meta_model(name)
    if _fault(model, anchor) is not None:
        raise ValueError(f"{name} does not take {anchor}x{anchor} inputs: {_fault(model, anchor)}")
    lo, hi = 0, anchor   # fault at lo (0 = none), fine at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _fault(model, mid) is None else (mid, hi)
    smallest = hi
    if _fault(model, LARGEST_TRACED) is None:
        return smallest, None
    lo, hi = anchor, LARGEST_TRACED   # fine at lo, fault at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fault(model, mid) is None else (lo, mid)
    return smallest, lo


@functools.cache
def _size_fault(name: str, size: int) -> str | None:
    """_fault of model `name` at `size`, traced once per process (a grid validates every point)."""
    return _fault(_meta_model(name), size)


def check_input_size(name: str, size: int, anchor: int) -> None:
    """A ValueError naming the sides model `name` takes when it cannot train on size x size crops
    (traced on the meta device: nothing is computed); `anchor` is a side it takes."""
    fault = _size_fault(name, size)
    if fault is None:
        return
    lo, hi = input_sizes(name, anchor)
    takes = f"{lo} to {hi} px" if hi is not None else f"at least {lo} px"
    example = min(max(anchor, lo), hi or anchor)
    raise ValueError(f"data.image_size={size} does not fit train.model={name}: it takes image sizes of {takes} "
                     f"(traced at {size}: {fault}); e.g. data.image_size={example}")
