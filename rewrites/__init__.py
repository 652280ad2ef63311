"""Fold rules, one family per module, and the insert pass.

Each rule has a `check` that returns the reason it does not apply (so find_blocks can say *why not*)
and produces `Target`s (parameter updates) and `Placement`s (where the paired model runs the pair).
The pure weight algebra lives in `algebra`; `RULES` maps a Target's rule name to it, and both the
fold (float64, on a state_dict) and pre-merged training (under autograd, on a live layer) apply it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from surgery.plan import Target

from . import algebra
from .attention import PackedAttentionConsumer
from .batchnorm import BatchNormProducer
from .embedding import EmbeddingProducer, EmbeddingSumProducer
from .factor import factor_rule
from .linear_conv import LayerConsumer, LayerProducer

CONSUMER_RULES = (LayerConsumer(), PackedAttentionConsumer())
PRODUCER_RULES = (LayerProducer(), BatchNormProducer(), EmbeddingProducer(), EmbeddingSumProducer())

Tensors = dict[str, torch.Tensor]


def _input_weight(t: Target, p: Tensors, W: torch.Tensor, c: torch.Tensor | None) -> Tensors:
    return {"weight": algebra.absorb_input(p["weight"], W, t.axis, t.outer, t.inner)}


def _input_bias(t: Target, p: Tensors, W: torch.Tensor, c: torch.Tensor | None) -> Tensors:
    if c is None:  # no pair bias (yet: see Algebra.factors)
        return {}
    return {
        "bias": algebra.absorb_input_bias(
            p["bias"], p["weight"], c, t.axis, t.out_axis, t.outer, t.inner
        )
    }


def _output_weight(t: Target, p: Tensors, W: torch.Tensor, c: torch.Tensor | None) -> Tensors:
    return {"weight": algebra.absorb_output(p["weight"], W, t.axis)}


def _output_bias(t: Target, p: Tensors, W: torch.Tensor, c: torch.Tensor | None) -> Tensors:
    return {"bias": algebra.absorb_output_bias(p["bias"], W, c if t.add_bias else None)}


def _batchnorm_through(t: Target, p: Tensors, W: torch.Tensor, c: torch.Tensor | None) -> Tensors:
    assert t.eps is not None
    return algebra.batchnorm_through(
        p["producer_weight"],
        p.get("producer_bias"),
        p["weight"],
        p["bias"],
        p["running_mean"],
        p["running_var"],
        t.eps,
        W,
        c,
        t.axis,
    )


def _embedding_table(t: Target, p: Tensors, W: torch.Tensor, c: torch.Tensor | None) -> Tensors:
    table = algebra.absorb_output(p["weight"], W, t.axis)
    return {"weight": table + c if c is not None and t.add_bias else table}


@dataclass(frozen=True)
class Algebra:
    """A Target rule's update: `apply(target, tensors by role, W, c)` returns the changed tensors by
    role. `factors` says whether W = M2 M1 may instead be applied as its two factors in turn, the
    pair bias c given with the second (pre-merged training uses it when the factors are cheaper):
    "input" (A M2, then M1: a map on the input side), "output" (M1 A, then M2), or None (W only)."""

    apply: Callable[[Target, Tensors, torch.Tensor, torch.Tensor | None], Tensors]
    factors: str | None

    def __call__(
        self, target: Target, tensors: Tensors, W: torch.Tensor, c: torch.Tensor | None
    ) -> Tensors:
        return self.apply(target, tensors, W, c)


RULES: dict[str, Algebra] = {
    "input_weight": Algebra(_input_weight, "input"),
    "input_bias": Algebra(_input_bias, "input"),  # uses A before input_weight: plan order
    "output_weight": Algebra(_output_weight, "output"),
    "output_bias": Algebra(_output_bias, "output"),
    "batchnorm_through": Algebra(_batchnorm_through, None),
    "embedding_table": Algebra(_embedding_table, "output"),
    "factor_product": Algebra(factor_rule, None),
}
