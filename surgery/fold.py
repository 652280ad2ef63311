"""fold: apply each site's recipe to the weights, in float64, and drop the pairs.

`fold_state_dict` is pure tensor algebra on a state_dict (no model code), so checkpoints can be folded
on their own; `fold` wraps it for a live paired model and returns the user's class.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from surgery.rewrites import RULES
from surgery.rewrites.insert import detach

from .errors import FoldError
from .plan import Plan, Site


def pair_product(
    state: Mapping[str, torch.Tensor], site: Site
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, c) of a site's pair in float64: the pair maps h to W h + c."""
    try:
        m1 = state[site.params["widen.weight"]].double()
        m2 = state[site.params["narrow.weight"]].double()
    except KeyError as missing:
        raise FoldError(
            f"site {site.name!r}: the state_dict has no pair tensor {missing}"
        ) from None
    if tuple(m1.shape) != (site.D, site.d) or tuple(m2.shape) != (site.d, site.D):
        raise FoldError(
            f"site {site.name!r}: pair shapes {tuple(m1.shape)}, {tuple(m2.shape)} do not match the plan "
            f"(widen {site.D}x{site.d}, narrow {site.d}x{site.D})"
        )
    W = m2 @ m1
    if not site.bias:
        return W, None
    c = m2 @ state[site.params["widen.bias"]].double() + state[site.params["narrow.bias"]].double()
    return W, c


def fold_state_dict(state: Mapping[str, torch.Tensor], plan: Plan) -> dict[str, torch.Tensor]:
    """The thin state_dict: every recipe applied in plan order, in float64, cast back to each
    parameter's dtype; pair tensors dropped, every other entry passed through untouched."""
    work: dict[str, torch.Tensor] = {}

    def current(name: str, site: Site) -> torch.Tensor:
        if name not in work:
            if name not in state:
                raise FoldError(
                    f"site {site.name!r}: the recipe names {name!r}, which the state_dict lacks"
                )
            work[name] = state[name].detach().to(torch.float64)
        return work[name]

    for site in plan.sites:
        if not site.route.targets:
            continue  # a probe-only site: its widen map is dropped, nothing was inserted
        W, c = pair_product(state, site)
        for target in site.route.targets:
            tensors = {role: current(name, site) for role, name in target.params.items()}
            for role, value in RULES[target.rule](target, tensors, W, c).items():
                name = target.params[role]
                if value.shape != work[name].shape:
                    raise FoldError(
                        f"site {site.name!r}: {target.rule} changed the shape of {name}"
                    )
                work[name] = value
    pair_keys = plan.pair_keys()
    thin = {k: v for k, v in state.items() if k not in pair_keys}
    for name, value in work.items():
        thin[name] = value.to(state[name].dtype)
    return thin


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def plan_of(paired: nn.Module) -> Plan:
    plan = getattr(unwrap(paired), "plan", None)
    if not isinstance(plan, Plan):
        raise FoldError(
            f"{type(paired).__name__} is not a paired model (it has no surgery plan): pass the result of surgery.insert_pairs"
        )
    return plan


def strip_pairs(paired: nn.Module) -> nn.Module:
    """A copy of the paired model without pairs and hooks: the original architecture."""
    thin = copy.deepcopy(unwrap(paired))
    detach(thin)
    return thin


def fold(paired: nn.Module) -> nn.Module:
    """Merge every pair into the adjacent layers: an instance of the original model's class with
    exactly the original state_dict keys and shapes (BatchNorm folds assume eval mode)."""
    plan = plan_of(paired)
    thin = strip_pairs(paired)
    thin.load_state_dict(fold_state_dict(unwrap(paired).state_dict(), plan), strict=True)
    return thin
