"""The front of the pipeline: find_blocks (capture -> analyse -> numeric self-check), plan_pairs
(choose sites and widths: the Plan) and insert_pairs (the trainable paired model)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from surgery.analysis.blocks import BlockTable, Boundary, analyse
from surgery.analysis.localcheck import recording
from surgery.analysis.selfcheck import self_check
from surgery.errors import PlanError
from surgery.ir.capture import as_example_inputs, capture
from surgery.plan import Plan, Site
from surgery.runtime.attach import Chosen, apply_plan, build_plan
from surgery.runtime.pairs import Pair

Wide = float | int | Mapping[str, int]


def find_blocks(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    bias: bool = False,
    inside_blocks: bool = False,
    check: bool | str = True,
) -> BlockTable:
    """Block boundaries of `model` with their fold routes or the reasons they cannot fold.

    `example_inputs`: a tensor or tuple of positional inputs (synthesised from the first layer when
    None). `bias`: plan for pairs with biases (fewer boundaries can absorb them). `inside_blocks`:
    also list the cuts inside the innermost blocks (e.g. between the layers of a chain-shaped block).
    `check`: prove every foldable site numerically on these weights and inputs first (random pairs,
    paired vs folded in float64; see surgery.analysis.selfcheck); a site that fails is refused.
    True (or "local"): each group of sites on the layers it touches, from one recorded forward
    (memory: one group's layers in float64); "full": a float64 copy of the whole model, paired and
    folded end to end; False: no check."""
    inputs = as_example_inputs(model, example_inputs)
    mode = "local" if check is True else check
    with recording(model) if mode == "local" else contextlib.nullcontext() as recorded:
        flow = capture(model, inputs)  # the local check replays from this forward's layer inputs
    table = analyse(flow, bias=bias, inside_blocks=inside_blocks)
    if check is False:
        return table
    return self_check(model, inputs, table, mode, recorded)


def insert_pairs(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    wide: Wide = 2.0,
    init: str | Callable[[Pair, Site], None] = "identity",
    sites: str | Sequence[str] = "auto",
    probes: Sequence[str] = (),
    bias: bool = False,
    check: bool | str = True,
) -> nn.Module:
    """A copy of `model` with a widen/narrow pair at each chosen block boundary.

    wide: a multiplier (D = ceil(wide * d), >= 1) or a mapping site -> D.
    init: "identity" (M2 M1 = I to float precision: the copy computes what `model` does), "random"
        (a generic non-identity pair), or a callable `init(pair, site)`.
    sites: "auto" (every boundary that can fold) or names from `find_blocks` (aliases work too).
    probes: boundaries that only get a widen map M1 for the WIN probe, nothing inserted into the
        forward (e.g. the residual stream between pre-LN transformer blocks, which cannot fold).
    bias: give the pairs biases (fewer boundaries can absorb them).
    check: prove each candidate site numerically first (see find_blocks); failing sites are refused.

    The result is an instance of the model's own class with `.pairs` (site -> Pair with `.widen` and
    `.narrow`) and `.plan` (a JSON-serialisable surgery.Plan); read the WIN probes M1(h) with
    `surgery.probe(paired)`. `model` itself is not modified."""
    plan = plan_pairs(
        model, example_inputs, wide=wide, sites=sites, probes=probes, bias=bias, check=check
    )
    return apply_plan(model, plan, init=init)


def plan_pairs(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    wide: Wide = 2.0,
    sites: str | Sequence[str] = "auto",
    probes: Sequence[str] = (),
    bias: bool = False,
    check: bool | str = True,
) -> Plan:
    """The Plan insert_pairs would follow (same arguments), without building anything: works on a
    model on the meta device, so a 7B-parameter model can be planned with no weight memory."""
    for attr in ("pairs", "plan"):
        if hasattr(model, attr):
            raise PlanError(
                f"{type(model).__name__} already has an attribute {attr!r}: is it already paired? "
                "Fold it first (surgery.runtime.fold) or pass the original model"
            )
    table = find_blocks(model, example_inputs, bias=bias, inside_blocks=True, check=check)
    flow = table.flow
    probes = [probes] if isinstance(probes, str) else list(probes)
    chosen = _choose(table, sites, wide, probes) + _choose_probes(table, probes, wide)
    if not chosen:
        raise PlanError(
            "no sites and no probes chosen: pass sites='auto' or names from surgery.find_blocks"
        )
    order = {name: i for i, name in enumerate(flow.ops)}
    chosen.sort(key=lambda item: order[item[0].tensor])
    return build_plan(table, chosen, bias)


def _lookup(table: BlockTable, name: str) -> Boundary:
    try:
        return table.get(name)
    except KeyError:
        foldable = ", ".join(b.name for b in table.foldable) or "none"
        raise PlanError(
            f"unknown site {name!r}. Boundaries that fold: {foldable} (see surgery.find_blocks)"
        ) from None


def _width(boundary: Boundary, wide: Wide) -> int:
    if isinstance(wide, Mapping):
        for key in [boundary.name, *boundary.aliases]:
            if key in wide:
                D = wide[key]
                break
        else:
            raise PlanError(
                f"wide has no width for site {boundary.name!r}; give every chosen site a D"
            )
        if isinstance(D, bool) or not isinstance(D, int) or D < boundary.width:
            raise PlanError(
                f"wide[{boundary.name!r}] must be an int D >= d = {boundary.width}, got {D!r}"
            )
        return D
    if isinstance(wide, bool) or not isinstance(wide, (int, float)) or not math.isfinite(wide):
        raise PlanError(f"wide must be a number >= 1 or a mapping site -> D, got {wide!r}")
    if wide < 1:
        raise PlanError(f"wide must be >= 1 (pairs widen d -> D = ceil(wide*d) >= d), got {wide}")
    return math.ceil(wide * boundary.width)


def _choose(
    table: BlockTable, sites: str | Sequence[str], wide: Wide, probes: Sequence[str]
) -> Chosen:
    if isinstance(sites, str) and sites == "auto":
        if isinstance(wide, Mapping):
            picked = [_lookup(table, name) for name in wide if name not in probes]
        else:
            picked = [b for b in table if b.foldable and not b.inside_block]
        if not picked:
            raise PlanError(
                f"no boundary of {table.flow.model_class} can absorb a pair ({table.why_no_sites})"
            )
    else:
        picked = [_lookup(table, name) for name in ([sites] if isinstance(sites, str) else sites)]
    picked = list({b.tensor: b for b in picked}.values())
    for b in picked:
        if not b.foldable:
            hint = " (pass it in probes= to read its WIN probe only)" if b.probe is not None else ""
            raise PlanError(f"site {b.name!r} cannot fold: {b.reason}{hint}")
    return [(b, _width(b, wide), False) for b in picked]


def _choose_probes(table: BlockTable, probes: Sequence[str], wide: Wide) -> Chosen:
    picked = [_lookup(table, name) for name in probes]
    for b in picked:
        if b.probe is None:
            raise PlanError(
                f"site {b.name!r} cannot be probed: its tensor is neither a module's output nor a module's input"
            )
    return [(b, _width(b, wide), True) for b in picked]
