"""Shared by the WIN benchmarks: the methods compared at an equal student step budget, and the table.

Rows: the teacher; the thin student trained vanilla, with KD, with full WIN (sampled start +
layerwise imitation + KD fine-tuning), and two ablations at the same budget: the sampled start with KD
but no imitation, and imitation from a random start. Each over several seeds (mean +- std).
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from surgery import win
from surgery.report import render_table
from surgery.win.loop import finetune_options
from surgery.win.start import recipe_start

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
    lower_is_better: bool = False  # the metric's direction (bits/char: lower)
    # win.Recipe fields set beyond the library's defaults
    recipe: dict = field(default_factory=dict)
    kd_lr: float | None = None  # KD from a random start (default: lr, like vanilla)
    eval_every: int = 0  # >0: evaluate every so many steps for "steps to vanilla's final metric"
    teacher_lr: float | None = None
    make_teacher: Callable[[], nn.Module] | None = None  # default: win.widen by teacher_factor
    warmup: float = 0.0  # teacher, vanilla and KD: share of steps warming up (transformers)
    clip: float | None = None  # teacher, vanilla and KD: gradient-norm clipping (transformers)
    teachers: str | None = None  # a folder keeping trained teachers between runs (exploration)
    only: Sequence[str] | None = None  # run only these rows (exploration; the table needs all)


def memoize_outputs(teacher: nn.Module) -> None:
    """Reuse the frozen teacher's outputs on a batch it has already seen: every row fine-tunes with KD
    over the same batches, so the teacher's forward (4x a 2x-narrower student's) is computed once per
    batch instead of once per row. Calls with hooks (imitation, refitting), gradients, keyword
    arguments or in training mode run the real forward, so only identical calls are served."""
    real, cache = teacher.forward, {}

    def forward(*args):
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())
        plain = all(type(a) is torch.Tensor for a in args)  # not a tracer's fake tensor
        key = tuple((a.data_ptr(), a.shape) for a in args) if plain else ()
        if hooked or teacher.training or torch.is_grad_enabled() or not key:
            return real(*args)
        if key not in cache:
            cache[key] = real(*args)
        return cache[key]

    teacher.forward = forward


def _methods(
    setup: Setup, teacher: nn.Module, track: Callable[[str], Callable | None]
) -> dict[str, Callable[[nn.Module], nn.Module]]:

    def vanilla(s):
        win.train(
            s,
            setup.batches,
            setup.steps,
            lr=setup.lr,
            optimizer=setup.optimizer,
            warmup=setup.warmup,
            clip=setup.clip,
            callback=track("thin vanilla"),
        )
        return s

    def kd(s):
        r = win.Recipe(**setup.recipe)  # the same KD loss as WIN's fine-tuning
        win.train(
            s,
            setup.batches,
            setup.steps,
            lr=setup.kd_lr or setup.lr,
            teacher=teacher,
            kd_weight=r.kd_weight,
            temperature=r.temperature,
            optimizer=setup.optimizer,
            warmup=setup.warmup,
            clip=setup.clip,
            callback=track("thin KD"),
        )
        return s

    def recipe(name: str, **changes) -> win.Recipe:
        # the budget form: every field the benchmark does not set is the library's default recipe
        fields = dict(
            stages=setup.stages,
            steps=setup.steps,
            imitation_share=setup.imitation_fraction,
            imitation_lr=setup.imitation_lr or setup.lr,
            finetune_lr=setup.finetune_lr,
            optimizer=setup.optimizer,
            callback=track(name),
        )
        if not setup.sampled_start:
            fields["sampled_start"] = False
        fields.update(setup.recipe)
        fields.update(changes)
        return win.Recipe(**fields)

    def full_win(s):
        return win.win(s, teacher, setup.batches, setup.example, recipe("thin WIN")).thin

    def sampled_kd(s):
        r = recipe("ablation: sampled start + KD, no imitation").for_model(s, setup.example)
        # the same start and the same fine-tuning as WIN's, over the whole budget
        recipe_start(s, teacher, setup.batches, setup.example, r)
        win.train(
            s, setup.batches, setup.steps, **finetune_options(r, teacher), callback=r.callback
        )
        return s

    def random_imitation(s):
        name = "ablation: imitation from a random start + KD"
        return win.win(
            s, teacher, setup.batches, setup.example, recipe(name, sampled_start=False)
        ).thin

    def plain_mse(s):
        name = "ablation: WIN with the paper's plain MSE"
        return win.win(s, teacher, setup.batches, setup.example, recipe(name, loss="mse")).thin

    methods = {"thin vanilla": vanilla, "thin KD": kd, "thin WIN": full_win}
    if setup.sampled_start:
        methods["ablation: sampled start + KD, no imitation"] = sampled_kd
        methods["ablation: imitation from a random start + KD"] = random_imitation
    if setup.recipe.get("loss", "nmse") != "mse":
        methods["ablation: WIN with the paper's plain MSE"] = plain_mse
    return methods


def run(setup: Setup, seeds: Sequence[int], metric: str, jobs: int = 0) -> str:
    """Train everything for each seed and return the table (mean +- std over seeds).

    The work is cut into tasks: one per seed trains its teacher (saved to a temporary file), then
    the methods of that seed run in `jobs` groups, each group reusing one memoized teacher. The tasks
    run in `jobs` worker processes of one thread each (default: one per core): these models are too
    small for two threads to halve a step, so two processes finish the table sooner than one. Every
    task seeds itself as the sequential order did, so the rows do not depend on `jobs`."""
    jobs = jobs or os.cpu_count() or 1
    names = list(_methods(setup, nn.Module(), lambda name: None))  # the rows, in order
    names = [n for n in names if setup.only is None or n in setup.only]
    groups = [names[i::jobs] for i in range(min(jobs, len(names)))]
    global _SETUP
    _SETUP = setup  # the workers are forked: they inherit it (lambdas do not pickle)
    results: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        if jobs == 1:
            for seed in seeds:
                results[(seed,)] = _teacher_task(seed, folder)
                for group in groups:
                    results[(seed, *group)] = _methods_task(seed, group, folder)
        else:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(
                jobs, context, initializer=torch.set_num_threads, initargs=(1,)
            ) as pool:
                pending = {pool.submit(_teacher_task, seed, folder): (seed,) for seed in seeds}
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        key = pending.pop(future)
                        results[key] = future.result()
                        if len(key) == 1:  # a teacher is ready: its seed's methods can start
                            for group in groups:
                                task = pool.submit(_methods_task, key[0], group, folder)
                                pending[task] = (key[0], *group)
    scores: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    curves: dict[str, list[list[tuple[int, float]]]] = {}  # name -> per seed [(step, metric)]
    for seed in seeds:
        parts = [results[(seed,)]] + [results[(seed, *group)] for group in groups]
        for part in parts:
            for name, (score, spent, curve) in part.items():
                if name == "teacher":
                    name = f"teacher ({setup.teacher_factor:g}x wide)"
                    seconds["teacher"] = seconds.get("teacher", 0) + spent
                else:
                    seconds[name] = seconds.get(name, 0) + spent
                scores.setdefault(name, []).append(score)
                if curve is not None:
                    curves.setdefault(name, []).append(curve)
    if setup.only is not None:
        return "(some rows only: their results are printed above)"
    order = [k for k in scores if k.startswith("teacher")] + names
    scores = {k: scores[k] for k in order}
    return table(setup, scores, seconds, curves, len(seeds), metric)


_SETUP: Setup | None = None  # the benchmark being run, for the worker processes


def _models(setup: Setup, seed: int) -> tuple[nn.Module, nn.Module]:
    """The seed's thin student at initialisation and its (untrained) wide teacher."""
    torch.manual_seed(seed)
    student0 = setup.make_student()
    teacher = (
        setup.make_teacher()
        if setup.make_teacher
        else win.widen(student0, setup.teacher_factor, setup.example)
    )
    return student0, teacher


