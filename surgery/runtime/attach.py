"""From chosen boundaries to a Plan, and from a Plan to a model with its pairs attached.

Shared by insert_pairs (the user's pairs) and the numeric self-check (random pairs on every
candidate site), so both build paired models the same way.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

from surgery.analysis.blocks import BlockTable, Boundary
from surgery.errors import PlanError
from surgery.plan import PROBE_ONLY, Plan, Route, Site, pair_param_name, pair_roles
from surgery.rewrites.insert import attach, detach
from surgery.runtime.pairs import INITS, Pair, PairDict

Chosen = list[tuple[Boundary, int, bool]]  # boundary, D, probe only


def build_plan(table: BlockTable, chosen: Chosen, bias: bool) -> Plan:
    """The Plan for the chosen boundaries (D each; probe-only or folding), in the order given."""
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
        params = {role: pair_param_name(key, role) for role in pair_roles(route is None, bias)}
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


def apply_plan(
    model: nn.Module, plan: Plan, *, init: str | Callable[[Pair, Site], None] = "identity"
) -> nn.Module:
    """A copy of `model` with the pairs of `plan` attached (e.g. to rebuild a paired model whose
    state_dict was saved: apply the saved plan to a fresh model, then load the state_dict)."""
    check_places(model, plan)
    paired = copy.deepcopy(model)
    attach(paired, plan, make_pairs(model, plan, init))
    paired.plan = plan
    return paired


def check_places(model: nn.Module, plan: Plan) -> None:
    """Refuse a plan that places a pair on a module `model` does not have (PlanError naming it)."""
    modules = dict(model.named_modules())
    for site in plan.sites:
        for p in [*site.route.placements, *([site.probe] if site.probe else [])]:
            if p.module not in modules:
                raise PlanError(
                    f"the plan places site {site.name!r} on module {p.module!r}, which "
                    f"{type(model).__name__} does not have: the plan belongs to another model"
                )


@contextlib.contextmanager
def attached(
    model: nn.Module, plan: Plan, *, init: str | Callable[[Pair, Site], None] = "identity"
) -> Iterator[nn.Module]:
    """`model` itself with the plan's pairs attached for the duration of the block, then detached
    again (no copy: for short-lived paired forwards such as the self-check's)."""
    attach(model, plan, make_pairs(model, plan, init))
    try:
        yield model
    finally:
        detach(model)


def make_pairs(
    model: nn.Module,
    plan: Plan,
    init: str | Callable[[Pair, Site], None] = "identity",
    dtype: torch.dtype | None = None,
) -> PairDict:
    """The plan's pairs on `model`'s device and dtype (or `dtype`), initialised by `init` (not on
    meta)."""
    device, own = _device_dtype(model)
    dtype = dtype or own
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
    return PairDict(pairs)


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
