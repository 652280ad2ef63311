"""Width groups: the index spaces of a model whose widths can change, and what changing them costs.

A *width group* is one unstructured index space of `surgery.analysis.spaces` that a parameter dim
carries (alone, or inside a product or concatenation): a Linear/Conv's output channels together
with every norm, reader and residual add that shares them (a ResNet stage is one group), an MLP's
hidden units, an attention's heads, the dims within its heads. A group that cannot change says why
(a model input or output, a vocabulary, GroupNorm's groups, an op the analysis does not follow).

`WidthTable.parameters(widths)` counts parameters at any widths without building anything;
`WidthTable.scaled(factor)` chooses the new width of every group so that every free width of the
model (each parameter dim that can change: a residual stream, a hidden layer, an attention's q/k/v)
becomes exactly `factor` times as wide: of a heads x head-dims space it scales the heads (the
outermost factor that can change), or the dims within heads where the heads cannot.
`surgery.runtime.resize` rebuilds the model at the chosen widths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from surgery.analysis.spaces import CAT, OUTPUT, PROD, IndexSpaces
from surgery.errors import PlanError
from surgery.ir.capture import as_example_inputs, capture
from surgery.report import render_table

_LAYERS = ("linear", "conv", "conv_transpose", "embedding")


@dataclass
class WidthGroup:
    """One index space whose width changes as a whole."""

    name: str  # the first module that produces it, with the place inside its output if a part
    width: int
    space: int  # the leaf space (surgery.analysis.spaces)
    producers: list[str] = field(default_factory=list)  # layers writing it (output dim)
    readers: list[str] = field(default_factory=list)  # layers reading it (input dim)
    tied: list[str] = field(default_factory=list)  # norms and other per-feature parameters
    residual: bool = False  # summed with another activation: a residual stream
    frozen: str | None = None  # why the width cannot change (None: it can)


class WidthTable:
    """The width groups of a model (from `width_groups`): printable, the input of `resize`."""

    def __init__(self, model: nn.Module, spaces: IndexSpaces) -> None:
        self.model_class = type(model).__name__
        self.spaces = spaces
        self.flow = spaces.flow
        params = dict(model.named_parameters())
        self._params = {n: tuple(p.shape) for n, p in params.items()}  # unique tensors only
        self.groups = self._groups()
        self._by_name = {g.name: i for i, g in enumerate(self.groups)}
        self._by_space = {g.space: g for g in self.groups}

    # ---- the groups ----
    def _groups(self) -> list[WidthGroup]:
        s = self.spaces
        found: dict[int, WidthGroup] = {}
        for op in self.flow.ops.values():  # in forward order: producers name their groups
            axis = s.feature_axis(op.name) if op.kind in _LAYERS and op.module else None
            if axis is not None:
                self._name_leaves(s.axes[op.name][axis], op.module, found)
        for name in self.flow.param_shapes:
            for d, space in enumerate(s.dims.get(name, ())):
                self._name_leaves(space, f"{name}:{d}", found)
        for op in self.flow.ops.values():
            self._roles(op, found)
        return list(found.values())

    def _name_leaves(self, space: int, base: str, found: dict[int, WidthGroup]) -> None:
        s = self.spaces
        for leaf, path in _paths(s, space):
            if leaf in found or s.width(leaf) <= 1:
                continue
            taken = {g.name for g in found.values()}
            name = base + path
            if name in taken:
                name = f"{name}#{leaf}"
            found[leaf] = WidthGroup(
                name=name,
                width=s.width(leaf),
                space=leaf,
                residual=s.residual(leaf),
                frozen=s.space(leaf).frozen,
            )

    def _roles(self, op: Any, found: dict[int, WidthGroup]) -> None:
        if not op.module or not op.params:
            return
        s = self.spaces
        outs: set[int] = set()
        ins: set[int] = set()
        axis = s.feature_axis(op.name)
        if op.kind in _LAYERS and axis is not None:
            outs = set(s.leaves(s.axes[op.name][axis]))
            if op.inputs and op.inputs[0] in s.axes and op.kind != "embedding":
                x = s.axes[op.inputs[0]]
                ins = set(s.leaves(x[1] if op.kind.startswith("conv") else x[-1]))
        carried = {
            leaf
            for name in op.params.values()
            for d in s.dims.get(name, ())
            for leaf in s.leaves(d)
        }
        for leaf in carried:
            group = found.get(leaf)
            if group is None:
                continue
            role = group.producers if leaf in outs else group.readers if leaf in ins else group.tied
            if op.module not in role:
                role.append(op.module)

    # ---- lookups ----
    def __getitem__(self, name: str) -> WidthGroup:
        return self.groups[self._index(name)]

    def _index(self, name: str) -> int:
        if name not in self._by_name:
            raise KeyError(f"no width group {name!r}; groups: {', '.join(self._by_name)}")
        return self._by_name[name]

    @property
    def free(self) -> list[WidthGroup]:
        """Groups whose width can change, in forward order."""
        return [g for g in self.groups if g.frozen is None]

    def widths(self) -> dict[str, int]:
        """group name -> current width."""
        return {g.name: g.width for g in self.groups}

    def leaf_widths(self, widths: Mapping[str, int] | None = None) -> dict[int, int]:
        """Leaf space -> width, with `widths` (group name -> width) applied (checked)."""
        out = {g.space: g.width for g in self.groups}
        for name, width in (widths or {}).items():
            group = self[name]
            if not isinstance(width, int) or isinstance(width, bool) or width < 1:
                raise PlanError(f"width of {name!r} must be a positive int, got {width!r}")
            if width != group.width and group.frozen:
                raise PlanError(f"width group {name!r} cannot change: {group.frozen}")
            out[group.space] = width
        return out

    def width_of(self, space: int, leaves: Mapping[int, int]) -> int:
        """The width of any space (a product or concatenation of groups) at leaf widths `leaves`."""
        s = self.spaces
        found = s.structure(space)
        if found is None:
            return leaves.get(s.find(space), s.width(space))
        widths = [self.width_of(m, leaves) for m in found[1]]
        return math.prod(widths) if found[0] == PROD else sum(widths)

    def shapes(self, leaves: Mapping[int, int]) -> dict[str, tuple[int, ...]]:
        """Every parameter and buffer's shape at leaf widths `leaves` (untraced ones unchanged)."""
        out = {}
        for name, shape in self.flow.param_shapes.items():
            dims = self.spaces.dims.get(name)
            out[name] = tuple(self.width_of(d, leaves) for d in dims) if dims is not None else shape
        return out

    def parameters(self, widths: Mapping[str, int] | None = None) -> int:
        """The model's parameter count at `widths` (default: as it is), without building it."""
        shapes = self.shapes(self.leaf_widths(widths))
        return sum(math.prod(shapes[name]) for name in self._params)

    # ---- the factor policy ----
    def scaled(
        self, factor: float, *, residual: bool = True, inner: bool = False, outputs: bool = False
    ) -> dict[int, int]:
        """Leaf widths that make every free width exactly `factor` times as wide (rounded, >= 1):
        in each parameter dim's space, in forward order, the outermost factor that can change
        scales (the heads of heads x head dims; `inner`: the innermost, the dims within heads);
        `residual=False` keeps residual streams at their width; `outputs=True` scales the widths
        frozen only because the model returns them (a headless encoder's pooled features, which a
        Hugging Face config sizes with the hidden size). PlanError when no choice of
        factors gives every space the factor (the spaces that conflict are named)."""
        s = self.spaces
        scale: dict[int, bool] = {}
        conflicts: list[str] = []

        def changeable(leaf: int) -> bool:
            group = self._by_space.get(leaf)
            if group is None or not (residual or not group.residual):
                return False
            return group.frozen is None or (outputs and group.frozen == OUTPUT)

        def scaled_atom(atom: int) -> bool:
            leaves = [leaf for leaf in s.leaves(atom) if changeable(leaf)]
            return bool(leaves) and all(scale.get(leaf) for leaf in leaves)

        units = [
            u for name in self.flow.param_shapes for d in s.dims.get(name, ()) for u in _units(s, d)
        ]
        for unit in units:
            free = [a for a in unit if any(changeable(leaf) for leaf in s.leaves(a))]
            if not free:
                continue
            done = [a for a in unit if scaled_atom(a)]
            if not done:
                pick = free[-1] if inner else free[0]
                for leaf in s.leaves(pick):
                    if changeable(leaf):
                        scale[leaf] = True
            elif len(done) > 1:
                conflicts.append(" x ".join(str(s.width(a)) for a in unit))
        leaves = {
            g.space: max(1, round(g.width * factor)) if scale.get(g.space) else g.width
            for g in self.groups
        }
        if conflicts:
            raise PlanError(
                f"no choice of widths scales every free width of {self.model_class} by {factor}: "
                f"spaces {', '.join(conflicts[:3])} share factors that scale twice"
            )
        return leaves

    # ---- printing ----
    def rows(self, widths: Mapping[str, int] | None = None) -> list[list[Any]]:
        """The table's rows: group, width (-> new width), role, layers, why it is fixed."""
        leaves = self.leaf_widths(widths)
        rows = []
        for g in self.groups:
            new = leaves[g.space]
            layers = g.producers + g.readers + [f"~{t}" for t in g.tied]
            shown = ", ".join(layers[:4]) + (f" +{len(layers) - 4}" if len(layers) > 4 else "")
            rows.append(
                [
                    g.name,
                    g.width if new == g.width else f"{g.width} -> {new}",
                    "residual" if g.residual else "hidden",
                    shown,
                    g.frozen or "free",
                ]
            )
        return rows

    def table(self, widths: Mapping[str, int] | None = None, title: str | None = None) -> str:
        """Groups with their widths (and new widths), role, layers and why a width is fixed."""
        before = self.parameters()
        after = self.parameters(widths) if widths else before
        return render_table(
            title or f"Width groups of {self.model_class}",
            ["group", "width", "role", "layers (~ tied)", "width can change"],
            self.rows(widths),
            caption=f"parameters: {before}" + (f" -> {after}" if widths else ""),
        )

    def __str__(self) -> str:
        return self.table()


