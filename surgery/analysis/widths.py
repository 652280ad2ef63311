"""Width groups: which layer dimensions must change together, and rebuilding a model at new widths.

A *width group* is a set of feature dimensions that are one and the same index space: the output
channels of a Linear/Conv, the channels of the BatchNorm/LayerNorm/depthwise conv after it, the input
dim of every Linear/Conv that reads it (a Flatten in between multiplies the input dim by the spatial
size), and — through residual adds and broadcast multiplies — the other producers summed into it (a
ResNet stage is one group). The groups come from the captured dataflow (surgery.ir.capture), so any
model fx or torch.export can capture works; a group whose width cannot change says why (it is the
model output, read by an op that is not understood, concatenated, ...).

`resize` rebuilds a copy of the model with new widths (the same module classes, fresh PyTorch
initialisation by default); `widen` multiplies every free group by a factor. These are the width
transforms the 003 experiments need (wide dense, wide sparse, non-linear bottleneck).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgery.analysis.unionfind import DisjointSets
from surgery.errors import PlanError
from surgery.ir.capture import _eval_mode, as_example_inputs, capture
from surgery.ir.graph import Dataflow, Layout
from surgery.report import render_table
from surgery.rewrites import channel_ops

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class WidthGroup:
    """One index space of features whose width changes as a whole."""

    name: str  # the first module that produces it
    width: int
    producers: list[str] = field(default_factory=list)  # Linear/Conv writing it (output dim)
    readers: list[str] = field(default_factory=list)  # Linear/Conv reading it (input dim)
    tied: list[str] = field(default_factory=list)  # BatchNorm / LayerNorm / depthwise conv
    residual: bool = False  # joined by an add: a residual stream
    frozen: str | None = None  # why the width cannot change (None: it can)


@dataclass
class _Spec:
    """How one module's constructor dims follow the groups."""

    module: str
    kind: str  # "linear", "conv", "depthwise", "batch_norm", "layer_norm"
    in_group: int | None = None
    in_mult: int = 1  # in_features = in_mult * width (a Flatten before a Linear)
    out_group: int | None = None


