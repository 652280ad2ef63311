"""A WinTrainer run on a tiny HF GPT-2 (2x teacher, every stage), shared by tests/test_hf_trainer.py
and its torchrun test: `python hf_trainer_run.py OUT` trains and saves each rank's thin weights to
OUT/rank-R.pt (under torchrun, rank 0 also saves the HF folder OUT/thin)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import transformers

from surgery import win
from surgery.win.hf import WinTrainer

RECIPE = win.Recipe(steps=40, imitation_share=0.3)  # start probes 1-4, imitation 5-16, fine-tune


def setup(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.nn.Module, list]:
    """A tiny GPT-2 student (dropout on, tied embeddings), its 2x teacher trained a little on the
    data, and 64 token sequences that follow simple rules."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    student = transformers.GPT2LMHeadModel(config)
    data = [{"input_ids": (torch.arange(16) * (i % 5 + 1) + i) % 32} for i in range(64)]
    for example in data:
        example["labels"] = example["input_ids"].clone()
    ids = torch.stack([d["input_ids"] for d in data])
    teacher = win.widen(student, 2.0, ids[:2])
    batches = [(ids[i : i + 16], ids[i : i + 16]) for i in range(0, 64, 16)]
    win.train(teacher, batches, 30, lr=1e-2, optimizer="adam", loss_fn=next_token_loss)
    return student.to(dtype), teacher.to(dtype).eval(), data


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )


def trainer(
    student: torch.nn.Module, teacher: torch.nn.Module, data: list, out: Path, **arguments
) -> WinTrainer:
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, logging_steps=1, report_to=[],
        seed=0, use_cpu=True, disable_tqdm=True, **{"save_strategy": "no", **arguments},
    )  # fmt: skip
    return WinTrainer(
        model=copy.deepcopy(student), args=args, train_dataset=data, teacher=teacher, recipe=RECIPE
    )


if __name__ == "__main__":
    out = Path(sys.argv[1])
    student, teacher, data = setup()
    run = trainer(student, teacher, data, out)
    run.train()
    rank = run.args.process_index
    torch.save({k: v.clone() for k, v in run.model.state_dict().items()}, out / f"rank-{rank}.pt")
    run.save_model(str(out / "thin"))
