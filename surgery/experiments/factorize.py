"""Linear bottleneck (Golubeva, Neyshabur, Gur-Ari, method a): every Linear/Conv weight W becomes a
product of two layers, `second(first(x))`, and contracts back to the original layers exactly.

- Linear [out, in]  -> Linear(in, r) then Linear(r, out) (the bias stays on the second);
- Conv [out, in/g, *k] -> the same conv (kernel, stride, padding, dilation, groups) to g·r channels,
  then a 1 x 1 conv to `out` with the same groups (the paper's footnote: k x k, then 1 x 1).

`factorize` initialises the factors from a truncated SVD (exact at full rank) or at random; the
bottleneck width is a rank (absolute or a fraction of each layer's full rank) or a parameter budget.
`contract` applies each site's recipe (the `factor_product` rule of surgery.rewrites.RULES) in
float64 and returns an instance of the user's class with the original state_dict keys and shapes;
`contract_state_dict` does the same on a bare state_dict, with no model code.
"""

from __future__ import annotations

import copy
import heapq
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from surgery.errors import FoldError, PlanError
from surgery.files.jsontext import dataclass_json, from_data, parse_json
from surgery.plan import Target
from surgery.report import render_table
from surgery.rewrites.factor import factor_svd, full_rank
from surgery.runtime.fold import apply_target
from surgery.runtime.models import unwrap

FACTOR_PLAN_VERSION = 2  # 1: a target's groups were stored in its `outer` field
FACTORIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
OUTPUT_ROLES = ("weight", "bias")  # roles a contraction writes; every other role is read
LayerFilter = Iterable[str] | Callable[[str, nn.Module], bool] | None


@dataclass
class FactorSite:
    """One factorized layer: its original weight shape, the bottleneck rank and the contraction."""

    name: str
    kind: str  # the original class name: Linear, Conv1d, Conv2d, Conv3d
    weight_shape: list[int]
    groups: int
    rank: int
    full_rank: int
    bias: bool
    params_before: int  # weight + bias of the original layer
    params_after: int  # both factors + bias
    target: Target  # rule "factor_product": roles first/second/second_bias -> weight/bias


@dataclass
class FactorPlan:
    """Where `factorize` put bottlenecks and how each contracts back (JSON-serialisable)."""

    model_class: str
    sites: list[FactorSite]
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it was left dense
    version: int = FACTOR_PLAN_VERSION

    def site(self, name: str) -> FactorSite:
        """The site of layer `name`."""
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(f"no factorized layer {name!r}")

    def to_json(self, indent: int | None = 1) -> str:
        """The plan as JSON (FactorPlan.from_json reads it back)."""
        return dataclass_json(self, indent)

    @classmethod
    def from_json(cls, text: str) -> FactorPlan:
        """A plan from `to_json` output."""
        data = parse_json(text)
        if data.get("version") == 1:  # saved before targets had a `groups` field
            for site in data.get("sites", []):
                target = site.get("target", {})
                target["groups"], target["outer"] = target.get("outer", 1), 1
            data["version"] = FACTOR_PLAN_VERSION
        if data.get("version") != FACTOR_PLAN_VERSION:
            raise ValueError(f"factor plan version {data.get('version')!r} is not supported")
        return from_data(cls, data)

    def table(self) -> str:
        """Per layer: shape, rank / full rank and parameters before and after."""
        rows = [
            [
                s.name,
                s.kind,
                "x".join(map(str, s.weight_shape)),
                f"{s.rank}/{s.full_rank}",
                s.params_before,
                s.params_after,
            ]
            for s in self.sites
        ]
        rows += [[name, "-", "-", "dense", "-", why] for name, why in self.skipped.items()]
        before = sum(s.params_before for s in self.sites)
        after = sum(s.params_after for s in self.sites)
        return render_table(
            f"Linear bottleneck of {self.model_class}",
            ["layer", "kind", "weight", "rank", "params before", "params after"],
            rows,
            caption=f"factorized layers: {before} -> {after} parameters",
        )

    def __str__(self) -> str:
        return self.table()


