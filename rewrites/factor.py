"""Linear-bottleneck algebra (Golubeva et al., method a): a weight as a product of two factors.

A Linear weight A [out, in] or a Conv weight A [out, in/g, *k] with g groups is written per group as
A_g = S_g F_g, with F_g [r, (in/g)·prod(k)] (the first layer: a k x k conv, or a Linear, to r
channels per group) and S_g [out/g, r] (the second layer: a 1 x 1 conv, or a Linear). Running the
first layer and then the second equals running A: the 1 x 1 map acts on channels only, so it
commutes with every kernel offset, stride, dilation and padding of the first.

`factor_product` contracts the factors back (the rule `factor_product` of surgery.rewrites.RULES);
`factor_svd` splits a weight by a truncated SVD (exact when r is the full rank), in float64.
"""

from __future__ import annotations

import math

import torch

from surgery.plan import Target

from .rule import Algebra, Tensors


def full_rank(weight_shape: tuple[int, ...] | list[int], groups: int = 1) -> int:
    """min(out/g, (in/g)·prod(k)): the largest useful bottleneck per group."""
    out, per_group_in, *kernel = weight_shape
    return min(out // groups, per_group_in * math.prod(kernel))


def factor_product(first: torch.Tensor, second: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A = S F per group: first [g·r, in/g, *k], second [out, r, 1...] -> A [out, in/g, *k]."""
    out, r = second.shape[0], second.shape[1]
    if first.shape[0] != groups * r or out % groups:
        raise ValueError(
            f"factor shapes {tuple(first.shape)} and {tuple(second.shape)} do not chain with groups={groups}"
        )
    f = first.reshape(groups, r, -1)  # [g, r, (in/g)·prod(k)]
    s = second.reshape(groups, out // groups, r)  # [g, out/g, r]
    return (s @ f).reshape(out, *first.shape[1:])


def factor_svd(
    weight: torch.Tensor, rank: int, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) with second·first the best rank-`rank` approximation of each group of
    `weight` (Eckart-Young), split evenly: F = sqrt(Σ_r) V_rᵀ, S = U_r sqrt(Σ_r). float64."""
    full = full_rank(tuple(weight.shape), groups)
    if not 1 <= rank <= full:
        raise ValueError(f"rank {rank} is outside 1..{full} for a weight {tuple(weight.shape)}")
    out = weight.shape[0]
    U, S, Vh = _svd(weight.double().reshape(groups, out // groups, -1))
    root = S[:, :rank].sqrt()
    first = root.unsqueeze(-1) * Vh[:, :rank]  # [g, r, (in/g)·prod(k)]
    second = U[:, :, :rank] * root.unsqueeze(1)  # [g, out/g, r]
    kernel_ones = [1] * (weight.dim() - 2)
    return (
        first.reshape(groups * rank, *weight.shape[1:]),
        second.reshape(out, rank, *kernel_ones),
    )


def _svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a batch of matrices through a QR of the long side first (A = Q R, then the
    small R): the same factorisation, much faster than LAPACK's gesdd on very wide matrices."""
    m, n = a.shape[-2:]
    if m == n:
        return torch.linalg.svd(a, full_matrices=False)
    if m < n:  # Aᵀ = Q R  =>  A = Rᵀ Qᵀ = U S (Q Vr)ᵀ
        q, r = torch.linalg.qr(a.mT)
        U, S, Vh = torch.linalg.svd(r.mT, full_matrices=False)
        return U, S, (q @ Vh.mT).mT
    q, r = torch.linalg.qr(a)  # A = Q R = (Q U) S Vh
    U, S, Vh = torch.linalg.svd(r, full_matrices=False)
    return q @ U, S, Vh


def factor_rule(t: Target, p: Tensors, W: torch.Tensor | None, c: torch.Tensor | None) -> Tensors:
    """RULES["factor_product"]: contract a factorized layer. Roles in: `first`, `second` (factor
    weights) and `second_bias` (if any); out: `weight` (= second·first per group, `t.groups` groups)
    and `bias`. A contraction has no pair, so W and c are unused."""
    out = {"weight": factor_product(p["first"], p["second"], groups=t.groups)}
    if "second_bias" in p:
        out["bias"] = p["second_bias"]
    return out


ALGEBRA = {"factor_product": Algebra(factor_rule, None)}
