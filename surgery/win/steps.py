"""The steps of one training stage, guarded against divergence, and the log every stage writes to.

A stage diverges when its loss is not finite, or when its recent losses average more than
`DIVERGENCE` times its first ones. Then the model is rolled back to the stage's start and the rest
of the stage runs at a tenth of the learning rate, up to `RETRIES` times; the steps already spent
stay spent (a budget of N student steps is never exceeded). The log says so. Under torchrun every
rank takes the same decision.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from surgery.report import progress_bar
from surgery.runtime.models import unwrap
from surgery.runtime.sharded import full_state_dict, is_sharded, write_back

from . import session

logger = logging.getLogger("surgery.win")

DIVERGENCE = 10.0  # recent mean loss over the stage's first losses that counts as diverging
RETRIES = 3  # times a diverging stage is rolled back and continued at a tenth of the rate
WINDOW = 5  # losses averaged on either side of that comparison


@dataclass
class Log:
    """Per-stage loss curves in order, the start's quality at each of its steps (distillation loss
    on held-out calibration inputs), and what happened on the way (rollbacks, retries)."""

    stages: dict[str, list[float]] = field(default_factory=dict)
    start: dict[str, float] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    spent: int = 0  # student steps the start spent choosing itself (counted in the budget)

    def add(self, stage: str, value: float) -> None:
        self.stages.setdefault(stage, []).append(value)

    def event(self, text: str) -> None:
        """Record (and log at warning level) something the run did that the user should know."""
        self.events.append(text)
        logger.warning(text)

    def __str__(self) -> str:
        lines = [f"start quality ({name}): {value:.4g}" for name, value in self.start.items()]
        lines += [
            f"{name}: {len(v)} steps, loss {v[0]:.4g} -> {v[-1]:.4g}"
            for name, v in self.stages.items()
            if v
        ]
        return "\n".join(lines + self.events)

    def plot(self, path: str, title: str = "WIN training") -> str:
        """A PNG of the loss curves, stage after stage on one step axis (log scale)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4.5))
        start = 0
        for name, values in self.stages.items():
            ax.plot(range(start, start + len(values)), values, label=name, linewidth=1)
            ax.axvline(start, color="0.85", linewidth=0.8)
            start += len(values)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def run_steps(
    net: nn.Module,
    steps: int,
    optimizer_for: Callable[[float, int], tuple[Any, Any]],
    loss_of: Callable[[Any], torch.Tensor],
    data: Iterator[Any],
    *,
    clip: float | None,
    log: Log | None,
    stage: str,
    after_step: Callable[[int], Any] | None = None,
) -> list[float]:
    """`steps` optimiser steps of `loss_of(next(data))`, guarded (see the module docstring).
    optimizer_for(rate scale, steps) -> (optimiser, scheduler) for the steps left at that scale.
    after_step(step) runs after each step (counted from 1). Returns the loss of every step.
    Inside a `surgery.win.session` (a Trainer's run): its gradient accumulation, autocast and
    per-step hook, and a finished or interrupted stage run put back from its checkpoint."""
    model = unwrap(net)
    run = session.current()
    index = run.calls if run is not None else 0
    if run is not None:
        run.calls += 1
        if index < len(run.journal):
            return _replayed(model, run, run.journal[index], stage, index, log)
    micro = run.accumulate if run is not None else 1
    autocast = run.autocast if run is not None else contextlib.nullcontext
    saved = snapshot(model)
    scale, tries, done, begun, consumed = 1.0, 0, 0, 0, 0
    losses: list[float] = []
    since: list[float] = []  # the losses since the last (re)start
    events = len(log.events) if log is not None else 0
    opt, sched = optimizer_for(scale, steps)
    if run is not None and run.resume is not None and run.resume["call"] == index:
        state, run.resume = run.resume, None
        session.check_entry(state, stage, index)
        restore(model, state["model"])
        saved = state["saved"]
        scale, tries, done, begun = state["scale"], state["tries"], state["done"], state["begun"]
        losses, since = list(state["losses"]), list(state["since"])
        opt, sched = optimizer_for(scale, steps - begun)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        for _ in range(state["consumed"]):
            next(data)  # the batches it had used: the same order every iteration
        consumed = state["consumed"]
        if log is not None:
            log.stages.setdefault(stage, []).extend(losses)
            log.events.extend(state["events"])
        session.set_rng_state(state["rng"])
    if run is not None:

        def in_progress() -> dict[str, Any]:
            return {
                "call": index, "stage": stage, "model": snapshot(model), "saved": saved,
                "scale": scale, "tries": tries, "done": done, "begun": begun,
                "consumed": consumed, "losses": list(losses), "since": list(since),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "events": log.events[events:] if log is not None else [],
                "rng": session.rng_state(),
            }  # fmt: skip

        run.in_progress = in_progress
    with progress_bar(enabled=main_process()) as progress:
        task = progress.add_task(stage, total=steps, completed=done)
        while done < steps:
            opt.zero_grad(set_to_none=True)
            value = 0.0
            for _ in range(micro):  # gradient accumulation: the mean loss of `micro` batches
                with autocast():
                    loss = loss_of(next(data)) / micro
                consumed += 1
                value += float(loss.detach())
                if math.isfinite(value):
                    loss.backward()
            done += 1
            losses.append(value)
            if log is not None:
                log.add(stage, value)
            if _any_rank(_diverged(since, value)):
                tries += 1
                restore(model, saved)
                retry = tries <= RETRIES and done < steps
                if log is not None:
                    log.event(
                        f"{stage}: diverged at step {done} of {steps} (loss {value:.3g}); rolled "
                        "back to the stage's start"
                        + (f", continuing at {scale / 10:g}x its learning rate" if retry else "")
                    )
                if not retry:
                    break
                scale /= 10
                since = []
                opt, sched = optimizer_for(scale, steps - done)
                begun = done
                continue
            since.append(value)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            sched.step()
            progress.update(task, advance=1, description=f"{stage} (loss {value:.4f})")
            if after_step is not None:
                after_step(done)
            if run is not None:
                run.step += 1
                if run.on_step is not None:
                    run.on_step(run, stage, value)
    if not _finite(model):
        restore(model, saved)
        if log is not None:
            log.event(f"{stage}: ended with non-finite weights; rolled back to the stage's start")
    if run is not None:
        run.in_progress = None
        if run.keep_journal:
            run.journal.append(
                {
                    "stage": stage,
                    "losses": losses,
                    "model": snapshot(model),
                    "events": log.events[events:] if log is not None else [],
                    "steps": done - tries,
                    "rng": session.rng_state(),
                }  # fmt: skip
            )
    return losses


