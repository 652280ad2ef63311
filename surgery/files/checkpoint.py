"""Checkpoints: paired (and thin) models saved as safetensors with their Plan and source, opened
lazily with every header checked, and loaded back into a rebuilt model (surgery.files.stream folds them).

Format: safetensors weights (the paired model's state_dict, pairs included) whose `__metadata__`
holds `surgery.plan` (the Plan as JSON) and `surgery.source` (how to rebuild the original model, see
surgery.files.sources). A directory holds `model.safetensors`, or Hugging Face shards with
`model.safetensors.index.json` (the surgery keys then sit in the index's `metadata`), plus
`config.json` for a Hugging Face model. Pickled files are refused unless trusted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.errors import CheckpointError
from surgery.files.dcpfile import METADATA, DcpFile, is_dcp
from surgery.files.jsontext import parse_json
from surgery.files.outputs import atomic_output, read_text, regular_input
from surgery.files.sources import Source, SourceError, source_of, source_of_model
from surgery.files.tensorfile import DTYPES, Spec, TensorFile, Writer, check_finite, tensor_bytes
from surgery.plan import Plan
from surgery.runtime import sharded
from surgery.runtime.attach import apply_plan
from surgery.runtime.models import unwrap

PLAN_KEY, SOURCE_KEY = "surgery.plan", "surgery.source"
WEIGHTS, INDEX, CONFIG = "model.safetensors", "model.safetensors.index.json", "config.json"
PICKLES = (".pt", ".pth", ".bin", ".ckpt")
PICKLED_WEIGHTS = "pytorch_model.bin"
DCP_METADATA = "surgery.json"  # beside a torch.distributed.checkpoint directory: plan and source

Shards = list[tuple[str, list[str]]]  # file name -> tensor names, in file order


class Checkpoint(Mapping[str, torch.Tensor]):
    """An opened checkpoint: checked headers (or an unpickled state_dict), its plan and its source.

    A read-only mapping name -> tensor that reads each tensor from disk when asked for it (checking
    it for NaN/Inf), so a fold can stream through a checkpoint bigger than memory."""

    def __init__(
        self,
        path: Path,
        specs: dict[str, Spec],
        shards: Shards,
        metadata: Mapping[str, str],
        *,
        files: dict[str, TensorFile] | None = None,
        tensors: Mapping[str, torch.Tensor] | None = None,
        plan: Plan | None = None,
        source: Source | None = None,
    ) -> None:
        self.path, self.specs, self.shards = path, specs, shards
        self.plan_file: Path | None = None  # a --plan file given instead of the metadata's
        self.extra_inputs: list[str] = []  # other files it reads (a DCP directory's surgery.json)
        self.files, self.tensors = files or {}, tensors
        self.plan = plan if plan is not None else _plan(metadata, path)
        self.source = source if source is not None else _source(metadata, path)

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1 or self.path.name.endswith(".index.json")

    @property
    def inputs(self) -> list[str]:
        """The files this checkpoint reads (an output may not replace them): the weights, shards,
        index, a plan file and the Hugging Face config beside them."""
        beside = [self.path.parent / CONFIG] if (self.path.parent / CONFIG).is_file() else []
        plan = [self.plan_file] if self.plan_file is not None else []
        files = dict.fromkeys(f.path for f in self.files.values())
        stored = [
            str(f.root / name) for f in self.files.values() for name in getattr(f, "stored", ())
        ]
        return list(
            dict.fromkeys(
                str(p) for p in (self.path, *files, *plan, *beside, *stored, *self.extra_inputs)
            )
        )

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise KeyError(name)
        tensor = self.tensors[name] if self.tensors is not None else self.files[name].read(name)
        check_finite(name, tensor, tensor.dtype)
        return tensor

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def chunks(self, name: str) -> Iterator[memoryview]:
        """The raw bytes of tensor `name` in pieces, checked for NaN/Inf piece by piece."""
        dtype = self.specs[name].dtype
        pieces = (
            [tensor_bytes(self.tensors[name])]
            if self.tensors is not None
            else self.files[name].chunks(name)
        )
        for piece in pieces:
            check_finite(name, piece, dtype)
            yield piece

    def close(self) -> None:
        for file in {id(f): f for f in self.files.values()}.values():
            file.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_checkpoint(spec: str | os.PathLike[str]) -> bool:
    """Whether `spec` names a checkpoint (weights), as opposed to a model source."""
    path = Path(spec)
    if is_dcp(path):
        return True
    if path.is_dir():
        return any((path / name).is_file() for name in (WEIGHTS, INDEX, PICKLED_WEIGHTS))
    return path.is_file() and (
        path.suffix in (".safetensors", *PICKLES) or path.name.endswith(".safetensors.index.json")
    )


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    plan: str | os.PathLike[str] | None = None,
    trust_pickle: bool = False,
) -> Checkpoint:
    """Open a checkpoint: a .safetensors file, a `*.safetensors.index.json`, a directory holding
    either, or (with trust_pickle) a pickled .pt/.pth/.bin/.ckpt. `plan`: a Plan json file to use
    instead of the one in the metadata. Every header is checked before any tensor is trusted."""
    root = regular_input(path, "checkpoint")
    if is_dcp(root):
        checkpoint = _open_dcp(root, _plan_file(plan) if plan is not None else None)
        checkpoint.plan_file = Path(plan) if plan is not None else None
        return checkpoint
    if root.is_dir():
        found = [n for n in (INDEX, WEIGHTS, PICKLED_WEIGHTS) if (root / n).is_file()]
        if not found:
            raise CheckpointError(f"{root} holds no {WEIGHTS}, {INDEX} or {PICKLED_WEIGHTS}")
        root = regular_input(root / found[0], "checkpoint")
    override = _plan_file(plan) if plan is not None else None
    if root.name.endswith(".index.json"):
        checkpoint = _open_sharded(root, override)
    elif root.suffix in PICKLES:
        checkpoint = _open_pickle(root, override, trust_pickle)
    elif root.suffix == ".safetensors":
        file = TensorFile(root)
        specs = {n: Spec(n, e.torch_dtype, e.shape) for n, e in file.entries.items()}
        try:
            checkpoint = Checkpoint(
                root, specs, [(root.name, list(specs))], file.metadata,
                files=dict.fromkeys(specs, file), plan=override,
            )  # fmt: skip
        except BaseException:
            file.close()
            raise
    else:
        raise CheckpointError(
            f"{root}: not a checkpoint (expected .safetensors, *.safetensors.index.json, a directory "
            f"holding {WEIGHTS}, or a pickle with --trust-pickle)"
        )
    checkpoint.plan_file = Path(plan) if plan is not None else None
    return checkpoint


def _open_dcp(root: Path, plan: Plan | None) -> Checkpoint:
    """A torch.distributed.checkpoint directory (see surgery.files.dcpfile), its plan and source from the
    surgery.json beside the shards (written by surgery.save_distributed) or --plan."""
    file = DcpFile(root)
    specs = {n: Spec(n, dtype, shape) for n, (dtype, shape) in file.entries.items()}
    metadata: dict[str, str] = {}
    beside = root / DCP_METADATA
    if beside.exists():
        try:
            metadata = parse_json(read_text(beside, "metadata"))
            assert isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        except (OSError, ValueError, AssertionError):
            raise CheckpointError(
                f"{beside}: not surgery metadata (JSON with string values)"
            ) from None
    checkpoint = Checkpoint(
        root / METADATA, specs, [(METADATA, list(specs))], metadata,
        files=dict.fromkeys(specs, file), plan=plan,
    )  # fmt: skip
    checkpoint.extra_inputs = [str(beside)] if beside.exists() else []
    return checkpoint


def _open_sharded(index_path: Path, plan: Plan | None) -> Checkpoint:
    """Hugging Face shards: the index's weight_map must match the shards' headers exactly."""
    try:
        index = parse_json(read_text(index_path, "index"))
        weight_map, metadata = index["weight_map"], index.get("metadata", {})
        assert isinstance(weight_map, dict) and isinstance(metadata, dict)
    except ValueError as error:
        raise CheckpointError(f"{index_path}: not a safetensors index ({error})") from None
    except (OSError, KeyError, TypeError, AttributeError, AssertionError):
        raise CheckpointError(
            f"{index_path}: not a safetensors index (JSON with a weight_map object)"
        ) from None
    for name, shard in weight_map.items():
        if (
            not isinstance(shard, str)
            or shard in ("", ".", "..")
            or "\x00" in shard
            or Path(shard).name != shard
        ):
            raise CheckpointError(
                f"{index_path}: the weight_map sends {name!r} to shard {shard!r}, which is not a "
                "file name beside it"
            )
    files: dict[str, TensorFile] = {}
    opened: dict[str, TensorFile] = {}
    try:
        for shard in dict.fromkeys(sorted(weight_map.values())):
            opened[shard] = TensorFile(regular_input(index_path.parent / shard, "shard"))
            listed = sorted(n for n, s in weight_map.items() if s == shard)
            if sorted(opened[shard].entries) != listed:
                raise CheckpointError(
                    f"{index_path}: the weight_map and the header of {shard} list different tensors"
                )
            files.update(dict.fromkeys(opened[shard].entries, opened[shard]))
        specs = {
            n: Spec(n, e.torch_dtype, e.shape)
            for f in opened.values()
            for n, e in f.entries.items()
        }
        shards = [(name, list(f.entries)) for name, f in opened.items()]
        metadata = {k: v for k, v in metadata.items() if isinstance(v, str)}
        return Checkpoint(index_path, specs, shards, metadata, files=files, plan=plan)
    except BaseException:
        for file in opened.values():
            file.close()
        raise


def _open_pickle(path: Path, plan: Plan | None, trust: bool) -> Checkpoint:
    """A torch.save file: a state_dict, {"state_dict": ..., "plan": ...}, or a whole (paired) module.
    Tried with weights_only=True first; a full unpickle only after that fails."""
    if not trust:
        raise CheckpointError(
            f"{path} is a pickle (torch.save) file and unpickling can run arbitrary code: convert it "
            "to safetensors, or pass --trust-pickle (trust_pickle=True) if you trust its origin"
        )
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - a corrupted pickle fails in many ways
        raise CheckpointError(f"cannot unpickle {path}: {type(error).__name__}: {error}") from None
    stored_plan = None
    if isinstance(obj, nn.Module):
        stored_plan, obj = getattr(unwrap(obj), "plan", None), unwrap(obj).state_dict()
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        stored_plan, obj = obj.get("plan"), obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor) or value.dtype not in DTYPES.values():
            raise CheckpointError(f"{path}: entry {name!r} is not a tensor safetensors can hold")
    tensors = {name: value.detach().cpu() for name, value in obj.items()}
    specs = {n: Spec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    if plan is None and stored_plan is not None:
        plan = stored_plan if isinstance(stored_plan, Plan) else _parse_plan(stored_plan, path)
    return Checkpoint(path, specs, [(path.name, list(specs))], {}, tensors=tensors, plan=plan)


def _plan_file(path: str | os.PathLike[str]) -> Plan:
    return _parse_plan(read_text(path, "plan"), Path(path))


def _parse_plan(data: str | Mapping[str, Any], where: Path) -> Plan:
    try:
        return Plan.from_json(data) if isinstance(data, str) else Plan.from_dict(dict(data))
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{where}: the surgery plan is not valid ({error})") from None


def _plan(metadata: Mapping[str, str], path: Path) -> Plan | None:
    return _parse_plan(metadata[PLAN_KEY], path) if PLAN_KEY in metadata else None


def _source(metadata: Mapping[str, str], path: Path) -> Source | None:
    """The stored source, else the config.json beside the weights (a Hugging Face directory)."""
    try:
        if SOURCE_KEY in metadata:
            return Source.from_json(metadata[SOURCE_KEY], trusted=False)
        if (path.parent / CONFIG).is_file():
            return source_of(str(path.parent / CONFIG))
    except SourceError as error:
        raise CheckpointError(f"{path}: {error}") from None
    return None


# ---------------------------------------------------------------- writing


@dataclass
class Output:
    """Where an output checkpoint goes: a single file, or a directory (one `model.safetensors`, or
    shards with an index) with the Hugging Face config when the source has one."""

    path: Path
    shards: Shards
    metadata: dict[str, str]
    config: dict[str, Any] | None

    @property
    def directory(self) -> bool:
        return self.path.suffix != ".safetensors"

    @classmethod
    def layout(
        cls,
        path: str | os.PathLike[str],
        names: Sequence[str],
        metadata: dict[str, str],
        source: Source | None,
        shards: Shards | None = None,
    ) -> Output:
        """A single file (`path` ends in .safetensors), else a directory with `shards` (default:
        one model.safetensors)."""
        out = Path(path)
        if out.suffix in (*PICKLES, ".json"):
            raise CheckpointError(
                f"--out {out}: outputs are safetensors: end it in .safetensors or name a directory"
            )
        if out.suffix == ".safetensors" or not shards or len(shards) == 1:
            shards = [(out.name if out.suffix == ".safetensors" else WEIGHTS, list(names))]
        return cls(out, shards, metadata, source.config if source is not None else None)

    @contextlib.contextmanager
    def open(
        self,
        specs: Mapping[str, Spec],
        inputs: Sequence[str] = (),
        before_commit: Callable[[Path], None] | None = None,
    ) -> Iterator[Writers]:
        """Writers for every shard inside an atomic temporary; index and config written at the end,
        then `before_commit(temporary)` (a check that may raise: nothing is written then)."""
        with atomic_output(self.path, directory=self.directory, inputs=inputs) as temp:
            writers = Writers()
            try:
                for file_name, names in self.shards:
                    target = temp / file_name if self.directory else temp
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    own = self.metadata if len(self.shards) == 1 else {"format": "pt"}
                    writers.add(fd, [specs[n] for n in names], own)
                yield writers
            finally:
                writers.close()
            if len(self.shards) > 1:
                (temp / INDEX).write_text(self._index(specs))
            if self.directory and self.config is not None:
                (temp / CONFIG).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
            if before_commit is not None:
                before_commit(temp)

    def _index(self, specs: Mapping[str, Spec]) -> str:
        total = sum(spec.nbytes for spec in specs.values())
        weight_map = {n: f for f, names in self.shards for n in sorted(names)}
        index = {
            "metadata": {**self.metadata, "total_size": total},
            "weight_map": dict(sorted(weight_map.items())),
        }
        return json.dumps(index, indent=2, sort_keys=True) + "\n"


class Writers:
    """The open shard writers of an output, by tensor name."""

    def __init__(self) -> None:
        self.by_name: dict[str, Writer] = {}
        self.fds: list[int] = []

    def add(self, fd: int, specs: list[Spec], metadata: Mapping[str, str]) -> None:
        self.fds.append(fd)
        writer = Writer(fd, specs, metadata)
        self.by_name.update(dict.fromkeys(writer.offsets, writer))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.by_name[name].write(name, tensor)

    def write_bytes(self, name: str, data: memoryview, start: int) -> None:
        self.by_name[name].write_bytes(name, data, start)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    source: Source | str | None = None,
    kwargs: dict[str, Any] | None = None,
    max_shard_size: int | str | None = None,
    distributed: bool = False,
) -> Path:
    """Save a paired (or thin) model as safetensors with its Plan and the recipe to rebuild it.

    path: `*.safetensors` (one file) or a directory (`model.safetensors`, or Hugging Face shards of
    at most `max_shard_size` bytes with an index; plus config.json for a Hugging Face model).
    source: how to rebuild the original model: an import path `package.module:factory` (with
    `kwargs`) or a surgery.files.sources.Source; Hugging Face models are recognised by themselves.
    Deterministic: the same model gives the same bytes. A model sharded by FSDP2 is gathered with
    the distributed state-dict API (every rank must call save) and rank 0 alone writes the same
    format; the other ranks write nothing and get the path back.
    distributed: write a torch.distributed.checkpoint directory instead (`dcp.save`: under torchrun
    every rank writes its own shards, nothing is gathered), with the plan and source in a
    surgery.json beside them; `surgery fold DIR` folds it with no process group and no model code."""
    module = unwrap(model)
    if isinstance(source, str):
        source = source_of(source, kwargs)
    if distributed:
        return _save_dcp(module, Path(path), source)
    if sharded.is_sharded(module):
        state = sharded.full_state_dict(module, rank0_only=True)
        if not state:
            return Path(path)
        module = sharded.plain_copy(module)  # the user's classes, for the source and the plan
    else:
        state = {name: t.detach().cpu() for name, t in module.state_dict().items()}
    source = source or source_of_model(module)
    specs = {name: Spec(name, t.dtype, tuple(t.shape)) for name, t in state.items()}
    metadata = _metadata(getattr(module, "plan", None), source)
    out = Output.layout(path, list(state), metadata, source, _split(specs, max_shard_size))
    with out.open(specs) as writers:
        for name, tensor in state.items():
            writers.write(name, tensor)
    return out.path


def _save_dcp(module: nn.Module, directory: Path, source: Source | None) -> Path:
    """A DCP directory written atomically: every rank writes its shards into one temporary
    directory beside `directory` (made by rank 0), rank 0 adds surgery.json and renames it into
    place; on any failure (a full disk on one rank) the temporary is removed and nothing is left."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise CheckpointError(
            f"{directory} exists and is not an empty directory: refusing to write into it"
        )
    plain = sharded.plain_copy(module) if sharded.is_sharded(module) else module
    metadata = _metadata(getattr(plain, "plan", None), source or source_of_model(plain))
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    lead = not distributed or dist.get_rank() == 0
    with contextlib.ExitStack() as stack:
        found: list[Any] = [None]
        if lead:
            try:
                found = [str(stack.enter_context(atomic_output(directory, directory=True)))]
            except CheckpointError as error:
                found = [error]
        if distributed:
            dist.broadcast_object_list(found, src=0)
        if isinstance(found[0], CheckpointError):
            raise CheckpointError(str(found[0]))
        temp = Path(found[0])
        failed: BaseException | None = None
        try:
            dcp.save(module.state_dict(), checkpoint_id=str(temp), no_dist=not distributed)
        except (Exception, CheckpointException) as error:  # noqa: BLE001 - all ranks decide below
            failed = error  # (DCP's CheckpointException is a BaseException)
        if distributed:
            flag = torch.tensor([0.0 if failed is None else 1.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            failed = failed or (
                RuntimeError("another rank failed to save") if flag.item() else None
            )
        if failed is not None:
            cause = _os_error(failed)
            if cause is not None:
                raise CheckpointError(
                    f"cannot write {directory}: {cause.strerror or cause}; nothing was written"
                ) from None
            raise failed
        if lead:
            (temp / DCP_METADATA).write_text(json.dumps(metadata, indent=1, sort_keys=True))
    if distributed:
        dist.barrier()
    return directory


def _os_error(error: BaseException) -> OSError | None:
    """The file-system error behind a failure of dcp.save (it wraps each rank's exception in a
    CheckpointException whose `failures` map ranks to (exception, traceback))."""
    if isinstance(error, OSError):
        return error
    for failure in getattr(error, "failures", {}).values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, OSError):
            return cause
    return None


def _metadata(plan: Plan | None, source: Source | None) -> dict[str, str]:
    metadata = {"format": "pt"}
    if plan is not None:
        metadata[PLAN_KEY] = plan.to_json(indent=None)
    if source is not None:
        metadata[SOURCE_KEY] = source.to_json()
    return metadata


def _split(specs: Mapping[str, Spec], max_shard_size: int | str | None) -> Shards | None:
    """Hugging Face style shards (names sorted, each shard at most max_shard_size bytes unless a
    single tensor is bigger), or None for one file."""
    if max_shard_size is None:
        return None
    limit = parse_size(max_shard_size)
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(specs):
        if groups[-1] and size + specs[name].nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += specs[name].nbytes
    count = len(groups)
    return [(f"model-{i + 1:05d}-of-{count:05d}.safetensors", g) for i, g in enumerate(groups)]


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "500MB", "2GB", "1GiB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, re.IGNORECASE)
    if not match:
        raise CheckpointError(f"size {size!r} is not a number of bytes such as 500MB or 2GB")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


# ---------------------------------------------------------------- loading


def load(
    spec: str | os.PathLike[str],
    *,
    into: nn.Module | None = None,
    kwargs: dict[str, Any] | None = None,
    plan: str | os.PathLike[str] | None = None,
    trust_pickle: bool = False,
    trust_source: bool = False,
) -> nn.Module:
    """A model in eval mode from a checkpoint (paired: the original model rebuilt from the stored
    source, or `into`, with the plan's pairs attached; then a strict state_dict load), or a fresh
    model (random weights) from an import path or a Hugging Face config."""
    if not is_checkpoint(spec):
        return source_of(str(spec), kwargs).build()
    with open_checkpoint(spec, plan=plan, trust_pickle=trust_pickle) as checkpoint:
        model = into if into is not None else build_original(checkpoint, trust_source=trust_source)
        if checkpoint.plan is not None:
            model = apply_plan(model, checkpoint.plan)
        _load_state(model, checkpoint)
        return model.eval()


def build_original(checkpoint: Checkpoint, *, trust_source: bool = False) -> nn.Module:
    """A fresh instance (random weights) of the checkpoint's original architecture."""
    if checkpoint.source is None:
        raise CheckpointError(
            f"{checkpoint.path} does not say how to rebuild its model (no {SOURCE_KEY} metadata, no "
            f"{CONFIG}): give MODEL as an import path, or in Python build it and pass into="
        )
    source = dataclasses.replace(
        checkpoint.source, trusted=checkpoint.source.trusted or trust_source
    )
    try:
        return source.build()
    except SourceError as error:
        raise CheckpointError(f"{checkpoint.path}: {error}") from None


def _load_state(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Strict load, except that a tied tensor saved under one of its names is enough (Hugging Face
    drops lm_head.weight when it is wte.weight). A file keeps no module versions, so the state
    carries the model's own (some `_load_from_state_dict` refuse a state without them)."""
    state = OrderedDict(checkpoint.items())
    state._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise CheckpointError(
            f"{checkpoint.path} does not fit {type(model).__name__}: {str(error).splitlines()[-1].strip()}"
        ) from None
    missing = [name for name in missing if not _tied_to_loaded(model, name, state)]
    if missing or unexpected:
        listed = "; ".join(
            f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for what, names in (("missing", missing), ("unexpected", unexpected))
            if names
        )
        raise CheckpointError(
            f"{checkpoint.path} does not fit {type(model).__name__} ({listed}): wrong model or plan?"
        )


def _tied_to_loaded(model: nn.Module, name: str, state: Mapping[str, torch.Tensor]) -> bool:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    target = tensors.get(name)
    return target is not None and any(t is target and n in state for n, t in tensors.items())
