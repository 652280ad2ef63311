"""A training run that can stop and resume: what every stage's steps (`run_steps`) read from the run
that drives them (a Trainer), and the journal that lets the run resume bit-identically.

WIN is a sequence of stage runs (the start's probes, imitation, the rate probes, fine-tuning) with
decisions in between that depend only on the models and the random state. So a run resumes by
replaying its control flow: each stage run the checkpoint records as finished is not trained again
but put back (its module's weights, the random state and the losses it ended with); the one in
progress continues from its optimizer, scheduler, divergence guard and data position; the rest run
as usual. Batches must come in the same order every time they are iterated (a list, or a loader
with a fixed order), so a data position is a count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from surgery.errors import PlanError


@dataclass
class Session:
    """The run driving the stages (see the module docstring). `accumulate`: batches per optimizer
    step (gradient accumulation); `autocast`: the context each loss is computed in (mixed
    precision); `on_step(session, stage, loss)`: after every optimizer step (logging, saving);
    `journal`: the stage runs finished so far; `resume`: the stage run in progress at a checkpoint;
    `keep_journal`: record finished stage runs (a copy of the trained module's state each: only a
    run that saves checkpoints needs them)."""

    accumulate: int = 1
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    on_step: Callable[[Session, str, float], Any] | None = None
    journal: list[dict[str, Any]] = field(default_factory=list)
    resume: dict[str, Any] | None = None
    keep_journal: bool = True
    calls: int = 0  # stage runs begun, in order (the replay's position)
    step: int = 0  # optimizer steps taken over the whole run
    in_progress: Callable[[], dict[str, Any]] | None = None  # the running stage's resumable state

    def checkpoint(self) -> dict[str, Any]:
        """Everything a resumed run needs, as tensors, numbers, strings and containers (loadable
        with `torch.load(weights_only=True)`)."""
        if self.in_progress is None:
            raise PlanError("a checkpoint is taken after an optimizer step of a stage")
        return {
            "version": 1,
            "step": self.step,
            "journal": self.journal,
            "current": self.in_progress(),
        }


_SESSION: ContextVar[Session | None] = ContextVar("surgery_win_session", default=None)


def current() -> Session | None:
    """The session the stages run in (None: a plain `win.win` call)."""
    return _SESSION.get()


@contextlib.contextmanager
def running(session: Session) -> Iterator[Session]:
    """Run the stages called inside this block in `session`."""
    token = _SESSION.set(session)
    try:
        yield session
    finally:
        _SESSION.reset(token)


def rng_state() -> dict[str, Any]:
    """The random state a stage's steps draw from (the CPU generator, and CUDA's when present)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_entry(entry: dict[str, Any], stage: str, index: int) -> None:
    """A checkpoint's record of stage run `index` must be for the stage this run replays there."""
    if entry.get("stage") != stage:
        raise PlanError(
            f"the checkpoint does not belong to this run: its stage run {index} is "
            f"{entry.get('stage')!r}, this run's is {stage!r} (resume with the same model, teacher, "
            "recipe, data and seed that wrote it)"
        )
