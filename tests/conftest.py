"""Shared test helpers: BatchNorm randomisation and error measures."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def randomise_batchnorm(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Non-default running statistics and affine parameters: default BN is nearly the identity and
    would hide fold bugs."""
    g = generator or torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                shape = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(0.5 * torch.randn(shape, generator=g))
                    m.running_var.copy_(0.5 + 1.5 * torch.rand(shape, generator=g))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(shape, generator=g))
                    m.bias.copy_(0.2 * torch.randn(shape, generator=g))
    return model


def max_rel_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max |a - b| / max |a| (normwise; never a signed sum)."""
    ref, cand = reference.detach().double(), candidate.detach().double()
    return ((ref - cand).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
