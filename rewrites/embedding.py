"""Producer embedding table: h = E[ids] with E of shape [num, dim].

    W·E[i] + c = (E Wᵀ + 1 cᵀ)[i]
so every row absorbs W and the pair bias: E' = E Wᵀ + c (a lookup returns exactly one row).
"""

from __future__ import annotations

import torch

from surgery.ir.graph import Op
from surgery.plan import Placement, Target

from . import algebra
from .common import RuleContext, feature_axis, unshared_reason, where
from .rule import Algebra, Fold, Tensors


class EmbeddingProducer:
    """h is an nn.Embedding lookup: fold W (and the pair bias) into every row of the table."""

    kinds = ("embedding",)
    route_kind = "producer embedding"

    def check(self, op: Op, ctx: RuleContext) -> str | None:
        if op.attrs.get("max_norm") is not None:
            return f"embedding {where(op)} renormalises rows (max_norm): W would change the norms"
        return unshared_reason(op, ctx)

    def fold(self, op: Op, ctx: RuleContext) -> Fold:
        return Fold(
            [Target("embedding_table", {"weight": op.params["weight"]}, axis=1)],
            [Placement(op.module or "", "output", feature_axis(op))],
            [op.params["weight"]],
        )


class EmbeddingSumProducer:
    """h is a sum of embedding lookups (token + position + type): every table absorbs the same W,
    one of them takes the pair bias:  W (E1[i] + E2[j]) + c = (E1 Wᵀ + c)[i] + (E2 Wᵀ)[j]."""

    kinds = ("add",)
    route_kind = "producer embedding sum"

    def tables(self, op: Op, ctx: RuleContext) -> list[Op] | str:
        """The embedding ops summed into `op`, or why `op` is not such a sum."""
        found: list[Op] = []
        for name in op.inputs:
            src = ctx.flow.ops[name]
            if len(ctx.users[name]) != 1:
                return f"{where(src)} also feeds other ops than the sum"
            if src.kind == "embedding":
                found.append(src)
            elif src.kind == "add":
                inner = self.tables(src, ctx)
                if isinstance(inner, str):
                    return inner
                found += inner
            else:
                return "a residual add absorbs nothing (only a sum of embedding lookups can)"
        return found

    def check(self, op: Op, ctx: RuleContext) -> str | None:
        tables = self.tables(op, ctx)
        if isinstance(tables, str):
            return tables
        for table in tables:
            reason = EmbeddingProducer().check(table, ctx)
            if reason:
                return reason
        return None

    def fold(self, op: Op, ctx: RuleContext) -> Fold:
        tables = self.tables(op, ctx)
        assert not isinstance(tables, str)
        return Fold(
            [
                Target("embedding_table", {"weight": t.params["weight"]}, axis=1, add_bias=i == 0)
                for i, t in enumerate(tables)
            ],
            [
                Placement(t.module or "", "output", feature_axis(t), bias=i == 0)
                for i, t in enumerate(tables)
            ],
            [t.params["weight"] for t in tables],
        )


def _embedding_table(t: Target, p: Tensors, W: torch.Tensor, c: torch.Tensor | None) -> Tensors:
    table = algebra.absorb_output(p["weight"], W, t.axis)
    return {"weight": table + c if c is not None and t.add_bias else table}


PRODUCERS = (EmbeddingProducer(), EmbeddingSumProducer())
ALGEBRA = {"embedding_table": Algebra(_embedding_table, "output")}
