"""Capture and plan time vs depth: surgery's analysis against the graph capture it is built on.

For a Hugging Face BERT (hidden 64, 4 heads, L layers, input 1x16 token ids) and a torchvision-style
ResNet of BasicBlocks (`blocks` blocks in 4 stages, input 1x3x32x32), at 12, 24, 48 and 96 blocks:

- baseline: the capture surgery itself uses for that model, alone -- torch.fx.symbolic_trace(model)
  when it traces (the ResNet), else torch.export.export(model, args, strict=False) (BERT: fx cannot
  trace Hugging Face's forward, so surgery's capture tries fx, fails, and falls back to export);
- capture: surgery's own capture (surgery.ir.capture.capture): baseline + what it adds to get shapes
  and a Dataflow (fx: ShapeProp runs the model once; the failed fx attempt first, for BERT);
- find_blocks: surgery.find_blocks(model, args) -- capture + the boundary / fold-route analysis;
- plan_pairs: surgery.plan_pairs(model, args, check=False) -- capture + analysis (with cuts inside
  blocks) + choosing sites and widths: everything insert_pairs does before it builds a module;
- checked plan: surgery.plan_pairs(model, args), the default: the same plus the numeric self-check
  (random pairs on every candidate site, paired vs folded, each group of sites replayed in float64
  on the layers it touches from one recorded forward; surgery.analysis.localcheck).

So every "ours" time is baseline + analysis; the ratios say what the analysis costs on top of the
capture. Candidates are interleaved round by round (perf_common.interleave); ratios are medians of
the per-round ratios with quartiles (min-max under 4 rounds); absolute times are context only.

Goals (checked on plan_pairs, the full planning path, and find_blocks, both without the check):
- ours / baseline <= 1.3 (median) at every depth;
- the self-check: checked plan / plan_pairs <= 1.5 (median) at every depth;
- linear in depth: per-block time of plan_pairs at the largest depth <= 1.5x its per-block time at
  the smallest depth (fixed costs make per-block time fall with depth, so growth above 1.5 means a
  super-linear term).

    python bench/capture_time.py            # depths 12, 24, 48, 96; 5 rounds
    python bench/capture_time.py --quick    # depths 12, 24, 48; 3 rounds (~1-2 min)
    python bench/capture_time.py --quick --profile   # + cProfile of plan_pairs at the largest depth
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from perf_common import (  # noqa: E402
    arguments,
    bert,
    interleave,
    machine,
    median,
    ratio,
    ratio_cell,
    report,
    resnet_depth,
    set_threads,
)

import surgery  # noqa: E402
from surgery.ir.capture import capture  # noqa: E402

GOAL_RATIO = 1.3
GOAL_GROWTH = 1.5
GOAL_CHECK = 1.5
FX = "torch.fx.symbolic_trace"
PROFILE_FILTER = (
    r"surgery/|_symbolic_trace.py.*\(trace\)|shape_prop.py.*\(propagate\)"
    r"|graph_module.py.*\(__init__\)|export/__init__.py.*\(export\)"
)


def models() -> dict[str, tuple[Callable[[int], nn.Module], Callable[[], tuple[Any, ...]]]]:
    return {
        "HF BERT (hidden 64)": (
            lambda depth: bert(depth, 64, heads=4),
            lambda: (torch.randint(0, 1000, (1, 16)),),
        ),
        "ResNet (BasicBlocks)": (resnet_depth, lambda: (torch.randn(1, 3, 32, 32),)),
    }


def baseline_fn(model: nn.Module, inputs: tuple[Any, ...], method: str) -> Callable[[], Any]:
    if method == FX:
        return lambda: torch.fx.symbolic_trace(model)
    return lambda: torch.export.export(model, inputs, strict=False)


def measure(model: nn.Module, inputs: tuple[Any, ...], rounds: int) -> dict[str, Any]:
    with torch.no_grad():
        table = surgery.find_blocks(model, inputs, check=False)  # which capture surgery uses
    method = table.flow.method
    times = interleave(
        {
            "baseline": baseline_fn(model, inputs, method),
            "capture": lambda: capture(model, inputs),
            "find_blocks": lambda: surgery.find_blocks(model, inputs, check=False),
            "plan_pairs": lambda: surgery.plan_pairs(model, inputs, check=False),
            "checked plan": lambda: surgery.plan_pairs(model, inputs),
        },
        rounds,
    )
    sites = len(surgery.plan_pairs(model, inputs).sites)
    return {"method": method, "times": times, "boundaries": len(table), "sites": sites}


def profile(model: nn.Module, inputs: tuple[Any, ...], top: int = 20) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    surgery.plan_pairs(model, inputs)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
    stats.print_stats(PROFILE_FILTER, top)  # surgery's functions and the torch steps it calls
    return out.getvalue()


def run(quick: bool, want_profile: bool) -> tuple[list[list[str]], list[str], list[str]]:
    depths = [12, 24, 48] if quick else [12, 24, 48, 96]
    rounds = 3 if quick else 5
    rows, misses, profiles = [], [], []
    for name, (build, make_inputs) in models().items():
        first_per_block: float | None = None
        for depth in depths:
            torch.manual_seed(0)
            model = build(depth).eval()
            inputs = make_inputs()
            start = time.perf_counter()
            try:
                m = measure(model, inputs, rounds)
            except Exception as error:  # noqa: BLE001 - one model failing must not hide the others
                rows.append([name, str(depth), "error", f"{type(error).__name__}: {error}"[:200]])
                rows[-1] += [""] * 9
                misses.append(f"{name} {depth}: error")
                continue
            times = m["times"]
            per_block = median(times["plan_pairs"]) / depth
            first_per_block = first_per_block or per_block
            growth = per_block / first_per_block
            met = []
            for ours in ("find_blocks", "plan_pairs"):
                mid = ratio(times, ours, "baseline")[0]
                met.append(mid <= GOAL_RATIO)
                if mid > GOAL_RATIO:
                    misses.append(
                        f"{name} {depth} blocks: {ours}/baseline {mid:.2f} > {GOAL_RATIO}"
                    )
            check_cost = ratio(times, "checked plan", "plan_pairs")[0]
            met.append(check_cost <= GOAL_CHECK)
            if check_cost > GOAL_CHECK:
                misses.append(
                    f"{name} {depth} blocks: checked plan/plan_pairs {check_cost:.2f} > {GOAL_CHECK}"
                )
            linear = growth <= GOAL_GROWTH
            if not linear:
                misses.append(
                    f"{name} {depth} blocks: per-block plan time {growth:.2f}x the "
                    f"{depths[0]}-block one > {GOAL_GROWTH}"
                )
            rows.append(
                [
                    name,
                    str(depth),
                    f"{m['sites']}/{m['boundaries']}",
                    m["method"].replace("torch.", ""),
                    f"{median(times['baseline']) * 1e3:.0f}",
                    ratio_cell(times, "capture", "baseline"),
                    ratio_cell(times, "find_blocks", "baseline"),
                    ratio_cell(times, "plan_pairs", "baseline"),
                    ratio_cell(times, "checked plan", "plan_pairs"),
                    f"{per_block * 1e3:.1f}",
                    f"{growth:.2f}",
                    "yes" if all(met) and linear else "NO",
                    f"{time.perf_counter() - start:.0f}",
                ]
            )
        if want_profile:
            profiles.append(f"--- cProfile: plan_pairs on {name}, {depth} blocks ---\n")
            profiles[-1] += profile(model, inputs)
    return rows, misses, profiles


def main() -> None:
    parser = arguments(__doc__, "depths 12, 24, 48; 3 rounds")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile plan_pairs at the largest depth"
    )
    args = parser.parse_args()
    set_threads(args.threads)
    start = time.perf_counter()
    rows, misses, profiles = run(args.quick, args.profile)
    report(
        "Capture and plan time vs depth: surgery against the capture it is built on"
        + (" (--quick)" if args.quick else ""),
        [
            "model",
            "blocks",
            "sites / boundaries",
            "baseline",
            "baseline ms",
            "capture / baseline",
            "find_blocks / baseline",
            "plan_pairs / baseline",
            "checked plan / plan_pairs",
            "plan ms / block",
            "per-block growth",
            f"goals (<= {GOAL_RATIO}x, check <= {GOAL_CHECK}x, growth <= {GOAL_GROWTH})",
            "s",
        ],
        rows,
        (
            "ratios: median per-round time ratio (quartiles), candidates interleaved; ours = "
            "baseline capture + analysis (surgery's capture calls symbolic_trace / export "
            "itself); growth: plan ms/block over the smallest depth's. "
            f"{machine(args.threads)}; {time.perf_counter() - start:.0f} s in all"
        ),
        misses,
    )
    for text in profiles:
        print(text)


if __name__ == "__main__":
    main()
