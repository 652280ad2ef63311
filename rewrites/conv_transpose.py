"""Rules for nn.ConvTranspose{1,2,3}d (groups == 1). Its weight is A [in, out/groups, *k]: the input
channel is dim 0 and the output channel dim 1 (the other way round from a Conv).

Consumer (the layer reads W h):  y = Σ_i A[i] ⋆ (W h)_i = Σ_j (Σ_i W[i, j] A[i]) ⋆ h_j
    A' = A W on dim 0 (any kernel, stride, padding, output_padding, dilation: each input channel's
    map is linear). A pair bias c cannot fold: an output position sums the kernel taps that reach it,
    which differ at the borders and between stride phases, so it would see a varying multiple of A c.
Producer (the pair reads the layer's output):  W (A ⋆ x + b) + c = (W A) ⋆ x + (W b + c)
    A' = W A on dim 1, b' = W b + c.
A grouped transposed conv reads and writes each channel group on its own: a dense W cannot fold in.
"""

from __future__ import annotations

from surgery.ir.graph import Layout, Op
from surgery.plan import Placement

from .common import RuleContext, unshared_reason, where
from .linear_conv import input_targets, producer_fold, producer_reason
from .rule import Fold

IN_DIM, OUT_DIM = 0, 1  # of the weight [in, out/groups, *k]


def _grouped(op: Op) -> str | None:
    groups = op.attrs.get("groups", 1)
    if groups == 1:
        return None
    return (
        f"grouped transposed conv {where(op)} (groups={groups}) sees each channel group alone: "
        "a dense channel mix cannot fold into it"
    )


class ConvTransposeConsumer:
    """A groups=1 ConvTranspose reads the pair's output: fold W into its input-channel dim (0)."""

    kinds = ("conv_transpose",)

    def check(self, op: Op, layout: Layout, ctx: RuleContext) -> str | None:
        if (layout.axis, layout.outer, layout.inner) != (1, 1, 1):
            return f"{where(op)} reads channels on axis 1, but the pair mixes axis {layout.axis}"
        reason = _grouped(op) or unshared_reason(op, ctx)
        if reason:
            return reason
        if ctx.bias:
            return (
                f"pair bias cannot fold into transposed conv {where(op)}: its outputs sum different "
                "numbers of kernel taps (borders, stride phases) (use bias=False)"
            )
        return None

    def fold(self, op: Op, layout: Layout, ctx: RuleContext) -> Fold:
        weight = op.params["weight"]
        return Fold(
            input_targets(weight, None, IN_DIM, OUT_DIM, layout),
            [Placement(op.module or "", "input", layout.axis)],
            [weight],
        )


class ConvTransposeProducer:
    """h is the output of a groups=1 ConvTranspose: fold W into its output dim (1) and bias."""

    kinds = ("conv_transpose",)
    route_kind = "producer"

    def check(self, op: Op, ctx: RuleContext) -> str | None:
        return producer_reason(op, ctx, _grouped(op) or unshared_reason(op, ctx))

    def fold(self, op: Op, ctx: RuleContext) -> Fold:
        return producer_fold(op, OUT_DIM)


CONSUMERS = (ConvTransposeConsumer(),)
PRODUCERS = (ConvTransposeProducer(),)
