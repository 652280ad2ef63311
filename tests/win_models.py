"""Tiny models and synthetic data for the WIN tests (and the torchrun helper script)."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class DeepThin(nn.Module):
    """A deep thin residual CNN: stem, n blocks, pooled linear head."""

    def __init__(self, width: int = 8, depth: int = 4, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def synthetic_batches(
    n: int = 256, batch: int = 64, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """8x8 images labelled by a fixed random linear rule (4 classes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x.flatten(1) @ torch.randn(3 * 64, 4, generator=g)).argmax(1)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
