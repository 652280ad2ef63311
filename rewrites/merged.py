"""Pre-merged training mode: a layer that absorbs pairs runs once with its pairs merged into its
weights, so the per-sample cost of a step is the thin model's; the merge costs a few products per
pair that do not grow with the batch, and gradients still reach M1 and M2 through it.

    consumer side:  A' = A (I ⊗ W ⊗ I),  b' = b + A (1 ⊗ c ⊗ 1)   (pairs nearest the layer first)
    producer side:  A' = W A,            b' = W b + c              (in the order they apply)

The fold's own recipe: each pair's Targets in the Plan, applied through the fold's rules
(surgery.rewrites.RULES) to the layer's live parameters, in the model's dtype and under autograd, so a
rule works in both modes or in neither. A layer takes part when its pairs' Targets change only its
own parameters (a BatchNorm fold also changes the layer before it: its pairs run on activations).
W = M2 M1 is formed at most once per forward of the paired model (MixingCache) and shared by every
layer that takes it (q, k and v read one product), or skipped for a layer with few rows, where
A M2 M1 = (A M2) M1 is cheaper. A layer runs its class's own forward instead (the hooks then apply
the pairs to the activations) while any of its pairs records a WIN probe, when pre-merging is off,
or, under the "auto" policy, for an input so small that the merge would cost more than running the
pairs on it (a classifier head after global pooling sees one row per sample).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from surgery.plan import Target
from surgery.runtime.pairs import PREMERGE_POLICIES, same_layout

from . import RULES
from .rule import factor_steps


def local_targets(targets: list[Target], module: nn.Module, path: str) -> list[Target] | None:
    """The targets among `targets` that change `module`'s own parameters (named under `path`), or
    None when one of them also changes something else (a BatchNorm fold changes the layer before it):
    a layer can run pre-merged only with every update its pairs need in its own parameters."""
    prefix = f"{path}." if path else ""
    own = {prefix + name for name in module._parameters}
    found = []
    for target in targets:
        names = set(target.params.values())
        if names <= own:
            found.append(target)
        elif names & own:
            return None
    return found


class MixingCache:
    """W = M2 M1 of each pair, formed at most once per forward of the paired model.

    Installed on the paired model as a forward pre-hook (opens a forward) and an always-called
    forward hook (closes it and drops the products, whose graphs belong to that forward). Outside a
    forward of the paired model (a submodule called on its own) nothing is cached."""

    def __init__(self) -> None:
        self.depth = 0
        self.products: dict[tuple[int, bool], torch.Tensor] = {}

    def open(self, module: nn.Module, args: Any) -> None:
        self.depth += 1

    def close(self, module: nn.Module, args: Any, output: Any) -> None:
        self.depth = max(self.depth - 1, 0)
        if self.depth == 0:
            self.products.clear()

    def mixing(self, pair: Any) -> torch.Tensor:
        if self.depth == 0:
            return pair.mixing()
        key = (id(pair), torch.is_grad_enabled())
        if key not in self.products:
            self.products[key] = pair.mixing()
        return self.products[key]


class MergedLayer:
    """Installed as a layer's instance `forward`: merged weights when pre-merging is on for every
    pair of the layer, none records a probe and the policy says merging pays for this input; the
    class's own forward otherwise. The merged weights are the site's own fold Targets applied through
    the fold's rules (surgery.rewrites.RULES) to the live parameters, so every rule the fold knows
    works here too. The choice is a function of the input's shape only, so the hooks that run the
    pairs on activations make the same choice for the same call."""

    def __init__(
        self,
        module: nn.Module,
        path: str,
        inputs: list[Any],
        outputs: list[Any],
        probes: list[Any],
        cache: MixingCache,
    ) -> None:
        self.module, self.cache = module, cache
        self.prefix = f"{path}." if path else ""
        self.inputs, self.outputs = inputs, outputs  # _Action lists (consumer side, producer side)
        self.pairs = [a.pair for a in inputs + outputs + probes]
        self.sharing: dict[Any, int] = {}  # pair -> how many layers it is merged into (see share)
        self.output_sizes: dict[tuple[int, ...], int] = {}  # input shape -> output numel (seen)
        self.merge_cost = self._merge_cost()
        self.current = False  # the choice made for the call in progress (read by output hooks)

    def merged_pairs(self) -> set[Any]:
        return {a.pair for a in self.inputs + self.outputs}

    def active(self, x: torch.Tensor) -> bool:
        policies = {p.premerged for p in self.pairs}
        if len(policies) != 1 or not policies <= set(PREMERGE_POLICIES):
            return False
        if any(p.recording for p in self.pairs):
            return False
        return policies == {"always"} or self.merge_cost <= self.pair_cost(x)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        self.current = self.active(x)
        if not self.current:
            out = type(self.module).forward(self.module, *args, **kwargs)
        else:
            with _substituted(self.module, self.merged()):
                out = type(self.module).forward(self.module, *args, **kwargs)
        if isinstance(out, torch.Tensor) and isinstance(x, torch.Tensor):
            self.output_sizes[tuple(x.shape)] = out.numel()
        return out

    def pair_cost(self, x: torch.Tensor) -> float:
        """Multiply-adds of running this layer's pairs on the activations around input `x` (2 d D
        per feature vector a pair maps); the backward pass scales both costs alike. The output's size
        is the one seen for an input of this shape (before the first such call: merging not paying)."""
        cost = sum(2 * a.pair.D * x.numel() for a in self.inputs)  # x.numel() / d vectors
        if not self.outputs:
            return cost
        out = self.output_sizes.get(tuple(x.shape))
        if out is None:
            return -1.0
        return cost + sum(2 * a.pair.D * out for a in self.outputs)

    def share(self, sharing: dict[Any, int]) -> None:
        """Set how many layers each pair is merged into (the insert pass knows, once all are built):
        the product W = M2 M1 is formed once per forward for all of them."""
        self.sharing = sharing
        self.merge_cost = self._merge_cost()

    def _merge_cost(self) -> float:
        """Multiply-adds of merging the pairs into the weights, each in its cheaper order (fixed by
        the shapes, so computed once, not per call)."""
        return sum(min(self._orders(a)) for a in self.inputs + self.outputs)

    def merged(self) -> dict[str, torch.Tensor]:
        """The layer's parameters with its pairs folded in (differentiable), by attribute name:
        consumer-side pairs nearest the layer first, then producer-side pairs in the order they
        apply; each pair's targets in plan order."""
        values: dict[str, torch.Tensor] = {}
        for action in [*reversed(self.inputs), *self.outputs]:
            steps = self._steps(action)
            for target in action.targets:
                algebra = RULES[target.rule]
                names = {role: name[len(self.prefix) :] for role, name in target.params.items()}
                for W, c in steps:
                    current = {
                        role: values.get(attr, getattr(self.module, attr))
                        for role, attr in names.items()
                    }
                    for role, value in algebra(target, current, W, c).items():
                        values[names[role]] = value
        # the products leave each tensor in whatever strides they produce: run it as the thin layer
        return {attr: same_layout(v, getattr(self.module, attr)) for attr, v in values.items()}

    def _steps(self, action: Any) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The (W, c) steps absorbing the action's pair: its two factors when every target's rule
        takes them and they are cheaper (A (M2 M1) = (A M2) M1), else W = M2 M1 (the last step)."""
        pair = action.pair
        c = pair.shift() if action.placement.bias else None
        sides = {RULES[t.rule].factors for t in action.targets}
        factored, product = self._orders(action)
        if len(sides) == 1 and None not in sides and factored < product:
            return factor_steps(sides.pop(), pair.widen.weight, pair.narrow.weight, c)
        return [(self.cache.mixing(pair), c)]

    def _orders(self, action: Any) -> tuple[float, float]:
        """Multiply-adds of absorbing the action's pair into the layer's m = numel / d rows of its
        largest changed tensor: by the two factors (2 m D d), or by W = M2 M1 (this layer's share
        of forming W, d D d, plus m d d)."""
        pair = action.pair
        d, D = pair.d, pair.D
        sizes = [
            getattr(self.module, name[len(self.prefix) :]).numel()
            for t in action.targets
            for name in t.params.values()
        ]
        m = max(sizes, default=0) / d
        return 2 * m * D * d, d * D * d / self.sharing.get(pair, 1) + m * d * d


@contextlib.contextmanager
def _substituted(module: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run `module` with some of its parameters replaced by computed tensors (gradients flow back
    through them to the parameters they were computed from)."""
    saved = {name: module._parameters[name] for name in values}
    try:
        module._parameters.update(values)  # type: ignore[arg-type]
        yield
    finally:
        module._parameters.update(saved)
