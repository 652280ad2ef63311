"""Rebuild a model at new widths: the same classes and code, every parameter and buffer at the
shape its index spaces give (`surgery.analysis.widths`).

Each resized tensor is a new one (fresh values; `reinit` re-initialises every layer as if built at
the new widths); the layers' size attributes follow their weights (Linear.in_features, a conv's
groups, LayerNorm.normalized_shape, ...). A module whose forward writes widths as numbers
(`x.view(B, T, self.n_head, self.head_dim)`, `split(self.n_embd)`) has the attribute those numbers
came from changed with them: the capture recorded which axis each number sizes. Every choice is
proven the way a user would find out: the rebuilt model is captured again and every tensor of its
forward must have exactly the shape the new widths give.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from surgery.analysis.widths import WidthTable
from surgery.errors import PlanError
from surgery.ir.capture import _eval_mode, capture

_MAX_TRIES = 32  # assignments of ambiguous attributes tried (each is one capture)


def rebuild_scaled(
    model: nn.Module,
    table: WidthTable,
    factor: float,
    inputs: tuple[Any, ...],
    *,
    reinit: bool = True,
    residual: bool = True,
) -> nn.Module:
    """`model` with every free width times `factor` (heads scaled where they can be, else the dims
    within heads: the first choice the model's own code accepts)."""
    errors: list[str] = []
    for inner in (False, True):
        try:
            leaves = table.scaled(factor, residual=residual, inner=inner)
            return rebuild(model, table, leaves, inputs, reinit=reinit)
        except PlanError as error:
            errors.append(str(error))
    raise PlanError(errors[0] if len(set(errors)) == 1 else "; ".join(dict.fromkeys(errors)))


def rebuild(
    model: nn.Module,
    table: WidthTable,
    leaves: Mapping[int, int],
    inputs: tuple[Any, ...],
    *,
    reinit: bool = True,
) -> nn.Module:
    """A copy of `model` whose width groups have the widths `leaves` (leaf space -> width)."""
    flow = table.flow
    shapes = table.shapes(leaves)
    changed = {n for n, shape in shapes.items() if shape != flow.param_shapes[n]}
    resized = copy.deepcopy(model)
    touched = _new_tensors(resized, shapes, changed)
    _layer_attributes(resized, table, leaves, touched)
    ways = _literal_attributes(resized, table, leaves)
    originals = [(m, a, getattr(m, a)) for options in ways for o in options for m, a, _ in o]
    expected = _expected_shapes(table, leaves)
    failures: list[str] = []
    for choice in itertools.islice(itertools.product(*ways), _MAX_TRIES):
        for module, attr, value in [*originals, *(a for option in choice for a in option)]:
            setattr(module, attr, value)  # the original values, then this choice's
        why = _check(model, resized, inputs, expected)
        if why is None:
            _initialise(resized, touched, reinit)
            return resized
        failures.append(why)
    raise PlanError(
        f"the resized {type(model).__name__} does not compute at the new widths ({failures[0]}); "
        "its forward probably hard-codes a width (e.g. x.view(-1, 512)) instead of reading it "
        "from the tensors or from an attribute of the module"
    )


def _new_tensors(
    model: nn.Module, shapes: Mapping[str, tuple[int, ...]], changed: set[str]
) -> set[nn.Module]:
    """Replace every changed parameter / buffer (a tied tensor once, under all its names) by a
    new one of its new shape, drawn from the old one's mean and spread. Returns the modules."""
    made: dict[int, torch.Tensor] = {}
    touched: set[nn.Module] = set()
    for path, module in model.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for attr, old in list(store.items()):
                name = f"{path}.{attr}" if path else attr
                if old is None or name not in changed:
                    continue
                if id(old) not in made:
                    made[id(old)] = _fresh(old, shapes[name])
                store[attr] = made[id(old)]
                touched.add(module)
    return touched


@torch.no_grad()
def _fresh(old: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    new = torch.zeros(shape, dtype=old.dtype, device=old.device)
    if old.is_floating_point() and old.numel() and new.numel():
        std = float(old.float().std()) if old.numel() > 1 else 0.0
        new.normal_(float(old.float().mean()), std)
    if isinstance(old, nn.Parameter):
        return nn.Parameter(new, requires_grad=old.requires_grad)
    return new


def _module_ops(table: WidthTable) -> dict[str, Any]:
    """Module path -> its first call's op."""
    found: dict[str, Any] = {}
    for op in table.flow.ops.values():
        if op.module and op.module not in found:
            found[op.module] = op
    return found


def _layer_attributes(
    model: nn.Module, table: WidthTable, leaves: Mapping[int, int], touched: set[nn.Module]
) -> None:
    """The size attributes of torch.nn layers (and Hugging Face's Conv1D) from their new tensors."""
    ops = _module_ops(table)
    spaces = table.spaces
    for path, m in model.named_modules():
        if m not in touched:
            continue
        op = ops.get(path)
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.modules.conv._ConvNd):
            g = spaces.groups.get(op.name) if op is not None else None
            if g is not None:
                m.groups = table.width_of(g, leaves)
            per = m.weight.shape[1] * m.groups
            if m.transposed:
                m.in_channels, m.out_channels = m.weight.shape[0], per
            else:
                m.out_channels, m.in_channels = m.weight.shape[0], per
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.num_features = (m.running_mean if m.running_mean is not None else m.weight).shape[0]
        elif isinstance(m, nn.GroupNorm):
            channels = _input_width(table, op, 1, leaves) if op is not None else m.num_channels
            if m.num_groups == m.num_channels:
                m.num_groups = channels
            m.num_channels = channels
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            n = len(m.normalized_shape)
            if m.weight is not None:
                m.normalized_shape = tuple(m.weight.shape)
            elif op is not None:
                m.normalized_shape = tuple(_input_width(table, op, a, leaves) for a in range(-n, 0))
        elif isinstance(m, nn.Embedding):
            m.num_embeddings, m.embedding_dim = m.weight.shape
        elif isinstance(m, nn.MultiheadAttention):
            embed = m.in_proj_weight.shape[1]
            m.embed_dim = m.kdim = m.vdim = embed
            heads = _heads(table, path, leaves)
            if heads:
                m.num_heads = heads
            m.head_dim = embed // m.num_heads
        elif type(m).__name__ == "Conv1D" and hasattr(m, "nf"):
            m.nx, m.nf = m.weight.shape
        elif isinstance(m, nn.PReLU):
            m.num_parameters = m.weight.numel()


def _input_width(table: WidthTable, op: Any, axis: int, leaves: Mapping[int, int]) -> int:
    axes = table.spaces.axes.get(op.inputs[0]) if op.inputs else None
    if not axes:
        raise PlanError(f"cannot size {op.module}: its input is not traced")
    return table.width_of(axes[axis], leaves)


def _heads(table: WidthTable, path: str, leaves: Mapping[int, int]) -> int | None:
    dims = table.spaces.dims.get(f"{path}.out_proj.weight")
    if not dims:
        return None
    atoms = table.spaces.atoms(dims[1])
    return table.width_of(atoms[0], leaves) if len(atoms) > 1 else None


Assignment = list[tuple[nn.Module, str, int]]  # (module, attribute, value) set together


def _literal_attributes(
    model: nn.Module, table: WidthTable, leaves: Mapping[int, int]
) -> list[list[Assignment]]:
    """Per number a shape op wrote into its call (view(B, T, 4, 8)) whose axis changes width: the
    ways to change the attributes of the nearest module holding that number (all of them to each
    new width, or one at a time: `image_size` and `hidden_dim` may both be 32 and only one sizes
    the axis). The unchanged attributes are the first way when the number also sizes an axis that
    keeps its width (3 heads beside the 3 parts of a packed qkv)."""
    modules = dict(model.named_modules())
    wanted: dict[tuple[str, int], set[int]] = {}
    for op_name, value, space in table.spaces.literals:
        op = table.flow.ops[op_name]
        for path in reversed(("", *op.scope)):
            if _holding(modules.get(path), value):
                wanted.setdefault((path, value), set()).add(table.width_of(space, leaves))
                break
    ways = []
    for (path, value), news in wanted.items():
        module = modules[path]
        attrs = _holding(module, value)
        options: list[Assignment] = [[]] if value in news else []
        for new in sorted(news - {value}):
            options.append([(module, a, new) for a in attrs])
            if len(attrs) > 1:
                options.extend([(module, a, new)] for a in attrs)
        if options and options != [[]]:
            ways.append(options)
    return ways


def _holding(module: nn.Module | None, value: int) -> list[str]:
    """The public integer attributes of `module` equal to `value`."""
    if module is None:
        return []
    return [
        a
        for a, v in vars(module).items()
        if not a.startswith("_") and type(v) is int and v == value
    ]


def _expected_shapes(table: WidthTable, leaves: Mapping[int, int]) -> dict[str, tuple[int, ...]]:
    """Op name -> the shape its tensor must have at the new widths."""
    return {
        name: tuple(table.width_of(a, leaves) for a in axes)
        for name, axes in table.spaces.axes.items()
        if table.flow.ops[name].shape is not None
    }


def _check(
    model: nn.Module,
    resized: nn.Module,
    inputs: tuple[Any, ...],
    expected: Mapping[str, tuple[int, ...]],
) -> str | None:
    """None when the rebuilt model runs and every tensor of its forward has its expected shape."""
    try:
        with torch.no_grad(), _eval_mode(resized):
            resized(*inputs)
        flow = capture(resized, inputs)
    except Exception as error:  # noqa: BLE001 - any failure is the model's code rejecting a choice
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    for name, shape in expected.items():
        op = flow.ops.get(name)
        if op is not None and op.shape is not None and tuple(op.shape) != shape:
            return f"{op.op} ({name}) has shape {tuple(op.shape)}, not {shape}"
    return None


def _initialise(model: nn.Module, touched: set[nn.Module], reinit: bool) -> None:
    """PyTorch's default initialisation for every layer (`reinit`) or the resized ones."""
    for m in model.modules():
        if reinit or m in touched:
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
            elif isinstance(m, nn.MultiheadAttention):
                m._reset_parameters()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