class Factorized(nn.Module):
    """A Linear or Conv as `second(first(x))` with a rank-r bottleneck (r per group)."""

    def __init__(self, layer: nn.Module, rank: int, init: str = "svd") -> None:
        super().__init__()
        if type(layer) not in FACTORIZABLE:
            raise TypeError(f"cannot factorize {type(layer).__name__}")
        weight = layer.weight
        groups = getattr(layer, "groups", 1)
        self.kind = type(layer).__name__
        self.groups = groups
        self.rank = rank
        self.full_rank = full_rank(tuple(weight.shape), groups)
        if not 1 <= rank <= self.full_rank:
            raise PlanError(f"rank {rank} is outside 1..{self.full_rank} for {self.kind}")
        has_bias = layer.bias is not None
        kw = {"device": weight.device, "dtype": weight.dtype}
        if isinstance(layer, nn.Linear):
            self.first = nn.Linear(layer.in_features, rank, bias=False, **kw)
            self.second = nn.Linear(rank, layer.out_features, bias=has_bias, **kw)
        else:
            conv = type(layer)
            self.first = conv(
                layer.in_channels,
                groups * rank,
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                groups=groups,
                bias=False,
                padding_mode=layer.padding_mode,
                **kw,
            )
            self.second = conv(
                groups * rank, layer.out_channels, 1, groups=groups, bias=has_bias, **kw
            )
        # the original layer without weights: `contract` rebuilds it (user subclass state included)
        object.__setattr__(self, "_skeleton", copy.deepcopy(layer).to("meta"))
        if init == "svd":
            with torch.no_grad():
                first, second = factor_svd(weight.detach(), rank, groups)
                self.first.weight.copy_(first)
                self.second.weight.copy_(second)
                if has_bias:
                    self.second.bias.copy_(layer.bias.detach())
        elif init != "random":
            raise PlanError(f"init must be 'svd' or 'random', got {init!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def original(self) -> nn.Module:
        """An empty instance of the original layer on this module's device and dtype."""
        weight = self.first.weight
        return copy.deepcopy(self._skeleton).to_empty(device=weight.device).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.kind}, rank={self.rank}/{self.full_rank}, groups={self.groups}"


def _layer_params(shape: list[int], bias: bool) -> int:
    return math.prod(shape) + (shape[0] if bias else 0)


def _rank_cost(shape: list[int], groups: int) -> int:
    """Parameters per unit of rank: first g·r x (in/g)·K, second out x r, so r·(in·K + out)."""
    out, per_group_in, *kernel = shape
    return out + groups * per_group_in * math.prod(kernel)


def _select(model: nn.Module, layers: LayerFilter) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers to factorize, and why the other Linear/Conv-like layers are left dense."""
    chosen: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    names = None if layers is None or callable(layers) else set(layers)
    for name, module in model.named_modules():
        if callable(layers):
            wanted = bool(layers(name, module))
        else:
            wanted = names is None or name in names
        if not name or not wanted:
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        looks_like = isinstance(module, FACTORIZABLE) or isinstance(module, nn.modules.conv._ConvNd)
        if isinstance(parent, nn.MultiheadAttention) and looks_like:
            skipped[name] = "read directly by MultiheadAttention (its forward is never called)"
        elif type(module) not in FACTORIZABLE:
            if names is not None or looks_like:
                skipped[name] = f"{type(module).__name__} is not exactly one of Linear/Conv1-3d"
        elif len(paths[id(module)]) > 1:
            skipped[name] = f"shared module (also {', '.join(paths[id(module)][1:])})"
        elif any(len(owners[id(p)]) > 1 for p in module.parameters(recurse=False)):
            skipped[name] = "its weight is tied to another module"
        elif module._forward_hooks or module._forward_pre_hooks:
            skipped[name] = "has forward hooks (a paired or masked layer)"
        else:
            chosen[name] = module
    if names is not None:
        for missing in names - set(chosen) - set(skipped):
            raise PlanError(f"no layer named {missing!r} in {type(model).__name__}")
    return chosen, skipped


def _ranks(
    chosen: dict[str, nn.Module], rank: int | float | None, budget: int | None, other: int
) -> dict[str, int]:
    """Rank per layer: full, a fixed rank / fraction of full rank, or the largest uniform fraction
    of full rank that fits `budget` parameters in total, topped up greedily."""
    shapes = {n: list(m.weight.shape) for n, m in chosen.items()}
    fulls = {n: full_rank(shapes[n], getattr(m, "groups", 1)) for n, m in chosen.items()}
    if budget is None:
        if rank is None:
            return fulls
        if isinstance(rank, bool) or not isinstance(rank, (int, float)) or rank <= 0:
            raise PlanError(f"rank must be a positive int or a fraction in (0, 1], got {rank!r}")
        if isinstance(rank, int):
            return {n: min(rank, f) for n, f in fulls.items()}
        if rank > 1:
            raise PlanError(f"a fractional rank must be in (0, 1], got {rank}")
        return {n: max(1, round(rank * f)) for n, f in fulls.items()}
    cost = {n: _rank_cost(shapes[n], getattr(m, "groups", 1)) for n, m in chosen.items()}
    room = budget - other
    if room < sum(cost.values()):
        raise PlanError(
            f"a budget of {budget} parameters cannot hold rank 1 everywhere "
            f"(needs {other + sum(cost.values())})"
        )

    def at(alpha: float) -> dict[str, int]:
        return {n: max(1, math.floor(alpha * f)) for n, f in fulls.items()}

    lo, hi = 0.0, 1.0
    if sum(cost[n] * r for n, r in at(hi).items()) <= room:
        lo = hi
    else:
        for _ in range(60):
            mid = (lo + hi) / 2
            if sum(cost[n] * r for n, r in at(mid).items()) <= room:
                lo = mid
            else:
                hi = mid
    ranks = at(lo)
    left = room - sum(cost[n] * r for n, r in ranks.items())
    heap = [(ranks[n] / fulls[n], n) for n in ranks if ranks[n] < fulls[n]]
    heapq.heapify(heap)
    while heap:  # top up the relatively narrowest bottlenecks while they fit
        _, n = heapq.heappop(heap)
        if cost[n] <= left and ranks[n] < fulls[n]:
            ranks[n] += 1
            left -= cost[n]
            if ranks[n] < fulls[n]:
                heapq.heappush(heap, (ranks[n] / fulls[n], n))
    return ranks


def count_parameters(model: nn.Module) -> int:
    """Number of parameter entries (each shared tensor once)."""
    return sum(p.numel() for p in model.parameters())


def factorize(
    model: nn.Module,
    *,
    rank: int | float | None = None,
    params: int | float | None = None,
    init: str = "svd",
    layers: LayerFilter = None,
) -> nn.Module:
    """A copy of `model` with every Linear/Conv1-3d (or `layers`) replaced by a rank-r product.

    `rank`: an int (capped at each layer's full rank) or a fraction of each layer's full rank;
    `params`: a budget for the whole model's parameter count (an int, or a float = fraction of the
    original count), met by the largest uniform fraction of full rank, then topped up greedily;
    neither: full rank. `init="svd"` (exact at full rank) or `"random"` (PyTorch defaults).
    The result has `.factor_plan` (a FactorPlan); `contract` turns it back into `model`'s class."""
    model = unwrap(model)
    if hasattr(model, "factor_plan"):
        raise PlanError("the model is already factorized: contract it first")
    if rank is not None and params is not None:
        raise PlanError("give rank or params, not both")
    chosen, skipped = _select(model, layers)
    if not chosen:
        raise PlanError(f"{type(model).__name__} has no Linear/Conv layer to factorize")
    budget = None
    if params is not None:
        budget = round(params * count_parameters(model)) if isinstance(params, float) else params
    dense = sum(m.weight.numel() for m in chosen.values())
    ranks = _ranks(chosen, rank, budget, count_parameters(model) - dense)
    factored = copy.deepcopy(model)
    sites = []
    for name, layer in chosen.items():
        shape = list(layer.weight.shape)
        groups = getattr(layer, "groups", 1)
        has_bias = layer.bias is not None
        target_params = {
            "first": f"{name}.first.weight",
            "second": f"{name}.second.weight",
            "weight": f"{name}.weight",
        }
        if has_bias:
            target_params |= {"second_bias": f"{name}.second.bias", "bias": f"{name}.bias"}
        sites.append(
            FactorSite(
                name=name,
                kind=type(layer).__name__,
                weight_shape=shape,
                groups=groups,
                rank=ranks[name],
                full_rank=full_rank(shape, groups),
                bias=has_bias,
                params_before=_layer_params(shape, has_bias),
                params_after=ranks[name] * _rank_cost(shape, groups)
                + (shape[0] if has_bias else 0),
                target=Target(rule="factor_product", params=target_params, groups=groups),
            )
        )
        factored.set_submodule(name, Factorized(factored.get_submodule(name), ranks[name], init))
    factored.factor_plan = FactorPlan(type(model).__name__, sites, skipped)
    return factored


