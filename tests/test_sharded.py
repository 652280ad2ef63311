"""Paired models under FSDP2 (fully_shard, gloo on CPU, 2 ranks under torchrun)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch


def _torchrun(script: str, out: Path) -> list[dict]:
    path = Path(__file__).with_name(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*cmd, str(path), str(out)], capture_output=True, text=True, timeout=300, cwd=path.parent
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]


def test_fold_of_an_fsdp2_model_equals_the_single_process_fold_bit_for_bit(tmp_path):
    for rank, got in enumerate(_torchrun("fsdp_fold.py", tmp_path / "fold")):
        reference = got["reference"]
        assert got["class"] == "DeepThin"  # the user's class, not FSDPDeepThin
        assert list(got["every"]) == list(reference)
        assert all(torch.equal(got["every"][k], v) for k, v in reference.items())
        assert torch.equal(*got["outputs"])
        if rank == 0:
            assert all(torch.equal(got["rank0"][k], v) for k, v in reference.items())
        else:
            assert got["rank0"] is None  # rank0_only: nothing gathered here