def _teacher_task(seed: int, folder: str) -> dict[str, tuple[float, float, None]]:
    """Stage 1 for one seed: train the teacher, save it for the seed's method tasks."""
    setup = _SETUP
    _, teacher = _models(setup, seed)
    lr = setup.teacher_lr or setup.lr
    kept = (  # a teacher trained by an earlier run (exploration only: --teachers)
        Path(setup.teachers) / f"teacher-{seed}-{setup.teacher_steps}-{lr:g}.pt"
        if setup.teachers
        else None
    )
    start = time.perf_counter()
    if kept is not None and kept.exists():
        teacher.load_state_dict(torch.load(kept, weights_only=True))
    else:
        win.train(
            teacher,
            setup.batches,
            setup.teacher_steps,
            lr=lr,
            optimizer=setup.optimizer,
            warmup=setup.warmup,
            clip=setup.clip,
        )
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            torch.save(teacher.state_dict(), kept)
    spent = time.perf_counter() - start
    torch.save(teacher.state_dict(), Path(folder) / f"teacher{seed}.pt")
    score = setup.evaluate(teacher.eval())
    print(f"seed {seed}: teacher {score:.4f} ({spent:.0f} s)", flush=True)
    return {"teacher": (score, spent, None)}


def _methods_task(seed: int, names: list[str], folder: str) -> dict[str, tuple]:
    """Some of one seed's methods, each from the same student initialisation: name -> (final
    metric, seconds, curve of (step, metric) or None)."""
    setup = _SETUP
    student0, teacher = _models(setup, seed)
    state = torch.load(Path(folder) / f"teacher{seed}.pt", weights_only=True)
    teacher.load_state_dict(state)
    teacher.eval()
    memoize_outputs(teacher)
    curves: dict[str, list[tuple[int, float]]] = {}

    def track(name: str) -> Callable | None:
        if not setup.eval_every:
            return None
        curve = curves.setdefault(name, [])

        def callback(model: nn.Module, step: int) -> None:
            if step % setup.eval_every == 0 or step == setup.steps:
                curve.append((step, setup.evaluate(model.eval())))

        return callback

    methods = _methods(setup, teacher, track)
    out = {}
    for name in names:
        torch.manual_seed(seed + 1)
        start = time.perf_counter()
        trained = methods[name](copy.deepcopy(student0))
        spent = time.perf_counter() - start
        out[name] = (setup.evaluate(trained.eval()), spent, curves.get(name))
        print(f"seed {seed}: {name} {out[name][0]:.4f} ({spent:.0f} s)", flush=True)
    return out


