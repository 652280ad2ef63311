"""analyse, part 2: for one boundary tensor h, find how a pair there folds (or every reason it cannot).

Consumer side first (the design prefers it): follow each edge of h through channel-commuting ops to
the layers that read it; each layer either absorbs W (a rule's check passes) or keeps h, with the
reason. If no edge absorbs, try the producer of h (it then replaces h on every edge).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from surgery.ir.graph import Layout, Op
from surgery.plan import Route
from surgery.rewrites import CONSUMER_RULES, PRODUCER_RULES, channel_ops
from surgery.rewrites.common import RuleContext, where
from surgery.rewrites.rule import ConsumerRule

_EDGE_REASONS = {
    "nonlinear": "{op} is not linear",
    "max_pool": "max-pool does not commute with a channel mix",
    "norm": "{op} normalises over the features",
    "add": "a residual add absorbs nothing",
    "batch_norm": "BatchNorm scales each channel on its own",
    "mul": "product with another tensor",
    "cat": "concatenation (no rule yet)",
    "matmul": "matmul of two activations",
    "attention": "attention (no rule yet)",
    "embedding": "an embedding reads indices, not features",
    "linear": "{op} reads h as a second argument",
    "conv": "{op} reads h as a second argument",
    "other": "{op}: no rule absorbs W",
}


def edge_reason(op: Op) -> str:
    """Why W cannot pass into `op`, for people."""
    text = _EDGE_REASONS.get(op.kind, "{op}: no rule absorbs W").format(op=op.op)
    why = op.attrs.get("why")
    return f"{text} ({why})" if why else text


@dataclass
class _ConsumerSearch:
    absorbing: list[tuple[ConsumerRule, Op, Layout]] = field(
        default_factory=list
    )  # rule, layer, layout
    kept: dict[str, str] = field(default_factory=dict)  # where -> why the edge keeps h


def _walk(tensor: Op, layout: Layout, ctx: RuleContext, found: _ConsumerSearch) -> None:
    if tensor.name in ctx.flow.outputs:
        found.kept["output"] = f"{tensor.name} is a model output"
    for user_name in ctx.users[tensor.name]:
        user = ctx.flow.ops[user_name]
        rule = next(
            (
                r
                for r in CONSUMER_RULES
                if user.kind in r.kinds and user.inputs[:1] == [tensor.name]
            ),
            None,
        )
        if rule is not None:
            reason = rule.check(user, layout, ctx)
            if reason is None:
                found.absorbing.append((rule, user, layout))
            else:
                found.kept[where(user)] = reason
        elif user.kind == "transparent":
            moved = channel_ops.propagate(user, layout, tensor.shape or (), bias=ctx.bias)
            if isinstance(moved, str):
                found.kept[where(user)] = moved
            else:
                _walk(user, moved, ctx, found)
        else:
            found.kept[where(user)] = edge_reason(user)


def consumer_route(
    head: Op, layout: Layout, ctx: RuleContext
) -> tuple[Route | None, dict[str, str]]:
    """The consumer-side route from h, or None and the reason of every edge."""
    found = _ConsumerSearch()
    _walk(head, layout, ctx, found)
    if not found.absorbing:
        return None, found.kept
    route = Route("consumer", [], [], [], kept=found.kept)
    for rule, op, at in found.absorbing:
        fold = rule.fold(op, at, ctx)
        route.targets += fold.targets
        route.placements += fold.placements
        route.absorbed_by += fold.absorbed
        route.notes += fold.notes
    return route, found.kept


def producer_route(head: Op, ctx: RuleContext) -> tuple[Route | None, str]:
    """The producer-side route of h (W replaces h on every edge), or None and why not."""
    if head.name in ctx.flow.outputs:
        return None, f"{head.name} is a model output: W would change it"
    for rule in PRODUCER_RULES:
        if head.kind not in rule.kinds:
            continue
        reason = rule.check(head, ctx)
        if reason is not None:
            return None, reason
        fold = rule.fold(head, ctx)
        return Route(
            rule.route_kind, fold.targets, fold.placements, fold.absorbed, notes=fold.notes
        ), ""
    return None, f"{where(head)}: {edge_reason(head)}"


def find_route(head: Op, layout: Layout, ctx: RuleContext) -> tuple[Route | None, str | None]:
    """Consumer route if any edge absorbs W, else producer route, else (None, every reason)."""
    route, kept = consumer_route(head, layout, ctx)
    if route is not None:
        return route, None
    route, producer_reason = producer_route(head, ctx)
    if route is not None:
        return route, None
    consumers = "; ".join(f"{at}: {why}" for at, why in kept.items()) or "none"
    return None, f"no consumer absorbs W ({consumers}); producer {producer_reason}"
