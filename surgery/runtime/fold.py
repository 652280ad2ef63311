"""fold: apply each site's recipe to the weights, in float64, and drop the pairs.

`fold_state_dict` is pure tensor algebra on a state_dict (no model code), so checkpoints can be folded
on their own; `fold` wraps it for a live paired model and returns the user's class.
"""

from __future__ import annotations

import copy
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from surgery.analysis.unionfind import DisjointSets
from surgery.errors import FoldError
from surgery.plan import Plan, Site, Target
from surgery.rewrites import RULES
from surgery.rewrites.insert import attached_mismatch, detach
from surgery.rewrites.rule import factor_steps
from surgery.runtime import sharded
from surgery.runtime.models import plan_of, unwrap
from surgery.runtime.pairs import pair_map


class PairTensors:
    """A site's pair from a state_dict in float64: its factors M1, M2, the bias c and (formed on
    first use) W = M2 M1, so that the pair maps h to W h + c."""

    def __init__(self, state: Mapping[str, torch.Tensor], site: Site) -> None:
        pair = {role: state[name] for role, name in site.params.items() if name in state}
        _check_pair(site, {role: tuple(t.shape) for role, t in pair.items()})
        self.widen, self.narrow = pair["widen.weight"].double(), pair["narrow.weight"].double()
        biases = (pair["widen.bias"], pair["narrow.bias"]) if site.bias else (None, None)
        self._W, self.c = pair_map(self.widen, self.narrow, *biases) if site.bias else (None, None)

    @property
    def W(self) -> torch.Tensor:
        if self._W is None:
            self._W = self.narrow @ self.widen
        return self._W

    def steps(
        self, target: Target, factored: bool
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """How `target` takes the pair: W once, or (factored, where its rule allows) M2 and M1 in
        turn, cheaper when D is small against d (the self-check's low-rank pairs)."""
        algebra = RULES.get(target.rule)
        if factored and algebra is not None and algebra.factors:
            return factor_steps(algebra.factors, self.widen, self.narrow, self.c)
        return [(self.W, self.c)]


def _check_pair(site: Site, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise FoldError unless the pair's tensors (by role) are all there with the plan's widths."""
    expected = {
        "widen.weight": (site.D, site.d),
        "narrow.weight": (site.d, site.D),
        "widen.bias": (site.D,),
        "narrow.bias": (site.d,),
    }
    for role, name in site.params.items():
        if role not in shapes:
            raise FoldError(f"site {site.name!r}: the state_dict has no pair tensor {name!r}")
        if shapes[role] != expected.get(role):
            raise FoldError(
                f"site {site.name!r}: pair tensor {name} has shape {list(shapes[role])}, which does "
                f"not match the plan (widen {site.D}x{site.d}, narrow {site.d}x{site.D})"
            )
    if "widen.weight" not in site.params or "narrow.weight" not in site.params:
        raise FoldError(f"site {site.name!r}: the plan names no widen and narrow weights")


def fold_state_dict(
    state: Mapping[str, torch.Tensor], plan: Plan, *, factored: bool = False
) -> dict[str, torch.Tensor]:
    """The thin state_dict: every recipe applied in plan order, in float64, cast back to each
    parameter's dtype; pair tensors dropped, every other entry passed through untouched.
    `factored`: apply each pair as its two factors where the rule allows (see PairTensors.steps)."""
    check_plan(plan, {name: tuple(tensor.shape) for name, tensor in state.items()})
    pair_keys = plan.pair_keys()
    thin = OrderedDict((k, v) for k, v in state.items() if k not in pair_keys)
    for folded in fold_components(state, plan, factored=factored):
        for name, value in folded.items():
            # contiguous: FSDP2 refuses strided parameters (the algebra's permutes leave some)
            thin[name] = value.to(state[name].dtype).contiguous()
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:  # module versions: some _load_from_state_dict refuse a state without
        thin._metadata = OrderedDict(  # type: ignore[attr-defined]
            (prefix, info)
            for prefix, info in metadata.items()
            if prefix != "pairs" and not prefix.startswith("pairs.")
        )
    return thin


@dataclass
class Component:
    """Parameters linked by the plan's targets (they fold together) and their updates in plan order."""

    names: list[str]
    steps: list[tuple[Site, Target]]


def components(plan: Plan) -> list[Component]:
    """The plan's targets grouped into connected components of the parameters they touch, ordered by
    their first update. Updates of disjoint parameters commute, so folding component by component
    equals folding site by site, and only one component's tensors need to be in memory."""
    sets, index = DisjointSets(), {}
    steps = [(site, target) for site in plan.sites for target in site.route.targets]
    for _, target in steps:
        for name in target.params.values():
            if name not in index:
                index[name] = sets.add()
        first, *rest = target.params.values()
        for name in rest:
            sets.join(index[first], index[name])
    groups: dict[int, Component] = {}
    for site, target in steps:
        group = groups.setdefault(
            sets.find(index[next(iter(target.params.values()))]), Component([], [])
        )
        group.steps.append((site, target))
        group.names += [n for n in target.params.values() if n not in group.names]
    return list(groups.values())


def fold_components(
    state: Mapping[str, torch.Tensor], plan: Plan, *, factored: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Each component's folded parameters in float64, in plan order (see `components`).

    `state` is read lazily (a dict, or a checkpoint that reads tensors from disk on access): only the
    current component's parameters and the pair products a later component still needs are held."""
    groups = components(plan)
    uses = Counter(name for group in groups for name in _site_names(group))
    products: dict[str, PairTensors] = {}
    for group in groups:
        work: dict[str, torch.Tensor] = {}
        for site, target in group.steps:
            if site.name not in products:
                products[site.name] = PairTensors(state, site)
            steps = products[site.name].steps(target, factored)
            apply_target(target, f"site {site.name!r}", work, state, steps)
        for name in _site_names(group):
            uses[name] -= 1
            if not uses[name]:
                del products[name]
        yield work


def check_plan(plan: Plan, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise FoldError unless every tensor `plan` folds with is in `shapes` and every pair has the
    plan's widths: a check before any tensor is read (a layer whose shape does not fit its rule is
    refused by the rule's algebra when its component folds)."""
    try:
        plan.validate()
    except ValueError as error:
        raise FoldError(f"the plan is not valid: {error}") from None
    for site in plan.sites:
        if not site.route.targets:
            continue
        _check_pair(site, {role: shapes[n] for role, n in site.params.items() if n in shapes})
        for target in site.route.targets:
            for name in target.params.values():
                if name not in shapes:
                    raise FoldError(
                        f"site {site.name!r}: the recipe names {name!r}, which the state_dict lacks"
                    )


def _site_names(group: Component) -> list[str]:
    return list(dict.fromkeys(site.name for site, _ in group.steps))


def apply_target(
    target: Target,
    label: str,
    work: dict[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    steps: list[tuple[torch.Tensor | None, torch.Tensor | None]],
    writes: Iterable[str] = (),
) -> None:
    """One Target through its rule, in float64, on the working copies in `work` (each parameter read
    from `state` on first use), once per (W, c) of `steps` (see PairTensors.steps); `writes` names
    roles the rule creates rather than updates (a factor contraction writes a weight the state does
    not have). Raises FoldError naming `label`."""
    if target.rule not in RULES:
        raise FoldError(
            f"{label}: unknown fold rule {target.rule!r} (this surgery knows "
            f"{', '.join(RULES)}): re-plan with this version"
        )
    reads = {role: name for role, name in target.params.items() if role not in writes}
    for name in reads.values():
        if name not in work:
            if name not in state:
                raise FoldError(f"{label}: the recipe names {name!r}, which the state_dict lacks")
            work[name] = state[name].detach().to(torch.float64)
    tensors = {role: work[name] for role, name in reads.items()}
    updates: dict[str, torch.Tensor] = {}
    try:
        for W, c in steps:
            updates.update(RULES[target.rule](target, {**tensors, **updates}, W, c))
    except Exception as error:  # noqa: BLE001 - the algebra refusing its inputs means a bad recipe
        shapes = ", ".join(f"{n} {list(work[n].shape)}" for n in reads.values())
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FoldError(f"{label}: rule {target.rule} does not fit {shapes}: {detail}") from None
    for role, value in updates.items():
        name = target.params[role]
        if role in reads and value.shape != work[name].shape:
            raise FoldError(f"{label}: {target.rule} changed the shape of {name}")
        work[name] = value


def check_attached(model: nn.Module, plan: Plan) -> None:
    """Refuse to fold a paired model whose running pairs are not the ones its plan names."""
    why = attached_mismatch(model, plan)
    if why is not None:
        raise FoldError(f"refusing to fold: {why} (the model was changed after insert_pairs)")


def strip_pairs(paired: nn.Module) -> nn.Module:
    """A copy of the paired model without pairs and hooks: the original architecture."""
    thin = copy.deepcopy(unwrap(paired))
    detach(thin)
    return thin


def fold(
    paired: nn.Module, *, rank0_only: bool = False, factored: bool = False
) -> nn.Module | None:
    """Merge every pair into the adjacent layers: an instance of the original model's class with
    exactly the original state_dict keys and shapes (BatchNorm folds assume eval mode).
    A model sharded by FSDP2 (`fully_shard`) is gathered with the distributed state-dict API (every
    rank must call fold) and folded into a plain, unsharded model on every rank, or with rank0_only
    on rank 0 alone (the other ranks get None and hold no full copy). `factored`: apply each pair
    as its two factors where the rules allow (fewer multiply-adds when D < d / 2; equal up to
    float64 rounding, so not bit-identical to the default)."""
    plan = plan_of(paired)
    check_attached(unwrap(paired), plan)
    if sharded.is_sharded(paired):
        state = sharded.full_state_dict(unwrap(paired), rank0_only=rank0_only)
        if not state:
            return None  # rank0_only, and this is not rank 0
        thin = sharded.plain_copy(unwrap(paired))
        detach(thin)
        return sharded.load_full(thin, fold_state_dict(state, plan, factored=factored))
    thin = strip_pairs(paired)
    state = unwrap(paired).state_dict()
    thin.load_state_dict(fold_state_dict(state, plan, factored=factored), strict=True)
    return thin


def _row_local(group: Component, tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether every update of `group` maps each row (dim 0) of its tensors on its own, and FSDP2
    holds all of them by rows: then each rank folds its own shard with no traffic."""
    return all(
        RULES[t.rule].factors == "input" and t.axis != 0 and t.out_axis == 0
        for _, t in group.steps
        if t.rule in RULES
    ) and all(sharded.row_sharded(tensors[name]) for name in group.names)


@dataclass
class ShardedFold:
    """What `fold_sharded` did on this rank: the model (now thin, still sharded), the bytes this rank
    received to fold, the bytes of the whole model (every parameter and buffer, unsharded), and the
    tensors folded shard-locally (no traffic)."""

    model: nn.Module
    received: int
    model_bytes: int
    local: list[str]


def fold_sharded(paired: nn.Module) -> ShardedFold:
    """Fold an FSDP2-sharded paired model in place across ranks (every rank calls it), in float64
    like `fold`; the pairs are dropped. A component whose updates all act on the weights' input
    dim while FSDP2 holds their rows (dim 0) folds shard-locally: each rank maps its own rows with
    the small W = M2 M1, and only the pairs cross ranks. Any other component (a producer fold
    mixes rows) is gathered, folded and written back to this rank's shards; no rank holds more than
    one component in full (see `received` against `model_bytes`)."""
    model = unwrap(paired)
    plan = plan_of(model)
    if not sharded.is_sharded(model):
        raise FoldError("fold_sharded folds a model sharded by FSDP2's fully_shard; use fold")
    check_attached(model, plan)
    tensors = model.state_dict(keep_vars=True)
    check_plan(plan, {name: tuple(t.shape) for name, t in tensors.items()})
    local = {
        name for group in components(plan) if _row_local(group, tensors) for name in group.names
    }
    state = sharded.Gathering(tensors, local=local)
    with torch.no_grad():
        for folded in fold_components(state, plan):
            for name, value in folded.items():
                if name in local:
                    tensors[name].to_local().copy_(value)
                else:
                    sharded.write_back(tensors[name], value)
    detach(model)
    pair_keys = plan.pair_keys()
    total = sum(t.numel() * t.element_size() for n, t in tensors.items() if n not in pair_keys)
    return ShardedFold(model, state.received, total, sorted(local))
