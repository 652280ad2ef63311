"""WIN on character-level language modelling of the Python standard library's own source text: a
deep thin GPT-2-style student (pre-LN: the block outputs are probe-only sites) against a 2x wider
teacher. Compares thin-vanilla, thin-KD and thin-WIN at equal student steps; metric: test bits/char.

    python bench/win_charlm.py            # 3 seeds, the default size (~45 min on 2 CPU cores)
    python bench/win_charlm.py --quick    # 2 seeds, 300 steps (~6 min)
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from win_common import Setup, run  # noqa: E402

VOCAB = [chr(c) for c in range(32, 127)] + ["\n", "\t", "\x00"]  # \x00 stands for anything else
INDEX = {c: i for i, c in enumerate(VOCAB)}


def corpus(chars: int) -> torch.Tensor:
    """The first `chars` characters of the stdlib's .py files (sorted paths), as vocabulary ids."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = []
    total = 0
    for path in sorted(root.glob("*.py")):
        part = path.read_text(encoding="utf-8", errors="replace")
        text.append(part)
        total += len(part)
        if total >= chars:
            break
    joined = "".join(text)[:chars]
    return torch.tensor([INDEX.get(c, INDEX["\x00"]) for c in joined], dtype=torch.long)


def student(layers: int, width: int, context: int) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(
        vocab_size=len(VOCAB),
        n_positions=context,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def windows(
    ids: torch.Tensor, context: int, batch: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(len(ids) - context - 1, generator=g)
    batches = []
    for i in range(0, len(starts) - batch + 1, batch):
        idx = starts[i : i + batch].unsqueeze(1) + torch.arange(context + 1)
        chunk = ids[idx]
        batches.append((chunk[:, :-1], chunk[:, 1:]))
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    context, batch = 64, 32
    ids = corpus(600_000 if args.quick else 2_000_000)
    split = int(0.9 * len(ids))
    train_batches = windows(ids[:split], context, batch, seed=0)
    test = windows(ids[split:], context, 256, seed=1)[:4]

    def bits_per_char(model: torch.nn.Module) -> float:
        with torch.no_grad():
            losses = [
                torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).item()
                for x, y in test
            ]
        return sum(losses) / len(losses) / math.log(2)

    steps = 300 if args.quick else 1500
    setup = Setup(
        make_student=lambda: student(layers=8, width=32, context=context),
        teacher_factor=2.0,
        batches=train_batches,
        example=train_batches[0][0][:2],
        evaluate=bits_per_char,
        steps=steps,
        teacher_steps=steps,
        lr=3e-3,
        finetune_lr=1e-3,
        imitation_lr=3e-3,
        optimizer="adam",
        stages="blocks",
        imitation_fraction=0.2,
        sampled_start=False,  # no head-aware sampling rule for attention yet: WIN starts from random
        lower_is_better=True,
    )
    print(
        run(
            setup,
            seeds=[0, 1] if args.quick else [0, 1, 2],
            metric="test bits/char (lower is better)",
        )
    )


if __name__ == "__main__":
    main()
