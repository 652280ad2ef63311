"""Non-linear bottleneck (Golubeva, Neyshabur, Gur-Ari, method b): widen every other layer and
narrow the rest so that the parameter count stays (at most, and as close as integers allow) the same.

The layers are paired as in the paper: the first layer of a pair gets a wider input and a narrower
output, so the second gets a narrower input and a wider output. On the width groups of
surgery.analysis.widths that means:
- a model with residual streams (ResNet-style): the streams (groups joined by residual adds) are
  widened by `factor` and the hidden widths inside the blocks are narrowed;
- a plain chain (MLP): the free hidden widths alternate narrow, wide, narrow, ... in forward order
  (`start="wide"` flips it), since the first layer's input (the data) cannot be widened.
The narrow widths are the original ones times one common scale b <= 1, the largest b that keeps the
count within the budget, then topped up one channel at a time while it still fits.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from surgery.analysis.widths import WidthTable, resize, width_groups
from surgery.errors import PlanError
from surgery.ir.capture import as_example_inputs


@dataclass
class BottleneckPlan:
    """The widths `nonlinear_bottleneck` chose, with the parameter counts."""

    widths: dict[str, int]  # group -> new width
    wide: list[str]
    narrow: list[str]
    params_before: int
    params_after: int
    table_text: str

    def table(self) -> str:
        """The width groups, old -> new width, and the parameter counts."""
        return self.table_text

    def __str__(self) -> str:
        return self.table_text


def roles(
    table: WidthTable, wide: Iterable[str] | None = None, start: str = "narrow"
) -> tuple[list[str], list[str]]:
    """(wide groups, narrow groups): given, residual streams vs hidden, or alternating."""
    free = [g.name for g in table.free]
    if wide is not None:
        wide = list(wide)
        for name in wide:
            if table[name].frozen:
                raise PlanError(f"width group {name!r} cannot change: {table[name].frozen}")
        return wide, [n for n in free if n not in wide]
    streams = [g.name for g in table.free if g.residual]
    hidden = [g.name for g in table.free if not g.residual]
    if streams and hidden:
        return streams, hidden
    if start not in ("narrow", "wide"):
        raise PlanError(f"start must be 'narrow' or 'wide', got {start!r}")
    first = 0 if start == "wide" else 1
    return free[first::2], free[1 - first :: 2]


def plan_bottleneck(
    model: nn.Module,
    factor: float,
    example_inputs: Any = None,
    *,
    wide: Iterable[str] | None = None,
    start: str = "narrow",
    params: int | None = None,
    table: WidthTable | None = None,
) -> BottleneckPlan:
    """The widths of the non-linear bottleneck of `model` (see `nonlinear_bottleneck`)."""
    if factor <= 1:
        raise PlanError(f"the widening factor must be > 1, got {factor}")
    table = table or width_groups(model, example_inputs)
    wide_groups, narrow_groups = roles(table, wide, start)
    if not wide_groups or not narrow_groups:
        raise PlanError(
            f"{type(model).__name__} needs at least two free hidden widths for a non-linear "
            f"bottleneck (free: {', '.join(g.name for g in table.free) or 'none'})"
        )
    budget = table.parameters() if params is None else params
    base = {name: max(1, round(factor * table[name].width)) for name in wide_groups}
    orig = {name: table[name].width for name in narrow_groups}

    def at(scale: float) -> dict[str, int]:
        return base | {n: max(1, math.floor(scale * w)) for n, w in orig.items()}

    if table.parameters(at(0.0)) > budget:
        raise PlanError(
            f"widening by {factor} needs {table.parameters(at(0.0))} parameters even with every "
            f"narrow width at 1; the budget is {budget}"
        )
    lo, hi = 0.0, 1.0
    if table.parameters(at(hi)) <= budget:
        lo = hi
    else:
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if table.parameters(at(mid)) <= budget else (lo, mid)
    widths = at(lo)
    heap = [(widths[n] / w, n) for n, w in orig.items() if widths[n] < w]
    heapq.heapify(heap)
    while heap:  # one more channel for the relatively narrowest group, while it fits
        _, n = heapq.heappop(heap)
        trial = widths | {n: widths[n] + 1}
        if table.parameters(trial) <= budget:
            widths = trial
            if widths[n] < orig[n]:
                heapq.heappush(heap, (widths[n] / orig[n], n))
    after = table.parameters(widths)
    text = table.table(
        widths,
        title=f"Non-linear bottleneck of {table.model_class}: wide x{factor} / narrow, "
        f"{after} of {budget} parameters",
    )
    return BottleneckPlan(widths, wide_groups, narrow_groups, table.parameters(), after, text)


def nonlinear_bottleneck(
    model: nn.Module,
    factor: float,
    example_inputs: Any = None,
    *,
    wide: Iterable[str] | None = None,
    start: str = "narrow",
    params: int | None = None,
    reinit: bool = True,
) -> nn.Module:
    """A copy of `model` with alternate widths widened by `factor` and the others narrowed so the
    parameter count stays within `params` (default: the original count). `.bottleneck_plan` says
    which widths changed and the counts; layers are freshly initialised unless `reinit=False`."""
    inputs = as_example_inputs(model, example_inputs)
    table = width_groups(model, inputs)
    plan = plan_bottleneck(
        model, factor, inputs, wide=wide, start=start, params=params, table=table
    )
    resized = resize(model, plan.widths, inputs, reinit=reinit, table=table)
    resized.bottleneck_plan = plan
    return resized
