"""WIN evaluated as a sceptical reviewer asks: every choice on a validation split with development
seeds, then the test split once with fresh seeds, paired confidence intervals against tuned KD.

Benchmarks (`python bench/win_eval.py NAME`):
  charlm-llama  character-level LM on the standard library's source, HF LlamaForCausalLM (GQA)
  charlm-gpt2   the same corpus, HF GPT2LMHeadModel with tied embeddings
  digits-vit    scikit-learn's digits (8x8, 10 classes), timm VisionTransformer
  digits-cnn    the same digits, a small residual CNN with BatchNorm

Per benchmark: a thin student and a teacher twice as wide (win.widen), the teacher trained first
(stage 1, outside the student's budget, as in the paper); then, at one student step budget:
  vanilla            labels only, learning rate tuned on validation
  KD (tuned)         a random start, KD; learning rate, temperature and CE/KD mix tuned on validation
  slice + KD         the first units of every teacher tensor, then KD (rate tuned)
  uniform + KD       evenly spaced units (weight selection), then KD (rate tuned)
  energy + KD        the loudest units, no refit (Minitron-style), then KD (rate tuned)
  default recipe     win.win(student, teacher, batches, x, win.Recipe(steps=N)): nothing overridden
                     (the measured start, then KD at a probed rate, the largest that
                     lowers the loss in a short run: imitation is off by default)
  default + imitation     the same with imitation_share=0.1 (WIN's stage 2: 10% of the steps
                     imitating the teacher's block outputs through widen/narrow pairs, then fold)
Every row trains as the default fine-tunes (AdamW: 5% warm-up, clipping, the rate decaying
linearly to 0, betas (0.9, 0.95); SGD: the paper's cosine); the teachers train with cosine decay
and torch's betas.
Tuning: every baseline's grid is run on the validation split with the development seeds; the best
mean wins. The default recipe has no knob set here: its rate is probed inside its own budget.
Test: 5 fresh seeds (other initialisations, other data orders), each row once, reported as mean +-
std and the paired 95% confidence interval of (row - tuned KD) per seed (t with n-1 dof).
Compute: student training FLOPs (6 x parameters x tokens per step) plus every teacher forward the
method spends (2 x teacher parameters x tokens: KD targets, imitation targets, the start's energy
and refit passes, the rate probes); steps to reach vanilla's final metric from the curves.
The curves (test metric every `eval_every` steps, mean over seeds) are drawn to docs/results/NAME.png.

    python bench/win_eval.py digits-vit --quick     # 2 test seeds, a short budget: a smoke run
    python bench/win_eval.py charlm-llama           # the full protocol
    python bench/win_eval.py charlm-gpt2 --teachers ../teachers   # teachers kept for a rerun
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from win_charlm import VOCAB, corpus  # noqa: E402

from surgery import win  # noqa: E402
from surgery.win.losses import logits_of  # noqa: E402
from surgery.win.sample import Selection  # noqa: E402

DEV_SEEDS = (100, 101)
TEST_SEEDS = (200, 201, 202, 203, 204)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


# ---------------------------------------------------------------- benchmarks


@dataclass
class Bench:
    """A benchmark: the data splits, the student, the metric and the budgets."""

    name: str
    student: Callable[[], nn.Module]
    splits: Callable[[], dict[str, list]]  # "train", "val", "test": lists of (x, y) batches
    metric: str
    lower_is_better: bool
    steps: int
    teacher_steps: int
    optimizer: str
    rates: tuple[float, ...]  # the learning-rate grid of every tuned row
    teacher_rate: float
    eval_every: int
    tokens_per_example: int = 1

    def opts(self) -> dict[str, Any]:
        adam = self.optimizer == "adam"
        return dict(
            optimizer=self.optimizer, warmup=0.05 if adam else 0.0, clip=1.0 if adam else None
        )


def _char_splits(context: int = 64, batch: int = 32, seed: int = 0) -> dict[str, list]:
    """The char corpus split by position, as windows (train: `seed` orders them, the rest seed + 1)."""
    # ~4.7M characters in the stdlib: a 2x teacher sees 4M about once (500k: 9 epochs, overfit)
    ids = corpus(4_000_000)
    n = len(ids)
    parts = {
        "train": ids[: int(0.8 * n)],
        "val": ids[int(0.8 * n) : int(0.9 * n)],
        "test": ids[int(0.9 * n) :],
    }
    out = {}
    for name, part in parts.items():
        g = torch.Generator().manual_seed(seed if name == "train" else seed + 1)
        starts = torch.randperm(len(part) - context - 1, generator=g)
        size = batch if name == "train" else 128
        count = len(starts) // size if name == "train" else 4
        out[name] = [
            (w[:, :-1], w[:, 1:])
            for w in (
                part[starts[i * size : (i + 1) * size].unsqueeze(1) + torch.arange(context + 1)]
                for i in range(count)
            )
        ]
    return out


def _llama() -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=86, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _gpt2() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=len(VOCAB), n_positions=64, n_embd=32, n_layer=4, n_head=4,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)  # lm_head tied to the token embedding


def _digit_splits(batch: int = 64) -> dict[str, list]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    cuts = {"train": (0, 1200), "val": (1200, 1500), "test": (1500, len(x))}
    return {
        name: [(x[i : min(i + batch, b)], y[i : min(i + batch, b)]) for i in range(a, b, batch)]
        for name, (a, b) in cuts.items()
    }


def _vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=4, num_heads=4,
        mlp_ratio=2.0,
    )  # fmt: skip


class DigitCNN(nn.Module):
    """A small residual CNN with BatchNorm (stem, three blocks, pooled head)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.BatchNorm2d(width),
            )  # fmt: skip
            for _ in range(3)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(x.mean((2, 3)))


