"""Shared by the speed and memory benchmarks (fold_exactness, capture_time, train_overhead,
onnx_latency): interleaved timing with medians, error measures, the models, the machine line.

Machines running these are shared and noisy, so nothing here reports an absolute time on its own:
every script times its candidates against a baseline *in the same run*, interleaving the candidates
round by round (order reversed every other round, so a slow drift of the machine's load hits all of
them alike) and reporting the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import max_rel_error, randomise_batchnorm  # noqa: E402

__all__ = [
    "max_rel_error",
    "randomise_batchnorm",
    "bert",
    "gpt2",
    "timm_vit",
    "resnet_depth",
    "main_output",
    "interleave",
    "ratio",
    "median",
    "machine",
    "set_threads",
    "step_flops",
    "resnet50_style",
    "arguments",
    "report",
    "measure_each",
    "Times",
]

Times = dict[str, list[float]]


# --- timing -----------------------------------------------------------------------------------


def set_threads(threads: int) -> None:
    """Fix torch's intra-op threads (1 by default in these scripts: with other jobs on the cores,
    one thread per process varies far less than a team of threads waiting for each other)."""
    torch.set_num_threads(threads)


def interleave(
    candidates: Mapping[str, Callable[[], Any]],
    rounds: int,
    *,
    warmup: int = 1,
    number: int = 1,
    budget_s: float | None = None,
) -> Times:
    """Seconds per call of each candidate, one entry per round.

    Each candidate runs `warmup` times first (caches, allocator, lazy init). Then every round calls
    each candidate `number` times back to back, in the candidates' order on even rounds and reversed
    on odd ones. `budget_s` stops after the round that crosses it (at least 3 rounds)."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    names = list(candidates)
    times: Times = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = candidates[name]
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            times[name].append((time.perf_counter() - t0) / number)
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def ratio(times: Times, name: str, baseline: str) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratio time[name] / time[baseline] (paired by round)."""
    per_round = sorted(a / b for a, b in zip(times[name], times[baseline], strict=True))
    if len(per_round) < 4:
        return statistics.median(per_round), per_round[0], per_round[-1]
    q1, q2, q3 = statistics.quantiles(per_round, n=4)
    return q2, q1, q3


def ratio_cell(times: Times, name: str, baseline: str) -> str:
    """'1.04 (1.01-1.07)': median per-round ratio and its quartiles (min-max under 4 rounds)."""
    mid, lo, hi = ratio(times, name, baseline)
    return f"{mid:.3f} ({lo:.2f}-{hi:.2f})"


def step_flops(fn: Callable[[], Any]) -> float:
    """FLOPs (matmul/conv/attention, as torch.utils.flop_counter counts them) of one call."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def machine(threads: int | None = None) -> str:
    """One line for a table caption: date, CPU/GPU, cores, torch version, threads, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load avg " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    threads = threads if threads is not None else torch.get_num_threads()
    return (
        f"{datetime.date.today().isoformat()}, {cpu} ({os.cpu_count()} cores){gpu}, "
        f"torch {torch.__version__.split('+')[0]}, {threads} thread(s){load}"
    )


# --- models -----------------------------------------------------------------------------------


def main_output(output: Any) -> torch.Tensor:
    """The tensor to compare: a tensor itself, else an HF output's logits / last_hidden_state."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if value is not None:
            return value
    raise TypeError(f"no tensor output in {type(output).__name__}")


def bert(
    layers: int = 4,
    hidden: int = 128,
    *,
    heads: int = 4,
    intermediate: int | None = None,
    vocab: int = 1000,
    head: str = "BertModel",
    **config: Any,
) -> nn.Module:
    """A Hugging Face BERT with random weights (head: BertModel, BertForSequenceClassification...)."""
    import transformers

    cfg = transformers.BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate or 4 * hidden,
        vocab_size=vocab,
        **config,
    )
    return getattr(transformers, head)(cfg)


def gpt2(layers: int = 4, hidden: int = 64, *, heads: int = 4, vocab: int = 1000) -> nn.Module:
    """A Hugging Face GPT-2 LM with random weights (tied embeddings: that site is refused)."""
    import transformers

    cfg = transformers.GPT2Config(
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        vocab_size=vocab,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def timm_vit(depth: int = 4, dim: int = 96, img: int = 32) -> nn.Module:
    """A small timm VisionTransformer (fused qkv Linear, pre-LN blocks)."""
    import timm

    return timm.models.vision_transformer.VisionTransformer(
        img_size=img, patch_size=8, embed_dim=dim, depth=depth, num_heads=4, num_classes=10
    )


def resnet_depth(blocks: int, classes: int = 10) -> nn.Module:
    """A torchvision ResNet of BasicBlocks with `blocks` blocks in 4 equal stages (12 -> [3,3,3,3])."""
    from torchvision.models.resnet import BasicBlock, ResNet

    if blocks % 4:
        raise ValueError(f"blocks must be a multiple of 4, got {blocks}")
    return ResNet(BasicBlock, [blocks // 4] * 4, num_classes=classes)


def resnet50_style(width: float = 1.0, classes: int = 1000) -> nn.Module:
    """ResNet-50 (torchvision Bottleneck blocks, [3, 4, 6, 3]) with every channel count x `width`:
    width 1 is torchvision's resnet50; 0.5 and 0.25 are the WIN paper's thin students."""
    from torchvision.models.resnet import Bottleneck, conv1x1

    def channels(c: int) -> int:
        return max(int(round(c * width)), 8)

    stem = channels(64)
    layers: list[nn.Module] = [
        nn.Conv2d(3, stem, 7, 2, 3, bias=False),
        nn.BatchNorm2d(stem),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    inplanes = stem
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
        planes, stride = channels(planes), 1 if i == 0 else 2
        out = planes * Bottleneck.expansion
        down = nn.Sequential(conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
        stage = [Bottleneck(inplanes, planes, stride, down)]
        stage += [Bottleneck(out, planes) for _ in range(blocks - 1)]
        layers.append(nn.Sequential(*stage))
        inplanes = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, classes)]
    return nn.Sequential(*layers)


# --- command line and output ------------------------------------------------------------------


def arguments(doc: str | None, quick_help: str, threads: int = 1) -> argparse.ArgumentParser:
    """The options every speed script has: --quick (under 5 minutes on a CPU) and --threads."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--threads", type=int, default=threads, help=f"torch threads (default {threads})"
    )
    return parser


def report(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    caption: str,
    misses: list[str],
) -> None:
    """Print the table, then one line: every goal met, or which were missed."""
    from surgery.report import render_table

    print(render_table(title, columns, rows, caption=caption))
    print("goals: " + ("all met" if not misses else "MISSED: " + "; ".join(misses)))


def measure_each(
    models: Mapping[str, tuple[Callable[[], nn.Module], Callable[..., Any]]],
    measure: Callable[[Callable[[], nn.Module], Callable[..., Any]], dict],
    rows: list[list[str]],
    misses: list[str],
    width: int,
) -> Iterator[tuple[str, dict, float]]:
    """(name, measure(build, make_inputs), start time) per model; a model that raises gets an error
    row of `width` cells and a miss instead, so one failure does not hide the others."""
    for name, (build, make_inputs) in models.items():
        start = time.perf_counter()
        try:
            result = measure(build, make_inputs)
        except Exception as error:  # noqa: BLE001 - reported in the table
            rows.append(
                [name, "error", f"{type(error).__name__}: {error}"[:200]] + [""] * (width - 3)
            )
            misses.append(f"{name}: error")
            continue
        yield name, result, start
