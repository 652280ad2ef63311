"""Rules for nn.Linear and nn.Conv{1,2,3}d (groups == 1).

Consumer (the layer reads W h + c):  y = A (W h + c) + b  =  (A W) h + (b + A c)
    A' = A W on the input-channel dim, any kernel size, stride, dilation and zero padding (W 0 = 0);
    the pair bias folds into b only if the layer has a bias and no zero padding (a padded tap would
    see 0 where the paired model sees c).
Producer (the pair reads the layer's output, on every edge):  W (A x + b) + c  =  (W A) x + (W b + c).
"""

from __future__ import annotations

import torch

from surgery.ir.graph import Layout, Op
from surgery.plan import Placement, Target

from . import algebra
from .common import RuleContext, feature_axis, unshared_reason, where
from .rule import Algebra, Fold, Tensors


def _zero_padded(op: Op) -> bool:
    if op.kind != "conv" or op.attrs.get("padding_mode", "zeros") != "zeros":
        return False
    padding = op.attrs.get("padding")
    if padding == "valid":
        return False
    if padding == "same":
        return any(k > 1 for k in (op.attrs.get("kernel_size") or (2,)))
    return any(int(p) > 0 for p in padding or ())


class LayerConsumer:
    """A Linear or groups=1 Conv reads the pair's output: fold W into its input-channel dim."""

    kinds = ("linear", "conv")

    def check(self, op: Op, layout: Layout, ctx: RuleContext) -> str | None:
        if op.kind == "conv" and op.attrs.get("groups", 1) != 1:
            return (
                f"grouped/depthwise conv {where(op)} (groups={op.attrs['groups']}) sees each channel group "
                "alone: a dense channel mix cannot fold into it"
            )
        expected = 1 if op.kind == "conv" else layout_rank(op, ctx) - 1
        if layout.axis != expected:
            return f"{where(op)} contracts axis {expected} but the pair mixes axis {layout.axis}"
        if op.kind == "conv" and (layout.outer, layout.inner) != (1, 1):
            return f"{where(op)} reads the features interleaved with other dims"
        reason = unshared_reason(op, ctx)
        if reason:
            return reason
        if ctx.bias:
            if "bias" not in op.params:
                return f"{where(op)} has no bias to absorb the pair's bias (use bias=False)"
            if _zero_padded(op):
                return (
                    f"pair bias cannot fold into zero-padded conv {where(op)}: padded taps would miss it "
                    "(use bias=False, or padding_mode='replicate'/'reflect'/'circular')"
                )
        return None

    def fold(self, op: Op, layout: Layout, ctx: RuleContext) -> Fold:
        in_axis, out_axis = weight_axes(op)
        weight, bias = op.params["weight"], op.params.get("bias") if ctx.bias else None
        return Fold(
            input_targets(weight, bias, in_axis, out_axis, layout),
            [Placement(op.module or "", "input", layout.axis, layout.outer, layout.inner)],
            [weight],
        )


def input_targets(
    weight: str, bias: str | None, in_axis: int, out_axis: int, layout: Layout
) -> list[Target]:
    """A consumer's updates: the pair bias into `bias` first (it reads the weight before W
    does), then W into the weight's input dim."""
    found = []
    if bias is not None:
        params = {"weight": weight, "bias": bias}
        found.append(Target("input_bias", params, in_axis, out_axis, layout.outer, layout.inner))
    found.append(
        Target("input_weight", {"weight": weight}, in_axis, outer=layout.outer, inner=layout.inner)
    )
    return found


def layout_rank(op: Op, ctx: RuleContext) -> int:
    """Rank of `op`'s (first) input tensor."""
    source = ctx.flow.ops[op.inputs[0]]
    return len(source.shape or ())


def weight_axes(op: Op) -> tuple[int, int]:
    """(input dim, output dim) of the op's weight: (1, 0) for nn.Linear/Conv, (0, 1) for HF Conv1D."""
    return op.attrs.get("weight_in_axis", 1), op.attrs.get("weight_out_axis", 0)


def writer_reason(op: Op, ctx: RuleContext) -> str | None:
    """Why the output channels of this Linear/Conv cannot be mixed by W, or None."""
    if op.kind == "conv" and op.attrs.get("groups", 1) != 1:
        return f"grouped/depthwise conv {where(op)} (groups={op.attrs['groups']}) cannot write mixed channels"
    return unshared_reason(op, ctx)


class LayerProducer:
    """h is the output of a Linear or groups=1 Conv: fold W into its output dim and bias."""

    kinds = ("linear", "conv")
    route_kind = "producer"

    def check(self, op: Op, ctx: RuleContext) -> str | None:
        return producer_reason(op, ctx, writer_reason(op, ctx))

    def fold(self, op: Op, ctx: RuleContext) -> Fold:
        return producer_fold(op, weight_axes(op)[1])


def producer_reason(op: Op, ctx: RuleContext, writer: str | None) -> str | None:
    """Why a layer cannot take a producer fold: `writer` (why it cannot write mixed channels), or
    no bias for the pair's bias; None when it can."""
    if writer:
        return writer
    if ctx.bias and "bias" not in op.params:
        return f"{where(op)} has no bias to absorb the pair's bias (use bias=False)"
    return None


def producer_fold(op: Op, out_axis: int) -> Fold:
    """A producer's fold: W into the weight's output dim `out_axis`, W b + c into its bias; the
    pair runs on the layer's output until then."""
    targets = [Target("output_weight", {"weight": op.params["weight"]}, axis=out_axis)]
    if "bias" in op.params:
        targets.append(Target("output_bias", {"bias": op.params["bias"]}))
    return Fold(
        targets, [Placement(op.module or "", "output", feature_axis(op))], [op.params["weight"]]
    )


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


CONSUMERS = (LayerConsumer(),)
PRODUCERS = (LayerProducer(),)
ALGEBRA = {
    "input_weight": Algebra(_input_weight, "input"),
    "input_bias": Algebra(_input_bias, "input"),  # reads A before input_weight: plan order
    "output_weight": Algebra(_output_weight, "output"),
    "output_bias": Algebra(_output_bias, "output"),
}
