"""The student's start of the paper's Assumption 3.4: each thin layer made of neurons sampled from the
corresponding wide layer (one random subset of channels per channel space, shared by every layer that
reads or writes it, so residual adds keep lining up)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.capture import capture
from surgery.errors import PlanError

from .spaces import channel_spaces


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
    s_flow, t_flow = capture(student, example_inputs), capture(teacher, example_inputs)
    s_spaces, t_spaces = channel_spaces(s_flow), channel_spaces(t_flow)
    t_ops = {op.module: op for op in t_flow.ops.values() if op.module}
    chosen: dict[str, torch.Tensor] = {}

    def indices(op_name: str, t_name: str) -> torch.Tensor:
        root = s_spaces.of(op_name)
        if root not in chosen:
            d, D = s_spaces.width[root], t_spaces.width[t_spaces.of(t_name)]
            if D < d:
                raise PlanError(
                    f"sample_from_teacher: the teacher is narrower than the student at {op_name} ({D} < {d})"
                )
            chosen[root] = (
                torch.arange(d)
                if s_spaces.is_fixed(op_name)
                else torch.randperm(D, generator=generator)[:d].sort().values
            )
        return chosen[root]

    s_modules, t_modules = dict(student.named_modules()), dict(teacher.named_modules())
    done: set[str] = set()
    for op in s_flow.ops.values():
        if op.module is None or not op.params or op.module in done:
            continue
        done.add(op.module)
        if op.name in s_spaces.opaque:
            raise PlanError(f"sample_from_teacher: {s_spaces.opaque[op.name]}")
        t_op = t_ops.get(op.module)
        if t_op is None:
            raise PlanError(f"sample_from_teacher: the teacher has no module {op.module}")
        src, t_src = (op.inputs[0], t_op.inputs[0]) if op.inputs else (op.name, t_op.name)
        out_idx = indices(op.name, t_op.name)
        in_idx = _expand(indices(src, t_src), s_spaces.inner.get(src, 1))
        scale = t_spaces.width[t_spaces.of(t_src)] / s_spaces.width[s_spaces.of(src)]
        _copy_sampled(s_modules[op.module], t_modules[op.module], op.kind, in_idx, out_idx, scale)
    return student


def _expand(idx: torch.Tensor, inner: int) -> torch.Tensor:
    """Channel indices -> feature indices when each channel spans `inner` features (c*inner + j)."""
    return (idx.unsqueeze(1) * inner + torch.arange(inner)).flatten()


def _copy_sampled(
    s: nn.Module, t: nn.Module, kind: str, in_idx: torch.Tensor, out_idx: torch.Tensor, scale: float
) -> None:
    if kind == "linear" and isinstance(s, nn.Linear):
        s.weight.copy_(t.weight[out_idx][:, in_idx] * scale)
    elif kind == "conv":
        rows = t.weight[out_idx]
        s.weight.copy_(rows if s.groups > 1 else rows[:, in_idx] * scale)
    elif kind == "batch_norm" or isinstance(s, (nn.LayerNorm, nn.GroupNorm)):
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(s, name, None) is not None:
                getattr(s, name).copy_(getattr(t, name)[out_idx])
        return
    elif kind == "embedding":
        s.weight.copy_(t.weight[:, out_idx])
        return
    else:
        raise PlanError(f"sample_from_teacher: no rule to sample a {type(s).__name__}")
    if getattr(s, "bias", None) is not None:
        s.bias.copy_(t.bias[out_idx])