def _better(a: float, b: float, lower: bool) -> bool:
    return a < b if lower else a > b


def steps_to(curve: list[tuple[int, float]], target: float, lower: bool) -> int | None:
    """The first evaluated step at which the metric is at least as good as `target`."""
    for step, value in curve:
        if value == target or _better(value, target, lower):
            return step
    return None


def table(setup, scores, seconds, curves, n_seeds: int, metric: str) -> str:
    lower = setup.lower_is_better
    teacher_name = next(k for k in scores if k.startswith("teacher"))
    vanilla_runs = scores["thin vanilla"]
    vanilla = statistics.mean(vanilla_runs)
    teacher_mean = statistics.mean(scores[teacher_name])
    # a gap exists only when the teacher beats vanilla; an undertrained teacher has none to close
    teacher_better = _better(teacher_mean, vanilla, lower)
    every_seed = all(
        _better(t, v, lower) for t, v in zip(scores[teacher_name], vanilla_runs, strict=True)
    )
    rows = []
    for name, values in scores.items():
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        student = name.startswith(("thin", "ablation"))
        gap = (mean - vanilla) / (teacher_mean - vanilla) if student and teacher_better else None
        versus = ""
        if student and name != "thin KD" and len(values) > 1:
            diff = [a - b for a, b in zip(values, scores["thin KD"], strict=True)]
            versus = f"{statistics.mean(diff):+.4f} +- {statistics.stdev(diff):.4f}"
        reach = ""
        if name in curves and name != "thin vanilla":
            found = [steps_to(c, v, lower) for c, v in zip(curves[name], vanilla_runs, strict=True)]
            hit = [f for f in found if f is not None]
            reach = (
                f"{statistics.mean(hit):.0f} ({100 * statistics.mean(hit) / setup.steps:.0f}%)"
                if len(hit) == len(found)
                else f"{len(hit)}/{len(found)} seeds"
            )
        elif name == "thin vanilla" and name in curves:
            reach = f"{setup.steps} (100%)"
        rows.append(
            [
                name,
                f"{mean:.4f} +- {std:.4f}",
                "" if gap is None else f"{100 * gap:+.0f}%",
                versus,
                reach,
                f"{seconds.get('teacher' if name == teacher_name else name, 0) / n_seeds:.0f}",
            ]
        )
    caption = (
        "per-seed difference to KD: mean +- std over seeds; steps to vanilla's final metric: mean "
        "over seeds of the first evaluated student step (every "
        f"{setup.eval_every}) at which the run matches that seed's final vanilla metric"
        if setup.eval_every
        else None
    )
    if not teacher_better:
        caption = "no gap to close: the teacher is not better than the thin vanilla student"
    elif not every_seed:
        caption = (caption or "") + "; the teacher is NOT better than vanilla in every seed"
    return render_table(
        f"{metric}: mean +- std over {n_seeds} seeds, every student {setup.steps} steps",
        [
            "model",
            metric,
            "gap closed (vanilla -> teacher)",
            "minus KD (per seed)",
            "steps to vanilla's final",
            "s / seed",
        ],
        rows,
        caption=caption,
    )