def _replayed(
    model: nn.Module, run: Any, entry: dict[str, Any], stage: str, index: int, log: Log | None
) -> list[float]:
    """A stage run a checkpoint recorded as finished, put back instead of trained again."""
    session.check_entry(entry, stage, index)
    restore(model, entry["model"])
    session.set_rng_state(entry["rng"])
    run.step += entry["steps"]
    if log is not None:
        log.stages.setdefault(stage, []).extend(entry["losses"])
        log.events.extend(entry["events"])
    return list(entry["losses"])


def _diverged(since: list[float], value: float) -> bool:
    if not math.isfinite(value):
        return True
    if len(since) < WINDOW:
        return False
    first = sum(since[:WINDOW]) / WINDOW
    recent = (sum(since[-(WINDOW - 1) :]) + value) / WINDOW
    return recent > DIVERGENCE * abs(first) and recent > 1e-8


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's whole state on the CPU (gathered from every rank when the model is
    sharded by FSDP2; every rank must call this), for `restore`."""
    if is_sharded(model):
        return full_state_dict(model, rank0_only=False)
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a `snapshot` back, whether the model was sharded since or not (every rank)."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    with torch.no_grad():
        for name, target in model.state_dict().items():
            write_back(target, state[name].to(target.device))


@torch.no_grad()
def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.is_floating_point())


def distributed() -> bool:
    """Whether a torch.distributed process group is running (torchrun)."""
    return dist.is_available() and dist.is_initialized()


def main_process() -> bool:
    return not distributed() or dist.get_rank() == 0


def mean_over_ranks(value: float) -> float:
    """The mean of `value` over the ranks (itself in one process): one number every rank decides on."""
    if not distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (so all ranks roll back together)."""
    if not distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