class WidthTable:
    """The width groups of a model (from `width_groups`): printable, and the input of `resize`."""

    def __init__(self, model: nn.Module, groups: list[WidthGroup], specs: dict[str, _Spec]):
        self.model_class = type(model).__name__
        self.groups = groups
        self._by_name = {g.name: i for i, g in enumerate(groups)}
        self._specs = specs
        self._modules = dict(model.named_modules())
        self._total = sum(p.numel() for p in model.parameters())

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

    def layers(self) -> list[tuple[str, str, str | None, int, str | None]]:
        """(module, kind, input group, input multiplier, output group) of every resizable layer;
        a group is None where that dim is not tied to a group (it keeps its size)."""
        name = [g.name for g in self.groups]
        return [
            (
                spec.module,
                spec.kind,
                None if spec.in_group is None else name[spec.in_group],
                spec.in_mult,
                None if spec.out_group is None else name[spec.out_group],
            )
            for spec in self._specs.values()
        ]

    def _dims(self, spec: _Spec, widths: list[int]) -> dict[str, int]:
        m = self._modules[spec.module]
        if spec.kind == "linear":
            return {
                "in": m.in_features
                if spec.in_group is None
                else spec.in_mult * widths[spec.in_group],
                "out": widths[spec.out_group],
            }
        if spec.kind == "conv":
            return {
                "in": m.in_channels if spec.in_group is None else widths[spec.in_group],
                "out": widths[spec.out_group],
            }
        return {"n": widths[spec.in_group]}

    def _full(self, widths: Mapping[str, int]) -> list[int]:
        out = [g.width for g in self.groups]
        for name, width in widths.items():
            i = self._index(name)
            if width != out[i] and self.groups[i].frozen:
                raise PlanError(f"width group {name!r} cannot change: {self.groups[i].frozen}")
            if not isinstance(width, int) or width < 1:
                raise PlanError(f"width of {name!r} must be a positive int, got {width!r}")
            out[i] = width
        return out

    def parameters(self, widths: Mapping[str, int] | None = None) -> int:
        """The model's parameter count at `widths` (default: as it is), without building it."""
        full = self._full(widths or {})
        total = self._total
        for spec in self._specs.values():
            m = self._modules[spec.module]
            total += _count(m, spec.kind, self._dims(spec, full)) - sum(
                p.numel() for p in m.parameters(recurse=False)
            )
        return total

    def rows(self, widths: Mapping[str, int] | None = None) -> list[list[Any]]:
        """The table's rows: group, width (-> new width), role, layers, why it is fixed."""
        full = self._full(widths or {})
        rows = []
        for i, g in enumerate(self.groups):
            layers = g.producers + [f"~{t}" for t in g.tied]
            shown = ", ".join(layers[:4]) + (f" +{len(layers) - 4}" if len(layers) > 4 else "")
            rows.append(
                [
                    g.name,
                    g.width if full[i] == g.width else f"{g.width} -> {full[i]}",
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


def _count(module: nn.Module, kind: str, dims: dict[str, int]) -> int:
    """Parameter count of `module` rebuilt with `dims`."""
    bias = getattr(module, "bias", None) is not None
    if kind in ("linear", "conv"):
        k = math.prod(module.kernel_size) if kind == "conv" else 1
        return dims["out"] * dims["in"] * k + (dims["out"] if bias else 0)
    n = dims["n"]
    if kind == "depthwise":  # in = out = groups = n: weight [n, 1, *k]
        return n * math.prod(module.kernel_size) + (n if bias else 0)
    per_channel = sum(p.numel() for p in module.parameters(recurse=False))
    per_channel //= module.num_features if kind == "batch_norm" else module.normalized_shape[0]
    return per_channel * n


class _Groups(DisjointSets):
    """Union-find over width groups, with what each group holds."""

    def __init__(self) -> None:
        super().__init__()
        self.info: list[WidthGroup] = []

    def new(self, name: str, width: int) -> int:
        self.info.append(WidthGroup(name=name, width=width))
        return self.add()

    def union(self, a: int, b: int) -> int:
        keep, gone = self.join(a, b)
        if gone is None:
            return keep
        ka, kb = self.info[keep], self.info[gone]
        ka.producers += kb.producers
        ka.readers += kb.readers
        ka.tied += kb.tied
        ka.residual = ka.residual or kb.residual
        ka.frozen = ka.frozen or kb.frozen
        return keep

    def freeze(self, g: int, why: str) -> None:
        info = self.info[self.find(g)]
        info.frozen = info.frozen or why


def width_groups(model: nn.Module, example_inputs: Any = None) -> WidthTable:
    """The width groups of `model` on `example_inputs` (see the module docstring)."""
    flow = capture(model, example_inputs)
    modules = dict(model.named_modules())
    groups, specs = _analyse(flow, modules)
    roots = groups.roots()
    index = {r: i for i, r in enumerate(roots)}
    out = [groups.info[r] for r in roots]
    for spec in specs.values():
        for attr in ("in_group", "out_group"):
            g = getattr(spec, attr)
            if g is not None:
                setattr(spec, attr, index[groups.find(g)])
    return WidthTable(model, out, specs)


def _analyse(flow: Dataflow, modules: dict[str, nn.Module]) -> tuple[_Groups, dict[str, _Spec]]:
    groups = _Groups()
    specs: dict[str, _Spec] = {}
    lay: dict[str, tuple[int, Layout] | None] = {}

    def freeze_inputs(op_inputs: list[str], why: str) -> None:
        for name in op_inputs:
            if lay.get(name) is not None:
                groups.freeze(lay[name][0], why)

    for op in flow.ops.values():
        ins = [lay.get(i) for i in op.inputs]
        src = ins[0] if ins else None
        in_shape = flow.ops[op.inputs[0]].shape if op.inputs else None
        module = modules.get(op.module) if op.module is not None else None
        lay[op.name] = None
        if op.kind == "input" or op.shape is None:
            continue
        what = f"{op.op} ({op.module or op.name})"
        if op.kind in ("linear", "conv"):
            _layer(op, module, src, groups, specs, lay, freeze_inputs, what)
        elif op.kind in ("batch_norm", "norm"):
            ok = src is not None and src[1].outer == src[1].inner == 1
            if op.kind == "batch_norm" and type(module) in BATCHNORMS and ok and src[1].axis == 1:
                kind = "batch_norm"
            elif (
                op.kind == "norm"
                and type(module) is nn.LayerNorm
                and len(module.normalized_shape) == 1
                and ok
                and src[1].axis == len(op.shape) - 1
            ):
                kind = "layer_norm"
            else:
                freeze_inputs(op.inputs, f"normalised by {what}, which cannot be resized")
                continue
            _tie(op.module, kind, src[0], groups, specs)
            lay[op.name] = src
        elif op.kind in ("nonlinear", "max_pool") and src is not None:
            same = op.kind == "nonlinear" and tuple(op.shape) == tuple(in_shape or ())
            spatial = op.kind == "max_pool" and src[1].axis == 1 and op.shape[1] == in_shape[1]
            if same or spatial:
                lay[op.name] = src
            else:
                freeze_inputs(op.inputs, f"{what} changes the feature layout")
        elif op.kind == "transparent" and src is not None:
            moved = channel_ops.propagate(op, src[1], in_shape)
            if isinstance(moved, Layout):
                lay[op.name] = (src[0], moved)
            else:
                groups.freeze(src[0], moved)
        elif op.kind in ("add", "mul") and len(ins) >= 2 and all(i is not None for i in ins):
            first = ins[0][1]
            if all(i[1] == first for i in ins):
                g = ins[0][0]
                for other in ins[1:]:
                    g = groups.union(g, other[0])
                if op.kind == "add":
                    groups.info[groups.find(g)].residual = True
                lay[op.name] = (g, first)
            else:
                freeze_inputs(op.inputs, f"{what} combines features laid out differently")
        else:
            freeze_inputs(op.inputs, f"read by {what}, which is not resizable")
    for name in flow.outputs:
        if lay.get(name) is not None:
            groups.freeze(lay[name][0], "a model output")
    return groups, specs


def _tie(module: str, kind: str, g: int, groups: _Groups, specs: dict[str, _Spec]) -> None:
    old = specs.get(module)
    if old is not None:
        groups.union(old.in_group, g)
        return
    specs[module] = _Spec(module, kind, in_group=g)
    groups.info[groups.find(g)].tied.append(module)


def _layer(op, module, src, groups, specs, lay, freeze_inputs, what) -> None:
    """A Linear or Conv op: a new output group (or the module's from an earlier call), and its
    input dim tied to the input's group."""
    rank = len(op.shape)
    if op.kind == "linear":
        ok_type = type(module) is nn.Linear
        axis, width = rank - 1, getattr(module, "out_features", 0)
    else:
        ok_type = type(module) in CONVS and module.groups == 1
        axis, width = 1, getattr(module, "out_channels", 0)
        if type(module) in CONVS and module.groups > 1:
            depthwise = module.groups == module.in_channels == module.out_channels
            if depthwise and src is not None and src[1].axis == 1 and src[1].outer == 1:
                _tie(op.module, "depthwise", src[0], groups, specs)
                lay[op.name] = src
                return
    if not ok_type:
        freeze_inputs(op.inputs, f"read by {what}, which cannot be resized")
        return
    spec = specs.get(op.module)
    if spec is None:
        out = groups.new(op.module, width)
        groups.info[out].producers.append(op.module)
        spec = specs[op.module] = _Spec(op.module, op.kind, out_group=out)
        first_call = True
    else:
        first_call = False
    if src is not None:
        g, layout = src
        mult = layout.outer * layout.inner
        fits = layout.axis == (rank - 1 if op.kind == "linear" else 1) and (
            op.kind == "linear" or mult == 1
        )
        if fits and first_call:
            spec.in_group, spec.in_mult = g, mult
            groups.info[groups.find(g)].readers.append(op.module)
        elif fits and spec.in_group is not None and spec.in_mult == mult:
            groups.union(spec.in_group, g)
        else:
            groups.freeze(g, f"read by {what} on a dim it cannot resize")
            if spec.in_group is not None:
                groups.freeze(spec.in_group, f"{what} is called on inputs of different layouts")
                spec.in_group = None
    elif spec.in_group is not None:
        groups.freeze(spec.in_group, f"{what} is also called on a fixed-width input")
        spec.in_group = None
    lay[op.name] = (spec.out_group, Layout(axis=axis, d=width))


def _build(module: nn.Module, kind: str, dims: dict[str, int]) -> nn.Module:
    """A fresh module of the same class with new dims (PyTorch's default initialisation)."""
    p = next(module.parameters(), None)
    kw = {"device": p.device, "dtype": p.dtype} if p is not None else {}
    if kind == "linear":
        return nn.Linear(dims["in"], dims["out"], bias=module.bias is not None, **kw)
    if kind in ("conv", "depthwise"):
        depthwise = kind == "depthwise"
        n_in, n_out = (dims["n"], dims["n"]) if depthwise else (dims["in"], dims["out"])
        return type(module)(
            n_in,
            n_out,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=dims["n"] if depthwise else 1,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            **kw,
        )
    if kind == "batch_norm":
        return type(module)(
            dims["n"],
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            **kw,
        )
    return nn.LayerNorm(
        dims["n"],
        eps=module.eps,
        elementwise_affine=module.elementwise_affine,
        bias=module.bias is not None,
        **kw,
    )


def _reset(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()


def resize(
    model: nn.Module,
    widths: Mapping[str, int],
    example_inputs: Any = None,
    *,
    reinit: bool = True,
    table: WidthTable | None = None,
) -> nn.Module:
    """A copy of `model` with width group `name` at `widths[name]` (names from `width_groups`).

    Resized layers are new instances of their classes; with `reinit` every layer is re-initialised
    (PyTorch defaults), as if the model had been constructed at the new widths. The copy is run on
    the example inputs and must give outputs of the original shapes."""
    inputs = as_example_inputs(model, example_inputs)
    table = table or width_groups(model, inputs)
    full = table._full(widths)
    resized = copy.deepcopy(model)
    for spec in table._specs.values():
        old = table._modules[spec.module]
        dims = table._dims(spec, full)
        if dims != table._dims(spec, [g.width for g in table.groups]):
            resized.set_submodule(spec.module, _build(old, spec.kind, dims))
    if reinit:
        _reset(resized)
    _check_outputs(model, resized, inputs)
    return resized


def _shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return [_shapes(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _shapes(v) for k, v in value.items()}
    return None


def _check_outputs(model: nn.Module, resized: nn.Module, inputs: tuple[Any, ...]) -> None:
    with torch.no_grad(), _eval_mode(model), _eval_mode(resized):
        expected = _shapes(model(*inputs))
        try:
            got = _shapes(resized(*inputs))
        except Exception as error:  # noqa: BLE001 - say which model code assumed the old widths
            raise PlanError(
                f"the resized {type(model).__name__} does not run ({type(error).__name__}: {error}); "
                "its forward probably hard-codes a width (e.g. x.view(-1, 512))"
            ) from error
    if got != expected:
        raise PlanError(f"the resized model's outputs have shapes {got}, not {expected}")


def widen(
    model: nn.Module, factor: float, example_inputs: Any = None, *, reinit: bool = True
) -> nn.Module:
    """A copy of `model` with every free width group multiplied by `factor` (rounded, >= 1)."""
    inputs = as_example_inputs(model, example_inputs)
    table = width_groups(model, inputs)
    widths = {g.name: max(1, round(factor * g.width)) for g in table.free}
    return resize(model, widths, inputs, reinit=reinit, table=table)
