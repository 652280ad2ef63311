"""The insert pass: attach pairs to a copy of the model per the Plan, as forward hooks.

The paired model stays an instance of the user's class (HF outputs, .train()/.eval(), save_pretrained
all keep working). A consumer-route pair runs at each absorbing layer's input, after the ops that
commute with it, so the paired forward is exactly the function the fold produces; a producer-route
pair runs at the producer's output. The probe M1(h) is read where h itself is visible.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgery.plan import Placement, Plan, Target
from surgery.runtime.pairs import PREMERGE_POLICIES, Pair, PairDict

from .merged import MergedLayer, MixingCache, local_targets


@dataclass
class _Action:
    site: str  # the plan's site this action runs the pair of
    pair: Pair
    placement: Placement
    apply: bool  # run M2 M1 on the tensor
    record: bool  # store the probe M1(h)
    cache: MixingCache
    targets: list[Target] | None = None  # the site's Targets in this module's own parameters
    merged_into: MergedLayer | None = None  # the layer whose weights take this pair when pre-merged

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.placement
        if self._merged(x):
            return x  # the layer runs with this pair merged into its weights
        if self.apply:
            mixing = self.cache.mixing(self.pair) if self._product_pays(x) else None
            return self.pair(x, p.axis, p.inner, add_bias=p.bias, record=self.record, mixing=mixing)
        if self.record:
            self.pair.record(x, p.axis)
        return x

    def _product_pays(self, x: torch.Tensor) -> bool:
        """Pre-merged and not recording: map x by W = M2 M1 (d d per vector, plus forming W once)
        when that beats the two maps (2 d D per vector)."""
        pair = self.pair
        if pair.premerged not in PREMERGE_POLICIES or (self.record and pair.recording):
            return False
        d, D = pair.d, pair.D
        vectors = x.numel() / d
        return pair.premerged == "always" or vectors * d * d + d * D * d < vectors * 2 * d * D

    def _merged(self, x: torch.Tensor) -> bool:
        if self.merged_into is None:
            return False
        if self.placement.where == "input":  # x is (the shape of) the layer's input
            return self.merged_into.active(x)
        return self.merged_into.current  # the choice the layer's forward just made


class InputPairs:
    """Forward pre-hook: runs pairs on the module's first input."""

    surgery_pair = True  # capture knows these hooks: they are the pairs themselves

    def __init__(self, actions: list[_Action]) -> None:
        self.actions = actions

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            h = x = args[0]
            for action in self.actions:
                x = action(x)
            # self-attention passes h as query, key and value: all of them read the pair's output
            return tuple(x if a is h else a for a in args), kwargs
        key = next(iter(kwargs))
        x = kwargs[key]
        for action in self.actions:
            x = action(x)
        return args, {**kwargs, key: x}


class OutputPairs:
    """Forward hook: runs pairs on the module's output tensor."""

    surgery_pair = True  # capture knows these hooks: they are the pairs themselves

    def __init__(self, actions: list[_Action], path: str) -> None:
        self.actions = actions
        self.path = path

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            raise RuntimeError(
                f"surgery: module {self.path} returned {type(output).__name__}, not the tensor the plan expects"
            )
        for action in self.actions:
            output = action(output)
        return output


def attached_mismatch(model: nn.Module, plan: Plan) -> str | None:
    """Why the pairs running in `model` are not the ones `plan` names (None when they are): every
    placement of every site must run, on its own module, the pair registered under the site's key,
    of the site's widths (two same-width pairs swapped in memory would fold into each other's
    layers)."""
    pairs = getattr(model, "pairs", None)
    if not isinstance(pairs, PairDict):
        return "it holds no pairs"
    running: dict[tuple[str, str, str], list[_Action]] = {}
    for path, module in model.named_modules():
        hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
        for hook in hooks:
            for action in getattr(hook, "actions", []):
                where = "input" if isinstance(hook, InputPairs) else "output"
                running.setdefault((action.site, path, where), []).append(action)
    for site in plan.sites:
        own = pairs._modules.get(site.key)
        if own is None or (own.d, own.D) != (site.d, site.D):
            return f"site {site.name!r} has no pair of {site.d} -> {site.D} under key {site.key!r}"
        places = [*site.route.placements, *([site.probe] if site.probe else [])]
        for p in places:
            actions = running.get((site.name, p.module, p.where), [])
            if not actions or any(a.pair is not own for a in actions):
                return (
                    f"the pair running at {p.module} ({p.where}) for site {site.name!r} is not "
                    f"the one under its key {site.key!r}"
                )
    return None


