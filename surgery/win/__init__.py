"""WIN ("Go Wide, Then Narrow") training: the wide teacher, layerwise imitation, fine-tuning, fold.

teacher = win.widen(student, 2.0, x)                  # stage 1: build, then train it
win.train(teacher, batches, steps=2000, lr=0.1)
result = win.win(student, teacher, batches, x, win.Recipe(imitation_steps=200, finetune_steps=1000))
result.thin                                           # the student's architecture, trained
"""

from .imitation import Imitation, least_squares_start, teacher_site, teacher_widths
from .loop import (
    Log,
    Recipe,
    WinResult,
    choose_stages,
    imitate,
    kd_loss,
    plan_stages,
    shard,
    task_loss,
    train,
    win,
)
from .sample import Selection, sample_from_teacher
from .widen import narrow, widen

__all__ = [
    "Imitation",
    "Log",
    "Recipe",
    "Selection",
    "WinResult",
    "choose_stages",
    "imitate",
    "kd_loss",
    "least_squares_start",
    "narrow",
    "plan_stages",
    "sample_from_teacher",
    "shard",
    "task_loss",
    "teacher_site",
    "teacher_widths",
    "train",
    "widen",
    "win",
]
