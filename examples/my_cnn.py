"""A user's own network, as NeRN meets it: plain PyTorch, nothing imported from nern.

Conv biases, max-pooling, no BatchNorm, and `nn.ReLU` modules (NeRN hooks their outputs as the feature maps
of its distillation loss). It expects raw 0..255 pixels, as many published small-image models do, so its
configs set `data.input_range: 255` with `data.mean: [0]`, `data.std: [1]` (see my_cnn.yaml).

Use it by reference: `model.factory=examples/my_cnn.py:make_cnn` (from the repository root), or
`my_cnn:make_cnn` with examples/ on PYTHONPATH.
"""

from __future__ import annotations

import torch
from torch import nn


class MyCNN(nn.Module):
    """Three 3x3 convs (two 2x2 max-pools between them), global average pool, one linear layer."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def make_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> MyCNN:
    return MyCNN(in_channels, num_classes, width)