BENCHES = {
    "charlm-llama": Bench(
        "charlm-llama",
        _llama,
        _char_splits,
        "bits/char",
        True,
        600,
        1800,
        "adam",
        (1e-3, 3e-3, 1e-2, 2e-2, 3.5e-2),
        3e-3,
        50,
        tokens_per_example=64,
    ),  # fmt: skip
    "charlm-gpt2": Bench(
        "charlm-gpt2",
        _gpt2,
        _char_splits,
        "bits/char",
        True,
        600,
        1800,
        "adam",
        (1e-3, 3e-3, 1e-2, 2e-2, 3.5e-2),
        3e-3,
        50,
        tokens_per_example=64,
    ),  # fmt: skip
    "digits-vit": Bench(
        "digits-vit",
        _vit,
        _digit_splits,
        "accuracy",
        False,
        400,
        1200,
        "adam",
        (1e-3, 3e-3, 1e-2, 2e-2, 3.5e-2),
        3e-3,
        25,
    ),  # fmt: skip
    "digits-cnn": Bench(
        "digits-cnn",
        DigitCNN,
        _digit_splits,
        "accuracy",
        False,
        400,
        1200,
        "sgd",
        (0.01, 0.03, 0.1),
        0.1,
        25,
    ),  # fmt: skip
}


# ---------------------------------------------------------------- one run


def evaluate(bench: Bench, model: nn.Module, data: list) -> float:
    """The bench's metric of `model` on `data` (in eval mode, restored to training after)."""
    model.eval()
    with torch.no_grad():
        if bench.metric == "accuracy":
            right = sum((logits_of(model(x)).argmax(-1) == y).sum().item() for x, y in data)
            value = right / sum(len(y) for _, y in data)
        else:
            losses = [
                F.cross_entropy(logits_of(model(x)).flatten(0, 1), y.flatten()).item()
                for x, y in data
            ]
            value = sum(losses) / len(losses) / math.log(2)
    model.train()
    return value


