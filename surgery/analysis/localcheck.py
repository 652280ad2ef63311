"""The numeric self-check on the layers each site touches, not on a copy of the whole model.

A site's fold changes only the parameters its Targets name, and its pair runs at its placements:
so paired and folded agree everywhere iff they agree on those layers, for any inputs. One forward
of the original model (in its own dtype, no copy) records the inputs of every layer some candidate
touches; then, site group by site group (sites touching one layer are checked together, so their
folds' interactions are caught), those layers run twice in float64 from the recorded inputs -- with
the random checking pairs where the plan puts them, and with the folded parameters -- and their
outputs are compared. A layer that reads another's output directly (a BatchNorm after its conv)
runs on that output, so a fold through both is checked as one. The working set is the float64
copies of one group's layers and the recorded activations, which are released group by group.

Sites this cannot replay (a layer that runs no hook, a layer called twice, parameters of the root
module) are left to the whole-model check (`surgery.analysis.selfcheck`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.func import functional_call

from surgery.analysis.blocks import BlockTable, Boundary
from surgery.analysis.unionfind import DisjointSets
from surgery.runtime.pairs import map_features, random_maps


@dataclass
class _Call:
    """One recorded call of a layer: its inputs (float copies, identity of repeated ones kept),
    and which earlier layer's output its first input is, if any."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    order: int
    wired_from: str | None = None
    calls: int = 1


