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
import pickletools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from surgery.errors import CheckpointError
from surgery.files.tensorfile import DTYPES, check_shape, natural, tensor_bytes

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


# the pickle opcodes DCP's records are written with (and their plain kin): no out-of-band buffers,
# no bytearrays, no persistent ids or extension codes, nothing a corrupted stream could make the
# unpickler misbehave on; the stream is parsed by pickletools first, so a malformed one is refused
_OPCODES = {
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP", "MEMOIZE", "BINPUT", "LONG_BINPUT",
    "PUT", "BINGET", "LONG_BINGET", "GET", "STACK_GLOBAL", "GLOBAL", "REDUCE", "BUILD", "NEWOBJ",
    "NEWOBJ_EX", "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "INT", "LONG",
    "LONG1", "LONG4", "BINFLOAT", "FLOAT", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
    "UNICODE", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "EMPTY_DICT", "DICT", "SETITEM",
    "SETITEMS", "EMPTY_LIST", "LIST", "APPEND", "APPENDS", "EMPTY_TUPLE", "TUPLE", "TUPLE1",
    "TUPLE2", "TUPLE3", "EMPTY_SET", "ADDITEMS", "FROZENSET",
}  # fmt: skip


def _plain_records(data: bytes) -> None:
    """Refuse a pickle stream that is malformed or uses an opcode DCP's records do not."""
    try:
        used = {op.name for op, _, _ in pickletools.genops(io.BytesIO(data))}
    except Exception:  # noqa: BLE001 - pickletools' every complaint means a malformed stream
        raise CheckpointError(
            f"{METADATA} is not torch.distributed.checkpoint metadata (not a well-formed pickle)"
        ) from None
    extra = sorted(used - _OPCODES)
    if extra:
        raise CheckpointError(f"{METADATA} uses pickle opcodes DCP's records do not ({extra[0]})")


def _check_planner_data(planner: Any, tensors: dict) -> None:
    """DCP's map from each name to its place in a nested state dict: for a paired model's flat
    state dict, each name in one path of strings (torch's own loader refuses anything else)."""
    if planner is None:
        return
    if not isinstance(planner, dict) or any(
        not isinstance(path, (tuple, list)) or not all(isinstance(p, (str, int)) for p in path)
        for path in planner.values()
    ):
        raise CheckpointError(f"{METADATA}'s planner data is not a map of names to paths")
    odd = sorted(
        name for name in tensors if name in planner and ".".join(map(str, planner[name])) != name
    )
    if odd:
        raise CheckpointError(f"{METADATA}'s planner data puts {odd[0]!r} elsewhere")


def is_dcp(path: Path) -> bool:
    return path.is_dir() and (path / METADATA).is_file()