def _shuffled(batches: list, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Run:
    """One row at one seed: its final metric, its curve (step, metric) and its compute."""

    metric: float
    curve: list[tuple[int, float]] = field(default_factory=list)
    flops: float = 0.0


def run_row(
    bench: Bench, row: str, config: dict[str, Any], seed: int, split: str, teacher_path: str
) -> Run:
    """One row at one seed: train the student as the row says, evaluate on `split`."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    splits = bench.splits()
    train, evald = _shuffled(splits["train"], seed), splits[split]
    teacher = torch.load(teacher_path, weights_only=False).eval()
    student = bench.student()
    x = train[0][0][:2]
    curve: list[tuple[int, float]] = []

    def track(model: nn.Module, step: int) -> None:
        if step % bench.eval_every == 0:
            curve.append((step, evaluate(bench, model, evald)))

    tokens = train[0][0].shape[0] * bench.tokens_per_example
    ps, pt = _params(student), _params(teacher)
    student_step, teacher_forward = 6 * ps * tokens, 2 * pt * tokens
    # every row trains as the default recipe fine-tunes: its optimiser, warm-up, clipping, decay
    # and AdamW betas (the teacher keeps `bench.opts()`: cosine, torch's betas)
    chosen = win.Recipe(steps=bench.steps, optimizer=bench.optimizer).for_model(student, x)
    opts = {**bench.opts(), "decay": chosen.decay, "betas": chosen.betas}
    if row == "vanilla":
        win.train(student, train, bench.steps, lr=config["lr"], callback=track, **opts)
        flops = bench.steps * student_step
    elif row == "default recipe" or row == "default + imitation":
        imitating = {"imitation_share": 0.1} if row == "default + imitation" else {}
        recipe = win.Recipe(steps=bench.steps, callback=track, **imitating)
        counted = _TeacherCalls(teacher)
        result = win.win(student, teacher, train, x, recipe)
        student = result.thin
        flops = bench.steps * student_step + counted.examples * 2 * pt * bench.tokens_per_example
        counted.remove()
    else:
        start_calls = 0
        if row != "KD (tuned)":
            select = {"slice + KD": "first", "uniform + KD": "uniform", "energy + KD": "energy"}[
                row
            ]
            counted = _TeacherCalls(teacher)
            selection = Selection(student, teacher, (x,))
            selection.choose(select, calibration=torch.cat([b for b, _ in train[:16]])[:512])
            selection.copy()
            start_calls = counted.examples
            counted.remove()
        win.train(
            student, train, bench.steps, lr=config["lr"], teacher=teacher,
            kd_weight=config.get("kd_weight", 1.0), temperature=config.get("temperature", 1.0),
            callback=track, **opts,
        )  # fmt: skip
        flops = (
            bench.steps * (student_step + teacher_forward)
            + start_calls * 2 * pt * bench.tokens_per_example
        )
    return Run(evaluate(bench, student, evald), curve, flops)


class _TeacherCalls:
    """Counts the examples the teacher's forward runs on (every teacher forward a method spends)."""

    def __init__(self, teacher: nn.Module):
        self.examples = 0

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            first = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(first, torch.Tensor):
                self.examples += first.shape[0]

        self.handle = teacher.register_forward_pre_hook(hook, with_kwargs=True)

    def remove(self) -> None:
        self.handle.remove()


# ---------------------------------------------------------------- the protocol


GRIDS = {
    "vanilla": lambda b: [{"lr": r} for r in b.rates],
    "KD (tuned)": lambda b: [
        {"lr": r, "temperature": t, "kd_weight": w}
        for r in b.rates
        for t in (1.0, 2.0)
        for w in (1.0, 0.5)
    ],
    "slice + KD": lambda b: [{"lr": r} for r in b.rates],
    "uniform + KD": lambda b: [{"lr": r} for r in b.rates],
    "energy + KD": lambda b: [{"lr": r} for r in b.rates],
    "default recipe": lambda b: [{}],
    "default + imitation": lambda b: [{}],
}


def _fingerprint(bench: Bench) -> str:
    """What a teacher of `bench` depends on besides its seed: its steps, rate and options, the
    student's tensors it widens, and torch's version (a cached teacher is reused only when equal)."""
    shapes = {k: list(v.shape) for k, v in bench.student().state_dict().items()}
    facts = [bench.teacher_steps, bench.teacher_rate, bench.opts(), shapes, torch.__version__]
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]


