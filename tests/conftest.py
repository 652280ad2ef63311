"""Shared test helpers: BatchNorm randomisation and error measures."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

# Hypothesis example counts: CI (CI=true, as .ci/run runs) proves each rule family on at least
# CI_EXAMPLES random cases; a developer's run uses the smaller per-test numbers.
CI_EXAMPLES = 1000
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def examples(developer: int, ci: int = CI_EXAMPLES) -> int:
    """max_examples for a property test: `developer` locally, at least `ci` under CI."""
    return max(developer, ci) if IN_CI else developer


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


def safetensors_metadata(path: os.PathLike[str] | str) -> dict[str, str]:
    """The metadata of a safetensors file (where surgery keeps the plan and the model source)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as file:
        return file.metadata()


def max_rel_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max |a - b| / max |a| (normwise; never a signed sum)."""
    ref, cand = reference.detach().double(), candidate.detach().double()
    return ((ref - cand).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests (threads only cost barrier waits, and
    LAPACK on 2 threads per xdist worker oversubscribes 2 cores); the setting is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MLP_SIZES = [8, 16, 16, 4]


@pytest.fixture(scope="module")
def paired_file(tmp_path_factory):
    """A small paired MLP checkpoint with random pairs (`small_models.mlp(MLP_SIZES)`) and no model
    source: folding it needs none."""
    from small_models import mlp

    import surgery

    torch.manual_seed(0)
    paired = surgery.insert_pairs(mlp(MLP_SIZES).eval(), (torch.randn(2, 8),), init="random")
    path = tmp_path_factory.mktemp("good") / "paired.safetensors"
    surgery.save(paired, path)
    return path
