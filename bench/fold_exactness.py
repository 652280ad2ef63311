"""Fold exactness: how far a folded model is from the paired model it came from, next to the error
of torch.fx's conv-BN fusion on the same model, both measured against fp32 rounding.

For each model (BatchNorm statistics randomised, random non-identity pairs at every boundary that
folds, eval mode):
- ours fp32: max rel error of fold(paired) vs paired, both run in fp32 (normwise: max|a-b| / max|a|);
- ours fp64: the same with the paired model cast to float64 first (the fold's own algebra: ~1e-15
  means exact, what remains in fp32 is rounding);
- fp32 rounding: the paired model run in fp32 vs the same model in fp64 -- the error any fp32
  evaluation of this function has; "ours / rounding" is the goal's ratio (<= 10);
- fx fuse: torch.fx.experimental.optimization.fuse(model) vs model in fp32, and its own rounding
  scale (the original model in fp32 vs fp64). Only for fx-traceable CNNs with conv-BN pairs.

    python bench/fold_exactness.py            # 7 models, batch 4
    python bench/fold_exactness.py --quick    # 6 models (no vgg11_bn), batch 2, smaller inputs
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from perf_common import (  # noqa: E402
    arguments,
    bert,
    gpt2,
    machine,
    main_output,
    max_rel_error,
    measure_each,
    randomise_batchnorm,
    report,
    set_threads,
    timm_vit,
)

import surgery  # noqa: E402

GOAL_ROUNDING = 10.0


def image(res: int) -> Callable[[int], tuple[torch.Tensor]]:
    return lambda batch: (torch.randn(batch, 3, res, res),)


def token_ids(batch: int) -> tuple[torch.Tensor]:
    return (torch.randint(0, 1000, (batch, 16)),)


def models(quick: bool) -> dict[str, tuple[Callable[[], nn.Module], Callable]]:
    res = 32 if quick else 64
    tv = torchvision.models
    # vgg11_bn's flatten boundary (512 x 7 x 7 = 25088 features) gets a 25088 -> 50176 pair: minutes
    # on a CPU, so only in the full run
    vgg = (
        {} if quick else {"torchvision vgg11_bn": (lambda: tv.vgg11_bn(num_classes=10), image(32))}
    )
    return {
        "torchvision resnet18": (lambda: tv.resnet18(num_classes=10), image(res)),
        "torchvision resnet50": (lambda: tv.resnet50(num_classes=10), image(res)),
        "torchvision mobilenet_v2": (lambda: tv.mobilenet_v2(num_classes=10), image(res)),
        **vgg,
        "timm ViT (4 blocks, 96)": (timm_vit, image(32)),
        "HF BERT (4 layers, 128)": (lambda: bert(4, 128), token_ids),
        "HF GPT-2 (4 layers, 64)": (lambda: gpt2(4, 64), token_ids),
    }


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(*inputs))


def _double(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(x.double() if x.is_floating_point() else x for x in inputs)


def _has_conv_bn(model: nn.Module) -> bool:
    kinds = {type(m) for m in model.modules()}
    return nn.BatchNorm2d in kinds and nn.Conv2d in kinds


def measure(build: Callable[[], nn.Module], make_inputs: Callable, batch: int) -> dict:
    torch.manual_seed(0)
    model = randomise_batchnorm(build().eval())
    inputs = make_inputs(batch)
    inputs64 = _double(inputs)
    out: dict = {}

    paired = surgery.insert_pairs(model, inputs, init="random").eval()
    out["pairs"] = len(paired.plan.sites)
    thin = surgery.fold(paired)
    p32, t32 = _run(paired, inputs), _run(thin, inputs)
    del thin
    paired64 = copy.deepcopy(paired).double()
    del paired
    thin64 = surgery.fold(paired64)
    p64, t64 = _run(paired64, inputs64), _run(thin64, inputs64)
    del paired64, thin64
    out["ours32"] = max_rel_error(p32, t32)
    out["ours64"] = max_rel_error(p64, t64)
    out["round_paired"] = max_rel_error(p64, p32)
    out["changed"] = max_rel_error(p32, _run(model, inputs))  # the pairs really change the function

    if _has_conv_bn(model):
        from torch.fx.experimental.optimization import fuse

        fused = fuse(model)  # a fused copy (inplace=False); needs eval mode
        o32 = _run(model, inputs)
        out["fuse32"] = max_rel_error(o32, _run(fused, inputs))
        out["round_orig"] = max_rel_error(_run(copy.deepcopy(model).double(), inputs64), o32)
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf") if a > 0 else 0.0


def run(quick: bool) -> tuple[list[list[str]], list[str]]:
    batch = 2 if quick else 4
    rows, misses = [], []
    measured = measure_each(
        models(quick), lambda build, inputs: measure(build, inputs, batch), rows, misses, 12
    )
    for name, m, start in measured:
        ours_ratio = _ratio(m["ours32"], m["round_paired"])
        row = [
            name,
            str(m["pairs"]),
            f"{m['round_paired']:.1e}",
            f"{m['ours32']:.1e}",
            f"{ours_ratio:.2f}",
            f"{m['ours64']:.1e}",
        ]
        if "fuse32" in m:
            fuse_ratio = _ratio(m["fuse32"], m["round_orig"])
            # errors within one fp32 rounding of the model are indistinguishable from each other
            no_worse = ours_ratio <= max(fuse_ratio, 1.0) or m["ours32"] <= m["fuse32"]
            row += [
                f"{m['fuse32']:.1e}",
                f"{m['round_orig']:.1e}",
                f"{fuse_ratio:.2f}",
                "yes" if no_worse else "NO",
            ]
            if not no_worse:
                misses.append(f"{name}: worse than fx fuse")
        else:
            row += ["n/a (no conv-BN)", "", "", ""]
        within = ours_ratio <= GOAL_ROUNDING
        row += ["yes" if within else "NO", f"{time.perf_counter() - start:.0f}"]
        if not within:
            misses.append(f"{name}: {ours_ratio:.1f}x fp32 rounding")
        rows.append(row)
    return rows, misses


def main() -> None:
    parser = arguments(__doc__, "batch 2, 32x32 images", threads=1)
    args = parser.parse_args()
    set_threads(args.threads)
    start = time.perf_counter()
    rows, misses = run(args.quick)
    report(
        "Fold exactness: folded vs paired (random pairs, random BN statistics), fx conv-BN "
        "fusion for contrast" + (" (--quick)" if args.quick else ""),
        [
            "model",
            "pairs",
            "fp32 rounding (paired fp32 vs fp64)",
            "ours fp32 (folded vs paired)",
            "ours / rounding",
            "ours fp64",
            "fx fuse fp32 (fused vs original)",
            "fp32 rounding (original)",
            "fuse / rounding",
            "ours no worse than fuse",
            "ours <= 10x rounding",
            "s",
        ],
        rows,
        (
            "max normwise relative error max|a-b|/max|a| of the main output; 'no worse' compares "
            "the errors relative to each model's fp32 rounding (anything within one rounding "
            f"counts as equal). {machine()}; "
            f"{time.perf_counter() - start:.0f} s in all"
        ),
        misses,
    )


if __name__ == "__main__":
    main()