def _teacher(bench: Bench, seed: int, folder: Path) -> tuple[str, float, float]:
    """Stage 1: the 2x teacher of `seed`, trained and saved in `folder` (or the one saved there
    before with the same fingerprint, `--teachers`); (its path, val metric, test metric)."""
    path = folder / f"{bench.name}-teacher-{seed}-{_fingerprint(bench)}.pt"
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    splits = bench.splits()
    if path.exists():
        teacher = torch.load(path, weights_only=False)
    else:
        teacher = win.widen(bench.student(), 2.0, splits["train"][0][0][:2])
        win.train(
            teacher,
            _shuffled(splits["train"], seed),
            bench.teacher_steps,
            lr=bench.teacher_rate,
            **bench.opts(),
        )
        partial = path.with_suffix(".partial")
        torch.save(teacher, partial)
        partial.replace(path)
    return (
        str(path),
        evaluate(bench, teacher, splits["val"]),
        evaluate(bench, teacher, splits["test"]),
    )


def _task(args: tuple) -> tuple:
    bench, row, config, seed, split, teacher = args
    return row, config, seed, run_row(bench, row, config, seed, split, teacher)


LIBRARY_ROWS = ("default recipe", "default + imitation")  # what the library's defaults decide


def config_key(row: str, config: dict[str, Any]) -> str:
    """How a validation run is filed: its row and its configuration."""
    return f"{row} {json.dumps(config, sort_keys=True)}"


def _reusable(reuse: dict | None, teachers: dict, test_seeds: tuple[int, ...]) -> dict:
    """The runs of an earlier protocol run (`--reuse`) that this one would repeat exactly: the
    validation runs of every configuration and the test runs of every baseline row. Only when
    the teachers trained again here score exactly as they did then (the runs are deterministic)."""
    if reuse is None:
        return {"dev": {}, "test": {}, "chosen": {}}
    then = reuse["teacher"]
    now = [teachers[s][2] for s in test_seeds]
    if now != then:
        raise SystemExit(
            f"--reuse: the teachers trained here score {now}, the reused run's {then}: not the "
            f"same runs (other code, torch or machine); run the whole protocol without --reuse"
        )
    return reuse


def _progress(results: Iterable, total: int, label: str, started: float) -> Iterator:
    """`results` passed through, a line printed at every tenth of `total` (the runs take an hour)."""
    marks = {math.ceil(total * k / 10) for k in range(1, 11)}
    for done, result in enumerate(results, 1):
        if done in marks:
            print(f"{label}: {done}/{total} runs ({time.time() - started:.0f} s)", flush=True)
        yield result


