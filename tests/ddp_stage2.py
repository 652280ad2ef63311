"""Run under torchrun: a short WIN stage 2 with DistributedDataParallel (gloo) and a short budget
recipe under FSDP2, then write this rank's flattened weights so the test can check that the ranks
agree."""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from win_models import DeepThin, synthetic_batches

from surgery import win
from surgery.win.start import recipe_start


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # same student, teacher and pairs on every rank (DDP broadcasts anyway)
    student, x = DeepThin(), synthetic_batches()[0][0][:4]
    teacher = win.widen(student, 2.0, x)
    widths = win.teacher_widths(teacher, x, ["blocks.0", "blocks.1"])
    paired = __import__("surgery").insert_pairs(student, x, wide=widths, sites=list(widths))
    batches = synthetic_batches(seed=1 + rank)  # each rank sees different data
    finals = win.imitate(
        paired, teacher, batches, x, [["blocks.0"], ["blocks.1"]], 5, lr=0.05, restarts=1
    )
    flat = torch.cat([p.detach().flatten() for p in paired.parameters()])
    # the measured recipe under FSDP2: its start is fitted on each rank's own batches
    recipe = win.Recipe(
        steps=6, stages=[["blocks.0"]], sharding="fsdp", sample_refit=64, imitation_share=0.1
    )  # imitating too: the pairs, the fold and the fine-tuning all run sharded
    started = copy.deepcopy(student)
    recipe_start(started, teacher, batches, x, recipe.for_model(started, x))
    start = torch.cat([p.detach().flatten() for p in started.parameters()])
    win.win(student, teacher, batches, x, recipe)  # and the whole recipe runs under FSDP2
    torch.save({"rank": rank, "weights": flat, "finals": finals, "start": start}, f"{out}.{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
