"""Models: the seed report's CNN, and torchvision's ResNet-18 / EfficientNet-B0 (random init)."""

from __future__ import annotations

import torch
from torch import nn

MODELS = ("seed_cnn", "resnet18", "efficientnet_b0")


class SeedCNN(nn.Module):
    """The seed report's CNN for 64x64 RGB inputs (4,293,194 parameters with 10 classes).

    conv 3->32 (3x3) | max-pool 2x2 | conv 32->64 (3x3) | max-pool | conv 64->128 (3x3) |
    max-pool | linear 128*8*8 -> 512 | dropout 0.25 | linear 512 -> num_classes.
    Convolutions are padded by 1 so that 64 -> 32 -> 16 -> 8, as 128*8*8 requires; ReLU follows
    each convolution and the first linear layer.
    """

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
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = self.pool(torch.relu(self.conv3(x)))
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
