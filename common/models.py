"""Toy models that train in seconds on a laptop CPU.

Lesson-specific models live in their lesson's script; these two are shared.
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """A small multi-layer perceptron for vector data: Linear -> ReLU -> Dropout, repeated."""

    def __init__(
        self, in_features: int = 20, hidden: int = 64, num_classes: int = 4, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """A small CNN split into ``backbone`` (features) and ``head`` (classifier).

    It has BatchNorm (buffers: running statistics) and Dropout, so ``train()`` and ``eval()``
    really give different outputs. The split lets transfer-learning lessons swap the head.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class SignGate(nn.Module):
    """Data-dependent control flow: the branch depends on the input's VALUES.

    Tracing bakes in one branch (05), and torch.export / torch.onnx.export refuse it with
    "Could not guard on data-dependent expression" (04, 05).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 0):
            return x * 2
        return x - 1


class SignGateCond(nn.Module):
    """The export-friendly form of :class:`SignGate`: ``torch.cond`` keeps both branches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda x: x * 2, lambda x: x - 1, (x,))
