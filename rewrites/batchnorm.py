"""Producer through an eval-mode BatchNorm: h = BN(A z + b0) with A a Linear/Conv.

    W·BN(y) + c = W·diag(s)·y + (W·t + c),   s = gamma/sqrt(var+eps), t = beta - mean·s
so A absorbs W·diag(s) (and b0 becomes W·(s⊙b0)), and the BatchNorm becomes an exact eval-mode
identity carrying the shift (mean 0, var 1-eps, gamma 1, beta W·t + c). Exact in eval mode only: the
folded BatchNorm no longer normalises batches, so say so and prefer a consumer-side fold.
"""

from __future__ import annotations

import torch

from surgery.ir.graph import Op
from surgery.plan import Placement, Target

from . import algebra
from .common import RuleContext, feature_axis, unshared_reason, where
from .linear_conv import LayerProducer, weight_axes, writer_reason
from .rule import Algebra, Fold, Tensors

NOTE = "{bn} folds into {layer} and becomes an identity: exact in eval mode only"


class BatchNormProducer:
    """h is BN(layer(z)) for an eval-mode, affine BatchNorm right after a Linear/Conv."""

    kinds = ("batch_norm",)
    route_kind = "producer through BatchNorm"

    def check(self, op: Op, ctx: RuleContext) -> str | None:
        if not op.attrs.get("affine") or not op.attrs.get("track_running_stats"):
            return f"BatchNorm {where(op)} has no affine parameters or running statistics to carry the fold"
        reason = unshared_reason(op, ctx)
        if reason:
            return reason
        layer = ctx.flow.ops[op.inputs[0]]
        if layer.kind not in LayerProducer.kinds:
            return f"BatchNorm {where(op)} reads {layer.op} ({layer.name}), not a Linear/Conv that could absorb its scale"
        if len(ctx.users[layer.name]) != 1:
            return f"{where(layer)}'s output also feeds other ops than BatchNorm {where(op)}"
        return writer_reason(layer, ctx)  # the layer needs no bias: BN's beta takes the pair bias

    def fold(self, op: Op, ctx: RuleContext) -> Fold:
        layer = ctx.flow.ops[op.inputs[0]]
        params = {
            role: op.params[role] for role in ("weight", "bias", "running_mean", "running_var")
        }
        params["producer_weight"] = layer.params["weight"]
        if "bias" in layer.params:
            params["producer_bias"] = layer.params["bias"]
        axis = weight_axes(layer)[1]
        return Fold(
            [Target("batchnorm_through", params, axis=axis, eps=op.attrs["eps"])],
            [Placement(op.module or "", "output", feature_axis(op))],
            [op.params["weight"], layer.params["weight"]],
            [NOTE.format(bn=where(op), layer=where(layer))],
        )


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


PRODUCERS = (BatchNormProducer(),)
ALGEBRA = {"batchnorm_through": Algebra(_batchnorm_through, None)}
