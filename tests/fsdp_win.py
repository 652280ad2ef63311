"""A short WIN run (imitation + fine-tuning) under FSDP2 on a small CNN and a tiny Hugging Face LLaMA.

`run_win(family, world, rank)` is the run of one rank holding its slice of every global batch;
with world=1 it is the single-process run on the whole batches. Under torchrun this script runs
it on every rank (gloo, FSDP2 per block and at the root) and writes each rank's thin state dict."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import transformers
from small_models import tiny_hf_config
from torch import nn

import surgery
from surgery import win
from surgery.runtime.sharded import is_sharded

FAMILIES = ("cnn", "llama", "gpt2-tied")


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return x + torch.tanh(self.conv(x))


class ResidualCNN(nn.Module):
    """Conv blocks without BatchNorm: the global batch's statistics are not split across ranks."""

    def __init__(self, width: int, depth: int = 2, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean((2, 3)))


def _llama(hidden: int) -> nn.Module:
    config = tiny_hf_config(
        "llama", vocab_size=32, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _gpt2(hidden: int) -> nn.Module:
    config = tiny_hf_config(
        "gpt2", vocab_size=32, n_embd=hidden, n_head=2, n_positions=8,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # dropout would draw per-rank masks
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)  # lm_head tied to the token embedding


def _setup(family: str):
    g = torch.Generator().manual_seed(1)
    if family == "cnn":
        student, teacher = ResidualCNN(4), ResidualCNN(8)
        x = torch.randn(4, 8, 3, 6, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (4, 8), generator=g)
        stages = [["blocks.0"], ["blocks.1"]]
    elif family == "gpt2-tied":
        student, teacher = _gpt2(8), _gpt2(16)
        x = torch.randint(0, 32, (4, 8, 6), generator=g)
        y = torch.roll(x, -1, dims=2)
        stages = [["transformer.h.0"], ["transformer.h.1"]]
    else:
        student, teacher = _llama(8), _llama(16)
        x = torch.randint(0, 32, (4, 8, 6), generator=g)
        y = torch.roll(x, -1, dims=2)
        stages = [["model.layers.0"], ["model.layers.1"]]
    return student.double(), teacher.double().eval(), list(zip(x, y, strict=True)), stages


def run_win(family: str, world: int, rank: int) -> dict:
    torch.manual_seed(0)
    student, teacher, batches, stages = _setup(family)
    if world > 1:  # the frozen teacher sharded too (its layers, then the root)
        win.shard(teacher)
    mine = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches]
    recipe = win.Recipe(
        stages=stages,
        imitation_steps=3,
        finetune_steps=3,
        optimizer="sgd",
        imitation_lr=0.01,
        finetune_lr=0.01,
        loss="mse",
        sharding="fsdp",
    )
    result = win.win(student, teacher, mine, batches[0][0][:2], recipe)
    thin = {k: v.detach().clone() for k, v in result.thin.state_dict().items()}
    tied = [
        result.thin.get_submodule(m).weight is result.thin.get_submodule(e).weight
        for m, e in [("lm_head", "transformer.wte")]
        if family == "gpt2-tied"
    ]
    return {
        "thin": thin,
        "sharded": is_sharded(result.paired),
        "class": type(result.thin).__name__,
        "tied": tied,
    }


def run_premerged(world: int, rank: int) -> dict[str, list[float]]:
    """This rank's loss trajectory of a paired CNN trained under FSDP2 with the pairs merged into
    the weights ("always") and with the pairs on the activations (False)."""
    losses = {}
    for policy in ("always", False):
        torch.manual_seed(0)
        student, _, batches, _ = _setup("cnn")
        paired = surgery.insert_pairs(student, batches[0][0][:2], init="random", bias=True)
        mine = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches]
        losses[str(policy)] = win.train(paired, mine, 4, lr=0.05, premerged=policy, sharding="fsdp")
        assert is_sharded(paired) == (world > 1)
    return losses


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {f: run_win(f, world, rank) for f in FAMILIES}
    results["premerged"] = run_premerged(world, rank)
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
