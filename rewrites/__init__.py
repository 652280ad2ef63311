"""Fold rules, one family per module, and the insert pass.

Each rule has a `check` that returns the reason it does not apply (so find_blocks can say *why not*)
and produces `Target`s (parameter updates) and `Placement`s (where the paired model runs the pair).
The pure weight algebra lives in `algebra`; `RULES` maps a Target's rule name to it.
"""

from __future__ import annotations

from collections.abc import Callable

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
    assert c is not None, "input_bias needs a pair bias"
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


RULES: dict[str, Callable[[Target, Tensors, torch.Tensor, torch.Tensor | None], Tensors]] = {
    "input_weight": _input_weight,
    "input_bias": _input_bias,
    "output_weight": _output_weight,
    "output_bias": _output_bias,
    "batchnorm_through": _batchnorm_through,
    "embedding_table": _embedding_table,
    "factor_product": factor_rule,
}
