"""Static sparsity (Golubeva, Neyshabur, Gur-Ari, method c): widen every layer by a factor and mask
weights at random, once, so that the wide model has exactly as many trainable parameters as the
dense original.

- Counting: trainable parameters = unmasked entries of the masked Linear/Conv weights + every other
  parameter (biases, BatchNorm/LayerNorm affine parameters, ...) in full. The number of entries to
  mask is (dense wide count) - (original count), exactly.
- Across layers (003, Section 2.3 / Appendix B, D): weights are removed from the largest layer until
  it matches the next largest, then from both evenly, and so on (`layer_proportional`).
- Within a layer: uniformly over all entries of the weight tensor (`dims="all"`), or over the
  input/output pairs only, so whole k x k kernels go (`dims="io"`, 003 Appendix C; a remainder
  smaller than one kernel is taken from one more kernel entry by entry, to keep the count exact).
- BatchNorm (and every non-Linear/Conv parameter) is untouched.
- The mask is a torch.nn.utils.parametrize parametrization `W -> W * mask` with the mask a buffer:
  masked entries are exactly zero in every forward, their gradients are exactly zero (so SGD with
  momentum/weight decay, Adam and AdamW leave them at zero), and the masks travel in the
  state_dict (`<layer>.parametrizations.weight.0.mask`). PyTorch saves parametrized models through
  state_dict only; `load_masked` rebuilds the masks of a dense wide model from such a state_dict.
"""

from __future__ import annotations

import bisect
import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from surgery.analysis.widths import widen
from surgery.errors import PlanError
from surgery.ir.capture import as_example_inputs
from surgery.report import render_table

MASKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
MASK_SUFFIX = ".parametrizations.weight.0.mask"