@dataclass
class LocalCheck:
    """The recorded layer calls of one forward, and the site groups to check on them."""

    model: nn.Module
    table: BlockTable
    calls: dict[str, _Call] = field(default_factory=dict)
    groups: list[list[Boundary]] = field(default_factory=list)
    unsupported: list[Boundary] = field(default_factory=list)
    modules: dict[str, nn.Module] = field(default_factory=dict)
    # per layer path, read once: its parameters and buffers by name, and its modules (itself too)
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    parts: dict[str, list[nn.Module]] = field(default_factory=dict)
    regions: dict[str, set[str]] = field(default_factory=dict)  # site name -> region(site)

    def batches(self) -> list[list[Boundary]]:
        """The groups merged, in order, into batches checked at once: each batch's layers hold at
        most the largest group's elements, a sixteenth of the model's or BATCH_ELEMENTS, whichever
        is most -- one pass per batch instead of one per group, at a bounded working set."""
        sizes = {
            path: sum(t.numel() for t in tensors.values()) for path, tensors in self.tensors.items()
        }
        cost = [
            sum(sizes[p] for p in set().union(*(self.regions[b.name] for b in g)))
            for g in self.groups
        ]
        model = sum(t.numel() for _, t in _tensors(self.model))
        budget = max([BATCH_ELEMENTS, model // 16, *cost])
        out: list[list[Boundary]] = []
        held = budget + 1
        for group, elements in zip(self.groups, cost, strict=True):
            if held + elements > budget:
                out.append([])
                held = 0
            out[-1] += group
            held += elements
        return out


BATCH_ELEMENTS = 1 << 21  # float64 elements of layers a batch of site groups may hold (16 MiB)


def region(boundary: Boundary) -> set[str]:
    """The layers a site touches: where its pair runs and whose parameters its fold changes."""
    route = boundary.route
    if route is None:
        return set()
    owners = {name.rpartition(".")[0] for t in route.targets for name in t.params.values()}
    return {p.module for p in route.placements} | owners


class Recorder:
    """Records the first call of each of `modules` (path -> module) during the forwards run inside
    it: inputs as detached references (`copy=False`, checked unchanged by their version counters
    before use) or as copies in their own dtype, and which recorded layer's output each first input
    is. A call seen on fake or meta tensors (a tracer's run) makes the recording unusable."""

    def __init__(self, modules: dict[str, nn.Module], copy: bool) -> None:
        self.modules, self.copy = modules, copy
        self.calls: dict[str, _Call] = {}
        self.usable = True
        self._versions: list[tuple[torch.Tensor, int]] = []
        self._outputs: dict[int, str] = {}  # id of a recorded layer's output -> the layer
        self._keep: list[Any] = []  # those outputs, so their ids are not reused meanwhile
        self._handles: list[Any] = []

    def __enter__(self) -> Recorder:
        for path, module in self.modules.items():
            self._handles.append(
                module.register_forward_pre_hook(self._pre(path), with_kwargs=True)
            )
            self._handles.append(module.register_forward_hook(self._post(path)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._keep.clear()

    def _pre(self, path: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.usable:
                return  # a tracer's run: nothing it records can be replayed
            seen = self.calls.get(path)
            if seen is not None:
                seen.calls += 1
                return
            first = args[0] if args else next(iter(kwargs.values()), None)
            held: dict[int, Any] = {}
            self.calls[path] = _Call(
                self._held(args, held), self._held(kwargs, held), len(self.calls),
                wired_from=self._outputs.get(id(first)) if isinstance(first, torch.Tensor) else None,
            )  # fmt: skip

        hook.surgery_observer = True  # reads only: capture may look through this layer
        return hook

    def _post(self, path: str):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if self.usable and isinstance(out, torch.Tensor) and self.calls[path].calls == 1:
                self._outputs[id(out)] = path
                self._keep.append(out)

        hook.surgery_observer = True
        return hook

    def _held(self, value: Any, held: dict[int, Any]) -> Any:
        if isinstance(value, torch.Tensor):
            if isinstance(value, (FakeTensor, FunctionalTensor)) or value.device.type == "meta":
                self.usable = False  # traced: detaching it would be traced too, at a cost
                return value
            if id(value) not in held:
                kept = value.detach().clone() if self.copy else value.detach()
                self._versions.append((kept, kept._version))
                held[id(value)] = kept
            return held[id(value)]
        if isinstance(value, (tuple, list)):
            return type(value)(self._held(v, held) for v in value)
        if isinstance(value, dict):
            return {k: self._held(v, held) for k, v in value.items()}
        return value

    def covers(self, paths: set[str]) -> bool:
        """Whether every layer of `paths` was recorded, once, on inputs unchanged since."""
        return (
            self.usable
            and all(p in self.calls and self.calls[p].calls == 1 for p in paths)
            and all(t._version == v for t, v in self._versions)
        )


def recording(model: nn.Module) -> Recorder:
    """A Recorder of every layer that holds parameters or buffers, taking references: wrapped
    around the capture, its forward is the one the local check replays from (no second forward)."""
    layers = {
        path: m
        for path, m in model.named_modules()
        if path
        and (
            next(m.parameters(recurse=False), None) is not None
            or next(m.buffers(recurse=False), None) is not None
        )
    }
    return Recorder(layers, copy=False)


def record(
    model: nn.Module,
    inputs: tuple[Any, ...],
    table: BlockTable,
    sites: list[Boundary],
    recorded: Recorder | None = None,
) -> LocalCheck:
    """The calls of every layer the sites touch, from `recorded` (the capture's forward) when it
    covers them, else from one forward of `model` (eval mode, its own dtype); the sites grouped by
    shared layers."""
    check = LocalCheck(model, table, regions={b.name: region(b) for b in sites})
    wanted = set().union(*check.regions.values()) if sites else set()
    modules = dict(model.named_modules())
    if "" in wanted or any(name not in modules for name in wanted):
        check.unsupported = list(sites)
        return check
    check.modules = {path: modules[path] for path in wanted}
    check.tensors = {path: dict(_tensors(m)) for path, m in check.modules.items()}
    check.parts = {path: list(m.modules()) for path, m in check.modules.items()}
    if recorded is not None and recorded.covers(wanted):
        check.calls = recorded.calls
    else:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad(), Recorder(check.modules, copy=True) as fresh:
                model(*inputs)
        finally:
            for m, training in modes:
                m.training = training
        check.calls = fresh.calls
    fine = [
        b
        for b in sites
        if all(p in check.calls and check.calls[p].calls == 1 for p in check.regions[b.name])
    ]
    replayed = {b.name for b in fine}
    check.unsupported = [b for b in sites if b.name not in replayed]
    sets = DisjointSets()
    index = {b.name: sets.add() for b in fine}
    owner: dict[str, str] = {}
    for b in fine:
        for path in check.regions[b.name]:
            if path in owner:
                sets.join(index[owner[path]], index[b.name])
            owner.setdefault(path, b.name)
    grouped: dict[int, list[Boundary]] = {}
    for b in fine:
        grouped.setdefault(sets.find(index[b.name]), []).append(b)
    check.groups = list(grouped.values())
    return check


def _copied(value: Any, copies: dict[int, Any]) -> Any:
    """Float64 copies of the tensors in a call's arguments (one copy per tensor: q = k = v stay
    one object), everything else as it is: made per batch of sites, released with it."""
    if isinstance(value, torch.Tensor):
        if id(value) not in copies:
            copies[id(value)] = (
                value.detach().double() if value.is_floating_point() else value.detach().clone()
            )
        return copies[id(value)]
    if isinstance(value, tuple):
        return tuple(_copied(v, copies) for v in value)
    if isinstance(value, list):
        return [_copied(v, copies) for v in value]
    if isinstance(value, dict):
        return {k: _copied(v, copies) for k, v in value.items()}
    return value


class LocalProbe:
    """The error of folding a group of sites, measured on the layers they touch (same interface
    as the whole-model probe: `error(sites)`, `tolerance`, `dtype_name`)."""

    tolerance = 1e-9
    dtype_name = "float64, local"

    def __init__(self, check: LocalCheck) -> None:
        self.check = check

    def error(self, sites: Sequence[Boundary]) -> tuple[float, str]:
        from surgery.analysis.selfcheck import _leaves, _relative, check_width
        from surgery.runtime.attach import build_plan
        from surgery.runtime.fold import fold_state_dict

        check = self.check
        try:
            plan = build_plan(
                check.table, [(b, check_width(b.width), False) for b in sites], check.table.bias
            )
            pairs = {
                site.name: {
                    r: t.double() for r, t in random_maps(site.d, site.D, site.bias).items()
                }
                for site in plan.sites
            }
            paths = sorted(
                set().union(*(check.regions[b.name] for b in sites)),
                key=lambda p: check.calls[p].order,
            )
            modules = check.modules
            copies: dict[int, Any] = {}
            calls = {
                path: replace(
                    check.calls[path],
                    args=_copied(check.calls[path].args, copies),
                    kwargs=_copied(check.calls[path].kwargs, copies),
                )
                for path in paths
            }
            own = {}
            for path in paths:  # a vocabulary-sized sink layer: the rows the check needs, sliced
                tensors = check.tensors[path]
                rows = _rows(modules[path], path, tensors, calls, plan, paths)  # before float64
                if rows is not None:
                    tensors, calls[path] = _sliced(modules[path], tensors, calls[path], rows)
                own[path] = {
                    n: t.detach().double() if t.is_floating_point() else t
                    for n, t in tensors.items()
                }
            state = {
                f"{path}.{n}" if path else n: t for path in paths for n, t in own[path].items()
            }
            for site in plan.sites:
                for role, tensor in pairs[site.name].items():
                    state[f"pairs.{site.key}.{role}"] = tensor
            folded_state = fold_state_dict(state, plan, factored=True)
            folded = {
                path: {n: folded_state.get(f"{path}.{n}", t) for n, t in own[path].items()}
                for path in paths
            }
            actions = {
                (p.module, p.where): [] for site in plan.sites for p in site.route.placements
            }
            for site in plan.sites:
                for p in site.route.placements:
                    actions[(p.module, p.where)].append((pairs[site.name], p))
            modes = [(m, m.training) for path in paths for m in check.parts[path]]
            for m, _ in modes:
                m.training = False  # as the model runs after training (BatchNorm's statistics)
            try:
                reference = self._replay(paths, modules, own, actions, calls)
                candidate = self._replay(paths, modules, folded, {}, calls)
            finally:
                for m, training in modes:
                    m.training = training
        except Exception as error:  # noqa: BLE001 - any failure refuses the sites, with its text
            return math.inf, f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}"
        errors = []
        for path in paths:
            if any(check.calls[q].wired_from == path for q in paths):
                continue  # read by the next layer of the group: compared there
            a, b = _leaves(reference[path]), _leaves(candidate[path])
            if len(a) != len(b):
                return math.inf, f"{path} returns other outputs when folded"
            errors += [_relative(x, y) for x, y in zip(a, b, strict=True)]
        return max(errors, default=0.0), ""

    def _replay(
        self,
        paths: list[str],
        modules: dict[str, nn.Module],
        tensors: dict[str, dict[str, torch.Tensor]],
        actions: dict[tuple[str, str], list],
        calls: dict[str, _Call],
    ) -> dict[str, Any]:
        """Run the group's layers in call order on their recorded inputs (a layer fed directly by
        an earlier one on that one's output), with `actions` (pairs) at their placements."""
        outs: dict[str, Any] = {}
        with torch.no_grad():
            for path in paths:
                call = calls[path]
                args, kwargs = call.args, dict(call.kwargs)
                if call.wired_from in outs and args:
                    args = tuple(outs[call.wired_from] if a is call.args[0] else a for a in args)
                for pair, p in actions.get((path, "input"), []):
                    if args:
                        h = args[0]
                        x = _paired(pair, h, p)
                        args = tuple(x if a is h else a for a in args)
                    else:
                        key = next(iter(kwargs))
                        kwargs[key] = _paired(pair, kwargs[key], p)
                out = _run(modules[path], tensors[path], args, kwargs)
                for pair, p in actions.get((path, "output"), []):
                    out = _paired(pair, out, p)
                outs[path] = out
        return outs


def _paired(pair: dict[str, torch.Tensor], h: torch.Tensor, placement: Any) -> torch.Tensor:
    """A checking pair (its tensors by role, `random_maps`) applied to `h` at `placement`, as the
    Pair module runs there."""
    maps = [
        (pair[f"{m}.weight"], pair.get(f"{m}.bias") if placement.bias else None)
        for m in ("widen", "narrow")
    ]
    return map_features(h, maps, pair["widen.weight"].shape[1], placement.axis, placement.inner)


def _run(
    module: nn.Module, tensors: dict[str, torch.Tensor], args: tuple, kwargs: dict[str, Any]
) -> Any:
    """`module`'s forward with `tensors` as its parameters and buffers: a plain Linear or Conv
    through its own kernel call (a tenth of functional_call's cost, which the check pays per layer
    per site), anything else through functional_call."""
    kind = type(module)
    if len(args) == 1 and not kwargs and set(tensors) <= {"weight", "bias"}:
        if kind is nn.Linear:
            return F.linear(args[0], tensors["weight"], tensors.get("bias"))
        if kind in CONVS:
            return module._conv_forward(args[0], tensors["weight"], tensors.get("bias"))
    return functional_call(module, tensors, args, kwargs)


ROWS = 16  # output rows a Linear or Conv sink is checked on (each row folds on its own)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _rows(
    module: nn.Module,
    path: str,
    tensors: dict[str, torch.Tensor],
    calls: dict[str, _Call],
    plan: Any,
    paths: list[str],
) -> torch.Tensor | None:
    """The rows of a sink layer's weight the check needs, when no pair of the group acts on its
    rows (so each row folds on its own): an Embedding's rows its recorded ids look up, a Linear's
    or an ungrouped Conv's ROWS evenly spaced output rows (channels). None: the whole layer
    (anything else, or small enough)."""
    if any(calls[q].wired_from == path for q in paths):
        return None  # another layer of the group reads its whole output
    names = {f"{path}.{n}" for n in tensors}
    touched = [
        t for site in plan.sites for t in site.route.targets if set(t.params.values()) & names
    ]
    if any(t.axis == 0 for t in touched) or not touched:
        return None
    kind = type(module)
    if kind is nn.Embedding and module.max_norm is None and calls[path].args:
        return torch.unique(calls[path].args[0])
    outputs = (
        module.out_features
        if kind is nn.Linear
        else module.out_channels
        if kind in CONVS and module.groups == 1
        else 0
    )
    if outputs > ROWS:
        return torch.div(torch.arange(ROWS) * outputs, ROWS, rounding_mode="floor")
    return None


def _sliced(
    module: nn.Module, tensors: dict[str, torch.Tensor], call: _Call, rows: torch.Tensor
) -> tuple[dict[str, torch.Tensor], _Call]:
    """The layer's weight (and bias) at `rows`; an Embedding's ids renumbered into them."""
    out = {n: t.index_select(0, rows) if n in ("weight", "bias") else t for n, t in tensors.items()}
    if isinstance(module, nn.Embedding):
        ids = torch.searchsorted(rows, call.args[0])
        call = _Call((ids, *call.args[1:]), call.kwargs, call.order, call.wired_from, call.calls)
    return out, call


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A module's parameters and buffers (its children's too), by their names in it."""
    return [
        *module.named_parameters(remove_duplicate=False),
        *((n, b) for n, b in module.named_buffers(remove_duplicate=False) if b is not None),
    ]
