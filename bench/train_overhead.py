"""Training overhead of the pairs: step time (forward, backward, SGD step) of the paired model over the
thin model it came from, with the pairs run on the activations (plain) and pre-merged into the
absorbing layers' weights (`surgery.premerged`, policy "auto"), timed in interleaved rounds.

Pre-merging removes the per-sample cost of a pair; what is left is the merge itself, about d/N of a
merged layer's cost (d its input width, N the feature vectors per step that reach it): it shrinks as
the batch grows and the model thins. So the table also gives each configuration's FLOP ratio (exact,
counted on the meta device), including full-size rows too slow to time on a CPU.

Models: a ResNet-50-style network (torchvision Bottleneck blocks, channels x width: 1/2 and 1/4 are
the WIN paper's thin students) and BERT-style encoders (Hugging Face BertModel, 4 layers).

    python bench/train_overhead.py            # timed: 1/2-width ResNet-50 224px b64 and b128, BERT h512 32x256
    python bench/train_overhead.py --quick    # timed: 1/4-width ResNet-50 224px b32, BERT h256 32x128
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from perf_common import (  # noqa: E402
    Times,
    arguments,
    bert,
    interleave,
    machine,
    main_output,
    median,
    ratio,
    ratio_cell,
    report,
    resnet50_style,
    set_threads,
    step_flops,
)

import surgery  # noqa: E402
from surgery.report import progress_bar  # noqa: E402

GOAL = 1.10


@dataclass
class Config:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    timed: bool


def resnet(width: float, res: int, batch: int, timed: bool) -> Config:
    return Config(
        f"ResNet-50 x{width:g} width, {res}px, batch {batch}",
        lambda: resnet50_style(width),
        lambda: (torch.randn(batch, 3, res, res),),
        timed,
    )


def bert_style(hidden: int, batch: int, seq: int, timed: bool, layers: int = 4) -> Config:
    return Config(
        f"BERT {layers}x{hidden}, batch {batch} x seq {seq}",
        lambda: bert(layers, hidden, heads=max(hidden // 64, 1), vocab=30522),
        lambda: (torch.randint(0, 30522, (batch, seq)),),
        timed,
    )


def configs(quick: bool) -> list[Config]:
    if quick:
        timed = [resnet(0.25, 224, 32, True), bert_style(256, 32, 128, True)]
    else:
        timed = [
            resnet(0.5, 224, 64, True),
            resnet(0.5, 224, 128, True),
            bert_style(512, 32, 256, True),
        ]
    counted = [
        resnet(1.0, 224, 32, False),
        resnet(1.0, 224, 128, False),
        bert_style(768, 32, 128, False, layers=12),
        bert_style(768, 32, 512, False, layers=12),
    ]
    return timed + counted


def _loss(output: object) -> torch.Tensor:
    return main_output(output).float().pow(2).mean()


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: tuple) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _loss(model(*inputs)).backward()
        optimizer.step()

    return step


def flop_ratios(config: Config) -> tuple[float, float, float]:
    """(thin GFLOP per step, plain ratio, premerged ratio), counted on the meta device."""
    with torch.device("meta"):
        thin = config.build().train()
    inputs = tuple(x.to("meta") for x in config.inputs())
    paired = surgery.insert_pairs(thin, tuple(x[:2] for x in inputs), init="random").train()
    base = step_flops(lambda: _loss(thin(*inputs)).backward())
    plain = step_flops(lambda: _loss(paired(*inputs)).backward())
    with surgery.premerged(paired):
        merged = step_flops(lambda: _loss(paired(*inputs)).backward())
    return base / 1e9, plain / base, merged / base


def time_ratios(config: Config, rounds: int, budget_s: float) -> Times:
    """Seconds per training step of the thin, plain paired and pre-merged models, per round."""
    torch.manual_seed(0)
    thin = config.build().train()
    inputs = config.inputs()
    paired = surgery.insert_pairs(thin, tuple(x[:2] for x in inputs), init="random").train()
    merged = copy.deepcopy(paired)
    surgery.set_premerged(merged, "auto")
    steps = {}
    for name, model in (("thin", thin), ("plain", paired), ("premerged", merged)):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        steps[name] = _step(model, optimizer, inputs)
    return interleave(steps, rounds, warmup=1, budget_s=budget_s)


def run(quick: bool, rounds: int, budget_s: float) -> tuple[list[list[str]], list[str]]:
    rows, misses = [], []
    chosen = configs(quick)
    with progress_bar() as progress:
        task = progress.add_task("train_overhead", total=len(chosen))
        for config in chosen:
            start = time.perf_counter()
            gflop, plain_flops, merged_flops = flop_ratios(config)
            row = [config.name, f"{gflop:.0f}", f"{plain_flops:.3f}", f"{merged_flops:.3f}"]
            if config.timed:
                times = time_ratios(config, rounds, budget_s)
                merged_ratio = ratio(times, "premerged", "thin")[0]
                ok = merged_ratio <= GOAL
                if not ok:
                    misses.append(f"{config.name}: premerged {merged_ratio:.3f}x > {GOAL}")
                row += [
                    f"{median(times['thin']):.2f}",
                    ratio_cell(times, "plain", "thin"),
                    ratio_cell(times, "premerged", "thin"),
                    str(len(times["thin"])),
                    "yes" if ok else "NO",
                ]
            else:
                row += ["not timed", "", "", "", "(FLOPs only)"]
            row.append(f"{time.perf_counter() - start:.0f}")
            rows.append(row)
            progress.advance(task)
    return rows, misses


def main() -> None:
    parser = arguments(__doc__, "smaller timed models, < 5 min", threads=2)
    parser.add_argument(
        "--rounds", type=int, default=None, help="timing rounds (default 7; 4 quick)"
    )
    args = parser.parse_args()
    set_threads(args.threads)
    rounds = args.rounds or (4 if args.quick else 7)
    start = time.perf_counter()
    rows, misses = run(args.quick, rounds, budget_s=60 if args.quick else 900)
    report(
        "Training overhead: paired step time / thin step time (forward + backward + SGD step)"
        + (" (--quick)" if args.quick else ""),
        [
            "model",
            "thin GFLOP/step",
            "plain FLOP ratio",
            "premerged FLOP ratio",
            "thin s/step",
            "plain time ratio",
            "premerged time ratio",
            "rounds",
            f"premerged <= {GOAL}",
            "s",
        ],
        rows,
        (
            "time ratios: median of per-round ratios (quartiles), candidates interleaved; FLOP "
            "ratios: torch.utils.flop_counter on the meta device. Pairs: D = 2d at every boundary "
            f"that folds, random. {machine()}; {time.perf_counter() - start:.0f} s in all"
        ),
        misses,
    )


if __name__ == "__main__":
    main()
