"""The student's start of the paper's Assumption 3.4: each thin layer made of neurons sampled from the
corresponding wide layer (one random subset of channels per width group, shared by every layer that
reads or writes it, so residual adds keep lining up)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.capture import as_example_inputs
from surgery.errors import PlanError
from surgery.widths import width_groups


@torch.no_grad()
def sample_from_teacher(
    student: nn.Module,
    teacher: nn.Module,
    example_inputs: Any = None,
    *,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Initialise `student` in place from `teacher` (same module names, wider layers) and return it.

    Input-side weights are scaled by D/d so each sampled pre-activation is an unbiased estimate of the
    teacher's (the mean-field reading of "sampling m neurons from the wide layer")."""
    inputs = as_example_inputs(student, example_inputs)
    s_table, t_table = width_groups(student, inputs), width_groups(teacher, inputs)
    chosen: dict[str, torch.Tensor] = {}
    for group in s_table.groups:
        try:
            D = t_table[group.name].width
        except KeyError:
            raise PlanError(
                f"sample_from_teacher: the teacher has no width group {group.name!r}"
            ) from None
        if D < group.width:
            raise PlanError(
                f"sample_from_teacher: the teacher is narrower than the student at {group.name} ({D} < {group.width})"
            )
        same = group.frozen is not None or D == group.width
        chosen[group.name] = (
            torch.arange(group.width)
            if same
            else torch.randperm(D, generator=generator)[: group.width].sort().values
        )
    s_modules, t_modules = dict(student.named_modules()), dict(teacher.named_modules())
    for module, kind, in_group, in_mult, out_group in s_table.layers():
        s, t = s_modules[module], t_modules[module]
        in_idx = _features(chosen[in_group], in_mult) if in_group else torch.arange(_in_features(s))
        scale = _in_features(t) / _in_features(s)
        out_idx = chosen[out_group] if out_group else in_idx
        _copy_sampled(s, t, kind, in_idx, out_idx, scale)
    return student


def _features(channels: torch.Tensor, inner: int) -> torch.Tensor:
    """Channel indices -> feature indices when each channel spans `inner` features (c*inner + j)."""
    return (channels.unsqueeze(1) * inner + torch.arange(inner)).flatten()


def _in_features(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else getattr(m, "in_channels", 1)


def _copy_sampled(
    s: nn.Module, t: nn.Module, kind: str, in_idx: torch.Tensor, out_idx: torch.Tensor, scale: float
) -> None:
    if kind in ("linear", "conv"):
        s.weight.copy_(t.weight[out_idx][:, in_idx] * scale)
    elif kind == "depthwise":
        s.weight.copy_(t.weight[out_idx])
    elif kind in ("batch_norm", "layer_norm"):
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(s, name, None) is not None:
                getattr(s, name).copy_(getattr(t, name)[out_idx])
        return
    else:
        raise PlanError(f"sample_from_teacher: no rule to sample a {type(s).__name__}")
    if s.bias is not None:
        s.bias.copy_(t.bias[out_idx])
