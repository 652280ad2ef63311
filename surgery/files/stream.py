"""Folding a paired checkpoint on disk, streaming: tensor algebra on the file, no model code.

The recipes run component by component (surgery.runtime.fold.components) on tensors read from disk, while a
second thread copies every other tensor through in pieces; the output's layout is fixed before any
tensor is written, so the two can write in any order and the bytes are always the same.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.errors import CheckpointError, FoldError
from surgery.files.checkpoint import SOURCE_KEY, Checkpoint, Output, Writers, open_checkpoint
from surgery.files.tensorfile import finite
from surgery.plan import Plan
from surgery.runtime.fold import check_plan, components, fold_components


@dataclass
class FoldSummary:
    """What `fold_checkpoint` did."""

    path: Path
    pairs_folded: int
    probes_dropped: int
    tensors_touched: int
    parameters_touched: int
    tensors_written: int
    bytes_written: int
    seconds: float


def fold_checkpoint(
    paired: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    plan: str | os.PathLike[str] | None = None,
    trust_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
    before_commit: Callable[[Path], None] | None = None,
) -> FoldSummary:
    """Fold a paired checkpoint into a thin one, streaming: the recipes run component by component
    (see surgery.runtime.fold.components) on tensors read from disk while a second thread copies every other
    tensor through in pieces, so memory holds one component at a time, never the model. The output
    (one file, or shards mirroring the input's) loads strictly into the original architecture; it
    is written atomically and is byte-identical for the same input. `progress(done, total)` is
    called with the bytes written so far; `before_commit(path)` gets the finished output under its
    temporary name (e.g. to verify it) and may raise, and then nothing is written."""
    start = time.perf_counter()
    with open_checkpoint(paired, plan=plan, trust_pickle=trust_pickle) as checkpoint:
        the_plan = _foldable(checkpoint)
        pair_keys = the_plan.pair_keys()
        names = [n for _, shard in checkpoint.shards for n in shard if n not in pair_keys]
        specs = {name: checkpoint.specs[name] for name in names}
        touched = {n for group in components(the_plan) for n in group.names}
        metadata = {
            "format": "pt",
            **({SOURCE_KEY: checkpoint.source.to_json()} if checkpoint.source else {}),
        }
        shards = [(f, [n for n in ns if n not in pair_keys]) for f, ns in checkpoint.shards]
        output = Output.layout(
            out, names, metadata, checkpoint.source, shards if checkpoint.sharded else None
        )
        counter = _Counter(sum(spec.nbytes for spec in specs.values()), progress)
        stop = threading.Event()
        with (
            output.open(specs, checkpoint.inputs, before_commit) as writers,
            ThreadPoolExecutor(1) as pool,
        ):
            untouched = [n for n in names if n not in touched]
            copying = pool.submit(_copy, checkpoint, writers, untouched, counter, stop)
            try:
                for folded in fold_components(checkpoint, the_plan):
                    for name, value in folded.items():
                        writers.write(name, _cast_back(name, value, specs[name].dtype))
                        counter.add(specs[name].nbytes)
                    if copying.done():
                        copying.result()  # a bad tensor found by the copy stops the fold now
            except BaseException:
                stop.set()
                raise
            copying.result()
    folding = [s for s in the_plan.sites if s.route.targets]
    return FoldSummary(
        output.path,
        len(folding),
        len(the_plan.sites) - len(folding),
        len(touched),
        sum(math.prod(specs[n].shape) for n in touched),
        len(names),
        counter.total,
        time.perf_counter() - start,
    )


class _Counter:
    """Bytes written by both threads of a fold, reported to a progress callback."""

    def __init__(self, total: int, progress: Callable[[int, int], None] | None) -> None:
        self.total, self.done, self.progress = total, 0, progress
        self.lock = threading.Lock()

    def add(self, count: int) -> None:
        with self.lock:
            self.done += count
            if self.progress:
                self.progress(self.done, self.total)


def _copy(
    checkpoint: Checkpoint,
    writers: Writers,
    names: Sequence[str],
    counter: _Counter,
    stop: threading.Event,
) -> None:
    """Copy tensors through unchanged, piece by piece (each checked for NaN/Inf)."""
    for name in names:
        position = 0
        for piece in checkpoint.chunks(name):
            if stop.is_set():
                return
            writers.write_bytes(name, piece, position)
            position += len(piece)
            counter.add(len(piece))


def _foldable(checkpoint: Checkpoint) -> Plan:
    """The checkpoint's plan, after checking it against the headers: the tensors it names, the pair
    widths, and one floating dtype across everything a fold combines."""
    plan = checkpoint.plan
    if plan is None:
        raise CheckpointError(
            f"{checkpoint.path} has no surgery plan in its metadata: it is not a paired checkpoint "
            "(save it with surgery.save, or pass --plan plan.json)"
        )
    try:
        check_plan(plan, {name: spec.shape for name, spec in checkpoint.specs.items()})
    except FoldError as error:
        raise CheckpointError(f"{checkpoint.path}: the plan does not fit: {error}") from None
    involved = [
        *(name for site in plan.sites if site.route.targets for name in site.params.values()),
        *(name for site in plan.sites for t in site.route.targets for name in t.params.values()),
    ]
    dtypes = {name: _dtype_name(checkpoint.specs[name].dtype) for name in dict.fromkeys(involved)}
    for name in dtypes:
        if not checkpoint.specs[name].dtype.is_floating_point:
            raise CheckpointError(
                f"{checkpoint.path}: {name} is {dtypes[name]}; a fold needs floating-point weights"
            )
    (first, kind), *rest = dtypes.items() or [(None, None)]
    other = next((name for name, dtype in rest if dtype != kind), None)
    if other is not None:
        raise CheckpointError(
            f"{checkpoint.path}: mixed dtypes in the tensors a fold combines ({first} is {kind}, "
            f"{other} is {dtypes[other]}): cast the checkpoint to one dtype first"
        )
    return plan


def _cast_back(name: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float64 result in the tensor's own dtype; refuse a fold that overflows it."""
    cast = value.to(dtype)
    if not finite(cast):
        raise CheckpointError(
            f"folding overflows {_dtype_name(dtype)} in {name}: fold a float32 copy of the checkpoint"
        )
    return cast


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