def contract_state_dict(
    state: Mapping[str, torch.Tensor], plan: FactorPlan
) -> dict[str, torch.Tensor]:
    """The original state_dict: each site's factors contracted by its recipe in float64 and cast
    back to the factors' dtype; every other entry passed through untouched (no model code)."""
    produced: dict[str, dict[str, torch.Tensor]] = {}  # first factor key -> contracted tensors
    consumed: set[str] = set()
    for site in plan.sites:
        t = site.target
        work: dict[str, torch.Tensor] = {}
        apply_target(t, f"layer {site.name!r}", work, state, [(None, None)], writes=OUTPUT_ROLES)
        weight = work[t.params["weight"]]
        if list(weight.shape) != site.weight_shape:
            raise FoldError(
                f"layer {site.name!r}: contracted weight {tuple(weight.shape)} is not "
                f"the original {tuple(site.weight_shape)}"
            )
        dtype = state[t.params["first"]].dtype
        outputs = [t.params[r] for r in OUTPUT_ROLES if r in t.params]
        produced[t.params["first"]] = {name: work[name].to(dtype) for name in outputs}
        consumed |= {name for role, name in t.params.items() if role not in OUTPUT_ROLES}
    thin: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in produced:
            thin.update(produced[key])
        elif key not in consumed:
            thin[key] = value
    return thin


def contract(factorized: nn.Module) -> nn.Module:
    """Multiply every bottleneck back into one layer: an instance of the original model's class
    with exactly the original state_dict keys and shapes (float64 algebra, cast back)."""
    factorized = unwrap(factorized)
    plan = getattr(factorized, "factor_plan", None)
    if not isinstance(plan, FactorPlan):
        raise FoldError(
            f"{type(factorized).__name__} is not factorized (no factor_plan): pass the result of surgery.factorize"
        )
    thin = copy.deepcopy(factorized)
    for site in plan.sites:
        layer = thin.get_submodule(site.name)
        if not isinstance(layer, Factorized):
            raise FoldError(f"{site.name!r} is not a Factorized module any more")
        thin.set_submodule(site.name, layer.original())
    del thin.factor_plan
    thin.load_state_dict(contract_state_dict(factorized.state_dict(), plan), strict=True)
    return thin