def protocol(
    bench: Bench,
    test_seeds: tuple[int, ...],
    dev_seeds: tuple[int, ...],
    workers: int,
    folder: Path,
    reuse: dict | None = None,
) -> dict:
    """The teachers, every tuned row's grid on the validation split (dev seeds), then every row once
    on the test split (test seeds) at its chosen configuration. `reuse`: an earlier run's saved
    numbers: its validation runs and its baseline test runs are taken instead of run again (the
    library's rows always run), after checking that one of them comes out the same again."""
    started = time.time()
    with ProcessPoolExecutor(workers) as pool:
        teachers = dict(
            zip(
                dev_seeds + test_seeds,
                pool.map(
                    _teacher,
                    [bench] * len(dev_seeds + test_seeds),
                    dev_seeds + test_seeds,
                    [folder] * len(dev_seeds + test_seeds),
                ),
                strict=True,
            )
        )
        print(f"[{bench.name}] teachers trained ({time.time() - started:.0f} s)", flush=True)
        earlier = _reusable(reuse, teachers, test_seeds)
        tuned = [(r, c) for r, grid in GRIDS.items() if len(grid(bench)) > 1 for c in grid(bench)]
        dev = {config_key(r, c): earlier["dev"][config_key(r, c)] for r, c in tuned
               if config_key(r, c) in earlier["dev"]}  # fmt: skip
        reused_dev = len(dev)
        jobs = [
            (bench, row, config, seed, "val", teachers[seed][0])
            for row, config in tuned
            if config_key(row, config) not in dev
            for seed in dev_seeds
        ]
        validation = _progress(
            pool.map(_task, jobs), len(jobs), f"[{bench.name}] validation", started
        )
        for row, config, _, run in validation:  # in seed order per configuration
            dev.setdefault(config_key(row, config), []).append(run.metric)
        sign = 1 if bench.lower_is_better else -1
        chosen = {
            row: min(
                grid(bench), key=lambda c, r=row: sign * statistics.mean(dev[config_key(r, c)])
            )
            if len(grid(bench)) > 1
            else grid(bench)[0]
            for row, grid in GRIDS.items()
        }
        print(
            f"[{bench.name}] validation-selected: {json.dumps(chosen)} ({time.time() - started:.0f} s)",
            flush=True,
        )
        test: dict[str, dict[int, Run]] = {
            row: {s: Run(**earlier["test"][row][str(s)]) for s in test_seeds}
            for row in GRIDS
            if row not in LIBRARY_ROWS and earlier["chosen"].get(row) == chosen[row]
        }
        reused = sorted(test)
        jobs = [
            (bench, row, chosen[row], seed, "test", teachers[seed][0])
            for row in GRIDS
            if row not in test
            for seed in test_seeds
        ]
        if reused:  # one reused run again, to check that it comes out the same
            jobs.append(
                (
                    bench,
                    reused[0],
                    chosen[reused[0]],
                    test_seeds[0],
                    "test",
                    teachers[test_seeds[0]][0],
                )
            )
        runs = list(_progress(pool.map(_task, jobs), len(jobs), f"[{bench.name}] test", started))
    if reused:
        row, _, seed, again = runs.pop()
        if again.metric != test[row][seed].metric:
            raise SystemExit(
                f"--reuse: {row} at seed {seed} gives {again.metric} now, {test[row][seed].metric} "
                "in the reused run: not the same runs; run the whole protocol without --reuse"
            )
    for row, _, seed, run in runs:
        test.setdefault(row, {})[seed] = run
    return {
        "chosen": chosen,
        "dev": dev,
        "test": {row: test[row] for row in GRIDS},
        "teacher": [teachers[s][2] for s in test_seeds],
        "seconds": time.time() - started,
        "reused": {"validation configurations": reused_dev, "test rows": reused},
    }


def paired_ci(values: list[float], against: list[float]) -> str:
    """The mean of the per-seed differences `values - against` and its paired 95% confidence
    interval (t with n-1 degrees of freedom)."""
    n = len(values)
    diffs = [v - a for v, a in zip(values, against, strict=True)]
    mean = statistics.mean(diffs)
    half = T_975.get(n - 1, 2.0) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
    return f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"


def table(bench: Bench, result: dict) -> str:
    test, seeds = result["test"], sorted(next(iter(result["test"].values())))
    kd = [test["KD (tuned)"][s].metric for s in seeds]
    default = [test["default recipe"][s].metric for s in seeds]
    vanilla = statistics.mean(test["vanilla"][s].metric for s in seeds)
    teacher = statistics.mean(result["teacher"])
    n = len(seeds)
    lines = [
        f"{bench.name}: test {bench.metric} ({'lower' if bench.lower_is_better else 'higher'} is better), "
        f"{n} fresh seeds, {bench.steps} student steps; teacher {teacher:.4f} (2x wide, {bench.teacher_steps} steps)",
        f"{'row':21s} {'mean':>7s} {'std':>7s} {'gap closed':>10s} {'row - tuned KD [95% CI]':>29s} "
        f"{'row - default [95% CI]':>29s} {'TFLOPs':>7s} {'steps to vanilla':>16s}",
    ]
    for row in GRIDS:
        values = [test[row][s].metric for s in seeds]
        mean, std = statistics.mean(values), statistics.stdev(values) if n > 1 else 0.0
        gap = 100 * (vanilla - mean) / (vanilla - teacher) if vanilla != teacher else float("nan")
        flops = statistics.mean(test[row][s].flops for s in seeds) / 1e12
        reach = _steps_to(bench, [test[row][s].curve for s in seeds], vanilla)
        vs_kd = "" if row == "KD (tuned)" else paired_ci(values, kd)
        vs_default = "" if row == "default recipe" else paired_ci(values, default)
        lines.append(
            f"{row:21s} {mean:7.4f} {std:7.4f} {gap:9.1f}% {vs_kd:>29s} {vs_default:>29s} "
            f"{flops:7.3f} {reach:>16s}"
        )
    lines.append(f"validation-selected: {json.dumps(result['chosen'])}")
    reused = result.get("reused") or {}
    if reused.get("validation configurations") or reused.get("test rows"):
        lines.append(
            f"taken from the earlier run (--reuse, checked to repeat exactly): "
            f"{reused['validation configurations']} validation configurations, test rows "
            f"{', '.join(reused['test rows']) or 'none'}"
        )
    return "\n".join(lines)