def _paths(s: IndexSpaces, space: int, path: str = "") -> list[tuple[int, str]]:
    """(leaf, where it sits in `space`: '' or '/part0/factor1' ...) for every leaf of `space`."""
    found = s.structure(space)
    if found is None:
        return [(s.find(space), path)]
    tag = "part" if found[0] == CAT else "factor"
    out = []
    for i, m in enumerate(found[1]):
        out.extend(_paths(s, m, f"{path}/{tag}{i}"))
    return out


def _units(s: IndexSpaces, space: int) -> list[list[int]]:
    """The spaces inside `space` that must each scale by the factor: each part of a concatenation
    (recursively), a product as a whole (its atoms listed)."""
    found = s.structure(space)
    if found is None:
        return [[s.find(space)]]
    if found[0] == CAT:
        return [u for m in found[1] for u in _units(s, m)]
    return [s.atoms(space)]  # a product scales as a whole, whatever its factors are made of


def width_groups(model: nn.Module, example_inputs: Any = None) -> WidthTable:
    """The width groups of `model` on `example_inputs` (see the module docstring)."""
    flow = capture(model, as_example_inputs(model, example_inputs))
    return WidthTable(model, IndexSpaces(flow))


def resize(
    model: nn.Module,
    widths: Mapping[str, int],
    example_inputs: Any = None,
    *,
    reinit: bool = True,
    table: WidthTable | None = None,
) -> nn.Module:
    """A copy of `model` with width group `name` at `widths[name]` (names from `width_groups`).

    Resized parameters are new tensors; with `reinit` every layer is re-initialised (PyTorch
    defaults), as if the model had been constructed at the new widths. The copy is run on the
    example inputs and must give outputs of the original shapes."""
    from surgery.runtime.resize import rebuild

    inputs = as_example_inputs(model, example_inputs)
    table = table or width_groups(model, inputs)
    return rebuild(model, table, table.leaf_widths(widths), inputs, reinit=reinit)


def widen(
    model: nn.Module, factor: float, example_inputs: Any = None, *, reinit: bool = True
) -> nn.Module:
    """A copy of `model` with every free width multiplied by `factor` (see `WidthTable.scaled`)."""
    from surgery.runtime.resize import rebuild_scaled

    inputs = as_example_inputs(model, example_inputs)
    return rebuild_scaled(model, width_groups(model, inputs), factor, inputs, reinit=reinit)
