"""GP-kernel distance (003, Section 3): the closed-form infinite-width kernel, the empirical
distance, eq. (4) where the paper says it holds (dp >> 1), p*, and where eq. (4) does not hold."""

from __future__ import annotations

import math

import pytest
import torch

from surgery.experiments.kernel_distance import (
    approx_terms,
    gp_kernel,
    infinite_width_kernel,
    kernel_distance,
    kernel_distance_approx,
    optimal_connectivity,
    sparse_first_layer,
)


def test_infinite_width_kernel_is_the_wide_limit():
    g = torch.Generator().manual_seed(0)
    d = 16
    x = torch.randn(64, d, generator=g, dtype=torch.float64)
    y = torch.randn(64, d, generator=g, dtype=torch.float64)
    wide = gp_kernel(sparse_first_layer(200_000, d, 1.0, g), x, y)
    reference = infinite_width_kernel(x, y)
    assert (wide - reference).abs().max() < 0.02 * reference.abs().max()
    # on the diagonal J1(0) = π: Θ∞(x, x) = |x|^2 / 2d
    assert torch.allclose(infinite_width_kernel(x, x), x.square().sum(-1) / (2 * d))


def test_sparse_weights_have_the_stated_distribution():
    g = torch.Generator().manual_seed(1)
    u = sparse_first_layer(400, 500, 0.1, g)
    kept = u != 0
    assert abs(kept.double().mean().item() - 0.1) < 0.005
    assert abs(u[kept].var().item() - 10.0) < 0.5  # σ² = 1/p
    with pytest.raises(ValueError):
        sparse_first_layer(4, 4, 0.0, g)


@pytest.mark.parametrize("p", [1.0, 0.5, 0.25])
def test_eq4_agrees_with_the_empirical_distance_when_dp_is_large(p):
    d, weights_per_input = 512, 8  # n·p fixed: every network has 8·d first-layer weights
    n = round(weights_per_input / p)
    assert d * p >= 100  # the regime 003 states eq. (4) for
    empirical = kernel_distance(d, n, p, pairs=400, inits=8, seed=2)
    approx = kernel_distance_approx(d, n, p)
    assert abs(empirical.distance / approx - 1) < 0.15
    # the split: the finite-width variance term carries it; bias + variance add up
    assert abs(empirical.variance / approx_terms(d, n, p)[1] - 1) < 0.2
    assert math.isclose(empirical.distance, empirical.bias2 + empirical.variance, rel_tol=1e-9)


def test_eq4_overstates_the_distance_when_dp_is_small():
    """Honest limits: with N(0, 1) inputs and dp ~ 8 the measured distance is far below eq. (4)
    (its sparsity term (1/sqrt(p) - 1)^2 / 16d does not show up), so the measured minimum is not
    at p* — the paper only claims agreement for dp >> 1."""
    d, p = 784, 0.01
    empirical = kernel_distance(d, 800, p, pairs=300, inits=4, seed=3)
    assert empirical.distance < 0.25 * kernel_distance_approx(d, 800, p)


def test_optimal_connectivity_minimises_eq4_at_fixed_weights():
    d, weights_per_input = 784, 8
    p_star = optimal_connectivity(d, weights_per_input)
    assert math.isclose(p_star, math.sqrt(8 / (4 * 784)))
    grid = [10 ** (-4 + 4 * i / 4000) for i in range(4001)]
    best = min(grid, key=lambda p: kernel_distance_approx(d, weights_per_input / p, p))
    assert 0.7 < best / p_star < 1.4  # p* drops (1 - 1/π²) and assumes sqrt(p) << 1
