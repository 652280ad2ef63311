"""Producer embedding table: h = E[ids] with E of shape [num, dim].

    W·E[i] + c = (E Wᵀ + 1 cᵀ)[i]
so every row absorbs W and the pair bias: E' = E Wᵀ + c (a lookup returns exactly one row).
"""

from __future__ import annotations

from surgery.graph import Op
from surgery.plan import Placement, Target

from .common import RuleContext, feature_axis, unshared_reason, where


class EmbeddingProducer:
    """h is an nn.Embedding lookup: fold W (and the pair bias) into every row of the table."""

    kinds = ("embedding",)

    def check(self, op: Op, ctx: RuleContext) -> str | None:
        if op.attrs.get("max_norm") is not None:
            return f"embedding {where(op)} renormalises rows (max_norm): W would change the norms"
        return unshared_reason(op, ctx)

    def targets(self, op: Op, ctx: RuleContext) -> list[Target]:
        return [Target("embedding_table", {"weight": op.params["weight"]}, axis=1)]

    def placements(self, op: Op) -> list[Placement]:
        return [Placement(op.module or "", "output", feature_axis(op))]
