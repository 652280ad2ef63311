"""Ops that commute with a channel mix: a pair W at their input equals W at their output (eval mode),
with the feature index possibly moved. Each family maps the input Layout to the output Layout, or
returns the reason it does not commute.

- pointwise (dropout in eval, identity, casts, scaling by a scalar): same layout.
- spatial (avg/adaptive-avg pooling, nearest/bilinear/... upsampling): act per channel on dims >= 2.
- reshape (view, flatten, unflatten, squeeze): the feature block stays contiguous in one axis.
- permute (permute, transpose): the feature axis moves.
- reduce (mean/sum over other axes): the feature axis shifts left by the reduced dims before it.

With a pair bias c the op must also map a constant to itself (W h + c through the op equals W·op(h) + c):
sums, scalings and zero-padded average pools that count the padding do not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from surgery.ir.graph import Layout, Op


def _pointwise(
    layout: Layout, in_shape: Sequence[int], out_shape: Sequence[int], op: Op
) -> Layout | str:
    if tuple(in_shape) != tuple(out_shape):
        return f"{op.op} changes the shape {tuple(in_shape)} -> {tuple(out_shape)}"
    return layout


def _spatial(
    layout: Layout, in_shape: Sequence[int], out_shape: Sequence[int], op: Op
) -> Layout | str:
    if layout.axis != 1 or len(in_shape) < 3:
        return f"{op.op} pools over axis {layout.axis}, the feature axis"
    if out_shape[1] != in_shape[1] or out_shape[0] != in_shape[0]:
        return f"{op.op} changes the channel count"
    return layout


def reshape_layout(
    layout: Layout, in_shape: Sequence[int], out_shape: Sequence[int]
) -> Layout | None:
    """Layout after a row-major reshape, or None when the feature block is split across axes."""
    stride = (
        math.prod(in_shape[layout.axis + 1 :]) * layout.inner
    )  # linear stride of the feature index
    span = stride * layout.d
    for axis in range(len(out_shape)):
        axis_stride = math.prod(out_shape[axis + 1 :])
        axis_span = axis_stride * out_shape[axis]
        if (
            stride % axis_stride == 0
            and axis_span % span == 0
            and axis_span >= span
            and out_shape[axis] > 1
        ):
            return Layout(
                axis=axis, d=layout.d, outer=axis_span // span, inner=stride // axis_stride
            )
    return None


def _reshape(
    layout: Layout, in_shape: Sequence[int], out_shape: Sequence[int], op: Op
) -> Layout | str:
    moved = reshape_layout(layout, in_shape, out_shape)
    if moved is None:
        return f"{op.op} {tuple(in_shape)} -> {tuple(out_shape)} splits the feature axis"
    return moved


def _permute(
    layout: Layout, in_shape: Sequence[int], out_shape: Sequence[int], op: Op
) -> Layout | str:
    perm = op.attrs.get("perm")
    if not perm or sorted(perm) != list(range(len(in_shape))):
        return f"{op.op}: permutation unknown"
    return Layout(axis=perm.index(layout.axis), d=layout.d, outer=layout.outer, inner=layout.inner)


def _reduce(
    layout: Layout, in_shape: Sequence[int], out_shape: Sequence[int], op: Op
) -> Layout | str:
    dims = op.attrs["dims"]
    if layout.axis in dims:
        return f"{op.op} reduces over the feature axis {layout.axis}"
    axis = (
        layout.axis
        if op.attrs["keepdim"]
        else layout.axis - sum(1 for d in dims if d < layout.axis)
    )
    return Layout(axis=axis, d=layout.d, outer=layout.outer, inner=layout.inner)


FAMILIES = {
    "pointwise": _pointwise,
    "spatial": _spatial,
    "reshape": _reshape,
    "permute": _permute,
    "reduce": _reduce,
}


def propagate(
    op: Op, layout: Layout, in_shape: Sequence[int], *, bias: bool = False
) -> Layout | str:
    """The pair's layout at `op`'s output given its layout at `op`'s input, or why W (and, with
    `bias`, the pair bias c) cannot pass: a consumer-side pair runs after these ops, so it must act
    there exactly as it would at h."""
    if op.kind != "transparent" or op.shape is None:
        return f"{op.op} ({op.name}) does not commute with a channel mix"
    if bias and op.attrs.get("keeps_constants") is False:
        return f"{op.op} does not carry a constant through unchanged, so the pair bias cannot pass it (use bias=False)"
    return FAMILIES[op.attrs["family"]](layout, in_shape, op.shape, op)
