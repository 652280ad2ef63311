"""The interface every fold rule implements, and what a rule module exports.

A rule module (one family, e.g. `linear_conv.py`) defines any of:
- `CONSUMERS`: rules for a layer that reads the pair's output h' = W h + c on its input,
- `PRODUCERS`: rules for the op that writes h (the pair then replaces h on every edge),
- `ALGEBRA`: the Target rules (by name) its folds use, as `Algebra` (pure float64 tensor maps).
`surgery.rewrites` finds every module of the package that exports them; nothing else lists rules.
A rule's `check` returns why it does not apply (None when it does); `fold` is called only after a
passing check and returns everything the site needs, in the order the algebra must run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from surgery.ir.graph import Layout, Op
from surgery.plan import Placement, Target

from .common import RuleContext

Tensors = dict[str, torch.Tensor]


@dataclass
class Fold:
    """What a rule gives its site: the parameter updates (applied in this order), where the paired
    model runs the pair until it is folded, which weights absorb it (for people), and notes."""

    targets: list[Target]
    placements: list[Placement]
    absorbed: list[str]
    notes: list[str] = field(default_factory=list)


class ConsumerRule(Protocol):
    """A layer reading h (as its first input, in `layout`) absorbs W into its weights."""

    kinds: tuple[str, ...]  # the op kinds (surgery.ir.graph.KINDS) the rule looks at

    def check(self, op: Op, layout: Layout, ctx: RuleContext) -> str | None: ...

    def fold(self, op: Op, layout: Layout, ctx: RuleContext) -> Fold: ...


class ProducerRule(Protocol):
    """The op writing h absorbs W (and c) into its weights: the pair replaces h on every edge."""

    kinds: tuple[str, ...]
    route_kind: str  # how the block table names the route, e.g. "producer embedding"

    def check(self, op: Op, ctx: RuleContext) -> str | None: ...

    def fold(self, op: Op, ctx: RuleContext) -> Fold: ...


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


def factor_steps(
    side: str, widen: torch.Tensor, narrow: torch.Tensor, c: torch.Tensor | None
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The (W, c) steps that apply W = M2 M1 as its factors on `side` (see Algebra.factors)."""
    first, second = (narrow, widen) if side == "input" else (widen, narrow)
    return [(first, None), (second, c)]
