"""The dataflow IR every later stage reads: one `Op` per tensor-producing node, ops in a canonical vocabulary.

Both capture back ends (torch.fx and torch.export) normalise into this, so the analysis, the rules in
`surgery.rewrites` and the planner never look at fx or aten details.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Canonical op kinds. "transparent" ops commute with a channel mix; their `attrs["family"]` says how
# the feature axis moves through them (see surgery.rewrites.channel_ops).
KINDS = (
    "input",
    "output",
    "linear",
    "conv",
    "conv_transpose",
    "batch_norm",
    "embedding",
    "transparent",
    "nonlinear",
    "max_pool",
    "norm",
    "add",
    "mul",
    "cat",
    "matmul",
    "attention",
    "other",
)
# kinds whose tensors are (N, C, ...): features on axis 1 (everything else: the last axis)
CHANNELS_FIRST = ("conv", "conv_transpose", "batch_norm")


@dataclass(frozen=True)
class Layout:
    """Where a pair's feature index lives in a tensor: axis `axis` has size outer*d*inner and the
    pair acts on the middle factor (index = (o*d + c)*inner + j)."""

    axis: int
    d: int
    outer: int = 1
    inner: int = 1


@dataclass(frozen=True)
class Ref:
    """A tensor argument of a recorded call: an op of the dataflow (`op`), a parameter or buffer of
    the model (`param`, its qualified name), or a value the capture could not see (both None)."""

    op: str | None = None
    param: str | None = None


class Traced(int):
    """A number the captured graph computed from a tensor's shape (C in x.split(C, 2) after
    B, T, C = x.shape): it follows the model's widths, unlike a number written in the source."""


@dataclass
class Op:
    """One tensor-producing node of the captured graph, in the canonical vocabulary."""

    name: str
    kind: str
    op: str  # the concrete op, for people: "Conv2d", "relu", "flatten", "aten.add.Tensor", ...
    inputs: list[str] = field(default_factory=list)  # tensor-valued input ops, argument order
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    module: str | None = None  # the module this op is a call of (its first argument is inputs[0])
    params: dict[str, str] = field(default_factory=dict)  # role -> qualified parameter/buffer name
    # for calls of functions/methods/aten ops: "fn" (canonical name: "view", "split", "getitem",
    # "cat", ...), "args" and "kwargs" with tensors written as Ref (see `Ref`), for the index-space
    # analysis; plus what normalize records per kind
    attrs: dict[str, Any] = field(default_factory=dict)
    scope: tuple[str, ...] = ()  # enclosing module paths, outermost first
    source: str | None = None  # user source line, for messages

    def __post_init__(self) -> None:
        if self.kind not in KINDS:  # the vocabulary every later stage relies on
            raise ValueError(f"op {self.name}: kind {self.kind!r} is not one of {KINDS}")


@dataclass
class Dataflow:
    """A captured model: ops in topological order, plus what the analysis needs about modules."""

    ops: dict[str, Op]
    inputs: list[str]  # activation inputs (the first example input); others are side inputs
    side_inputs: list[str]
    outputs: list[str]
    method: str  # "torch.fx.symbolic_trace" or "torch.export"
    model_class: str
    module_calls: dict[str, int]  # module path -> number of calls in one forward
    scope_types: dict[str, str]  # module path -> class name
    module_kinds: dict[
        str, str
    ]  # module path -> "leaf", "container" (Sequential/ModuleList/...) or "block"
    param_aliases: dict[str, list[str]]  # parameter name -> other names of the same tensor
    example_shapes: list[tuple[int, ...]]
    # parameter/buffer name (every alias) -> shape: what the index-space analysis sizes them by
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # module path -> whether every call of it returned one plain tensor (not a tuple/ModelOutput)
    returns_tensor: dict[str, bool] = field(default_factory=dict)
    # buffers the model computes when it is built and does not save (rotary frequencies, ...)
    constants: set[str] = field(default_factory=set)

    def users(self) -> dict[str, list[str]]:
        """Consumer ops of each op, in topological order (an op using a tensor twice appears twice)."""
        users: dict[str, list[str]] = {name: [] for name in self.ops}
        for op in self.ops.values():
            for src in op.inputs:
                users[src].append(op.name)
        return users

    def param_readers(self) -> dict[str, list[str]]:
        """Parameter name -> ops reading it (a module called twice reads its weight twice)."""
        readers: dict[str, list[str]] = {}
        for op in self.ops.values():
            for pname in op.params.values():
                readers.setdefault(pname, []).append(op.name)
        return readers