class Mask(nn.Module):
    """The parametrization W -> W * mask; `mask` (bool) is a buffer, so it is saved and loaded."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def layer_proportional(total: int, sizes: Sequence[int]) -> list[int]:
    """How many weights to remove from each layer (003 Appendix B, `get_ntf`): take from the
    largest layer until it matches the next largest, then from both evenly, and so on; the rest is
    split evenly over the layers involved, the largest taking the indivisible remainder.
    The result is in the order of `sizes` and sums to `total` exactly."""
    if total < 0 or total > sum(sizes):
        raise PlanError(f"cannot remove {total} of {sum(sizes)} weights")
    n = len(sizes)
    order = sorted(range(n), key=lambda i: -sizes[i])  # stable: ties keep their order
    s = [sizes[i] for i in order]
    diffs = [s[k] - s[k + 1] for k in range(n - 1)]
    # limits[k-1]: removals that level the k largest layers down to the (k+1)-th largest
    limits = [sum((j + 1) * diffs[j] for j in range(k)) for k in range(1, n)]
    involved = bisect.bisect_left(limits, total) + 1 if limits else 1  # layers that lose weights
    involved = min(involved, n)
    base = [s[j] - s[involved - 1] for j in range(involved)]
    rest_total = total - sum(base)
    rest = rest_total // involved
    remove = [0] * n
    for j in range(involved):
        remove[order[j]] = base[j] + rest
    remove[order[0]] += rest_total - rest * involved
    for j in range(
        n - 1
    ):  # near total removal the remainder can exceed the largest layer: pass it on
        excess = remove[order[j]] - s[j]
        if excess > 0:
            remove[order[j]] -= excess
            remove[order[j + 1]] += excess
    assert sum(remove) == total
    return remove


@dataclass
class SparsityPlan:
    """Per masked layer: shape, weights, masked entries; and the counts `sparsify_wide` matched."""

    rows: list[list[Any]]
    dims: str
    factor: float
    target: int  # the original model's trainable parameter count
    dense_wide: int  # the wide model's count before masking

    def table(self) -> str:
        """One row per masked layer, with the connectivity it kept."""
        return render_table(
            f"Static sparsity: x{self.factor} wider, masks over {self.dims} dims",
            ["layer", "weight", "entries", "masked", "connectivity"],
            self.rows,
            caption=f"trainable parameters: dense wide {self.dense_wide} -> {self.target} "
            "(= the dense original)",
        )

    def __str__(self) -> str:
        return self.table()


def _is_masked(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, Mask) for p in module.parametrizations.weight
    )


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """layer name -> its static mask (True = trainable entry)."""
    return {
        name: next(p for p in m.parametrizations.weight if isinstance(p, Mask)).mask
        for name, m in model.named_modules()
        if _is_masked(m)
    }


def trainable_parameters(model: nn.Module) -> int:
    """Parameters with requires_grad, a masked weight counting only its unmasked entries."""
    masked_originals = {
        id(m.parametrizations.weight.original): int(
            next(p for p in m.parametrizations.weight if isinstance(p, Mask)).mask.sum()
        )
        for m in model.modules()
        if _is_masked(m)
    }
    return sum(
        masked_originals.get(id(p), p.numel()) for p in model.parameters() if p.requires_grad
    )


def apply_mask(module: nn.Module, mask: torch.Tensor, *, zero: bool = True) -> nn.Module:
    """Register `mask` on `module.weight` (in place); `zero` also zeroes the masked entries."""
    if _is_masked(module):
        raise PlanError(f"{type(module).__name__} already has a mask")
    if tuple(mask.shape) != tuple(module.weight.shape):
        raise PlanError(
            f"mask {tuple(mask.shape)} does not fit weight {tuple(module.weight.shape)}"
        )
    parametrize.register_parametrization(module, "weight", Mask(mask.to(module.weight.device)))
    if zero:
        with torch.no_grad():
            original = module.parametrizations.weight.original
            original.mul_(module.parametrizations.weight[0].mask)
    return module


def _random_mask(
    weight: torch.Tensor, remove: int, dims: str, generator: torch.Generator
) -> torch.Tensor:
    """A mask with exactly `remove` False entries, uniform over entries or over kernels."""
    numel = weight.numel()
    mask = torch.ones(numel, dtype=torch.bool)
    kernel = math.prod(weight.shape[2:]) if dims == "io" else 1
    if kernel == 1:
        mask[torch.randperm(numel, generator=generator)[:remove]] = False
        return mask.view(weight.shape)
    units = mask.view(-1, kernel)  # one row per (out, in) pair
    whole, part = divmod(remove, kernel)
    chosen = torch.randperm(units.shape[0], generator=generator)[: whole + (1 if part else 0)]
    units[chosen[:whole]] = False
    if part:
        units[chosen[whole], torch.randperm(kernel, generator=generator)[:part]] = False
    return mask.view(weight.shape)


def sparsify_wide(
    model: nn.Module,
    factor: float,
    example_inputs: Any = None,
    *,
    dims: str = "all",
    seed: int = 0,
    rescale: bool = False,
    reinit: bool = True,
) -> nn.Module:
    """`model` widened by `factor` (every free width, see surgery.widen) with random static masks on
    its Linear/Conv weights so that its trainable parameter count equals `model`'s exactly.

    `dims="all"` masks entries uniformly over the whole tensor, `"io"` whole kernels (input/output
    dims only); `rescale` multiplies the kept weights by 1/sqrt(connectivity) (variance of a dense
    layer with the same fan-in; 003 keeps PyTorch's defaults, so off by default). `.sparsity_plan`
    holds the per-layer table."""
    if dims not in ("all", "io"):
        raise PlanError(f"dims must be 'all' or 'io', got {dims!r}")
    if factor < 1:
        raise PlanError(f"factor must be >= 1, got {factor}")
    inputs = as_example_inputs(model, example_inputs)
    target = trainable_parameters(model)
    wide = widen(model, factor, inputs, reinit=reinit)
    layers = {
        name: m
        for name, m in wide.named_modules()
        if type(m) in MASKABLE and m.weight.requires_grad and not _is_masked(m)
    }
    dense_wide = trainable_parameters(wide)
    total = dense_wide - target
    sizes = [m.weight.numel() for m in layers.values()]
    if total > sum(sizes) - len(sizes):
        raise PlanError(
            f"x{factor} adds {total} parameters but the Linear/Conv weights hold only {sum(sizes)}: "
            "the other parameters (biases, norms) alone outgrow the original; use a smaller factor"
        )
    remove = layer_proportional(total, sizes)
    for (name, m), r in zip(layers.items(), remove, strict=True):
        if r >= m.weight.numel():
            raise PlanError(f"x{factor} would mask all of {name}'s weights; use a smaller factor")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for (name, m), r in zip(layers.items(), remove, strict=True):
        mask = _random_mask(m.weight, r, dims, generator)
        apply_mask(m, mask)
        kept = m.weight.numel() - r
        if rescale and r:
            with torch.no_grad():
                m.parametrizations.weight.original.mul_(math.sqrt(m.weight.numel() / kept))
        rows.append(
            [name, "x".join(map(str, m.weight.shape)), m.weight.numel(), r, kept / m.weight.numel()]
        )
    count = trainable_parameters(wide)
    if count != target:  # the construction is exact; anything else is a bug
        raise AssertionError(f"sparse wide model has {count} trainable parameters, not {target}")
    wide.sparsity_plan = SparsityPlan(rows, dims, factor, target, dense_wide)
    return wide


def remove_masks(model: nn.Module) -> nn.Module:
    """A copy with every mask baked in (plain weights with zeros; the dense wide state_dict keys).

    (Not torch's remove_parametrizations on a copy: deep copies of a parametrized module share its
    generated class, and removing the parametrization deletes the property from that class, which
    would break the original model too.)"""
    plain = copy.deepcopy(model)
    for name in masks(plain):
        module = plain.get_submodule(name)
        if len(module.parametrizations) != 1 or len(module.parametrizations.weight) != 1:
            raise PlanError(f"{name} has parametrizations other than its mask: remove them first")
        original = module.parametrizations.weight.original
        weight = nn.Parameter(module.weight.detach().clone(), original.requires_grad)
        base = type(module).__bases__[0]
        bare = base.__new__(base)
        state = dict(module.__dict__)
        state["_parameters"] = {"weight": weight, **state["_parameters"]}
        state["_modules"] = {k: v for k, v in state["_modules"].items() if k != "parametrizations"}
        bare.__dict__.update(state)
        plain.set_submodule(name, bare)
    return plain


def load_masked(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Register the masks found in `state_dict` on a dense (wide) `model`, then load it strictly:
    the way back from a saved sparse checkpoint without re-running `sparsify_wide`."""
    for key, mask in state_dict.items():
        if key.endswith(MASK_SUFFIX):
            module = model.get_submodule(key[: -len(MASK_SUFFIX)])
            if not _is_masked(module):
                apply_mask(module, mask, zero=False)
    model.load_state_dict(state_dict, strict=True)
    return model
