"""Index spaces of an attention model, for sampling a thin student from a wide teacher.

An *index space* is a set of feature indices that must be chosen together: the residual stream
(every embedding, norm, residual add, and every Linear that reads or writes it), each MLP's hidden
units, each attention's heads (q and k share them; v and the output projection share theirs), each
part of a packed qkv projection. Heads are kept whole (a space's `unit` is the head size) and
grouped-query attention keeps its grouping (the query space is `grouped` over the key/value space).
The spaces come from the captured dataflow, so they do not depend on module or attribute names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from torch import nn

from surgery.analysis.unionfind import DisjointSets
from surgery.ir.capture import capture
from surgery.ir.graph import Dataflow, Op


@dataclass
class Space:
    key: str  # stable across a student and its wider teacher: the op that first produced it
    width: int
    unit: int = 1  # chosen in whole units of this many features (an attention head)
    parts: list[int] | None = None  # a packed output split into these spaces, in order
    grouped: tuple[int, int] | None = None  # (key/value space, query heads per key/value head)
    frozen: str | None = None  # why its width cannot differ between student and teacher


@dataclass(frozen=True)
class Label:
    """Where a tensor carries a space: element i of `axis` holds features [i*per, (i+1)*per) of
    the space (a head when per > 1, its features along `inner`), each repeated `repeat` times."""

    space: int
    axis: int
    per: int = 1
    inner: int | None = None
    repeat: int = 1


@dataclass
class Use:
    """How one module's parameters follow the spaces."""

    module: str
    kind: str  # "linear", "embedding" or "norm"
    space: int | None = None  # output space (linear, embedding) or normalised space (norm)
    in_space: int | None = None  # a linear's input space (None: its input is not sampled)
    in_per: int = 1  # input features per index of the input space (a flatten before it)
    weight_in_axis: int = 1
    weight_out_axis: int = 0


class SpaceTable:
    """The spaces of one model (from `index_spaces`), after unions."""

    def __init__(
        self, spaces: list[Space], sets: DisjointSets, uses: dict[str, Use], attention: bool
    ):
        self._spaces, self._sets, self.uses = spaces, sets, uses
        self.attention = (
            attention  # the model has attention ops (else widths.width_groups suffices)
        )

    def find(self, i: int) -> int:
        return self._sets.find(i)

    def space(self, i: int) -> Space:
        return self._spaces[self.find(i)]

    def __len__(self) -> int:
        return len(self._spaces)

    def roots(self) -> list[int]:
        return self._sets.roots()


def index_spaces(model: nn.Module, example_inputs: object = None) -> SpaceTable:
    """The index spaces of `model` on `example_inputs` (see the module docstring)."""
    flow = capture(model, example_inputs)
    return _Analysis(flow, dict(model.named_modules())).run()


