"""The residual stream's start by rotation (SliceGPT's idea, used as an initialisation): instead of
keeping d of the teacher's D residual channels, the thin student keeps the d directions along
which the teacher's normalised residual stream varies most. Every tensor dim of that stream
(embeddings, the writers' outputs and biases, the readers' inputs) is multiplied by one D x d
orthonormal basis; each norm's gain becomes its best diagonal in the new basis. On a held-out GPT
(docs/results.md) this start is closer to the teacher than any channel selection and ends better
after the same KD fine-tuning.

Only a stream that feature norms read (LayerNorm, RMSNorm: over the whole last axis) is turned:
the norm makes the stream's direction, not its channels, what its readers see. For a mean-centring
norm the student's own mean direction is kept empty (its centring would remove it), so d - 1
principal directions are kept. The result is a start, not a fold: nothing here claims exactness.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from surgery.ir.graph import Dataflow, Op, Ref

if TYPE_CHECKING:
    from .sample import Selection


# where a norm function takes its gain and shift, when called with them positionally
_NORM_TENSOR_ARGS = {"layer_norm": {"weight": 2, "bias": 3}, "rms_norm": {"weight": 2}}


def norm_tensors(op: Op) -> dict[str, str]:
    """Role ("weight", "bias") -> parameter name of a norm op: a module's, or a norm function's
    arguments (timm's LayerNorm calls F.layer_norm with its own weight and bias)."""
    found = {role: op.params[role] for role in ("weight", "bias") if op.params.get(role)}
    args, kwargs = op.attrs.get("args", ()), op.attrs.get("kwargs", {})
    for role, at in _NORM_TENSOR_ARGS.get(op.attrs.get("fn", ""), {}).items():
        ref = kwargs.get(role, args[at] if len(args) > at else None)
        if isinstance(ref, Ref) and ref.param:
            found.setdefault(role, ref.param)
    return found


def feature_norms(flow: Dataflow) -> list[Op]:
    """The norm ops of `flow` over the last axis alone (LayerNorm, RMSNorm): the ones that read a
    stream's direction, which the rotation can turn."""
    return [op for op in flow.ops.values() if op.kind == "norm" and op.attrs.get("normalized") == 1]


def norm_params(selection: Selection) -> dict[str, str]:
    """Parameter name -> "weight" or "bias" for every feature norm (over the last axis) of the student."""
    return {
        name: role
        for op in feature_norms(selection.s.flow)
        for role, name in norm_tensors(op).items()
    }


def gain_offsets(model: nn.Module, flow: Dataflow) -> dict[str, torch.Tensor]:
    """Weight name -> the part of a feature norm's gain its weight does not hold, for each norm
    whose gain is `offset + weight` with an offset (Gemma's RMSNorm multiplies by 1 + weight).
    Measured, not assumed: the norm module's output with its weight at 0 and at 1 (its bias at 0)."""
    modules = dict(model.named_modules())
    offsets = {}
    for op in feature_norms(flow):
        module, weight = norm_module(flow, op, modules), norm_tensors(op).get("weight")
        if module is None or weight is None:
            continue
        offset = _gain_offset(module, model.get_parameter(weight))
        if offset is not None:
            offsets[weight] = offset
    return offsets


@torch.no_grad()
def _gain_offset(norm: nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
    """Per feature, what `norm`'s gain is when its `weight` is 0, relative to the gain one unit of
    weight adds (None: 0, the gain is the weight)."""
    bias = getattr(norm, "bias", None)
    saved = [(t, t.detach().clone()) for t in (weight, bias) if isinstance(t, torch.Tensor)]
    x = torch.randn(16, weight.shape[-1], generator=torch.Generator().manual_seed(0))
    x = x.to(weight)
    try:
        if isinstance(bias, torch.Tensor):
            bias.zero_()
        weight.zero_()
        at_zero = norm(x).double()
        weight.fill_(1)
        unit = norm(x).double() - at_zero
    finally:
        for tensor, value in saved:
            tensor.copy_(value)
    if at_zero.abs().max() <= 1e-6 * unit.abs().max():
        return None
    return (at_zero * unit).sum(0) / (unit * unit).sum(0).clamp_min(1e-30)


def norm_module(flow: Dataflow, op: Op, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The module whose input is what norm `op` normalises: the norm module itself, or the module
    that calls a norm function on its own input with its own parameters (timm's LayerNorm); None
    when no module's input is that (a norm of a tensor computed inside the module)."""
    if op.module in modules:
        return modules[op.module]
    path = op.scope[-1] if op.scope else None
    tensors = norm_tensors(op).values()
    if path not in modules or not tensors or any(not n.startswith(f"{path}.") for n in tensors):
        return None
    producer = flow.ops.get(op.inputs[0]) if op.inputs else None
    if producer is not None and path in producer.scope:
        return None  # computed inside the module (LayerNorm2d's permute): not the module's input
    return modules[path]


@torch.no_grad()
def residual_bases(selection: Selection, inputs: tuple[Any, ...]) -> dict[int, torch.Tensor]:
    """Teacher leaf -> its D x d basis (float64) for every unstructured teacher space that feature
    norms read and the student keeps 1 < d < D units of: the top principal directions of the unit
    vectors those norms read on `inputs` (centred first where every reader centres)."""
    s, t = selection.s.spaces, selection.t.spaces
    kept = {target: s.width(leaf) for leaf, target in selection.pairs.items()}
    modules = dict(selection.teacher.named_modules())
    readers: dict[int, list[nn.Module]] = {}
    for op in feature_norms(selection.t.flow):
        module = norm_module(selection.t.flow, op, modules)
        axes = t.axes.get(op.inputs[0]) if op.inputs else None
        if module is None or not axes or t.structure(axes[-1]) is not None:
            continue
        leaf = t.find(axes[-1])
        if 1 < kept.get(leaf, 0) < t.width(leaf):
            readers.setdefault(leaf, []).append(module)
    if not readers:
        return {}
    moments = {leaf: _Moments() for leaf in readers}
    handles = [
        m.register_forward_pre_hook(lambda m, a, leaf=leaf: moments[leaf].add(a[0], t.width(leaf)))
        for leaf, ms in readers.items()
        for m in dict.fromkeys(ms)
    ]
    from .sample import _eval, hooked_forward  # sample imports this module

    hooked_forward(selection.teacher, inputs, handles)
    bases = {}
    with _eval(selection.teacher):
        for leaf, seen in moments.items():
            if seen.sample is None:
                continue
            centred = all(_centres(m, seen.sample) for m in readers[leaf])
            bases[leaf] = _basis(seen.centred if centred else seen.plain, kept[leaf], centred)
    return bases


class _Moments:
    """The second moments of the unit vectors a stream's norms read, summed as they pass (plain
    and mean-centred), and a few of the vectors themselves: no activations kept."""

    def __init__(self) -> None:
        self.plain: torch.Tensor | None = None
        self.centred: torch.Tensor | None = None
        self.sample: torch.Tensor | None = None

    def add(self, x: torch.Tensor, width: int) -> None:
        if not isinstance(x, torch.Tensor) or x.shape[-1] != width:
            return
        rows = x.detach().reshape(-1, width)
        if self.sample is None:
            self.sample = rows[:64].clone()
        rows = rows.double()
        for name, v in (("plain", rows), ("centred", rows - rows.mean(1, keepdim=True))):
            unit = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
            total = getattr(self, name)
            setattr(self, name, unit.T @ unit if total is None else total + unit.T @ unit)


def _centres(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether `norm` ignores a constant added to every feature (LayerNorm does, RMSNorm not)."""
    shift = x.abs().mean().clamp_min(1e-3)
    return torch.allclose(norm(x), norm(x + shift), rtol=1e-3, atol=1e-4)


def _basis(second: torch.Tensor, d: int, centred: bool) -> torch.Tensor:
    """The D x d orthonormal basis: the top principal directions of a `second` moment; when
    `centred`, d - 1 of them beside the mean direction, turned (a Householder reflection) so that
    the mean direction lands on the student's own mean direction."""
    width = second.shape[0]
    if not centred:
        return torch.linalg.eigh(second).eigenvectors[:, -d:].flip(1)
    mean = torch.full((width, 1), 1 / math.sqrt(width), dtype=second.dtype, device=second.device)
    project = torch.eye(width, dtype=second.dtype, device=second.device) - mean @ mean.T
    top = torch.linalg.eigh(project @ second @ project).eigenvectors[:, -(d - 1) :].flip(1)
    v = torch.full((d,), 1 / math.sqrt(d), dtype=second.dtype, device=second.device)
    v[-1] -= 1  # the reflection across v swaps the student's mean direction and its last axis
    turn = torch.eye(d, dtype=second.dtype, device=second.device) - 2 * torch.outer(v, v) / (v @ v)
    return torch.cat([top, mean], 1) @ turn


def rotated(
    value: torch.Tensor,
    dim: int,
    basis: torch.Tensor,
    role: str | None,
    offsets: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> torch.Tensor:
    """A teacher tensor's `dim` taken into the basis: contracted with it (embeddings, weights,
    biases, a norm's bias), or for a norm's gain its best diagonal, scaled by sqrt(D / d) (the
    student's norm divides by the size of d features, the teacher's by D); `offsets`: the
    teacher's and the student's norm gain offsets (`gain_offsets`), for a weight that holds
    gain - offset."""
    big, small = basis.shape
    if role == "weight":
        teacher, student = offsets
        gain = value.double() + (teacher.to(value.device) if teacher is not None else 0)
        gain = math.sqrt(big / small) * (basis**2).T @ gain
        return gain - (student.to(gain.device) if student is not None else 0)
    out = torch.tensordot(value.double().movedim(dim, -1), basis, dims=([-1], [0]))
    return out.movedim(-1, dim)
