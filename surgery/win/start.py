"""The recipe's start, measured. With a budget (`sample_select="measured"`), candidates -- the
student's own initialisation, and the teacher's units taken as a plain slice ("first"), evenly
spaced ("uniform"), by energy, or with the residual stream turned onto its principal directions
("rotation", where feature norms read the stream; elsewhere it is the energy selection) -- each
distil for a few steps from the teacher, and the one whose held-out distillation loss ends lowest is kept with its run: the loss at the start itself does not
predict the end (a start refitted by least squares is far better at step 0 and no better after
fine-tuning: on the validation splits of bench/win_eval.py the refitted candidates won the short
probes and ended no better, so they are not candidates). Otherwise the thin student is taken step
by step (select, copy, refit), each step kept only if it does not make the *start quality* worse or
non-finite: the distillation loss (KL from the teacher's to the student's outputs) on held-out
calibration inputs. What each candidate or step measured goes into the run's log.
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
Probe = Callable[[nn.Module, int, str], Any]  # (model, steps, stage name): distil it in place
TOLERANCE = 1e-3  # a step changing the measure by less than this (relative) changed nothing
# the teacher-unit selections a measured start tries ("rotation" only where it turns a stream; it
# takes the "energy" candidate's units, so it comes after it)
MEASURED = ("first", "uniform", "energy", "rotation")


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
    probe: Probe | None = None,
    steps: int = 0,
) -> Log:
    """The recipe's sampled start, in place: the teacher's units chosen by `sample_select` (on
    `sample_refit` examples of `batches`), copied with `sample_scale`, each changed layer refitted
    on those examples (none when 0); the batch after them is the held-out calibration batch on which
    each step must not make the start worse (`kept_if_better`). `sample_select="measured"`: the
    candidates of `measured_start`, each distilled by `probe` for `recipe.start_probe` of `steps`
    student steps (`log.spent` says how many in all). Under torchrun, rank 0's start."""
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

    if recipe.sample_select == "measured":
        measured_start(student, teacher, inputs, recipe, fit, quality, log, probe, steps)
        same_on_every_rank(student)
        return log
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


def measured_start(
    student: nn.Module,
    teacher: nn.Module,
    inputs: Any,
    recipe: Any,
    fit: tuple[Any, ...] | None,
    quality: Callable[[], float],
    log: Log,
    probe: Probe | None,
    steps: int,
) -> str:
    """Try every candidate start on `student` (its own initialisation; each of MEASURED copied,
    the units chosen on `fit` when given), distil each for `recipe.start_probe` of `steps` with
    `probe`, keep the one whose `quality` ends lowest, with its run. Without a probe, or when the
    probes would take more than a quarter of `steps`, candidates are ranked at the start itself.
    Returns the chosen candidate's name; `log.spent` counts the probe steps."""
    names = ["own initialisation"]
    selections: dict[str, Selection] = {}
    for select in MEASURED:
        if select == "rotation":  # the energy candidate's units, its energies not measured again
            selection = selections["energy"].turned(fit)
            if not selection.bases:
                continue  # nothing turned: the energy selection again
        else:
            selection = Selection(student, teacher, inputs, scale=recipe.sample_scale)
            selection.choose(select, calibration=fit)
        selections[select] = selection
        names.append(select)
    for note in dict.fromkeys(n for s in selections.values() for n in s.notes):
        log.event(f"start: {note}")
    n = max(1, round(recipe.start_probe * steps)) if probe is not None else 0
    if n * len(names) * 4 > steps:
        n = 0
    original = snapshot(student)
    best: tuple[float, str, dict[str, torch.Tensor]] | None = None
    for name in names:
        restore(student, original)
        with torch.no_grad():
            if name in selections:
                selections[name].copy()
        if n and math.isfinite(mean_over_ranks(quality())):
            probe(student, n, f"start probe: {name}")
            log.spent += n
        score = mean_over_ranks(quality())
        log.start[f"{name}, after {n} steps"] = score
        if math.isfinite(score) and (best is None or score < best[0]):
            best = (score, name, snapshot(student))
    if best is None:
        restore(student, original)
        log.event("start: every candidate start is non-finite; the student's own kept")
        return names[0]
    restore(student, best[2])
    log.event(f"start: {best[1]} chosen (distillation loss {best[0]:.4g} after {n} steps)")
    return best[1]


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
