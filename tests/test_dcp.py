"""torch.distributed.checkpoint directories: written by surgery.save(distributed=True), folded by
`surgery fold DIR` with no process group and no model code; bad or incomplete ones refused (exit 2,
one line, nothing written, no code run from the metadata)."""

from __future__ import annotations

import io
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
    huge = _copy(path, tmp_path / "huge")  # a bytearray8 claiming 2^62 bytes: refused unread
    (huge / ".metadata").write_bytes(b"\x80\x05\x96" + (2**62).to_bytes(8, "little") + b"ab.")
    cases["a bytearray opcode"] = (huge, "not a well-formed pickle")
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


def _rewrite(path: Path, tmp_path: Path, name: str, change) -> Path:
    """A copy of the DCP directory whose metadata `change(metadata, copy)` rewrote (crafted files)."""
    copy = _copy(path, tmp_path / name)
    with open(copy / ".metadata", "rb") as f:
        meta = pickle.load(f)  # our own file: trusted here, to craft a hostile one
    change(meta, copy)
    (copy / ".metadata").write_bytes(pickle.dumps(meta))
    return copy


def _split_rows(meta, copy: Path, boxes: list[tuple[int, int]], tensor: torch.Tensor) -> None:
    """Store `tensor` (the record "0.weight") as row chunks (start, rows) in a new shard file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    record = meta.state_dict_metadata["0.weight"]
    meta.storage_data = {k: v for k, v in meta.storage_data.items() if k.fqn != "0.weight"}
    record.chunks, data = [], b""
    for start, rows in boxes:
        offsets, sizes = torch.Size([start, 0]), torch.Size([rows, tensor.shape[1]])
        record.chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=sizes))
        buffer = io.BytesIO()
        torch.save(tensor[start : start + rows].clone(), buffer)
        meta.storage_data[MetadataIndex("0.weight", offsets)] = _StorageInfo(
            "extra.distcp", len(data), len(buffer.getvalue())
        )
        data += buffer.getvalue()
    (copy / "extra.distcp").write_bytes(data)


def test_crafted_dcp_records_exit_2_and_write_nothing(dcp_dir, tmp_path):
    """Records that lie (overlapping chunks that leave elements uncovered, wrong types, signs,
    ranks, sizes) are refused before anything is allocated or written: never garbage with exit 0."""
    path, _ = dcp_dir
    with open(path / ".metadata", "rb") as f:
        rows, cols = tuple(pickle.load(f).state_dict_metadata["0.weight"].size)
    weight = torch.randn(rows, cols)

    def record(meta):
        return meta.state_dict_metadata["0.weight"]

    def storage(meta):
        return next(v for k, v in meta.storage_data.items() if k.fqn == "0.weight")

    def set_size(meta, size):
        record(meta).size = size

    changes = {
        # two chunks overlapping by half: their volume adds up, rows at the end stay uncovered
        "overlap": lambda m, c: _split_rows(m, c, [(0, rows // 2), (rows // 4, rows // 2)], weight),
        "same offset twice": lambda m, c: _split_rows(
            m, c, [(0, rows // 2), (0, rows // 2)], weight
        ),
        "float storage offset": lambda m, c: setattr(storage(m), "offset", 0.5),
        "negative size": lambda m, c: set_size(m, [-rows, -cols]),
        "2^31 size": lambda m, c: set_size(m, torch.Size([2**31, 2**31, 2**31])),
        "offsets of the wrong rank": lambda m, c: setattr(
            record(m).chunks[0], "offsets", torch.Size([0])
        ),
        "no properties": lambda m, c: delattr(record(m), "properties"),
        "storage keyed by a string": lambda m, c: setattr(
            m, "storage_data", {str(k): v for k, v in m.storage_data.items()}
        ),
        "NUL in a shard name": lambda m, c: setattr(
            storage(m), "relative_path", "__0_0\x00.distcp"
        ),
    }
    for what, change in changes.items():
        source = _rewrite(path, tmp_path, what.replace(" ", "_"), change)
        out = tmp_path / f"{what}.safetensors"
        result = _fold(source, out)
        assert result.returncode == 2, (what, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (what, result.stderr)
        assert not out.exists(), what


def test_dcp_chunks_that_tile_fold_like_one(dcp_dir, tmp_path):
    """The tiling check accepts what DCP really writes for a sharded tensor: disjoint row chunks."""
    path, reference = dcp_dir
    with open(path / ".metadata", "rb") as f:
        rows = pickle.load(f).state_dict_metadata["0.weight"].size[0]
    from surgery.files.dcpfile import DcpFile

    original = DcpFile(path).read("0.weight")
    split = _rewrite(
        path, tmp_path, "split", lambda m, c: _split_rows(m, c, [(0, 3), (3, rows - 3)], original)
    )
    assert torch.equal(DcpFile(split).read("0.weight"), original)
    result = _fold(split, tmp_path / "thin.safetensors")
    assert result.returncode == 0, result.stderr
    folded = load_file(tmp_path / "thin.safetensors")
    assert all(torch.equal(folded[k], v) for k, v in reference.items())
