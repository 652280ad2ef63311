"""torch.distributed.checkpoint directories: written by surgery.save(distributed=True), folded by
`surgery fold DIR` with no process group and no model code; bad or incomplete ones refused (exit 2,
one line, nothing written, no code run from the metadata)."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MLP_SIZES
from safetensors.torch import load_file
from small_models import mlp

import surgery


@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A paired MLP saved as a DCP directory, and its single-process fold."""
    torch.manual_seed(0)
    paired = surgery.insert_pairs(mlp(MLP_SIZES).eval(), (torch.randn(2, 8),), init="random")
    path = tmp_path_factory.mktemp("dcp") / "paired"
    surgery.save(paired, path, distributed=True)
    return path, surgery.fold(paired).state_dict()


def _fold(source: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "surgery.cli.main", "fold", str(source), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_dcp_directory_folds_like_the_model(dcp_dir, tmp_path):
    path, reference = dcp_dir
    result = _fold(path, tmp_path / "thin.safetensors")
    assert result.returncode == 0, result.stderr
    folded = load_file(tmp_path / "thin.safetensors")
    assert sorted(folded) == sorted(reference)
    assert all(torch.equal(folded[k], v) for k, v in reference.items())


def _copy(path: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    return copy


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(self.sentinel),))


def test_bad_or_incomplete_dcp_directories_exit_2_and_write_nothing(dcp_dir, tmp_path):
    path, _ = dcp_dir
    shard = next(p.name for p in path.iterdir() if p.suffix == ".distcp")
    cases = {}
    missing = _copy(path, tmp_path / "missing")
    (missing / shard).unlink()
    cases["missing shard"] = (missing, "is missing")
    short = _copy(path, tmp_path / "short")
    (short / shard).write_bytes((short / shard).read_bytes()[:100])
    cases["truncated shard"] = (short, "shorter than")
    evil = _copy(path, tmp_path / "evil")
    sentinel = tmp_path / "ran"
    boom = _Boom()
    boom.sentinel = str(sentinel)
    (evil / ".metadata").write_bytes(pickle.dumps(boom))
    cases["code in the metadata"] = (evil, "refused (it could run code)")
    garbage = _copy(path, tmp_path / "garbage")
    (garbage / ".metadata").write_bytes(b"not a pickle")
    cases["not metadata"] = (garbage, "not torch.distributed.checkpoint metadata")
    for what, (source, message) in cases.items():
        out = tmp_path / f"{what}.safetensors"
        result = _fold(source, out)
        assert result.returncode == 2, (what, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, what
        assert not out.exists(), what
    assert not sentinel.exists()  # the metadata's code never ran


def test_output_onto_the_dcp_directory_is_refused(dcp_dir, tmp_path):
    copy = _copy(dcp_dir[0], tmp_path)
    shard = next(p for p in copy.iterdir() if p.suffix == ".distcp")
    before = shard.read_bytes()
    for target in (shard, copy / "surgery.json"):
        result = _fold(copy, target)
        assert result.returncode == 2, result.stderr
    assert shard.read_bytes() == before


def test_save_distributed_refuses_a_directory_with_files(dcp_dir):
    with pytest.raises(surgery.CheckpointError, match="not an empty directory"):
        surgery.save(mlp(MLP_SIZES), dcp_dir[0], distributed=True)
