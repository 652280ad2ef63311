"""Rules for nn.Linear and nn.Conv{1,2,3}d (groups == 1).

Consumer (the layer reads W h + c):  y = A (W h + c) + b  =  (A W) h + (b + A c)
    A' = A W on the input-channel dim, any kernel size, stride, dilation and zero padding (W 0 = 0);
    the pair bias folds into b only if the layer has a bias and no zero padding (a padded tap would
    see 0 where the paired model sees c).
Producer (the pair reads the layer's output, on every edge):  W (A x + b) + c  =  (W A) x + (W b + c).
"""

from __future__ import annotations

from surgery.graph import Layout, Op
from surgery.plan import Placement, Target

from .common import RuleContext, feature_axis, unshared_reason, where


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

    def targets(self, op: Op, layout: Layout, ctx: RuleContext) -> list[Target]:
        in_axis, out_axis = weight_axes(op)
        found = []
        if ctx.bias:
            found.append(
                Target(
                    "input_bias",
                    {"weight": op.params["weight"], "bias": op.params["bias"]},
                    axis=in_axis,
                    out_axis=out_axis,
                    outer=layout.outer,
                    inner=layout.inner,
                )
            )
        found.append(
            Target(
                "input_weight",
                {"weight": op.params["weight"]},
                axis=in_axis,
                outer=layout.outer,
                inner=layout.inner,
            )
        )
        return found

    def placement(self, op: Op, layout: Layout) -> Placement:
        return Placement(op.module or "", "input", layout.axis, layout.outer, layout.inner)

    def absorbed(self, op: Op) -> str:
        return op.params["weight"]


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
        reason = writer_reason(op, ctx)
        if reason:
            return reason
        if ctx.bias and "bias" not in op.params:
            return f"{where(op)} has no bias to absorb the pair's bias (use bias=False)"
        return None

    def targets(self, op: Op, ctx: RuleContext) -> list[Target]:
        found = [Target("output_weight", {"weight": op.params["weight"]}, axis=weight_axes(op)[1])]
        if "bias" in op.params:
            found.append(Target("output_bias", {"bias": op.params["bias"]}))
        return found

    def placements(self, op: Op, ctx: RuleContext) -> list[Placement]:
        return [Placement(op.module or "", "output", feature_axis(op))]
