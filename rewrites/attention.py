"""Consumer rule for nn.MultiheadAttention's packed input projection.

Self-attention reads h as query, key and value through one in_proj_weight [3E, E]:
    in_proj(W h + c) = (in_proj_weight W) h + (in_proj_bias + in_proj_weight c)
so all three slices absorb the same W on their input dim, exactly as a Linear consumer does.
"""

from __future__ import annotations

from surgery.ir.graph import Layout, Op
from surgery.plan import Placement

from .common import RuleContext, unshared_reason, where
from .linear_conv import input_targets
from .rule import Fold


class PackedAttentionConsumer:
    """nn.MultiheadAttention with h as query, key and value and a packed in_proj_weight."""

    kinds = ("attention",)

    def check(self, op: Op, layout: Layout, ctx: RuleContext) -> str | None:
        if "in_proj_weight" not in op.params:
            return f"{where(op)} projects q, k and v with separate weights (kdim/vdim differ): no rule yet"
        if not op.attrs.get("self_attention"):
            return f"{where(op)}: query, key and value are not all h (cross-attention): no rule yet"
        rank = len(ctx.flow.ops[op.inputs[0]].shape or ())
        if layout.axis != rank - 1 or (layout.outer, layout.inner) != (1, 1):
            return f"{where(op)} contracts the last axis but the pair mixes axis {layout.axis}"
        reason = unshared_reason(op, ctx)
        if reason:
            return reason
        if ctx.bias and "in_proj_bias" not in op.params:
            return f"{where(op)} has no in_proj_bias to absorb the pair's bias (use bias=False)"
        return None

    def fold(self, op: Op, layout: Layout, ctx: RuleContext) -> Fold:
        weight = op.params["in_proj_weight"]
        bias = op.params["in_proj_bias"] if ctx.bias else None
        return Fold(
            input_targets(weight, bias, 1, 0, layout),
            # the pre-hook replaces every positional argument that is h: query, key and value
            [Placement(op.module or "", "input", layout.axis)],
            [weight],
        )


CONSUMERS = (PackedAttentionConsumer(),)
