"""Pre-merged training mode: a layer that absorbs pairs runs once with its pairs merged into its
weights, so the per-sample cost of a step is the thin model's; the merge costs a few products per
pair that do not grow with the batch, and gradients still reach M1 and M2 through it.

    consumer side:  A' = A (I ⊗ W ⊗ I),  b' = b + A (1 ⊗ c ⊗ 1)   (pairs nearest the layer first)
    producer side:  A' = W A,            b' = W b + c              (in the order they apply)

The same algebra as the fold (surgery.rewrites.algebra), in the model's dtype and under autograd.
W = M2 M1 is formed at most once per forward of the paired model (MixingCache) and shared by every
layer that takes it (q, k and v read one product), or skipped for a layer with few rows, where
A M2 M1 = (A M2) M1 is cheaper. A layer runs its class's own forward instead (the hooks then apply
the pairs to the activations) while any of its pairs records a WIN probe, when pre-merging is off,
or, under the "auto" policy, for an input so small that the merge would cost more than running the
pairs on it (a classifier head after global pooling sees one row per sample).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.normalize import classify_module
from surgery.pairs import PREMERGE_POLICIES, same_layout

from . import algebra

# (weight input dim, weight output dim) per mergeable layer kind
_AXES = {"linear": (1, 0), "conv1d_hf": (0, 1), "conv": (1, 0), "embedding": (None, 1)}
# the feature dim of the layer's input activations
_FEATURE_DIM = {"linear": -1, "conv1d_hf": -1, "conv": 1}


def mergeable_kind(module: nn.Module) -> str | None:
    """The kind of a layer whose pairs can be merged into its weights, or None."""
    kind, attrs = classify_module(module)
    if kind == "linear":
        return "linear" if attrs.get("weight_in_axis", 1) == 1 else "conv1d_hf"
    if kind in ("conv", "embedding"):
        return kind
    return None


class MixingCache:
    """W = M2 M1 of each pair, formed at most once per forward of the paired model.

    Installed on the paired model as a forward pre-hook (opens a forward) and an always-called
    forward hook (closes it and drops the products, whose graphs belong to that forward). Outside a
    forward of the paired model (a submodule called on its own) nothing is cached."""

    def __init__(self) -> None:
        self.depth = 0
        self.products: dict[tuple[int, bool], torch.Tensor] = {}

    def open(self, module: nn.Module, args: Any) -> None:
        self.depth += 1

    def close(self, module: nn.Module, args: Any, output: Any) -> None:
        self.depth = max(self.depth - 1, 0)
        if self.depth == 0:
            self.products.clear()

    def mixing(self, pair: Any) -> torch.Tensor:
        if self.depth == 0:
            return pair.mixing()
        key = (id(pair), torch.is_grad_enabled())
        if key not in self.products:
            self.products[key] = pair.mixing()
        return self.products[key]


class MergedLayer:
    """Installed as a layer's instance `forward`: merged weights when pre-merging is on for every
    pair of the layer, none records a probe and the policy says merging pays for this input; the
    class's own forward otherwise. The choice is a function of the input's shape only, so the hooks
    that run the pairs on activations make the same choice for the same call."""

    def __init__(
        self,
        module: nn.Module,
        kind: str,
        inputs: list[Any],
        outputs: list[Any],
        probes: list[Any],
        cache: MixingCache,
    ) -> None:
        self.module, self.kind, self.cache = module, kind, cache
        self.inputs, self.outputs = inputs, outputs  # _Action lists (consumer side, producer side)
        self.pairs = [a.pair for a in inputs + outputs + probes]
        self.sharing: dict[Any, int] = {}  # pair -> how many layers it is merged into (see share)
        self.merge_cost = self._merge_cost()
        self.current = False  # the choice made for the call in progress (read by output hooks)

    def merged_pairs(self) -> set[Any]:
        return {a.pair for a in self.inputs + self.outputs}

    def active(self, x: torch.Tensor) -> bool:
        policies = {p.premerged for p in self.pairs}
        if len(policies) != 1 or not policies <= set(PREMERGE_POLICIES):
            return False
        if any(p.recording for p in self.pairs):
            return False
        return policies == {"always"} or self.merge_cost <= self.pair_cost(x)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        self.current = self.active(x)
        if not self.current:
            return type(self.module).forward(self.module, *args, **kwargs)
        weight, bias = self.merged()
        return _run(self.module, self.kind, x, weight, bias)

    def pair_cost(self, x: torch.Tensor) -> float:
        """Multiply-adds of running this layer's pairs on the activations around input `x` (2 d D
        per feature vector a pair maps); the backward pass scales both costs alike."""
        cost = sum(2 * a.pair.D * x.numel() for a in self.inputs)  # x.numel() / d vectors
        if not self.outputs:
            return cost
        rows = (
            x.numel() if self.kind == "embedding" else x.numel() / x.shape[_FEATURE_DIM[self.kind]]
        )
        if self.kind == "conv":
            rows /= math.prod(self.module.stride)  # output positions, near enough
        out_features = self.module.weight.shape[_AXES[self.kind][1]]
        return cost + sum(2 * a.pair.D * rows * out_features for a in self.outputs)

    def share(self, sharing: dict[Any, int]) -> None:
        """Set how many layers each pair is merged into (the insert pass knows, once all are built):
        the product W = M2 M1 is formed once per forward for all of them."""
        self.sharing = sharing
        self.merge_cost = self._merge_cost()

    def _merge_cost(self) -> float:
        """Multiply-adds of merging the pairs into the weight, each in its cheaper order (fixed by
        the shapes, so computed once, not per call)."""
        return sum(
            min(self._orders(self.module.weight, a.pair)) for a in self.inputs + self.outputs
        )

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
            if self._factor_first(weight, pair):  # A (M2 M1) = (A M2) M1
                weight = algebra.absorb_input(weight, pair.narrow.weight, in_axis, p.outer, p.inner)
                weight = algebra.absorb_input(weight, pair.widen.weight, in_axis, p.outer, p.inner)
            else:
                mixing = self.cache.mixing(pair)
                weight = algebra.absorb_input(weight, mixing, in_axis, p.outer, p.inner)
        for action in self.outputs:
            pair = action.pair
            c = pair.shift() if action.placement.bias else None
            if self._factor_first(weight, pair):  # (M2 M1) A = M2 (M1 A)
                weight = algebra.absorb_output(weight, pair.widen.weight, out_axis)
                weight = algebra.absorb_output(weight, pair.narrow.weight, out_axis)
            else:
                weight = algebra.absorb_output(weight, self.cache.mixing(pair), out_axis)
            if self.kind == "embedding":
                weight = weight + c if c is not None else weight
            elif bias is not None or c is not None:
                bias = _output_bias(bias, pair, c)
        # the products leave the weight in whatever strides they produce; run it as the thin layer runs
        return same_layout(weight, self.module.weight), bias

    def _factor_first(self, weight: torch.Tensor, pair: Any) -> bool:
        factored, product = self._orders(weight, pair)
        return factored < product

    def _orders(self, weight: torch.Tensor, pair: Any) -> tuple[float, float]:
        """Multiply-adds of absorbing `pair` into the layer's m = weight.numel() / d rows: by M2 then
        M1 (2 m D d), or by W = M2 M1 (this layer's share of forming W, d D d, plus m d d)."""
        d, D = pair.d, pair.D
        m = weight.numel() / d
        return 2 * m * D * d, d * D * d / self.sharing.get(pair, 1) + m * d * d


def _output_bias(bias: torch.Tensor | None, pair: Any, c: torch.Tensor | None) -> torch.Tensor:
    """W b + c, computed as M2 (M1 b) + c (never forming W for a vector)."""
    out = pair.narrow.weight @ (pair.widen.weight @ bias) if bias is not None else 0
    return out + c if c is not None else out


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