def save(result: dict, path: Path) -> Path:
    """The run's numbers as JSON (per-seed test metrics, curves and FLOPs, the validation runs,
    the choices): the table and the picture can be made again from it."""
    test = {
        row: {str(seed): run.__dict__ for seed, run in runs.items()}
        for row, runs in result["test"].items()
    }
    path.write_text(json.dumps({**result, "test": test}, indent=1))
    return path


def _steps_to(bench: Bench, curves: list[list[tuple[int, float]]], target: float) -> str:
    """The first step where the mean curve reaches `target` (vanilla's final metric)."""
    steps = sorted({s for c in curves for s, _ in c})
    for step in steps:
        values = [v for c in curves for s, v in c if s == step]
        if len(values) == len(curves):
            mean = statistics.mean(values)
            if (mean <= target) if bench.lower_is_better else (mean >= target):
                return f"{step} ({100 * step / bench.steps:.0f}%)"
    return "not reached"


def picture(bench: Bench, result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row, runs in result["test"].items():
        curves = [r.curve for r in runs.values()]
        steps = sorted({s for c in curves for s, _ in c})
        means = [statistics.mean(v for c in curves for s, v in c if s == step) for step in steps]
        ax.plot(steps, means, label=row, linewidth=1.5 if row.startswith("default") else 1)
    ax.axhline(
        statistics.mean(result["teacher"]),
        color="black",
        linestyle="--",
        linewidth=1,
        label="teacher",
    )
    ax.set_xlabel("student step")
    ax.set_ylabel(f"test {bench.metric}")
    ax.set_title(f"{bench.name}: mean over {len(result['teacher'])} test seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=list(BENCHES))
    parser.add_argument(
        "--quick", action="store_true", help="2 test seeds, 1 dev seed, a quarter of the steps"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--reuse",
        type=Path,
        help="an earlier run's JSON: its validation runs and baseline test runs are taken, not "
        "run again (checked to be the same runs); the library's rows always run",
    )
    parser.add_argument(
        "--teachers",
        type=Path,
        help="a folder keeping the trained teachers: one trained before with the same settings "
        "is loaded instead of trained again (default: a temporary folder)",
    )
    parser.add_argument(
        "--test-seeds",
        type=int,
        nargs="+",
        help=f"the test split's seeds (default {' '.join(map(str, TEST_SEEDS))}): seeds never run "
        "before confirm a table whose seeds have seen earlier defaults",
    )
    args = parser.parse_args()
    reuse = json.loads(args.reuse.read_text()) if args.reuse else None
    bench = BENCHES[args.bench]
    test_seeds, dev_seeds = TEST_SEEDS, DEV_SEEDS
    if args.quick:
        bench = Bench(
            **{
                **bench.__dict__,
                "steps": bench.steps // 4,
                "teacher_steps": bench.teacher_steps // 4,
                "eval_every": bench.eval_every // 2,
            }
        )
        test_seeds, dev_seeds = TEST_SEEDS[:2], DEV_SEEDS[:1]
    if args.test_seeds:
        test_seeds = tuple(args.test_seeds)
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.teachers or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        result = protocol(bench, test_seeds, dev_seeds, args.workers, folder, reuse)
    print(table(bench, result))
    root = Path(__file__).parents[1] / "docs" / "results"
    suffix = "-quick" if args.quick else ""
    print(f"curves: {picture(bench, result, root / f'{bench.name}{suffix}.png')}")
    print(f"numbers: {save(result, root / f'{bench.name}{suffix}.json')}")
    print(f"({result['seconds'] / 60:.0f} min)")


if __name__ == "__main__":
    main()
