"""The safetensors format by hand: validated headers, positional tensor reads, a header-first writer.

A file is an 8-byte little-endian header length N, N bytes of JSON (`{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}`, offsets relative to the data that
follows), then the tensor bytes. Reading checks every claim of the header against the file before a
byte of tensor data is trusted; tensors are read with `pread` (nothing stays mapped, so reading a
big file does not grow the resident set). Writing lays the header out first from names, dtypes and
shapes, so tensors can be produced in any order and land at fixed offsets: the same tensors always
give the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from surgery.errors import CheckpointError
from surgery.files.jsontext import parse_json

DTYPES: dict[str, torch.dtype] = {  # in the order of the safetensors library's Dtype enum
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}
RANK = {code: i for i, code in enumerate(DTYPES)}
CODES = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # the limit the safetensors library itself enforces
CHUNK = 64 * 2**20  # bytes per read when streaming a tensor through


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: dtype code, shape, and where its bytes are (absolute offset)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class TensorFile:
    """An open safetensors file whose header has been checked against the file's size."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:  # non-blocking: opening a named pipe must not wait for a writer
            self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as error:
            raise CheckpointError(f"cannot open {self.path}: {error.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                raise CheckpointError(
                    f"{self.path} is not a regular file (a directory, pipe or device): give the "
                    "safetensors file itself"
                )
            self.entries, self.metadata = _read_header(self.fd, self.path)
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name`, read into memory."""
        entry = self.entries[name]
        if not entry.nbytes:
            return torch.empty(entry.shape, dtype=entry.torch_dtype)
        raw = torch.empty(entry.nbytes, dtype=torch.uint8)  # read straight into the tensor
        with memoryview(raw.numpy()) as view:
            self._read_into(view, entry.offset)
        return raw.view(entry.torch_dtype).reshape(entry.shape)

    def chunks(self, name: str, size: int = CHUNK) -> Iterator[memoryview]:
        """The bytes of tensor `name`, in pieces of at most `size` bytes (a multiple of 8) read into
        one reused buffer: valid until the next piece is read."""
        entry = self.entries[name]
        # a tensor's memory, not a bytearray: a bytearray freed while a piece of it is still
        # referenced (by an error's traceback) makes CPython print a SystemError
        buffer = memoryview(torch.empty(min(size, entry.nbytes), dtype=torch.uint8).numpy())
        for start in range(0, entry.nbytes, size):
            piece = buffer[: min(size, entry.nbytes - start)]
            self._read_into(piece, entry.offset + start)
            yield piece

    def _read_into(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got == 0:
                raise CheckpointError(f"{self.path}: the file ended early (changed while reading?)")
            done += got

    def close(self) -> None:
        os.close(self.fd)


def _read_header(fd: int, path: str) -> tuple[dict[str, Entry], dict[str, str]]:
    """Entries (in file order) and metadata, after checking every claim of the header."""
    size = os.fstat(fd).st_size
    if size < 8:
        raise CheckpointError(
            f"{path}: truncated ({size} bytes; a safetensors file starts with an 8-byte header length)"
        )
    length = int.from_bytes(os.pread(fd, 8, 0), "little")
    if length > MAX_HEADER:
        raise CheckpointError(
            f"{path}: the header claims {length:,} bytes, over the 100 MiB safetensors limit: "
            "a corrupted or non-safetensors file"
        )
    if length > size - 8:
        raise CheckpointError(
            f"{path}: the header claims {length:,} bytes but the file holds {size - 8:,} after the "
            "length: truncated, or not a safetensors file"
        )
    raw = os.pread(fd, length, 8)
    try:
        header = parse_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(
            f"{path}: the header is not valid JSON ({error}): a corrupted or non-safetensors file"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object: not a safetensors file")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + length
    entries = [_entry(name, spec, path, data_start) for name, spec in header.items()]
    entries.sort(key=lambda e: e.offset)
    end = data_start
    for entry in entries:
        if entry.offset != end:
            raise CheckpointError(
                f"{path}: tensor {entry.name!r} starts at data offset {entry.offset - data_start:,}, "
                f"expected {end - data_start:,}: the header's offsets overlap or leave gaps (corrupted)"
            )
        end += entry.nbytes
    if end != size:
        what = "truncated" if end > size else "trailing bytes after the last tensor"
        raise CheckpointError(
            f"{path}: the header describes {end - data_start:,} bytes of tensor data, the file holds "
            f"{size - data_start:,} ({what}): re-save or re-download it"
        )
    return {e.name: e for e in entries}, metadata


def _entry(name: str, spec: object, path: str, data_start: int) -> Entry:
    """One header entry, checked: known dtype, a shape of non-negative ints, offsets that span
    exactly numel * itemsize bytes."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(
            f"{where}: needs exactly dtype, shape and data_offsets (corrupted header)"
        )
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(natural(n) for n in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(natural, offsets))):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    check_shape(shape, DTYPES[dtype], where)
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: the header says {dtype} {shape} ({expected:,} bytes) but its data_offsets span "
            f"{end - begin:,} bytes: the header lies about sizes (corrupted)"
        )
    return Entry(name, dtype, tuple(shape), data_start + begin, expected)


def natural(value: object) -> bool:
    """A non-negative Python int (not a bool, not a float)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


INT64_MAX = 2**63 - 1


def check_shape(shape: Sequence[int], dtype: torch.dtype, where: str) -> None:
    """Refuse a shape whose element count or byte size does not fit in int64 (torch could not
    hold such a tensor, so a file claiming one is corrupted)."""
    numel = math.prod(shape)
    largest = math.prod(n for n in shape if n) if shape else 1
    if largest > INT64_MAX or numel * dtype.itemsize > INT64_MAX:
        raise CheckpointError(
            f"{where}: shape {list(shape)} holds more elements than int64 can count (corrupted)"
        )


@dataclass(frozen=True)
class Spec:
    """What the writer needs to know of a tensor before its bytes exist."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Writer:
    """Writes a safetensors file whose layout is fixed up front: header first, then each tensor's
    bytes at its offset, in any order. Tensors are laid out as the safetensors library lays them out
    (dtype descending in its enum order, then name): every tensor is aligned to its element size, and
    the file is byte for byte the one `safetensors.torch.save_file` writes."""

    def __init__(self, fd: int, specs: Sequence[Spec], metadata: Mapping[str, str]) -> None:
        self.fd = fd
        unknown = [s.name for s in specs if s.dtype not in CODES]
        if unknown:
            raise CheckpointError(f"tensor {unknown[0]!r}: safetensors cannot store its dtype")
        ordered = sorted(specs, key=lambda s: (-RANK[CODES[s.dtype]], s.name))
        header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
        self.offsets: dict[str, tuple[int, int]] = {}
        position = 0
        for spec in ordered:
            if spec.dtype not in CODES:
                raise CheckpointError(
                    f"tensor {spec.name!r}: safetensors cannot store {spec.dtype}"
                )
            header[spec.name] = {
                "dtype": CODES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [position, position + spec.nbytes],
            }
            self.offsets[spec.name] = (position, spec.nbytes)
            position += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.data_start = 8 + len(text)
        self.size = self.data_start + position
        os.ftruncate(fd, self.size)
        _write_at(fd, len(text).to_bytes(8, "little") + text, 0)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the whole tensor `name` (its dtype and shape must be the announced ones)."""
        self.write_bytes(name, tensor_bytes(tensor), 0)

    def write_bytes(self, name: str, data: memoryview | bytes, start: int) -> None:
        """Write `data` at byte `start` of tensor `name`'s region."""
        offset, nbytes = self.offsets[name]
        if start + len(data) > nbytes:
            raise CheckpointError(f"tensor {name!r}: {start + len(data)} bytes do not fit {nbytes}")
        _write_at(self.fd, data, self.data_start + offset + start)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor in row-major order."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _write_at(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def check_finite(name: str, data: torch.Tensor | memoryview, dtype: torch.dtype) -> None:
    """Raise CheckpointError when a floating tensor (or a piece of its bytes) holds NaN or Inf."""
    if isinstance(data, memoryview):
        if not dtype.is_floating_point or not len(data):
            return
        data = torch.frombuffer(data, dtype=dtype)
    if not finite(data):
        raise CheckpointError(
            f"tensor {name!r} holds NaN or Inf values: fix the training run or pick an earlier checkpoint"
        )


def finite(values: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf (one pass, no temporary the size of the tensor)."""
    if not values.dtype.is_floating_point or values.numel() == 0:
        return True
    if values.dtype.itemsize == 1:  # float8 has no reductions
        values = values.to(torch.float16)
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low) and torch.isfinite(high))
