"""The training losses of every stage and how a batch and a model's output are read."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def inputs_of(x: Any) -> tuple[Any, ...]:
    """A batch's inputs as the model's positional arguments (a tensor, or a tuple/list of them)."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, or a Hugging Face output's `.logits`."""
    return out.logits if hasattr(out, "logits") else out


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dim (sequence models: every position)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL from the teacher's to the student's softened distribution, times T² (Hinton et al.)."""
    t = temperature
    s_log = F.log_softmax(student.reshape(-1, student.shape[-1]) / t, -1)
    t_log = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]) / t, -1)
    return F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * t * t