class _Analysis:
    def __init__(self, flow: Dataflow, modules: dict[str, nn.Module]):
        self.flow, self.modules = flow, modules
        self.spaces: list[Space] = []
        self.sets = DisjointSets()
        self.uses: dict[str, Use] = {}
        self.labels: dict[str, Label | None] = {}

    def run(self) -> SpaceTable:
        for op in self.flow.ops.values():
            self.labels[op.name] = None if op.shape is None and op.kind != "other" else self._op(op)
        attention = any(op.kind in ("attention", "matmul") for op in self.flow.ops.values())
        return SpaceTable(self.spaces, self.sets, self.uses, attention)

    # union-find
    def new(self, key: str, width: int) -> int:
        self.spaces.append(Space(key, width))
        return self.sets.add()

    def find(self, i: int) -> int:
        return self.sets.find(i)

    def union(self, a: int, b: int) -> int:
        keep, gone = self.sets.join(a, b)
        if gone is None:
            return keep
        k, g = self.spaces[keep], self.spaces[gone]
        if 1 < k.unit != g.unit > 1:
            k.frozen = k.frozen or f"{k.key} and {g.key} are cut into heads of different sizes"
        k.unit = max(k.unit, g.unit)
        k.frozen = k.frozen or g.frozen
        k.grouped = k.grouped or g.grouped
        return keep

    def freeze(self, label: Label | None, why: str) -> None:
        if label is not None:
            s = self.spaces[self.find(label.space)]
            s.frozen = s.frozen or why

    # ops
    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.flow.ops[name].shape or ())

    def _op(self, op: Op) -> Label | None:
        ins = [self.labels.get(i) for i in op.inputs]
        first = ins[0] if ins else None
        kind = op.kind
        if kind == "embedding" and op.module is not None:
            out = self._module_output(op, "embedding", weight_out_axis=1)
            return Label(out, len(op.shape) - 1)
        if kind == "linear" and op.module is not None:
            return self._linear(op, first)
        if kind in ("norm", "batch_norm"):
            if first is not None and op.module is not None:
                if first.axis != len(op.shape) - 1 or first.per != 1:
                    self.freeze(first, f"normalised by {op.module} on another axis")
                    return None
                use = self.uses.setdefault(op.module, Use(op.module, "norm", first.space))
                use.space = self.union(use.space, first.space)
            return first
        if kind == "attention":
            return self._attention(op, ins)
        if kind == "matmul":
            return self._matmul(op, ins)
        if kind in ("add", "mul", "cat"):
            return self._combine(op, ins)
        if op.attrs.get("why") == "indexing" and op.inputs and "index" in op.attrs:
            parent = self.flow.ops[op.inputs[0]]
            if parent.shape is None:  # a part of a split
                return self._part(parent, op)
        if first is None:
            return None
        if kind == "transparent":
            family = op.attrs.get("family")
            if family == "permute":
                perm = list(op.attrs["perm"])
                inner = None if first.inner is None else perm.index(first.inner)
                return replace(first, axis=perm.index(first.axis), inner=inner)
            if family == "reshape":
                return self._reshape(first, self._shape(op.inputs[0]), tuple(op.shape))
        if op.shape is None:  # a split: its parts are the getitems that follow
            return self._split(op, first)
        return self._keep(first, self._shape(op.inputs[0]), tuple(op.shape))

    def _module_output(self, op: Op, kind: str, **axes: int) -> int:
        use = self.uses.get(op.module)
        if use is None:
            out = self.new(op.module, op.shape[-1])
            use = self.uses[op.module] = Use(op.module, kind, out, **axes)
        return use.space

    def _linear(self, op: Op, src: Label | None) -> Label:
        axes = {k: op.attrs.get(k, d) for k, d in (("weight_in_axis", 1), ("weight_out_axis", 0))}
        first_call = op.module not in self.uses
        out = self._module_output(op, "linear", **axes)
        use = self.uses[op.module]
        rank = len(op.shape)
        fits = src is not None and src.axis == rank - 1 and src.repeat == 1
        if src is not None and not fits:
            self.freeze(src, f"read by {op.module} on a dim it cannot sample")
        if fits and first_call:
            use.in_space, use.in_per = src.space, src.per
        elif fits and use.in_space is not None and use.in_per == src.per:
            use.in_space = self.union(use.in_space, src.space)
        elif not first_call and use.in_space is not None:
            self.freeze(Label(use.in_space, 0), f"{op.module} is called on different inputs")
            use.in_space = None
        return Label(out, rank - 1)

    def _attention(self, op: Op, ins: list[Label | None]) -> Label | None:
        if len(ins) < 3 or any(label is None for label in ins[:3]):
            for label in ins:
                self.freeze(label, f"{op.op} reads it with an input not traced to a projection")
            return None
        q, k, v = ins[:3]
        last = len(op.shape) - 1
        for label in ins[:3]:
            if label.axis == last:  # a single head (its head axis had size 1): one unit of all
                space = self.spaces[self.find(label.space)]
                space.unit = max(space.unit, space.width)
        heads = [
            1 if label.axis == last else self.spaces[self.find(label.space)].width // label.per
            for label in ins[:3]
        ]
        if heads[1] != heads[2] or heads[0] % heads[1]:
            self.freeze(q, f"{op.op}: {heads} query/key/value heads do not group")
            return None
        kv = self.union(k.space, v.space)
        if heads[0] == heads[1]:
            qs = self.union(q.space, kv)
        else:
            qs = self.find(q.space)
            self.spaces[qs].grouped = (kv, heads[0] // heads[1])
        return Label(qs, q.axis, q.per, len(op.shape) - 1)

    def _matmul(self, op: Op, ins: list[Label | None]) -> Label | None:
        a, b = (ins + [None, None])[:2]
        rank = len(op.shape)
        if a is None or b is None or a.axis != b.axis or a.axis >= rank - 2 or a.per != b.per:
            for label in ins:
                self.freeze(label, f"{op.op} mixes it with another tensor")
            return None
        space = self.union(a.space, b.space)
        return Label(space, a.axis, a.per, rank - 1 if op.shape[-1] == a.per else None)

    def _combine(self, op: Op, ins: list[Label | None]) -> Label | None:
        labelled = [label for label in ins if label is not None]
        if not labelled:
            return None
        first = labelled[0]
        same = all(
            (label.axis, label.per, label.repeat) == (first.axis, first.per, first.repeat)
            for label in labelled
        )
        if op.kind == "cat":
            dim = _changed_dim(self._shape(op.inputs[0]), tuple(op.shape))
            if dim == first.axis or not same or len(labelled) < len(ins):
                for label in labelled:
                    self.freeze(label, f"concatenated by {op.op}")
                return None
        if not same:
            for label in labelled:
                self.freeze(label, f"{op.op} combines it with features laid out differently")
            return None
        space = first.space
        for label in labelled[1:]:
            space = self.union(space, label.space)
        rank = len(op.shape or ())
        if len(self._shape(op.inputs[ins.index(first)])) != rank:
            return None
        return replace(first, space=space)

    def _keep(self, label: Label, before: tuple[int, ...], after: tuple[int, ...]) -> Label | None:
        """An op that does not move the labelled axis (elementwise, a slice elsewhere, an expand of
        another dim, dropping leading dims) keeps the label; anything else drops it."""
        if len(before) == len(after):
            return label if after[label.axis] == before[label.axis] else None
        shift = len(after) - len(before)
        axis = label.axis + shift
        if 0 <= axis < len(after) and after[axis] == before[label.axis]:
            inner = None if label.inner is None else label.inner + shift
            return replace(
                label, axis=axis, inner=inner if inner is not None and inner >= 0 else None
            )
        return None

    def _reshape(
        self, label: Label, before: tuple[int, ...], after: tuple[int, ...]
    ) -> Label | None:
        n, stride = before[label.axis], math.prod(before[label.axis + 1 :])
        strides = [math.prod(after[i + 1 :]) for i in range(len(after))]
        inner = None
        if label.inner is not None:
            s_in, n_in = math.prod(before[label.inner + 1 :]), before[label.inner]
            inner = next(
                (b for b in range(len(after)) if strides[b] == s_in and after[b] == n_in), None
            )
        moved = [b for b in range(len(after)) if strides[b] == stride and after[b] == n]
        if moved:
            return replace(label, axis=moved[0], inner=inner)
        # split: the labelled axis becomes (outer, inner) axes; features -> heads
        inside = [
            b
            for b in range(len(after))
            if after[b] > 1 and strides[b] >= stride and strides[b] * after[b] <= stride * n
        ]
        if len(inside) == 2 and label.per == 1 and label.repeat == 1:
            outer, head = inside
            if after[outer] * after[head] == n and strides[head] == stride:
                space = self.spaces[self.find(label.space)]
                if space.unit not in (1, after[head]):
                    space.frozen = (
                        space.frozen or f"cut into heads of {space.unit} and {after[head]}"
                    )
                space.unit = after[head]
                return Label(label.space, outer, after[head], head)
        # merge: the labelled axis is the outer part of one new axis
        for b in range(len(after)):
            if (
                strides[b] * after[b] == stride * n
                and strides[b] < stride
                and stride % strides[b] == 0
            ):
                factor = stride // strides[b]
                merged = [
                    a
                    for a in range(label.axis + 1, len(before))
                    if math.prod(before[a:]) > strides[b] and before[a] > 1
                ]
                if merged == [label.inner] and factor == label.per:  # heads back into features
                    return Label(label.space, b, 1, None, label.repeat)
                if label.inner not in merged:  # copies of each element (repeat_kv)
                    return replace(label, axis=b, inner=inner, repeat=label.repeat * factor)
        self.freeze(label, "reshaped in a way the sampler does not follow")
        return None

    def _split(self, op: Op, label: Label) -> None:
        parts = [
            o for o in self.flow.ops.values() if o.inputs[:1] == [op.name] and "index" in o.attrs
        ]
        before = self._shape(op.inputs[0])
        dims = {_changed_dim(before, tuple(p.shape)) for p in parts if p.shape}
        if dims != {label.axis} or label.per != 1:
            return None  # split along another dim: each part keeps the label (see _part)
        space = self.spaces[self.find(label.space)]
        if space.parts is None:
            ordered = sorted(parts, key=lambda p: p.attrs["index"])
            space.parts = [
                self.new(f"{space.key}#{i}", p.shape[label.axis]) for i, p in enumerate(ordered)
            ]
        return None

    def _part(self, split: Op, op: Op) -> Label | None:
        label = self.labels.get(split.inputs[0])
        if label is None:
            return None
        space = self.spaces[self.find(label.space)]
        if space.parts is None:  # split along another dim
            return self._keep(label, self._shape(split.inputs[0]), tuple(op.shape))
        return replace(label, space=space.parts[op.attrs["index"]])


def _changed_dim(before: tuple[int, ...], after: tuple[int, ...]) -> int | None:
    diff = [i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b]
    return diff[0] if len(diff) == 1 and len(before) == len(after) else None
