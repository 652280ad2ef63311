"""Run under torchrun: fold a paired model sharded by FSDP2 (gloo, CPU mesh) on every rank and on
rank 0 only, and write what this rank got so the test can compare it with the single-process fold."""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from win_models import DeepThin, synthetic_batches

import surgery
import surgery.runtime.sharded


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)  # the same model and pairs on every rank
    x = synthetic_batches()[0][0][:4].double()
    student = DeepThin(width=6).double().eval()
    paired = surgery.insert_pairs(student, x, wide=2.0, init="random", bias=True)
    reference_thin = surgery.fold(copy.deepcopy(paired))
    reference = reference_thin.state_dict()
    source = dict(source="win_models:DeepThin", kwargs={"width": 6})
    if rank == 0:
        surgery.save(paired, f"{out}.unsharded.safetensors", **source)
    for block in paired.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(paired, mesh=mesh)
    surgery.save(paired, f"{out}.sharded.safetensors", **source)  # rank 0 writes
    surgery.save(paired, f"{out}.dcp", **source, distributed=True)  # each rank its own shards
    every = surgery.fold(paired)
    only0 = surgery.fold(paired, rank0_only=True)
    result = {
        "reference": reference,
        "every": every.state_dict(),
        "class": type(every).__name__,
        "rank0": None if only0 is None else only0.state_dict(),
        "outputs": (reference_thin(x).detach(), every(x).detach()),
    }
    report = surgery.fold_sharded(paired)  # in place, last: the model is thin and sharded after
    result["in_place"] = surgery.runtime.sharded.full_state_dict(report.model, rank0_only=False)
    result["in_place_class"] = type(report.model).__name__
    result["in_place_output"] = report.model(x).detach()
    result["bytes"] = (report.received, report.model_bytes)
    result["local"] = report.local
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
