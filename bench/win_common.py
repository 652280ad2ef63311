"""Shared by the WIN benchmarks: the methods compared at an equal student step budget, and the table.

Rows: the teacher; the thin student trained vanilla, with KD, with full WIN (sampled start +
layerwise imitation + KD fine-tuning), and two ablations at the same budget: the sampled start with KD
but no imitation, and imitation from a random start. Each over several seeds (mean +- std).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from surgery import win
from surgery.report import render_table

Evaluate = Callable[[nn.Module], float]


@dataclass
class Setup:
    make_student: Callable[[], nn.Module]
    teacher_factor: float
    batches: Sequence[tuple]
    example: torch.Tensor
    evaluate: Evaluate
    steps: int  # student budget, every method
    teacher_steps: int
    lr: float
    finetune_lr: float
    stages: object = "blocks"
    imitation_fraction: float = (
        0.3  # share of the budget spent imitating (split evenly over stages)
    )
    imitation_lr: float | None = None
    sampled_start: bool = True  # full WIN's start; False where the family has no sampling rule yet
    optimizer: str = "sgd"
    loss: str = "nmse"  # imitation loss (scale-free; the paper's plain "mse" needs per-model learning rates)
    lower_is_better: bool = False  # the metric's direction (bits/char: lower)


def _methods(
    setup: Setup, teacher: nn.Module, n_stages: int
) -> dict[str, Callable[[nn.Module], nn.Module]]:
    per_stage = max(1, int(setup.steps * setup.imitation_fraction) // n_stages)
    finetune = setup.steps - per_stage * n_stages

    def vanilla(s):
        win.train(s, setup.batches, setup.steps, lr=setup.lr, optimizer=setup.optimizer)
        return s

    def kd(s, lr=setup.lr):
        win.train(s, setup.batches, setup.steps, lr=lr, teacher=teacher, optimizer=setup.optimizer)
        return s

    def recipe(sampled: bool) -> win.Recipe:
        return win.Recipe(
            stages=setup.stages,
            imitation_steps=per_stage,
            finetune_steps=finetune,
            imitation_lr=setup.imitation_lr or setup.lr,
            finetune_lr=setup.finetune_lr,
            sampled_start=sampled,
            optimizer=setup.optimizer,
            loss=setup.loss,
        )

    def full_win(s):
        return win.win(s, teacher, setup.batches, setup.example, recipe(setup.sampled_start)).thin

    def sampled_kd(s):
        win.sample_from_teacher(s, teacher, setup.example)
        return kd(s, lr=setup.finetune_lr)  # a warm start is fine-tuned, like WIN's stage 3

    def random_imitation(s):
        return win.win(s, teacher, setup.batches, setup.example, recipe(False)).thin

    methods = {"thin vanilla": vanilla, "thin KD": kd, "thin WIN": full_win}
    if setup.sampled_start:
        methods["ablation: sampled start + KD, no imitation"] = sampled_kd
        methods["ablation: imitation from a random start + KD"] = random_imitation
    return methods


def run(setup: Setup, seeds: Sequence[int], metric: str) -> str:
    """Train everything for each seed and return the table (mean +- std over seeds)."""
    scores: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for seed in seeds:
        torch.manual_seed(seed)
        student0 = setup.make_student()
        teacher = win.widen(student0, setup.teacher_factor, setup.example)
        start = time.perf_counter()
        win.train(
            teacher, setup.batches, setup.teacher_steps, lr=setup.lr, optimizer=setup.optimizer
        )
        seconds["teacher"] = seconds.get("teacher", 0) + time.perf_counter() - start
        scores.setdefault("teacher (2x wide)", []).append(setup.evaluate(teacher.eval()))
        n_stages = len(win.plan_stages(student0, teacher, setup.example, setup.stages))
        for name, method in _methods(setup, teacher, n_stages).items():
            torch.manual_seed(seed + 1)
            start = time.perf_counter()
            trained = method(copy.deepcopy(student0))
            seconds[name] = seconds.get(name, 0) + time.perf_counter() - start
            scores.setdefault(name, []).append(setup.evaluate(trained.eval()))
        print(
            f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in scores.items()), flush=True
        )
    vanilla = statistics.mean(scores["thin vanilla"])
    teacher_mean = statistics.mean(scores["teacher (2x wide)"])
    # a gap exists only when the teacher beats vanilla; an undertrained teacher has none to close
    teacher_better = teacher_mean < vanilla if setup.lower_is_better else teacher_mean > vanilla
    rows = []
    for name, values in scores.items():
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        gap = (
            (mean - vanilla) / (teacher_mean - vanilla)
            if name.startswith(("thin", "ablation")) and teacher_better
            else None
        )
        rows.append(
            [
                name,
                f"{mean:.4f} +- {std:.4f}",
                "" if gap is None else f"{100 * gap:+.0f}%",
                f"{seconds.get(name.split(' (')[0] if name.startswith('teacher') else name, 0) / len(seeds):.0f}",
            ]
        )
    return render_table(
        f"{metric}: mean +- std over {len(seeds)} seeds, every student {setup.steps} steps",
        ["model", metric, "gap closed (vanilla -> teacher)", "s / seed"],
        rows,
        caption=None
        if teacher_better
        else "no gap to close: the teacher is not better than the thin vanilla student",
    )