class DcpFile:
    """The tensors of a DCP directory: `entries` (name -> (dtype, shape)) checked up front against
    the chunk records, `read(name)` assembling one tensor."""

    def __init__(self, root: Path):
        self.root, self.path = root, root / METADATA
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            _plain_records(data)
            meta = _Records(io.BytesIO(data)).load()
            tensors, storage = meta.state_dict_metadata, meta.storage_data
            assert isinstance(tensors, dict) and isinstance(storage, dict)
            _check_planner_data(getattr(meta, "planner_data", None), tensors)
        except CheckpointError as e:
            raise CheckpointError(f"{root}: {e}") from None
        except Exception:
            raise CheckpointError(
                f"{root}: {METADATA} is not torch.distributed.checkpoint metadata"
            ) from None
        if not all(type(k).__name__ == "MetadataIndex" for k in storage):
            raise CheckpointError(
                f"{root}: {METADATA}'s storage_data is not keyed by DCP chunk indexes (corrupted)"
            )
        self.stored: set[str] = set()  # the .distcp files holding the tensors
        where_of: dict[tuple[str, tuple[int, ...]], Any] = {}
        for key, info in storage.items():
            fqn = getattr(key, "fqn", None)
            index = (
                fqn,
                _ints(getattr(key, "offset", None), f"{root}: the storage index of {fqn!r}"),
            )
            if index in where_of:
                raise CheckpointError(
                    f"{root}: two storage records for one chunk of {key.fqn!r} (corrupted metadata)"
                )
            where_of[index] = info
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._chunks: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], Any]]] = {}
        for name, record in tensors.items():
            if not isinstance(name, str) or type(record).__name__ != "TensorStorageMetadata":
                raise CheckpointError(
                    f"{root}: {name!r} is not a tensor (a paired model's state dict holds tensors only)"
                )
            dtype = getattr(getattr(record, "properties", None), "dtype", None)
            if dtype not in DTYPES.values():
                raise CheckpointError(f"{root}: {name!r} has dtype {dtype}, not a tensor dtype")
            shape = _ints(getattr(record, "size", None), f"{root}: the size of {name!r}")
            check_shape(shape, dtype, f"{root}: {name!r}")
            if not isinstance(getattr(record, "chunks", None), list):
                raise CheckpointError(
                    f"{root}: {name!r} has no list of chunks (corrupted metadata)"
                )
            chunks = []
            for chunk in record.chunks:
                what = f"{root}: a chunk of {name!r}"
                offsets = _ints(getattr(chunk, "offsets", None), what + "'s offsets")
                sizes = _ints(getattr(chunk, "sizes", None), what + "'s sizes")
                if len(offsets) != len(shape) or len(sizes) != len(shape):
                    raise CheckpointError(
                        f"{what} has offsets {offsets} and sizes {sizes} for a tensor of rank "
                        f"{len(shape)} (corrupted metadata)"
                    )
                where = where_of.get((name, offsets))
                if where is None or getattr(where, "transform_descriptors", None):
                    raise CheckpointError(
                        f"{root}: a chunk of {name!r} has no plain storage record (incomplete or "
                        "transformed checkpoint)"
                    )
                chunks.append((offsets, sizes, where))
            _check_tiling(name, shape, [(o, s) for o, s, _ in chunks], root)
            for _, _, where in chunks:
                self._check_storage(name, where)
            self.entries[name] = (dtype, shape)
            self.stored.update(str(where.relative_path) for _, _, where in chunks)
            self._chunks[name] = chunks

    def _check_storage(self, name: str, where: Any) -> None:
        relative = getattr(where, "relative_path", None)
        offset, length = getattr(where, "offset", None), getattr(where, "length", None)
        if not isinstance(relative, (str, os.PathLike)) or not all(
            natural(n) for n in (offset, length)
        ):
            raise CheckpointError(
                f"{self.root}: the storage record of {name!r} is not a file, offset and length "
                "(corrupted metadata)"
            )
        relative = str(relative)
        if Path(relative).name != relative or relative in ("", ".", "..") or "\x00" in relative:
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
        out = torch.zeros(shape, dtype=dtype)  # the chunks tile it exactly (checked at opening)
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


def _ints(values: object, what: str) -> tuple[int, ...]:
    """A record's offsets or sizes: a sequence of non-negative Python ints, else refused."""
    if not isinstance(values, (tuple, list, torch.Size)) or not all(map(natural, values)):
        raise CheckpointError(f"{what} is {values!r}, not a list of non-negative integers")
    return tuple(values)


def _check_tiling(
    name: str, shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]], root
) -> None:
    """The chunks cover every element of the tensor exactly once: each inside the shape, no two
    overlapping, and their volumes adding up to the tensor's."""
    problem = None
    if any(
        o + s > n for offsets, sizes in boxes for o, s, n in zip(offsets, sizes, shape, strict=True)
    ):
        problem = "a chunk reaches past the tensor's end"
    elif sum(math.prod(s) for _, s in boxes) != math.prod(shape):
        problem = "their sizes do not add up to the tensor's"
    else:
        solid = [b for b in boxes if math.prod(b[1])]
        for i, (oa, sa) in enumerate(solid):
            for ob, sb in solid[i + 1 :]:
                if all(a < b + m and b < a + n for a, n, b, m in zip(oa, sa, ob, sb, strict=True)):
                    problem = f"chunks at offsets {oa} and {ob} overlap"
                    break
            if problem:
                break
    if problem:
        raise CheckpointError(
            f"{root}: the chunks of {name!r} do not tile its shape {shape}: {problem} "
            "(incomplete or corrupted checkpoint)"
        )