def _same_place(a: Placement, b: Placement) -> bool:
    return (a.module, a.where, a.axis, a.inner, a.outer) == (
        b.module,
        b.where,
        b.axis,
        b.inner,
        b.outer,
    )


def attach(model: nn.Module, plan: Plan, pairs: PairDict) -> None:
    """Register `pairs` on `model` (as `model.pairs`) and the hooks that run them per `plan`."""
    model.add_module("pairs", pairs)
    cache = MixingCache()
    hooks: dict[tuple[str, str], list[_Action]] = {}
    for site in plan.sites:
        pair = pairs[site.name]
        probe_seen = False
        for placement in site.route.placements:
            record = site.probe is not None and _same_place(placement, site.probe)
            probe_seen |= record
            targets = local_targets(
                site.route.targets, model.get_submodule(placement.module), placement.module
            )
            hooks.setdefault((placement.module, placement.where), []).append(
                _Action(site.name, pair, placement, True, record, cache, targets)
            )
        if site.probe is not None and not probe_seen:
            hooks.setdefault((site.probe.module, site.probe.where), []).append(
                _Action(site.name, pair, site.probe, False, True, cache)
            )
    for (path, where), actions in hooks.items():
        module = model.get_submodule(path)
        if where == "input":
            module.register_forward_pre_hook(InputPairs(actions), with_kwargs=True)
        else:
            module.register_forward_hook(OutputPairs(actions, path))
    model.register_forward_pre_hook(cache.open)
    model.register_forward_hook(cache.close, always_call=True)
    merged = [
        _install_merged_forward(
            model.get_submodule(path),
            path,
            hooks.get((path, "input"), []),
            hooks.get((path, "output"), []),
            cache,
        )
        for path in {path for path, _ in hooks}
    ]
    sharing = Counter(
        pair for layer in merged if layer is not None for pair in layer.merged_pairs()
    )
    for layer in merged:
        if layer is not None:
            layer.share(sharing)


def _install_merged_forward(
    module: nn.Module,
    path: str,
    inputs: list[_Action],
    outputs: list[_Action],
    cache: MixingCache,
) -> MergedLayer | None:
    """Let a layer whose pairs fold into its own parameters run them pre-merged (rewrites.merged)."""
    applied = [a for a in inputs + outputs if a.apply]
    if not applied or not all(a.targets for a in applied):
        return None
    merged = MergedLayer(
        module,
        path,
        [a for a in inputs if a.apply],
        [a for a in outputs if a.apply],
        [a for a in inputs + outputs if not a.apply],
        cache,
    )
    for action in applied:
        action.merged_into = merged
    module.forward = merged  # an instance attribute: nn.Module.__call__ finds it before the class's
    return merged


def detach(model: nn.Module) -> None:
    """Remove the pairs and their hooks from `model` in place (the thin skeleton is left)."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in hooks.items() if _ours(hook)]:
                del hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
        if isinstance(module.__dict__.get("forward"), MergedLayer):
            del module.__dict__["forward"]
    if "pairs" in model._modules:
        del model._modules["pairs"]
    model.__dict__.pop("plan", None)


def _ours(hook: Any) -> bool:
    return isinstance(hook, (InputPairs, OutputPairs)) or isinstance(
        getattr(hook, "__self__", None), MixingCache
    )
