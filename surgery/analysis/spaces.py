"""Index spaces: which feature indices of a captured model must be chosen, resized or mixed together.

Every axis of every tensor of the dataflow, and every dim of every parameter and buffer, carries
one *space*: a set of indices. Ops say which spaces are the same one (a Linear's input axis and its
weight's input dim; the two operands of a residual add; q and k in attention), and how spaces are
built from others: a reshape that cuts features into heads makes the feature space a *product*
(heads x head dims; a 3-way view of a packed qkv: parts x heads x head dims), a split or a
concatenation makes it a *concatenation* of parts. The same space seen through two ops is refined
to their common structure (a view into (3, h, hd) and a split into three parts of h x hd).

A space is *frozen* when its width cannot change or be chosen: an axis of a model input or output,
a vocabulary or position table indexed by values, the count of parts a tensor is split or unbound
into, a GroupNorm's groups, or anything an op the analysis does not follow reads (the reason names
the op). Everything else is free. This is the one analysis behind the fold's feature axes, widen and
narrow (`surgery.analysis.widths`) and the teacher-derived start (`surgery.win.sample`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from surgery.analysis.unionfind import DisjointSets
from surgery.ir.graph import Dataflow

PROD, CAT = "prod", "cat"
OUTPUT = "a model output"  # the reason of a width frozen only because the model returns it


@dataclass
class Space:
    """One index space (a root of the analysis): its width, its structure (the spaces it is the
    product or the concatenation of, outermost / first first), why it is frozen, and the parameter
    dims that carry it whole."""

    id: int
    width: int
    factors: tuple[int, ...] = ()
    parts: tuple[int, ...] = ()
    frozen: str | None = None
    carriers: list[tuple[str, int]] = field(default_factory=list)
    positional: bool = False  # an axis of the data (batch, sequence, spatial), not of features

    @property
    def leaf(self) -> bool:
        return not self.factors and not self.parts


class IndexSpaces:
    """The index spaces of one captured model (see the module docstring).

    axes[op] is the space of each axis of op's tensor; dims[name] the space of each dim of a
    parameter or buffer (every alias of a tied tensor has the same). Space ids may be stale after
    unions: read them through `find` / `space`."""

    def __init__(self, flow: Dataflow) -> None:
        self.flow = flow
        self._sets = DisjointSets()
        self._width: list[int] = []
        self._struct: dict[int, tuple[str, list[int]]] = {}
        self._frozen: dict[int, str] = {}
        self._carriers: dict[int, list[tuple[str, int]]] = {}
        self._positional: set[int] = set()
        self.axes: dict[str, tuple[int, ...]] = {}
        self.tuples: dict[str, list[tuple[int, ...] | None]] = {}
        self.dims: dict[str, tuple[int, ...]] = {}
        self.unfollowed: list[str] = []  # the ops the analysis could not follow, with the reason
        self._summed: list[int] = []  # spaces two activations are added on (residual streams)
        self.groups: dict[str, int] = {}  # grouped conv op -> the space of its groups
        self.literals: list[tuple[str, int, int]] = []  # (op, literal int, space) of shape ops
        from surgery.analysis.space_ops import Walk

        Walk(self).run()

    # ---- the store: union-find with widths and structure ----
    def new(self, width: int, *, frozen: str | None = None, positional: bool = False) -> int:
        i = self._sets.add()
        self._width.append(int(width))
        if frozen:
            self._frozen[i] = frozen
        if positional:
            self._positional.add(i)
        return i

    def find(self, i: int) -> int:
        return self._sets.find(i)

    def width(self, i: int) -> int:
        return self._width[self.find(i)]

    def structure(self, i: int) -> tuple[str, list[int]] | None:
        found = self._struct.get(self.find(i))
        return None if found is None else (found[0], [self.find(j) for j in found[1]])

    def space(self, i: int) -> Space:
        r = self.find(i)
        kind, members = self.structure(r) or ("", [])
        return Space(
            id=r,
            width=self._width[r],
            factors=tuple(members) if kind == PROD else (),
            parts=tuple(members) if kind == CAT else (),
            frozen=self._frozen.get(r) if kind == "" else self.frozen_reason(r),
            carriers=list(self._carriers.get(r, [])),
            positional=self.positional(r),
        )

    def leaves(self, i: int) -> list[int]:
        """The unstructured spaces `i` is made of, in index order."""
        found = self.structure(i)
        if found is None:
            return [self.find(i)]
        return [leaf for member in found[1] for leaf in self.leaves(member)]

    def atoms(self, i: int) -> list[int]:
        """`i` as a product, outermost factor first (nested products flattened; width-1 factors
        left out); an unstructured or concatenated space is its own one atom."""
        found = self.structure(i)
        if found is None or found[0] != PROD:
            return [self.find(i)] if self.width(i) != 1 else []
        return [a for member in found[1] for a in self.atoms(member)]

    def frozen_reason(self, i: int) -> str | None:
        """Why `i` cannot change at all: every leaf of it frozen (the first leaf's reason)."""
        reasons = [self._frozen.get(leaf) for leaf in self.leaves(i)]
        return reasons[0] if reasons and all(reasons) else None

    def positional(self, i: int) -> bool:
        return all(leaf in self._positional for leaf in self.leaves(i))

    def carried(self, i: int) -> bool:
        """Whether a parameter dim carries `i` or a space it is made of."""
        r = self.find(i)
        if self._carriers.get(r):
            return True
        found = self.structure(r)
        return found is not None and any(self.carried(m) for m in found[1])

    def carriers(self, i: int) -> list[tuple[str, int]]:
        return list(self._carriers.get(self.find(i), []))

    def freeze(self, i: int, why: str) -> None:
        for leaf in self.leaves(i):
            self._frozen.setdefault(leaf, why)

    def carry(self, i: int, name: str, dim: int) -> None:
        self._carriers.setdefault(self.find(i), []).append((name, dim))

    def mark_positional(self, i: int) -> None:
        for leaf in self.leaves(i):
            self._positional.add(leaf)

    def unify(self, a: int, b: int) -> int:
        """One space from `a` and `b` (equal widths): their structures refined to a common one."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self._width[a] != self._width[b]:  # a bug in an op's rule, never a user's model
            raise AssertionError(f"unify spaces of widths {self._width[a]} and {self._width[b]}")
        sa, sb = self._struct.pop(a, None), self._struct.pop(b, None)
        frozen = (self._frozen.get(a) if sa is None else None) or (
            self._frozen.get(b) if sb is None else None
        )
        positional = (sa is None and a in self._positional) or (
            sb is None and b in self._positional
        )
        keep, gone = self._sets.join(a, b)
        self._carriers.setdefault(keep, []).extend(self._carriers.pop(gone, []))
        self._frozen.pop(gone, None)
        self._positional.discard(gone)
        merged = self._merge(keep, sa, sb)
        if merged is not None:
            self._struct[keep] = merged
        if frozen:
            self.freeze(keep, frozen)
        if positional:
            self.mark_positional(keep)
        return self.find(keep)

    def _merge(
        self, at: int, sa: tuple[str, list[int]] | None, sb: tuple[str, list[int]] | None
    ) -> tuple[str, list[int]] | None:
        if sa is None or sb is None:
            return sa or sb
        if sa[0] != sb[0]:
            why = "split into parts in one place and into factors in another"
            for members in (sa[1], sb[1]):
                for m in members:
                    self.freeze(m, why)
            return sa
        kind = sa[0]
        flat_a, flat_b = self._flat(kind, sa[1]), self._flat(kind, sb[1])
        aligned = self._align(kind, flat_a, flat_b)
        if aligned is None:
            why = f"cut into {_widths_text(self, flat_a, kind)} and {_widths_text(self, flat_b, kind)}"
            for m in flat_a + flat_b:
                self.freeze(m, why)
            return sa
        return (kind, aligned)

    def _flat(self, kind: str, members: list[int]) -> list[int]:
        out = []
        for m in members:
            found = self.structure(m)
            if found is not None and found[0] == kind:
                out.extend(self._flat(kind, found[1]))
            elif not (kind == PROD and self.width(m) == 1) and not (
                kind == CAT and self.width(m) == 0
            ):
                out.append(self.find(m))
        return out

    def _align(self, kind: str, xs: list[int], ys: list[int]) -> list[int] | None:
        """Common refinement of two factorisations (products) or partitions (concatenations) of
        one space, unifying the members that line up; None when they cannot line up."""
        left, right, out = deque(xs), deque(ys), []
        while left and right:
            x, y = self.find(left.popleft()), self.find(right.popleft())
            wx, wy = self._width[x], self._width[y]
            if wx == wy:
                out.append(self.unify(x, y))
                continue
            big, small, queue = (x, y, left) if wx > wy else (y, x, right)
            wb, ws = self._width[big], self._width[small]
            if kind == PROD and wb % ws:
                return None
            head, rest = self.split(big, kind, [ws, wb // ws if kind == PROD else wb - ws])
            if head is None:
                return None
            out.append(self.unify(head, small))
            queue.appendleft(rest)
        return out if not left and not right else None

    def split(self, i: int, kind: str, widths: Sequence[int]) -> list[int | None]:
        """Give the unstructured space `i` the structure `kind` over new members of `widths`
        (they inherit its frozen / positional marks); [None, ...] if it is structured already."""
        r = self.find(i)
        if r in self._struct:
            found = self._struct[r]
            if found[0] == kind and [self.width(m) for m in found[1]] == list(widths):
                return [self.find(m) for m in found[1]]
            return [None] * len(widths)
        members = [
            self.new(w, frozen=self._frozen.get(r), positional=r in self._positional)
            for w in widths
        ]
        self._struct[r] = (kind, members)
        return members

    def make(self, kind: str, members: Sequence[int]) -> int:
        """A new space that is the product / concatenation of `members` (a product of one member
        besides width-1 ones is that member)."""
        if kind == PROD:
            kept = [m for m in members if self.width(m) != 1]
            if len(kept) <= 1:
                return kept[0] if kept else self.new(1)
            members = kept
        widths = [self.width(m) for m in members]
        total = math.prod(widths) if kind == PROD else sum(widths)
        i = self.new(total)
        self._struct[i] = (kind, [self.find(m) for m in members])
        return i

    # ---- what the consumers read ----
    def feature_axis(self, op: str) -> int | None:
        """The axis of op's tensor that carries model features: the last axis whose space a
        parameter dim carries and which is not an axis of the data (batch, sequence, spatial)."""
        axes = self.axes.get(op)
        if not axes:
            return None
        found = [a for a, s in enumerate(axes) if self.carried(s) and not self.positional(s)]
        return found[-1] if found else None

    def residual(self, i: int) -> bool:
        """Whether two activations are summed on `i` (a residual stream)."""
        return self.find(i) in {self.find(j) for j in self._summed}


def _widths_text(spaces: IndexSpaces, members: list[int], kind: str) -> str:
    sep = " x " if kind == PROD else " + "
    return "(" + sep.join(str(spaces.width(m)) for m in members) + ")"


def feature_axes(flow: Dataflow, spaces: IndexSpaces | None = None) -> dict[str, int]:
    """The feature axis of every tensor of `flow`: where its index space analysis finds one, else
    1 for a tensor read by a convolution and the last axis otherwise."""
    spaces = spaces or IndexSpaces(flow)
    users = flow.users()
    axes: dict[str, int] = {}
    for op in flow.ops.values():
        rank = len(op.shape or ())
        found = spaces.feature_axis(op.name)
        if found is not None:
            axes[op.name] = found
        elif rank >= 2 and any(
            flow.ops[u].kind in ("conv", "conv_transpose", "batch_norm") for u in users[op.name]
        ):
            axes[op.name] = 1
        else:
            axes[op.name] = max(rank - 1, 0)
    return axes
