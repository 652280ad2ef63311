"""Memory per rank of WIN steps under FSDP2 against DDP on the same model, and the bytes
`surgery.fold_sharded` moves against the model size (2 ranks, gloo on CPU, or NCCL on GPUs).

    python bench/fsdp_memory.py            # LLaMA-style student, 8 layers, hidden 512 (~30M params)
    python bench/fsdp_memory.py --quick    # hidden 128

Memory: on GPUs the allocator's peak (torch.cuda.max_memory_allocated); on CPU the growth of each
rank's peak resident set over the step (ru_maxrss), which includes the allocator's slack.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

import surgery
from surgery import win
from surgery.report import render_table


def _model(hidden: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(config)


def _peak() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rank_main(mode: str, hidden: int, out: str) -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (8, 64), device=device)
    batches = [(ids, torch.roll(ids, -1, 1))]
    with torch.device(device):
        student = _model(hidden)
    sites = [f"model.layers.{i}" for i in range(8)]
    paired = surgery.insert_pairs(student, (ids[:1],), wide=2.0, check=False, probes=sites[:1])
    base = _peak()
    win.train(paired, batches, 3, lr=1e-3, optimizer="adam", sharding=mode)
    grown = _peak() - base
    params = sum(p.numel() * p.element_size() for p in student.parameters())
    moved = model_bytes = None
    if mode == "fsdp":
        report = surgery.fold_sharded(paired)
        moved, model_bytes = report.received, report.model_bytes
    Path(f"{out}.{rank}").write_text(
        json.dumps({"grown": grown, "params": params, "moved": moved, "model": model_bytes})
    )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rank-mode", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_mode:
        rank_main(args.rank_mode, args.hidden, args.out)
        return
    hidden = 128 if args.quick else 512
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("ddp", "fsdp"):
            out = os.path.join(tmp, mode)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd += ["--nproc_per_node", "2", __file__, "--rank-mode", mode]
            cmd += ["--hidden", str(hidden), "--out", out]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            results[mode] = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    mib = 2**20
    rows = []
    for mode, ranks in results.items():
        grown = max(r["grown"] for r in ranks)
        rows.append(
            [
                mode.upper(),
                f"{ranks[0]['params'] / mib:.0f}",
                f"{grown / mib:.0f}",
                f"{grown / max(r['grown'] for r in results['ddp']):.2f}",
            ]
        )
    where = "GPU allocator peak" if torch.cuda.is_available() else "CPU peak RSS growth"
    print(
        render_table(
            f"WIN training steps (AdamW) on 2 ranks, LLaMA-style student hidden {hidden}, 8 layers",
            ["sharding", "parameters (MiB)", f"memory per rank, max ({where}, MiB)", "vs DDP"],
            rows,
        )
    )
    fsdp = results["fsdp"]
    print(
        render_table(
            "surgery.fold_sharded: bytes received per rank to fold in place",
            ["rank", "received (MiB)", "model (MiB)", "share"],
            [
                [
                    str(r),
                    f"{x['moved'] / mib:.1f}",
                    f"{x['model'] / mib:.1f}",
                    f"{x['moved'] / x['model']:.2f}",
                ]
                for r, x in enumerate(fsdp)
            ],
        )
    )


if __name__ == "__main__":
    main()
