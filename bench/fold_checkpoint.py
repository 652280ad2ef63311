"""Folding a big paired checkpoint on disk: `surgery fold` against a plain safetensors load + save of
the same file, each in a fresh process, in one run (wall time, peak RSS as a fraction of the file).

The checkpoint is synthetic and BERT-shaped (post-LN encoder, fp32): token and position embeddings,
then layers of q/k/v/o (d x d) and a 4d MLP; a pair (d -> D = 2d) at every block boundary folds into
the next layer's q, k and v, as in the WIN paper's Figure 2. A third row times the float64 algebra
alone (the same matrix products on random data, no I/O): the floor of any exact fold.

    python bench/fold_checkpoint.py            # ~4 GiB checkpoint (needs ~13 GiB free disk)
    python bench/fold_checkpoint.py --quick    # ~400 MiB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from surgery.files.outputs import atomic_output
from surgery.files.tensorfile import Spec, Writer
from surgery.plan import Plan, Route, Site, Target
from surgery.report import render_table

VOCAB, POSITIONS = 32000, 512
PROJECTIONS = ("query", "key", "value")


def layer_specs(i: int, d: int) -> list[Spec]:
    """One encoder layer's tensors (names as in Hugging Face BERT)."""
    p = f"encoder.layer.{i}"
    shapes = {
        **{f"{p}.attention.self.{n}.weight": (d, d) for n in PROJECTIONS},
        **{f"{p}.attention.self.{n}.bias": (d,) for n in PROJECTIONS},
        f"{p}.attention.output.dense.weight": (d, d),
        f"{p}.attention.output.dense.bias": (d,),
        f"{p}.attention.output.LayerNorm.weight": (d,),
        f"{p}.attention.output.LayerNorm.bias": (d,),
        f"{p}.intermediate.dense.weight": (4 * d, d),
        f"{p}.intermediate.dense.bias": (4 * d,),
        f"{p}.output.dense.weight": (d, 4 * d),
        f"{p}.output.dense.bias": (d,),
        f"{p}.output.LayerNorm.weight": (d,),
        f"{p}.output.LayerNorm.bias": (d,),
    }
    return [Spec(name, torch.float32, shape) for name, shape in shapes.items()]


def site(i: int, d: int, D: int) -> Site:
    """The pair on the input of layer i (the embeddings' output for i = 0), folded into its q/k/v."""
    name = f"encoder.layer.{i - 1}" if i else "embeddings"
    key = name.replace(".", "_")
    weights = [f"encoder.layer.{i}.attention.self.{n}.weight" for n in PROJECTIONS]
    route = Route(
        "consumer", [Target("input_weight", {"weight": w}, axis=1) for w in weights], [], weights
    )
    params = {f"{m}.weight": f"pairs.{key}.{m}.weight" for m in ("widen", "narrow")}
    return Site(name, name, [1, 128, d], 2, d, D, False, route, None, key, params)


def build(path: Path, target_bytes: int, d: int) -> tuple[Plan, int]:
    """Write the synthetic paired checkpoint tensor by tensor (never all in memory)."""
    D = 2 * d
    embeddings = [
        Spec("embeddings.word_embeddings.weight", torch.float32, (VOCAB, d)),
        Spec("embeddings.position_embeddings.weight", torch.float32, (POSITIONS, d)),
    ]
    per_layer = sum(s.nbytes for s in layer_specs(0, d)) + 2 * d * D * 4
    layers = max(2, round((target_bytes - sum(s.nbytes for s in embeddings)) / per_layer))
    plan = Plan("bench.BertShaped", "synthetic", [[1, 128]], [site(i, d, D) for i in range(layers)])
    pairs = [
        Spec(name, torch.float32, (D, d) if role.startswith("widen") else (d, D))
        for s in plan.sites
        for role, name in s.params.items()
    ]
    specs = embeddings + [s for i in range(layers) for s in layer_specs(i, d)] + pairs
    g = torch.Generator().manual_seed(0)
    with atomic_output(path) as temp, open(temp, "wb") as file:
        writer = Writer(file.fileno(), specs, {"format": "pt", "surgery.plan": plan.to_json(None)})
        for spec in specs:
            scale = spec.shape[-1] ** -0.5 if len(spec.shape) == 2 else 0.02
            writer.write(spec.name, torch.randn(spec.shape, generator=g) * scale)
    return plan, layers


def child(kind: str, src: str, dst: str) -> None:
    """Run one measured job in this (fresh) process; print its seconds and peak RSS as JSON."""
    start = time.perf_counter()
    if kind == "plain":
        from safetensors.torch import load_file, save_file

        save_file(load_file(src), dst)
    elif kind == "fold":
        from surgery.cli.main import main

        assert main(["fold", src, "--out", dst]) == 0
    else:  # the fold's float64 algebra alone: per site W = M2 M1, then q, k, v absorb W
        layers, d = map(int, dst.split("x"))
        m1, m2 = torch.randn(2 * d, d).double(), torch.randn(d, 2 * d).double()
        weight = torch.randn(d, d)
        start = time.perf_counter()
        for _ in range(layers):
            W = m2 @ m1
            for _ in PROJECTIONS:
                (weight.double() @ W).float()
    seconds = time.perf_counter() - start
    with open("/proc/self/status") as status:
        hwm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
    print(json.dumps({"seconds": seconds, "peak": hwm}))


def measure(kind: str, src: Path | str, dst: Path | str) -> dict[str, float]:
    """One job in a fresh interpreter: process wall time, in-process seconds, peak RSS (VmHWM, not
    ru_maxrss, which a child inherits from the process it was forked from)."""
    os.sync()  # the previous job's dirty pages are not this job's cost
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(src), str(dst)],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - start
    return {"wall": wall, **json.loads(result.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a ~400 MiB checkpoint instead of ~4 GiB"
    )
    parser.add_argument("--hidden", type=int, default=1024, help="d (default 1024, BERT-large)")
    parser.add_argument("--dir", help="where to write the files (default: a temporary directory)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    target = (400 if args.quick else 4096) * 2**20
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        src = Path(folder, "paired.safetensors")
        start = time.perf_counter()
        plan, layers = build(src, target, args.hidden)
        size = src.stat().st_size
        print(
            f"built {src.name}: {size / 2**30:.2f} GiB fp32, {layers} layers, d={args.hidden}, "
            f"{len(plan.sites)} pairs d->2d ({time.perf_counter() - start:.0f} s)"
        )
        plain = measure("plain", src, Path(folder, "plain.safetensors"))
        Path(folder, "plain.safetensors").unlink()
        fold = measure("fold", src, Path(folder, "thin.safetensors"))
        algebra = measure("algebra", "-", f"{layers}x{args.hidden}")
    rows = [
        [
            name,
            f"{r['wall']:.1f}",
            f"{r['seconds']:.1f}",
            f"{r['peak'] / 2**30:.2f}",
            f"{r['peak'] / size:.2f}",
        ]
        for name, r in (
            ("safetensors load_file + save_file", plain),
            ("surgery fold (CLI)", fold),
            ("float64 algebra alone (no I/O)", algebra),
        )
    ]
    print(
        render_table(
            f"Folding a {size / 2**30:.2f} GiB paired checkpoint (each row a fresh process)",
            ["job", "process wall s", "in-process s", "peak RSS GiB", "peak RSS / file"],
            rows,
            caption=(
                f"wall-time ratio fold / plain = {fold['wall'] / plain['wall']:.2f} (goal <= 1.5); "
                f"fold peak RSS / file = {fold['peak'] / size:.2f} (goal <= 0.5)"
            ),
        )
    )


if __name__ == "__main__":
    main()
