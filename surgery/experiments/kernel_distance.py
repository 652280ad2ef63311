"""GP-kernel distance of a sparse one-hidden-layer ReLU network (Golubeva et al., Section 3).

The network is f(x) = (n d)^(-1/2) vᵀ [u x]_+ with u in R^{n x d} (NTK parameterisation, no biases);
each entry of u is kept with probability p and drawn from N(0, 1/p), else zero. Its GP kernel is
Θ(x, y) = ∇_v f(x)ᵀ ∇_v f(y) = (n d)^(-1) Σ_i [u_i·x]_+ [u_i·y]_+, and the dense infinite-width
kernel is the arc-cosine kernel Θ∞(x, y) = |x||y| J1(θ) / (2π d), J1(θ) = sin θ + (π - θ) cos θ
(computed in closed form here; the paper estimates it with a width-10^4 dense network).

- `kernel_distance`: the empirical E[(Θ - Θ∞)^2] over input pairs and random initialisations;
- `kernel_distance_approx`: eq. (4), (1/4d)[(1/4)(1/sqrt(p) - 1)^2 + (d/n)(1 - 1/π^2)], derived for
  independent N(0, 1) inputs and dp >> 1;
- `optimal_connectivity`: the minimiser of eq. (4) at a fixed number of weights n·p: p* ≈ sqrt(np/4d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def infinite_width_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Θ∞(x_k, y_k) for each row pair: the dense infinite-width GP kernel (arc-cosine, order 1)."""
    nx, ny = x.norm(dim=-1), y.norm(dim=-1)
    cos = ((x * y).sum(-1) / (nx * ny)).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    j1 = torch.sin(theta) + (math.pi - theta) * cos
    return nx * ny * j1 / (2 * math.pi * x.shape[-1])


def sparse_first_layer(
    n: int, d: int, p: float, generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """u in R^{n x d}: each entry kept with probability p, drawn from N(0, 1/p) (σ² = 1/p)."""
    if not 0 < p <= 1:
        raise ValueError(f"connectivity p must be in (0, 1], got {p}")
    weights = torch.randn(n, d, generator=generator, dtype=dtype) / math.sqrt(p)
    if p == 1:
        return weights
    return weights * (torch.rand(n, d, generator=generator, dtype=dtype) < p)


def gp_kernel(u: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Θ(x_k, y_k) = (n d)^-1 Σ_i [u_i·x_k]_+ [u_i·y_k]_+ for each row pair (x_k, y_k)."""
    n, d = u.shape
    return (torch.relu(x @ u.T) * torch.relu(y @ u.T)).sum(-1) / (n * d)


@dataclass
class KernelDistance:
    """Empirical kernel distance and its split into the squared bias of the mean kernel and the
    variance over initialisations (averaged over input pairs)."""

    distance: float  # E[(Θ - Θ∞)^2]
    bias2: float  # E_pairs[(E_init Θ - Θ∞)^2], debiased for the finite number of inits
    variance: float  # E_pairs[Var_init Θ]


def kernel_distance(
    d: int,
    n: int,
    p: float,
    *,
    pairs: int = 1000,
    inits: int = 10,
    seed: int = 0,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
) -> KernelDistance:
    """The empirical E[(Θ - Θ∞)^2] of a width-`n` network with connectivity `p` on `d`-dim inputs:
    `pairs` independent N(0, 1) input pairs (or the rows of x, y) x `inits` initialisations."""
    if inits < 2:
        raise ValueError("inits must be >= 2 to split bias and variance")
    g = torch.Generator().manual_seed(seed)
    if x is None or y is None:
        x = torch.randn(pairs, d, generator=g, dtype=torch.float64)
        y = torch.randn(pairs, d, generator=g, dtype=torch.float64)
    x, y = x.to(torch.float64), y.to(torch.float64)
    reference = infinite_width_kernel(x, y)
    draws = torch.stack([gp_kernel(sparse_first_layer(n, d, p, g), x, y) for _ in range(inits)])
    distance = (draws - reference).square().mean().item()
    variance = draws.var(dim=0, unbiased=True)
    bias2 = ((draws.mean(0) - reference).square() - variance / inits).mean().item()
    return KernelDistance(distance, bias2, variance.mean().item())


def kernel_distance_approx(d: int, n: float, p: float) -> float:
    """Eq. (4): (1/4d)[(1/4)(1/sqrt(p) - 1)^2 + (d/n)(1 - 1/π^2)] (valid for dp >> 1)."""
    return (0.25 * (1 / math.sqrt(p) - 1) ** 2 + (d / n) * (1 - 1 / math.pi**2)) / (4 * d)


def approx_terms(d: int, n: float, p: float) -> tuple[float, float]:
    """The two terms of eq. (4): (sparsity bias, finite-width variance)."""
    return (1 / math.sqrt(p) - 1) ** 2 / (16 * d), (1 - 1 / math.pi**2) / (4 * n)


def optimal_connectivity(d: int, weights_per_input: float) -> float:
    """p* ≈ sqrt(np / 4d), the minimiser of eq. (4) at fixed np (= `weights_per_input`)."""
    return math.sqrt(weights_per_input / (4 * d))
