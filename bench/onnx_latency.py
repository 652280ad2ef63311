"""ONNX Runtime latency of the folded model against the original thin model (and of the paired model,
for contrast): folding must cost nothing at inference.

For each model (eval mode, BatchNorm statistics randomised):
- original: the thin model as built;
- paired: surgery.insert_pairs(original, inputs, init="random") -- random non-identity pairs at every
  boundary that folds;
- folded: surgery.fold(paired) -- the original architecture with different weight values.

Each is exported the way surgery.verify does (surgery.verify.export_onnx: dynamo exporter, no
exporter optimisation) and loaded into an onnxruntime.InferenceSession (CUDAExecutionProvider when
torch sees a GPU, else CPUExecutionProvider; intra-op threads = --threads). session.run is timed
with the three sessions interleaved round by round (perf_common.interleave), the original as the
baseline; ratios are medians of the per-round ratios with quartiles; the original's absolute time
is context only. The provider column is the one that actually ran (session.get_providers()[0]).

Goals (folded vs original): latency ratio 1.00 +- 0.02 (median), identical ONNX operator histograms
(surgery.verify's structural check: op_type counts over the graph and its local functions), equal
parameter counts (initializer elements). The paired model's ratio and extra nodes are shown as
the cost the fold removes; no goal applies to it.

    python bench/onnx_latency.py            # resnet18, resnet50 at 224, BERT 4x128 seq 64, ViT-S
    python bench/onnx_latency.py --quick    # resnet18 at 64, BERT 4x128 seq 64, small ViT
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from perf_common import (  # noqa: E402
    arguments,
    bert,
    interleave,
    machine,
    max_rel_error,
    measure_each,
    median,
    randomise_batchnorm,
    ratio,
    ratio_cell,
    report,
    set_threads,
    timm_vit,
)

import surgery  # noqa: E402
from surgery.verify import _op_histogram, _param_count, export_onnx  # noqa: E402

GOAL_TOLERANCE = 0.02
MAX_OUTPUT_ERROR = 1e-4  # folded vs paired ONNX outputs, normwise (a sanity check, not a goal)
ROUND_S = 0.05  # aim for this much time per candidate per round (several runs of a fast model)

Inputs = tuple[torch.Tensor, ...]


def image(res: int) -> Callable[[], Inputs]:
    return lambda: (torch.randn(1, 3, res, res),)


def token_ids(seq: int) -> Callable[[], Inputs]:
    return lambda: (torch.randint(0, 1000, (1, seq)),)


def models(quick: bool) -> dict[str, tuple[Callable[[], nn.Module], Callable[[], Inputs]]]:
    tv = torchvision.models
    if quick:
        return {
            "torchvision resnet18 (64x64)": (lambda: tv.resnet18(num_classes=10), image(64)),
            "HF BERT (4 layers, 128, seq 64)": (lambda: bert(4, 128), token_ids(64)),
            "timm ViT (4 blocks, 96, 32x32)": (timm_vit, image(32)),
        }
    return {
        "torchvision resnet18 (224x224)": (lambda: tv.resnet18(num_classes=1000), image(224)),
        "torchvision resnet50 (224x224)": (lambda: tv.resnet50(num_classes=1000), image(224)),
        "HF BERT (4 layers, 128, seq 64)": (lambda: bert(4, 128), token_ids(64)),
        "timm ViT (12 blocks, 384, 64x64)": (lambda: timm_vit(12, 384, 64), image(64)),
    }


def providers() -> list[str]:
    if torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session(proto: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=providers())


def runner(sess: ort.InferenceSession, inputs: Inputs) -> Callable[[], Any]:
    names = [i.name for i in sess.get_inputs()]
    feed = {n: x.numpy() for n, x in zip(names, inputs, strict=True)}
    return lambda: sess.run(None, feed)


def histogram_diff(a: onnx.ModelProto, b: onnx.ModelProto) -> dict[str, int]:
    """op_type -> count in a minus count in b, for the op types whose counts differ."""
    ha, hb = _op_histogram(a), _op_histogram(b)
    return {op: ha[op] - hb[op] for op in sorted(ha | hb) if ha[op] != hb[op]}


def _diff_text(diff: dict[str, int], top: int | None = None) -> str:
    """'MatMul +26, Transpose +56', largest changes first when cut to `top` entries."""
    items = list(diff.items())
    if top is not None and len(items) > top:
        items = sorted(items, key=lambda kv: -abs(kv[1]))[:top] + [("...", 0)]
    return ", ".join(op if op == "..." else f"{op} {n:+d}" for op, n in items)


def measure(build: Callable[[], nn.Module], make_inputs: Callable[[], Inputs], args) -> dict:
    torch.manual_seed(0)
    original = randomise_batchnorm(build().eval())
    inputs = make_inputs()
    paired = surgery.insert_pairs(original, inputs, init="random").eval()
    folded = surgery.fold(paired).eval()
    with torch.no_grad():
        protos = {
            "original": export_onnx(original, inputs, "original"),
            "folded": export_onnx(folded, inputs, "folded"),
            "paired": export_onnx(paired, inputs, "paired"),
        }
    sessions = {k: session(p, args.threads) for k, p in protos.items()}
    calls = {k: runner(s, inputs) for k, s in sessions.items()}
    outs = {k: fn() for k, fn in calls.items()}
    error = max(
        max_rel_error(torch.as_tensor(p), torch.as_tensor(f))
        for p, f in zip(outs["paired"], outs["folded"], strict=True)
    )
    t0 = time.perf_counter()
    calls["original"]()
    number = max(1, round(ROUND_S / max(time.perf_counter() - t0, 1e-6)))
    times = interleave(calls, args.rounds, warmup=2, number=number, budget_s=args.budget_per_model)
    return {
        "pairs": len(paired.plan.sites),
        "provider": sessions["folded"].get_providers()[0],
        "times": times,
        "number": number,
        "diff": histogram_diff(protos["folded"], protos["original"]),
        "paired_diff": histogram_diff(protos["paired"], protos["original"]),
        "params": {k: _param_count(p) for k, p in protos.items()},
        "same_output": error <= MAX_OUTPUT_ERROR,
        "error": error,
    }


def run(args) -> tuple[list[list[str]], list[str]]:
    rows, misses = [], []
    measured = measure_each(
        models(args.quick), lambda build, inputs: measure(build, inputs, args), rows, misses, 12
    )
    for name, m, start in measured:
        times, params = m["times"], m["params"]
        mid = ratio(times, "folded", "original")[0]
        in_band = abs(mid - 1.0) <= GOAL_TOLERANCE
        same_ops = not m["diff"]
        same_params = params["folded"] == params["original"]
        if not in_band:
            misses.append(f"{name}: folded/original latency {mid:.3f} outside 1.00 +- 0.02")
        if not same_ops:
            misses.append(f"{name}: operator histograms differ ({_diff_text(m['diff'])})")
        if not same_params:
            misses.append(f"{name}: {params['folded']:,} vs {params['original']:,} parameters")
        if not m["same_output"]:
            misses.append(f"{name}: folded vs paired ONNX output error {m['error']:.1e}")
        paired_extra = sum(m["paired_diff"].values())
        rows.append(
            [
                name,
                m["provider"].removesuffix("ExecutionProvider"),
                str(m["pairs"]),
                f"{median(times['original']) * 1e3:.2f}",
                ratio_cell(times, "folded", "original"),
                ratio_cell(times, "paired", "original"),
                "yes" if same_ops else f"NO: {_diff_text(m['diff'])}",
                f"{paired_extra:+d} ({_diff_text(m['paired_diff'], top=2)})",
                ("yes" if same_params else "NO")
                + f" ({params['original'] / 1e6:.2f}M; paired {params['paired'] / 1e6:.2f}M)",
                f"{len(times['original'])}x{m['number']}",
                "yes" if in_band and same_ops and same_params and m["same_output"] else "NO",
                f"{time.perf_counter() - start:.0f}",
            ]
        )
    return rows, misses


def main() -> None:
    parser = arguments(__doc__, "3 small models, fewer rounds")
    args = parser.parse_args()
    args.rounds = 30 if args.quick else 60
    args.budget_per_model = 15.0 if args.quick else 60.0
    set_threads(args.threads)
    start = time.perf_counter()
    rows, misses = run(args)
    report(
        "ONNX Runtime latency: folded and paired vs the original thin model"
        + (" (--quick)" if args.quick else ""),
        [
            "model",
            "provider",
            "pairs",
            "original ms",
            "folded / original",
            "paired / original",
            "ops identical (folded vs original)",
            "paired extra nodes",
            "params equal",
            "rounds x runs",
            "goals (1.00 +- 0.02, same ops, same params)",
            "s",
        ],
        rows,
        (
            "ratios: median per-round session.run time ratio (quartiles), the three sessions "
            "interleaved, batch 1; 'original ms' is context only. Also checked: the folded "
            "model's ONNX outputs match the paired model's (max|a-b|/max|a| <= 1e-4). "
            f"onnxruntime {ort.__version__}; {machine(args.threads)}; "
            f"{time.perf_counter() - start:.0f} s in all"
        ),
        misses,
    )


if __name__ == "__main__":
    main()
