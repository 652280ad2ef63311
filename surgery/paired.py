"""insert_pairs: choose sites and widths (the Plan), then build the trainable paired model."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from surgery.rewrites.insert import attach

from .blocks import BlockTable, Boundary, analyse
from .capture import capture
from .errors import PlanError
from .pairs import INITS, Pair, PairDict
from .plan import PROBE_ONLY, Plan, Route, Site

Wide = float | int | Mapping[str, int]
Chosen = list[tuple[Boundary, int, bool]]  # boundary, D, probe only


def insert_pairs(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    wide: Wide = 2.0,
    init: str | Callable[[Pair, Site], None] = "identity",
    sites: str | Sequence[str] = "auto",
    probes: Sequence[str] = (),
    bias: bool = False,
) -> nn.Module:
    """A copy of `model` with a widen/narrow pair at each chosen block boundary.

    wide: a multiplier (D = ceil(wide * d), >= 1) or a mapping site -> D.
    init: "identity" (M2 M1 = I to float precision: the copy computes what `model` does), "random"
        (a generic non-identity pair), or a callable `init(pair, site)`.
    sites: "auto" (every boundary that can fold) or names from `find_blocks` (aliases work too).
    probes: boundaries that only get a widen map M1 for the WIN probe, nothing inserted into the
        forward (e.g. the residual stream between pre-LN transformer blocks, which cannot fold).
    bias: give the pairs biases (fewer boundaries can absorb them).

    The result is an instance of the model's own class with `.pairs` (site -> Pair with `.widen` and
    `.narrow`) and `.plan` (a JSON-serialisable surgery.Plan); read the WIN probes M1(h) with
    `surgery.probe(paired)`. `model` itself is not modified."""
    plan = plan_pairs(model, example_inputs, wide=wide, sites=sites, probes=probes, bias=bias)
    return apply_plan(model, plan, init=init)


def plan_pairs(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    wide: Wide = 2.0,
    sites: str | Sequence[str] = "auto",
    probes: Sequence[str] = (),
    bias: bool = False,
) -> Plan:
    """The Plan insert_pairs would follow (same arguments), without building anything: works on a
    model on the meta device, so a 7B-parameter model can be planned with no weight memory."""
    for attr in ("pairs", "plan"):
        if hasattr(model, attr):
            raise PlanError(
                f"{type(model).__name__} already has an attribute {attr!r}: is it already paired? "
                "Fold it first (surgery.fold) or pass the original model"
            )
    flow = capture(model, example_inputs)
    table = analyse(flow, bias=bias, inside_blocks=True)
    probes = [probes] if isinstance(probes, str) else list(probes)
    chosen = _choose(table, sites, wide, probes) + _choose_probes(table, probes, wide)
    if not chosen:
        raise PlanError(
            "no sites and no probes chosen: pass sites='auto' or names from surgery.find_blocks"
        )
    order = {name: i for i, name in enumerate(flow.ops)}
    chosen.sort(key=lambda item: order[item[0].tensor])
    return _plan(table, chosen, bias)


def apply_plan(
    model: nn.Module, plan: Plan, *, init: str | Callable[[Pair, Site], None] = "identity"
) -> nn.Module:
    """A copy of `model` with the pairs of `plan` attached (e.g. to rebuild a paired model whose
    state_dict was saved: apply the saved plan to a fresh model, then load the state_dict)."""
    paired = copy.deepcopy(model)
    device, dtype = _device_dtype(model)
    init_fn = _init_fn(init)
    pairs = {}
    for site in plan.sites:
        pair = Pair(
            site.d,
            site.D,
            bias=site.bias,
            narrow=site.route.kind != PROBE_ONLY,
            device=device,
            dtype=dtype,
        )
        if device.type != "meta":
            init_fn(pair, site)
        pairs[site.name] = (site.key, pair)
    attach(paired, plan, PairDict(pairs))
    paired.plan = plan
    return paired


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _init_fn(init: str | Callable[[Pair, Site], None]) -> Callable[[Pair, Site], None]:
    if callable(init):
        return init
    if init not in INITS:
        raise PlanError(
            f"init must be one of {', '.join(INITS)} or a callable(pair, site), got {init!r}"
        )
    return INITS[init]


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
            reasons = "; ".join(f"{b.name}: {b.reason}" for b in table[:5])
            raise PlanError(
                f"no boundary of {table.flow.model_class} can absorb a pair ({reasons})"
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


def _plan(table: BlockTable, chosen: Chosen, bias: bool) -> Plan:
    sites: list[Site] = []
    names = [b.name for b, _, _ in chosen]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise PlanError(f"sites {twice} are named twice (in sites and probes, or by two aliases)")
    for boundary, D, probe_only in chosen:
        key = boundary.name.replace(".", "_").replace(":", "__")
        while any(s.key == key for s in sites):
            key += "_"
        route = None if probe_only else boundary.route
        maps = ("widen", "narrow") if route is not None else ("widen",)
        params = {
            f"{m}.{p}": f"pairs.{key}.{m}.{p}"
            for m in maps
            for p in (("weight", "bias") if bias else ("weight",))
        }
        sites.append(
            Site(
                name=boundary.name,
                tensor=boundary.tensor,
                shape=list(boundary.shape),
                feature_axis=boundary.feature_axis,
                d=boundary.width,
                D=D,
                bias=bias,
                route=route or Route(PROBE_ONLY, [], [], []),
                probe=boundary.probe,
                key=key,
                params=params,
            )
        )
    flow = table.flow
    return Plan(flow.model_class, flow.method, [list(s) for s in flow.example_shapes], sites)
