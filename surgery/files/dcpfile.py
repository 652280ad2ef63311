"""`torch.distributed.checkpoint` directories (written by `dcp.save`) read with no process group and
no code run from the files: the pickled `.metadata` is unpickled with an allow-list of DCP's own
record classes, and each tensor is assembled from its chunks — each a `torch.load(weights_only=True)`
record at an offset of a `.distcp` file — only when it is asked for, so a fold streams through it.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from surgery.errors import CheckpointError
from surgery.files.tensorfile import DTYPES, tensor_bytes

METADATA = ".metadata"
_DCP = "torch.distributed.checkpoint"
_ALLOWED = (
    {
        (f"{_DCP}.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        (f"{_DCP}.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }
    | {("torch", str(dtype).removeprefix("torch.")) for dtype in DTYPES.values()}
)


class _Records(pickle.Unpickler):
    """Unpickles DCP metadata records and nothing else (no other global can be named)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise CheckpointError(
                f"the checkpoint's {METADATA} names {module}.{name}, which is not a record of "
                "torch.distributed.checkpoint: refused (it could run code)"
            )
        return super().find_class(module, name)


def is_dcp(path: Path) -> bool:
    return path.is_dir() and (path / METADATA).is_file()


class DcpFile:
    """The tensors of a DCP directory: `entries` (name -> (dtype, shape)) checked up front against
    the chunk records, `read(name)` assembling one tensor."""

    def __init__(self, root: Path):
        self.root, self.path = root, root / METADATA
        try:
            with open(self.path, "rb") as f:
                meta = _Records(f).load()
            tensors, storage = meta.state_dict_metadata, meta.storage_data
            assert isinstance(tensors, dict) and isinstance(storage, dict)
        except CheckpointError as e:
            raise CheckpointError(f"{root}: {e}") from None
        except Exception:
            raise CheckpointError(
                f"{root}: {METADATA} is not torch.distributed.checkpoint metadata"
            ) from None
        self.stored: set[str] = set()  # the .distcp files holding the tensors
        where_of = {(key.fqn, tuple(key.offset)): info for key, info in storage.items()}
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._chunks: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], Any]]] = {}
        for name, record in tensors.items():
            if type(record).__name__ != "TensorStorageMetadata":
                raise CheckpointError(
                    f"{root}: {name!r} is not a tensor (a paired model's state dict holds tensors only)"
                )
            dtype, shape = record.properties.dtype, tuple(int(n) for n in record.size)
            if dtype not in DTYPES.values():
                raise CheckpointError(f"{root}: {name!r} has dtype {dtype}, not a tensor dtype")
            chunks = []
            for chunk in record.chunks:
                where = where_of.get((name, tuple(chunk.offsets)))
                if where is None or getattr(where, "transform_descriptors", None):
                    raise CheckpointError(
                        f"{root}: a chunk of {name!r} has no plain storage record (incomplete or "
                        "transformed checkpoint)"
                    )
                chunks.append((tuple(chunk.offsets), tuple(chunk.sizes), where))
            covered = sum(math.prod(sizes) for _, sizes, _ in chunks)
            if covered != math.prod(shape) or any(
                o + s > n
                for offsets, sizes, _ in chunks
                for o, s, n in zip(offsets, sizes, shape, strict=True)
            ):
                raise CheckpointError(
                    f"{root}: the chunks of {name!r} do not tile its shape {shape} (incomplete checkpoint)"
                )
            for _, _, where in chunks:
                self._check_storage(name, where)
            self.entries[name] = (dtype, shape)
            self.stored.update(str(where.relative_path) for _, _, where in chunks)
            self._chunks[name] = chunks

    def _check_storage(self, name: str, where: Any) -> None:
        relative = str(where.relative_path)
        if Path(relative).name != relative or relative in ("", ".", ".."):
            raise CheckpointError(
                f"{self.root}: {name!r} is stored in {relative!r}, not a file in it"
            )
        path = self.root / relative
        if not path.is_file():
            raise CheckpointError(f"{self.root}: {relative} (holding {name!r}) is missing")
        if (
            where.offset < 0
            or where.length < 0
            or where.offset + where.length > path.stat().st_size
        ):
            raise CheckpointError(
                f"{self.root}: {relative} is shorter than the records of {name!r} say"
            )

    def read(self, name: str) -> torch.Tensor:
        dtype, shape = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        for offsets, sizes, where in self._chunks[name]:
            fd = os.open(self.root / str(where.relative_path), os.O_RDONLY)
            try:
                data = os.pread(fd, where.length, where.offset)
            finally:
                os.close(fd)
            try:
                chunk = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            except Exception:
                raise CheckpointError(
                    f"{self.root}: a chunk of {name!r} is not a tensor record"
                ) from None
            if (
                not isinstance(chunk, torch.Tensor)
                or tuple(chunk.shape) != sizes
                or chunk.dtype != dtype
            ):
                raise CheckpointError(f"{self.root}: a chunk of {name!r} does not match its record")
            out[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))] = chunk
        return out

    def chunks(self, name: str) -> Iterator[memoryview]:
        yield tensor_bytes(self.read(name))

    def close(self) -> None:
        pass
