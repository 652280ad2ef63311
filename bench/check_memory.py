"""Peak memory of the numeric self-check, as multiples of the model's own size.

For a Hugging Face LlamaForCausalLM of about 250M parameters (~0.93 GiB in float32) and a
torchvision ResNet-50, `surgery.insert_pairs(model, x, wide=2.0)` runs in a fresh process with
check=False, the default check (each group of sites on the layers it touches) and check="full" (a
float64 copy of the whole model, paired and folded end to end). Each row: the peak resident set
after building the model and during insert_pairs, and what insert_pairs adds over the model, in
model sizes; then what each check adds over check=False (the goal: the default adds at most 0.3x).

    python bench/check_memory.py            # both models, the three modes (~5 min)
    python bench/check_memory.py --quick    # a ~60M LLaMA and ResNet-50
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = {"check=False": False, "default (local)": True, 'check="full"': "full"}


def build(name: str, quick: bool):
    import torch

    torch.manual_seed(0)
    if name == "llama":
        import transformers

        layers, hidden, inter = (4, 768, 2048) if quick else (14, 1024, 2816)
        config = transformers.LlamaConfig(
            vocab_size=32000, hidden_size=hidden, intermediate_size=inter,
            num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
            max_position_embeddings=64, tie_word_embeddings=False,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config).eval(), (torch.randint(0, 32000, (1, 16)),)
    import torchvision

    return torchvision.models.resnet50(num_classes=1000).eval(), (torch.randn(1, 3, 64, 64),)


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def one(name: str, mode: str, quick: bool) -> dict:
    """In this (fresh) process: build, then insert_pairs with the mode's check."""
    import torch

    import surgery

    torch.set_num_threads(2)
    model, x = build(name, quick)
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    built = _peak_gib()
    started = time.time()
    paired = surgery.insert_pairs(model, x, wide=2.0, check=MODES[mode])
    seconds = time.time() - started
    return {
        "size": size,
        "built": built,
        "peak": _peak_gib(),
        "seconds": seconds,
        "sites": len(paired.plan.sites),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.quick)))
        return
    print(
        f"{'model':10s} {'check':18s} {'model GiB':>9s} {'peak GiB':>9s} {'insert_pairs adds':>18s} {'time s':>7s} {'sites':>5s}"
    )
    for name in ("llama", "resnet50"):
        results = {}
        for mode in MODES:
            cmd = [sys.executable, str(Path(__file__)), "--one", name, mode] + (
                ["--quick"] if args.quick else []
            )
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = results[mode] = json.loads(out.strip().splitlines()[-1])
            added = (r["peak"] - r["built"]) / r["size"]
            print(
                f"{name:10s} {mode:18s} {r['size']:9.2f} {r['peak']:9.2f} {added:17.2f}x {r['seconds']:7.1f} {r['sites']:5d}"
            )
        base = results["check=False"]["peak"]
        for mode in ("default (local)", 'check="full"'):
            r = results[mode]
            print(f"{'':10s} {mode} adds over check=False: {(r['peak'] - base) / r['size']:.2f}x the model, "
                  f"time {r['seconds'] / max(results['check=False']['seconds'], 1e-9):.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
