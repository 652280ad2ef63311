"""The recipe's start, measured: the thin student taken from the teacher step by step (select the
teacher's units, copy them, refit the layers that lost units), each step kept only if it does not
make the *start quality* worse or non-finite: the distillation loss (KL from the teacher's to the
student's outputs) on held-out calibration inputs. What each step measured goes into the run's log.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from surgery.errors import PlanError
from surgery.runtime.sharded import is_sharded

from .losses import inputs_of, kd_loss, logits_of
from .sample import Selection, _eval
from .steps import Log, distributed, mean_over_ranks, restore, snapshot

Batch = tuple[Any, Any]
TOLERANCE = 1e-3  # a step changing the measure by less than this (relative) changed nothing


@torch.no_grad()
def start_quality(student: nn.Module, teacher: nn.Module, inputs: tuple[Any, ...]) -> float:
    """KL from the teacher's to the student's output distribution on `inputs`, both in eval mode
    (over the last axis: classes, or the vocabulary at every position)."""
    with _eval(student, teacher):
        s = logits_of(student(*inputs)).double()
        t = logits_of(teacher(*inputs)).double()
    if s.shape != t.shape:
        raise PlanError(
            f"the student's outputs {tuple(s.shape)} and the teacher's {tuple(t.shape)} differ: "
            "a distillation start needs the same outputs"
        )
    return float(kd_loss(s, t))


def calibration(batches: Iterable[Batch], examples: int, skip: int = 0) -> tuple[Any, ...]:
    """Inputs `skip` .. `skip + examples` of `batches`, concatenated (tensors batched on dim 0)."""
    parts: list[tuple[Any, ...]] = []
    n = 0
    for x, _ in batches:
        parts.append(inputs_of(x))
        n += parts[-1][0].shape[0]
        if n >= skip + examples:
            break
    if not parts:
        raise PlanError("the batches iterable is empty")
    columns = [torch.cat(column) for column in zip(*parts, strict=True)]
    if columns[0].shape[0] <= skip:
        raise PlanError(f"the batches hold {columns[0].shape[0]} examples, fewer than {skip + 1}")
    return tuple(c[skip : skip + examples] for c in columns)


def kept_if_better(
    model: nn.Module,
    step: Callable[[], Any],
    measure: Callable[[], float],
    before: float,
    name: str,
    log: Log,
) -> float:
    """Run `step` on `model`; keep it if the measure is finite and not worse than `before`, else
    restore the model and say so. Returns the measure after (before, when rolled back)."""
    saved = snapshot(model)
    step()
    after = mean_over_ranks(measure())
    if math.isfinite(after) and after <= before + TOLERANCE * abs(before):  # not worse
        log.start[name] = after
        return after
    restore(model, saved)
    log.event(
        f"start: {name} made the distillation loss worse ({before:.4g} -> {after:.4g}); rolled back"
    )
    return before


def recipe_start(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Batch],
    inputs: Any,
    recipe: Any,
    log: Log | None = None,
) -> Log:
    """The recipe's sampled start, in place: the teacher's units chosen by `sample_select` (on
    `sample_refit` examples of `batches`), copied with `sample_scale`, each changed layer refitted
    on those examples (none when 0); the batch after them is the held-out calibration batch on which
    each step must not make the start worse (`kept_if_better`). Under torchrun, rank 0's start."""
    log = log if log is not None else Log()
    if is_sharded(teacher):
        raise PlanError(
            "the sampled start reads the teacher's full weights and this teacher is sharded by "
            "FSDP2: pass sampled_start=False, or sample the student (win.sample_from_teacher) "
            "before sharding the teacher"
        )
    n = recipe.sample_refit
    fit = calibration(batches, n) if n else None
    held_out = held_out_batch(batches, n)

    def quality() -> float:
        return start_quality(student, teacher, held_out)

    before = mean_over_ranks(quality())
    log.start["own initialisation"] = before
    selection = Selection(student, teacher, inputs, scale=recipe.sample_scale)
    selection.choose(recipe.sample_select, calibration=fit)
    for note in selection.notes:
        log.event(f"start: {note}")
    with torch.no_grad():
        after = kept_if_better(student, selection.copy, quality, before, "teacher's units", log)
    if fit is not None and "teacher's units" in log.start:
        with torch.no_grad():
            kept_if_better(student, lambda: selection.refit(fit), quality, after, "refit", log)
    same_on_every_rank(student)
    return log


def held_out_batch(batches: Iterable[Batch], used: int) -> tuple[Any, ...]:
    """The inputs of one batch after the first `used` examples, on which the start's steps are
    measured (the first batch when the batches hold no more)."""
    first = inputs_of(next(iter(batches))[0])
    size = first[0].shape[0]
    try:
        return calibration(batches, size, skip=used)
    except PlanError:
        return first


def same_on_every_rank(model: nn.Module) -> None:
    """Under torchrun, rank 0's parameters and buffers on every rank: a start fitted on each rank's
    own batches differs between ranks, and FSDP2 (unlike DDP) does not broadcast at wrapping."""
    if distributed() and dist.get_world_size() > 1:
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
