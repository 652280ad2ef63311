"""Pure weight algebra of the fold rules: float64 tensors in, float64 tensors out, no graphs.

Notation: a pair maps a feature vector h (size d) to W h + c. A feature axis of size outer*d*inner
carries the pair's index in its middle factor, so the map there is (I_outer ⊗ W ⊗ I_inner).
"""

from __future__ import annotations

import torch


def _split_feature(t: torch.Tensor, axis: int, outer: int, inner: int) -> torch.Tensor:
    """Move `axis` last and split it into (outer, d, inner)."""
    moved = t.movedim(axis, -1)
    d = moved.shape[-1] // (outer * inner)
    return moved.reshape(*moved.shape[:-1], outer, d, inner)


def absorb_input(
    weight: torch.Tensor, W: torch.Tensor, axis: int, outer: int = 1, inner: int = 1
) -> torch.Tensor:
    """A' = A (I ⊗ W ⊗ I) on the input dim `axis`: a layer reading W h now reads h.

    Exact for Linear, Conv (groups=1, any kernel/stride/dilation/zero padding: zeros map to zeros).
    W may be rectangular [d, e] (one factor of a pair): the dim then holds outer*e*inner features."""
    split = _split_feature(weight, axis, outer, inner).transpose(-1, -2)  # [..., outer, inner, d]
    if split.shape[-1] != W.shape[0]:
        raise ValueError(
            f"dim {axis} holds {split.shape[-1]} features per block, W maps {W.shape[0]}"
        )
    # one matrix product over all rows (a batch of vector-matrix products would re-read W per row)
    mixed = (split.reshape(-1, W.shape[0]) @ W).reshape(*split.shape[:-1], W.shape[1])
    mixed = mixed.transpose(-1, -2)  # [..., outer, e, inner]
    return mixed.reshape(*mixed.shape[:-3], -1).movedim(-1, axis)


def absorb_input_bias(
    bias: torch.Tensor,
    weight: torch.Tensor,
    c: torch.Tensor,
    axis: int,
    out_axis: int,
    outer: int = 1,
    inner: int = 1,
) -> torch.Tensor:
    """b' = b + A (1 ⊗ c ⊗ 1), summed over every kernel position: the layer reads h + c.

    Uses A *before* absorb_input. Exact only when every output sees c at every tap (no zero padding)."""
    split = _split_feature(weight, axis, outer, inner)
    per_tap = torch.einsum("...okj,k->...", split, c)  # weight's dims without `axis`
    out = out_axis if out_axis < axis else out_axis - 1
    other = [dim for dim in range(per_tap.dim()) if dim != out]
    return bias + (per_tap.sum(dim=other) if other else per_tap)


def absorb_output(weight: torch.Tensor, W: torch.Tensor, axis: int) -> torch.Tensor:
    """A' = W A on the output dim `axis`: a layer's output is mixed by W (W may be rectangular)."""
    moved = weight.movedim(axis, 0)
    mixed = (W @ moved.reshape(moved.shape[0], -1)).reshape(W.shape[0], *moved.shape[1:])
    return mixed.movedim(0, axis)


def absorb_output_bias(
    bias: torch.Tensor | None, W: torch.Tensor, c: torch.Tensor | None
) -> torch.Tensor:
    """b' = W b + c (either term may be absent)."""
    out = W @ bias if bias is not None else torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
    return out + c if c is not None else out


def batchnorm_through(
    producer_weight: torch.Tensor,
    producer_bias: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    W: torch.Tensor,
    c: torch.Tensor | None,
    out_axis: int = 0,
) -> dict[str, torch.Tensor]:
    """W·BN(A z + b0) + c with BN(y) = s⊙y + t (eval mode), rewritten as A' z + b0' followed by an
    identity BN carrying the shift: A' = W diag(s) A, b0' = W (s⊙b0), BN' = (mean 0, var 1-eps,
    gamma 1, beta W t + c)."""
    s = gamma / torch.sqrt(var + eps)
    t = beta - mean * s
    scaled = W * s.unsqueeze(0)  # W diag(s)
    out = {
        "producer_weight": absorb_output(producer_weight, scaled, out_axis),
        "weight": torch.ones_like(gamma),
        "bias": absorb_output_bias(t, W, c),
        "running_mean": torch.zeros_like(mean),
        "running_var": torch.full_like(var, 1.0 - eps),
    }
    if producer_bias is not None:
        out["producer_bias"] = scaled @ producer_bias
    return out
