"""Pre-merged training mode: a layer that absorbs pairs runs once with its pairs merged into its
weights, so a training step costs what the thin model costs plus one small product W = M2 M1 per pair
(independent of the batch), and gradients still reach M1 and M2 through the merge.

    consumer side:  A' = A (I ⊗ W ⊗ I),  b' = b + A (1 ⊗ c ⊗ 1)   (pairs nearest the layer first)
    producer side:  A' = W A,            b' = W b + c              (in the order they apply)

The same algebra as the fold (surgery.rewrites.algebra), in the model's dtype and under autograd.
A layer falls back to its class's own forward (the hooks then run the pairs on the activations)
while any of its pairs records a WIN probe, or when pre-merging is off.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.normalize import classify_module

from . import algebra

# (weight input dim, weight output dim) per mergeable layer kind
_AXES = {"linear": (1, 0), "conv1d_hf": (0, 1), "conv": (1, 0), "embedding": (None, 1)}


def mergeable_kind(module: nn.Module) -> str | None:
    """The kind of a layer whose pairs can be merged into its weights, or None."""
    kind, attrs = classify_module(module)
    if kind == "linear":
        return "linear" if attrs.get("weight_in_axis", 1) == 1 else "conv1d_hf"
    if kind in ("conv", "embedding"):
        return kind
    return None


class MergedLayer:
    """Installed as a layer's instance `forward`: merged weights when every pair of the layer is
    pre-merged and none records a probe, the class's own forward otherwise."""

    def __init__(
        self, module: nn.Module, kind: str, inputs: list[Any], outputs: list[Any], probes: list[Any]
    ) -> None:
        self.module, self.kind = module, kind
        self.inputs, self.outputs = inputs, outputs  # _Action lists (consumer side, producer side)
        self.pairs = [a.pair for a in inputs + outputs + probes]

    def active(self) -> bool:
        return all(p.premerged for p in self.pairs) and not any(p.recording for p in self.pairs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active():
            return type(self.module).forward(self.module, *args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        weight, bias = self.merged()
        return _run(self.module, self.kind, x, weight, bias)

    def merged(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's weight and bias with its pairs folded in (differentiable)."""
        in_axis, out_axis = _AXES[self.kind]
        weight, bias = self.module.weight, getattr(self.module, "bias", None)
        for action in reversed(self.inputs):  # the pair nearest the layer is absorbed first
            pair, p = action.pair, action.placement
            c = pair.shift() if p.bias else None
            if c is not None:
                bias = algebra.absorb_input_bias(
                    bias, weight, c, in_axis, out_axis, p.outer, p.inner
                )
            if _factor_first(
                weight, pair
            ):  # A (M2 M1) = (A M2) M1: cheaper for a layer with few rows
                weight = algebra.absorb_input(weight, pair.narrow.weight, in_axis, p.outer, p.inner)
                weight = algebra.absorb_input(weight, pair.widen.weight, in_axis, p.outer, p.inner)
            else:
                weight = algebra.absorb_input(weight, pair.mixing(), in_axis, p.outer, p.inner)
        for action in self.outputs:
            pair = action.pair
            c = pair.shift() if action.placement.bias else None
            if _factor_first(weight, pair):  # (M2 M1) A = M2 (M1 A)
                weight = algebra.absorb_output(weight, pair.widen.weight, out_axis)
                weight = algebra.absorb_output(weight, pair.narrow.weight, out_axis)
            else:
                weight = algebra.absorb_output(weight, pair.mixing(), out_axis)
            if self.kind == "embedding":
                weight = weight + c if c is not None else weight
            elif bias is not None or c is not None:
                bias = _output_bias(bias, pair, c)
        return weight, bias


def _output_bias(bias: torch.Tensor | None, pair: Any, c: torch.Tensor | None) -> torch.Tensor:
    """W b + c, computed as M2 (M1 b) + c (never forming W for a vector)."""
    out = pair.narrow.weight @ (pair.widen.weight @ bias) if bias is not None else 0
    return out + c if c is not None else out


def _factor_first(weight: torch.Tensor, pair: Any) -> bool:
    """Whether multiplying the layer by M2 then M1 costs less than forming W = M2 M1 first
    (m rows of the layer: 2 m d D against d D d + m d d)."""
    d, D = pair.d, pair.D
    m = weight.numel() // d
    return 2 * m * D < d * D + m * d


def _run(
    module: nn.Module, kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if kind == "linear":
        return F.linear(x, weight, bias)
    if kind == "conv":
        return module._conv_forward(x, weight, bias)
    if kind == "conv1d_hf":  # Hugging Face Conv1D: x @ W[in, out] + b
        out = (
            torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
            if bias is not None
            else x.reshape(-1, x.shape[-1]) @ weight
        )
        return out.view(*x.shape[:-1], weight.shape[1])
    return F.embedding(
        x,
        weight,
        module.padding_idx,
        module.max_norm,
        module.norm_type,
        module.scale_grad_by_freq,
        module.sparse,
    )
