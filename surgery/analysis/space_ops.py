"""The rules of the index-space analysis, one per op: which axes of an op's inputs, outputs and
parameters are one space, and how spaces are built from others (see `surgery.analysis.spaces`).

`Walk` visits the ops of a captured dataflow in order. A module call is read by its kind (linear,
conv, norm, embedding, attention, pooling, ...); a function / method / aten call by its canonical
name and recorded arguments (pointwise with broadcasting, reshapes, permutes, expand / repeat,
cat / stack, split / chunk / unbind, indexing and slicing, matmul / einsum, attention, functional
norms and convs, pads, reductions, tensors made in forward). An op no rule follows freezes what it
reads, with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

import torch

from surgery.analysis.spaces import CAT, OUTPUT, PROD, IndexSpaces
from surgery.ir.graph import Op, Ref

_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod",
           "norm", "vector_norm", "linalg_vector_norm", "all", "any", "nansum", "nanmean",
           "std_mean", "var_mean", "count_nonzero"}  # fmt: skip
_RESHAPE = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze",
            "view_as", "reshape_as", "squeeze_", "unsqueeze_", "ravel", "squeeze_copy",
            "unsqueeze_copy", "view_copy", "_reshape_alias"}  # fmt: skip
_PERMUTE = {"permute", "transpose", "t", "swapaxes", "swapdims", "movedim", "moveaxis", "T", "mT",
            "transpose_", "permute_copy", "transpose_copy", "numpy_T"}  # fmt: skip
_SPLIT = {"split", "split_with_sizes", "chunk", "tensor_split", "unbind", "unsafe_split",
          "unsafe_chunk", "unsafe_split_with_sizes", "hsplit", "vsplit", "split_copy"}  # fmt: skip
_CREATE = {"arange", "zeros", "ones", "full", "empty", "rand", "randn", "randint", "tensor",
           "new_ones", "new_zeros", "new_full", "new_empty", "eye", "linspace", "scalar_tensor",
           "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
           "new_tensor", "as_tensor", "empty_strided", "range", "logspace"}  # fmt: skip
_AXIS_PRESERVING = {"softmax", "log_softmax", "_softmax", "_log_softmax", "normalize",
                    "softmin", "gumbel_softmax", "glu_not"}  # fmt: skip
_ALONG_AXIS = {"cumsum", "cumprod", "logcumsumexp", "cummax", "cummin", "flip", "roll", "sort",
               "argsort", "diff"}  # fmt: skip
_SPATIAL = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
            "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "max_pool1d", "max_pool2d", "max_pool3d",
            "max_pool2d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d",
            "adaptive_max_pool3d", "interpolate", "upsample", "upsample_nearest1d",
            "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d", "upsample_bicubic2d",
            "upsample_linear1d", "upsample_trilinear3d", "lp_pool1d", "lp_pool2d"}  # fmt: skip
_POINTWISE = {"add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder",
              "fmod", "pow", "neg", "exp", "exp2", "expm1", "log", "log1p", "log2", "sqrt",
              "rsqrt", "tanh", "sigmoid", "relu", "relu6", "gelu", "silu", "mish", "sin", "cos",
              "abs", "clamp", "clamp_min", "clamp_max", "clip", "where", "masked_fill",
              "maximum", "minimum", "float", "double", "half", "bfloat16", "to", "type",
              "contiguous", "clone", "dropout", "feature_dropout", "alpha_dropout",
              "native_dropout", "dropout1d", "dropout2d", "dropout3d", "erf", "softplus",
              "square", "reciprocal", "sign", "sgn", "eq", "ne", "lt", "gt", "le", "ge",
              "logical_not", "logical_and", "logical_or", "logical_xor", "bitwise_not",
              "bitwise_and", "bitwise_or", "bitwise_xor", "__and__", "__or__", "__xor__",
              "detach", "alias", "_to_copy", "lift_fresh_copy", "hardswish", "hardsigmoid",
              "hardtanh", "leaky_relu", "elu", "selu", "celu", "round", "floor", "ceil",
              "trunc", "isnan", "isinf", "isfinite", "nan_to_num", "addcmul", "addcdiv",
              "lerp", "threshold", "tril", "triu", "masked_fill_", "add_", "mul_", "sub_",
              "div_", "copy_", "requires_grad_", "float_power", "logit", "softsign",
              "tanhshrink", "hardshrink", "softshrink", "silu_", "gelu_", "relu_", "tanh_",
              "sigmoid_", "clamp_", "zero_", "fill_", "logaddexp", "hypot", "atan2",
              "heaviside", "xlogy", "prelu", "bool", "long", "int", "cpu", "cuda",
              "_assert_tensor_metadata", "sym_constrain_range_for_size", "erfinv", "deg2rad",
              "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh",
              "frac", "positive", "negative", "subtract", "multiply", "divide", "bernoulli",
              "bernoulli_", "uniform_", "normal_", "exponential_", "random_"}  # fmt: skip
# operands that give only a dtype / device / shape, not values
_DTYPE_ONLY = {"to": 1, "type_as": 1, "expand_as": 1, "view_as": 1, "reshape_as": 1}


@cache
def _aten_pointwise(fn: str) -> bool:
    """Whether an aten op of this name is elementwise (torch tags its overloads)."""
    packet = getattr(torch.ops.aten, fn, None)
    if packet is None:
        return False
    try:
        overloads = [getattr(packet, o) for o in packet.overloads()]
    except Exception:  # noqa: BLE001 - an odd packet: not known to be elementwise
        return False
    return any(torch.Tag.pointwise in o.tags for o in overloads)


def _ints(value: Any) -> bool:
    """Whether `value` is a list or tuple of ints (sizes known at capture)."""
    return isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


def _written(value: Any) -> bool:
    """Whether `value` is a number written in the source (view(B, T, 4, 8)'s 4 and 8), which a
    resize must change by hand, not one the graph computed from a shape (`Traced`)."""
    return type(value) is int


def _tensor_split_sizes(sections: Any, n: int) -> list[int]:
    """The part sizes of tensor_split over `n`: a count of near-equal sections (the first n % k
    one larger) or the indices to cut at."""
    if isinstance(sections, int) and sections > 0:
        size, extra = divmod(n, sections)
        return [size + 1] * extra + [size] * (sections - extra)
    if _ints(sections):
        cuts = [min(max(c if c >= 0 else c + n, 0), n) for c in sections]
        return [max(b - a, 0) for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    raise _NotFollowed("its split sizes could not be read")


def _dim(value: Any, rank: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not -rank <= value < max(rank, 1):
        return None
    return value % rank if rank else 0


class Walk:
    """One pass over the ops in order, giving every tensor's axes their spaces."""

    def __init__(self, spaces: IndexSpaces) -> None:
        self.s = spaces
        self.flow = spaces.flow
        self.aliases = self.flow.param_aliases
        self.sliced: list[tuple[int, str]] = []  # parts made by slices, with what left them out
        self.taken: list[int] = []  # parts some slice took

    def run(self) -> None:
        for op in self.flow.ops.values():
            self.op = op
            try:
                self._op(op)
            except _NotFollowed as why:
                self._unfollowed(op, str(why))
            if op.shape is not None and op.name not in self.s.axes:
                self._unfollowed(op, "no rule gives its axes")
        for name in self.flow.outputs:  # a residual stream the model returns stays free
            for a in self.s.axes.get(name, ()):
                if not self.s.residual(a):
                    self.s.freeze(a, OUTPUT)
        taken = {self.s.find(t) for t in self.taken}

        def read(part: int) -> bool:  # taken by a slice, or every piece of it is
            found = self.s.structure(part)
            pieces = self.s._flat(CAT, found[1]) if found and found[0] == CAT else []
            return self.s.find(part) in taken or bool(pieces) and all(map(read, pieces))

        for part, why in self.sliced:  # a part no slice reads is not read: its width stays
            if not read(part):
                self.s.freeze(part, why)

    # ---- helpers ----
    def _unfollowed(self, op: Op, why: str) -> None:
        text = f"{op.op} ({op.name}{f', {op.source}' if op.source else ''}): {why}"
        self.s.unfollowed.append(text)
        reason = f"read by {op.op} ({op.name}), which the analysis does not follow: {why}"
        for ref in self._operands(op):
            for a in self._axes(ref) or ():
                self.s.freeze(a, reason)
        if op.shape is not None:
            self.s.axes[op.name] = self._fresh(op.shape, frozen=reason)

    def _fresh(
        self, shape: Sequence[int], *, frozen: str | None = None, positional: bool = False
    ) -> tuple[int, ...]:
        return tuple(self.s.new(n, frozen=frozen, positional=positional) for n in shape)

    def _param(self, name: str) -> tuple[int, ...] | None:
        if name in self.s.dims:
            return self.s.dims[name]
        shape = self.flow.param_shapes.get(name)
        if shape is None:
            return None
        constant = (
            f"{name} is computed when the model is built (not saved)"
            if name in self.flow.constants
            else None
        )
        dims = tuple(self.s.new(n, frozen=constant) for n in shape)
        for d, space in enumerate(dims):
            self.s.carry(space, name, d)
        for alias in [name, *self.aliases.get(name, [])]:
            self.s.dims[alias] = dims
        return dims

    def _axes(self, ref: Any) -> tuple[int, ...] | None:
        if isinstance(ref, Ref):
            if ref.op is not None:
                return self.s.axes.get(ref.op)
            if ref.param is not None:
                return self._param(ref.param)
            return None
        if isinstance(ref, str):
            return self.s.axes.get(ref)
        return None

    def _operands(self, op: Op) -> list[Any]:
        """Tensor operands of an op: its recorded call's tensors, else its inputs and parameters."""
        if "args" in op.attrs:
            return [r for r in _refs((op.attrs["args"], op.attrs["kwargs"])) if r.op or r.param]
        return [Ref(op=i) for i in op.inputs] + [Ref(param=p) for p in op.params.values()]

    def _in(self, i: int = 0) -> tuple[int, ...]:
        axes = self.s.axes.get(self.op.inputs[i]) if len(self.op.inputs) > i else None
        if axes is None:
            raise _NotFollowed("its input is not a traced tensor")
        return axes

    def _set(self, axes: Sequence[int]) -> None:
        shape = self.op.shape
        if shape is None or len(axes) != len(shape):
            raise _NotFollowed(
                f"the rule gives {len(axes)} axes for a tensor of rank {len(shape or ())}"
            )
        self.s.axes[self.op.name] = tuple(axes)

    def _same(self, a: int, b: int) -> int:
        """Unify two axes that must be one space (widths > 1; width-1 axes are left apart)."""
        if self.s.width(a) != self.s.width(b):
            raise _NotFollowed(f"axes of widths {self.s.width(a)} and {self.s.width(b)} meet")
        return self.s.unify(a, b) if self.s.width(a) > 1 else a

    def _param_of(self, role: str) -> tuple[int, ...] | None:
        name = self.op.params.get(role)
        return None if name is None else self._param(name)

    # ---- per op ----
    def _op(self, op: Op) -> None:
        if op.kind == "input":
            self._set(self._fresh(op.shape or (), frozen="a model input", positional=True))
            return
        if op.module is not None:
            self._module(op)
            return
        fn = op.attrs.get("fn")
        if op.kind == "linear" and op.params.get("weight"):
            self._linear(op.attrs.get("weight_in_axis", 1), op.attrs.get("weight_out_axis", 0))
        elif op.kind in ("conv", "conv_transpose", "batch_norm", "embedding") and op.params:
            {"conv": self._conv, "conv_transpose": self._conv, "batch_norm": self._batch_norm,
             "embedding": self._embedding}[op.kind]()  # fmt: skip
        elif fn is None:
            raise _NotFollowed("no record of the call")
        else:
            self._function(op, fn)

    def _module(self, op: Op) -> None:
        kind, attrs = op.kind, op.attrs
        if kind == "linear":
            self._linear(attrs.get("weight_in_axis", 1), attrs.get("weight_out_axis", 0))
        elif kind in ("conv", "conv_transpose"):
            self._conv()
        elif kind == "batch_norm":
            self._batch_norm()
        elif kind == "embedding":
            self._embedding()
        elif kind == "norm":
            self._norm(attrs)
        elif kind == "attention":
            self._multihead_attention(attrs)
        elif kind == "transparent" and attrs.get("family") == "spatial" or kind == "max_pool":
            self._spatial()
        elif kind == "transparent" and attrs.get("family") == "reshape":
            self._reshape(self._in(), self.s.flow.ops[op.inputs[0]].shape, op.shape)
        elif kind in ("transparent", "nonlinear"):
            x = self._in()
            weight = self._param_of("weight")  # PReLU: one slope per channel (or one)
            if weight and self.s.width(weight[0]) > 1 and len(x) > 1:
                self._same(weight[0], x[1])
            self._set(x)
        else:
            raise _NotFollowed(attrs.get("why") or f"an opaque module ({op.op})")

    def _linear(self, w_in: int, w_out: int) -> None:
        x = self._in()
        weight = self._param_of("weight")
        if weight is None or len(weight) != 2:
            raise _NotFollowed("a linear layer without a 2-D weight")
        self._same(x[-1], weight[w_in])
        bias = self._param_of("bias")
        if bias:
            self._same(bias[0], weight[w_out])
        self._set([*x[:-1], weight[w_out]])

    def _conv(self) -> None:
        op = self.op
        weight, bias = self._param_of("weight"), self._param_of("bias")
        if weight is None:
            raise _NotFollowed("a convolution without a weight")
        self._convolve(
            self._in(),
            weight,
            bias,
            int(op.attrs.get("groups", 1) or 1),
            op.kind == "conv_transpose",
        )

    def _convolve(
        self,
        x: tuple[int, ...],
        weight: tuple[int, ...],
        bias: tuple[int, ...] | None,
        groups: int,
        transposed: bool,
    ) -> None:
        """weight [out, in/groups, *k] (transposed: [in, out/groups, *k]); with groups > 1 the
        channels on both sides are groups x per-group channels."""
        if len(x) < 2 or len(weight) < 2:
            raise _NotFollowed("a convolution of a tensor without a channel axis")
        w_in, w_out = (weight[0], weight[1]) if transposed else (weight[1], weight[0])
        for k in weight[2:]:
            self.s.freeze(k, f"a kernel size of {self.op.op} ({self.op.module or self.op.name})")
        if groups == 1:
            self._same(x[1], w_in)
            out = w_out
        else:
            g = self.s.new(groups)
            self.s.groups[self.op.name] = g
            whole, per = (w_in, w_out) if transposed else (w_out, w_in)
            if self.s.width(whole) % groups:
                raise _NotFollowed(f"groups={groups} do not divide its channels")
            inner = self.s.new(self.s.width(whole) // groups)
            self._same(whole, self.s.make(PROD, [g, inner]))
            self._same(x[1], w_in if transposed else self.s.make(PROD, [g, per]))
            out = self.s.make(PROD, [g, per]) if transposed else w_out
        if bias:
            self._same(bias[0], out)
        spatial = self._fresh((self.op.shape or ())[2:], positional=True)
        self._set([x[0], out, *spatial])

    def _batch_norm(self) -> None:
        x = self._in()
        for role in ("weight", "bias", "running_mean", "running_var"):
            dims = self._param_of(role)
            if dims and len(x) > 1:
                self._same(dims[0], x[1])
        self._set(x)

    def _embedding(self) -> None:
        ids = self._in()
        table = self._param_of("weight")
        if table is None or len(table) != 2:
            raise _NotFollowed("an embedding without a 2-D table")
        self.s.freeze(
            table[0], "rows of a table indexed by the input's values (vocabulary, positions)"
        )
        self._set([*ids, table[1]])

    def _norm(self, attrs: dict[str, Any]) -> None:
        """A norm layer: its per-feature tensors (whatever their names: weight, scale, ...) sit on
        axis 1 (GroupNorm, LocalResponseNorm) or on the last axes it normalises."""
        x = self._in()
        if attrs.get("channels"):
            self._groups(x, attrs.get("groups"))
        for name in self.op.params.values():
            dims = self._param(name)
            if not dims or len(dims) > len(x):
                continue
            on = [x[1]] if attrs.get("channels") and len(x) > 1 else x[len(x) - len(dims) :]
            if len(on) == len(dims):
                for d, a in zip(dims, on, strict=True):
                    self._same(d, a)
        self._set(x)

    def _groups(self, x: tuple[int, ...], groups: Any) -> None:
        """A GroupNorm's channels: its groups (kept whole, their count fixed) x channels per group."""
        if not isinstance(groups, int) or groups < 2 or len(x) < 2:
            return
        width = self.s.width(x[1])
        if width % groups or width == groups:
            return
        g = self.s.new(groups, frozen=f"the groups of {self.op.op} ({self.op.name}): num_groups")
        self._same(x[1], self.s.make(PROD, [g, self.s.new(width // groups)]))

    def _multihead_attention(self, attrs: dict[str, Any]) -> None:
        op = self.op
        heads = int(attrs.get("num_heads") or 1)
        q = self._in()
        packed = self._param_of("in_proj_weight")
        out_w = self.s.dims.get(f"{op.module}.out_proj.weight") or self._param(
            f"{op.module}.out_proj.weight"
        )
        if packed is None or out_w is None:
            raise _NotFollowed("nn.MultiheadAttention with separate q/k/v weights")
        for i, ref in enumerate(op.inputs[:3]):
            axes = self.s.axes.get(ref)
            if axes is not None and (i == 0 or not attrs.get("self_attention")):
                self._same(axes[-1], packed[1])
        embed = self.s.width(packed[0]) // 3
        part = self.s.new(3, frozen=f"the q, k, v parts of {op.module}")
        inner = self.s.new(embed)
        if heads > 1:
            self._same(inner, self.s.make(PROD, [self.s.new(heads), self.s.new(embed // heads)]))
        self._same(packed[0], self.s.make(PROD, [part, inner]))
        self._same(out_w[1], inner)
        bias = self._param_of("in_proj_bias")
        if bias:
            self._same(bias[0], packed[0])
        out_b = self._param(f"{op.module}.out_proj.bias")
        if out_b:
            self._same(out_b[0], out_w[0])
        out = (*q[:-1], out_w[0])
        self.s.tuples[op.name] = [out, None]
        if op.shape is not None:
            self._set(out)

    def _spatial(self) -> None:
        x = self._in()
        shape = self.op.shape or ()
        if len(x) < 2 or len(shape) != len(x):
            raise _NotFollowed("pools a tensor without a channel axis")
        self._set([x[0], x[1], *self._fresh(shape[2:], positional=True)])

    # ---- functions, methods and aten ops ----
    def _function(self, op: Op, fn: str) -> None:
        args, kwargs = list(op.attrs.get("args", ())), dict(op.attrs.get("kwargs", {}))
        if fn == "getitem":
            self._getitem(op, args)
        elif fn in _SPLIT:
            self._split(op, fn, args, kwargs)
        elif fn in _RESHAPE:
            src = self._axes(args[0]) if args else None
            if src is None:
                raise _NotFollowed("reshapes an untraced tensor")
            self._reshape(src, self._shape(args[0]), op.shape)
            if fn in ("view", "reshape", "_unsafe_view"):
                self._literals(args[1:], self.s.axes[op.name])
        elif fn in _PERMUTE:
            self._permute(op, fn, args, kwargs)
        elif fn in ("expand", "expand_as", "broadcast_to"):
            self._expand(args)
            if fn == "expand":
                self._literals(args[1:], self.s.axes[op.name])
        elif fn in ("repeat", "tile", "repeat_interleave"):
            self._repeat(fn, args, kwargs)
        elif fn in ("cat", "concat", "concatenate", "stack"):
            self._cat(fn, args, kwargs)
        elif fn in ("select", "slice", "narrow", "select_copy", "slice_copy"):
            self._select(fn, args, kwargs)
        elif fn in ("index", "index_select", "gather", "take_along_dim"):
            self._index_op(fn, args, kwargs)
        elif fn in ("pad", "constant_pad_nd"):
            self._pad(args, kwargs)
        elif fn in ("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d",
                    "conv_transpose2d", "conv_transpose3d"):  # fmt: skip
            self._functional_conv(fn, args, kwargs)
        elif fn in ("matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm"):
            self._matmul(fn, args)
        elif fn == "linear" or fn == "embedding":
            raise _NotFollowed(f"a functional {fn} whose weight is not a parameter")
        elif fn == "einsum":
            self._einsum(args)
        elif fn == "scaled_dot_product_attention":
            self._sdpa(args, kwargs)
        elif fn in ("layer_norm", "native_layer_norm", "rms_norm"):
            self._functional_norm(args, kwargs)
        elif fn in ("group_norm", "native_group_norm", "batch_norm", "instance_norm"):
            self._functional_channel_norm(fn, args, kwargs)
        elif fn in _CREATE:
            self._create(fn, args)
        elif fn in _REDUCE:
            self._reduce(args, kwargs)
        elif fn in _SPATIAL:
            src = self._axes(args[0]) if args else None
            if src is None or len(src) < 2:
                raise _NotFollowed("pools an untraced tensor")
            self._set([src[0], src[1], *self._fresh((op.shape or ())[2:], positional=True)])
        elif fn in _AXIS_PRESERVING:
            src = self._axes(args[0]) if args else None
            if src is None:
                raise _NotFollowed("reads an untraced tensor")
            self._set(src)
        elif fn in _ALONG_AXIS:
            self._along_axis(fn, args, kwargs)
        elif fn in _POINTWISE or _aten_pointwise(fn):
            self._pointwise(fn, args, kwargs)
        else:
            raise _NotFollowed(f"no rule for {fn!r}")

    def _functional_conv(self, fn: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        """F.conv2d(x, weight, bias, stride, padding, dilation, groups) and its kin, the weight any
        traced tensor (a standardised weight, a weight made per call)."""
        x, weight = (self._axes(a) for a in (args + [None, None])[:2])
        bias_ref = args[2] if len(args) > 2 else kwargs.get("bias")
        bias = self._axes(bias_ref) if isinstance(bias_ref, Ref) else None
        if x is None or weight is None:
            raise _NotFollowed("a convolution of untraced tensors")
        if fn == "convolution":
            transposed, groups = (
                bool(args[6]) if len(args) > 6 else False,
                args[8] if len(args) > 8 else 1,
            )
        else:
            transposed = "transpose" in fn
            at = 7 if transposed else 6
            groups = args[at] if len(args) > at else kwargs.get("groups", 1)
        if not isinstance(groups, int):
            raise _NotFollowed("its groups could not be read")
        self._convolve(x, weight, bias, groups, transposed)

    def _shape(self, ref: Any) -> tuple[int, ...]:
        if isinstance(ref, Ref) and ref.op is not None:
            return tuple(self.flow.ops[ref.op].shape or ())
        if isinstance(ref, Ref) and ref.param is not None:
            return tuple(self.flow.param_shapes.get(ref.param, ()))
        return ()

    def _pointwise(self, fn: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Elementwise with broadcasting: operand axes aligned from the right are one space
        wherever both have the output's size."""
        out_shape = tuple(self.op.shape or ())
        skip = _DTYPE_ONLY.get(fn)
        refs = [r for i, r in enumerate(args) if isinstance(r, Ref) and i != skip]
        refs += [r for r in _refs(kwargs) if isinstance(r, Ref)]
        out: list[int | None] = [None] * len(out_shape)
        added = fn in ("add", "sub", "add_", "sub_") and sum(1 for r in refs if r.op) >= 2
        for ref in refs:
            axes, shape = self._axes(ref), self._shape(ref)
            if axes is None:
                continue
            if len(shape) > len(out_shape):
                raise _NotFollowed("an operand of higher rank than the result")
            offset = len(out_shape) - len(shape)
            for i, (a, n) in enumerate(zip(axes, shape, strict=True)):
                if n != out_shape[offset + i] or n == 1:
                    continue
                slot = offset + i
                if out[slot] is not None and added:
                    self.s._summed.append(a)
                out[slot] = a if out[slot] is None else self._same(out[slot], a)
        fresh = [self.s.new(n) if a is None else a for a, n in zip(out, out_shape, strict=True)]
        self._set(fresh)

    def _reshape(
        self, src: tuple[int, ...], before: Sequence[int] | None, after: Sequence[int] | None
    ) -> None:
        """Groups of consecutive axes with equal products map to each other; within a group the
        input axes' product and the output axes' product are one space."""
        before, after = tuple(before or ()), tuple(after or ())
        if math.prod(before) != math.prod(after):
            raise _NotFollowed(f"reshape {before} -> {after} changes the element count")
        out: list[int] = []
        i = j = 0
        while i < len(before) or j < len(after):
            if i < len(before) and before[i] == 1 and (j >= len(after) or after[j] != 1):
                i += 1  # a dropped width-1 axis
                continue
            if j < len(after) and after[j] == 1 and (i >= len(before) or before[i] != 1):
                out.append(self.s.new(1))
                j += 1
                continue
            gi, gj = [i], [j]
            pi, pj = before[i], after[j]
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj:
                    gi.append(i)
                    pi *= before[i]
                    i += 1
                else:
                    gj.append(j)
                    pj *= after[j]
                    j += 1
            ins = [src[k] for k in gi if before[k] != 1]
            outs_w = [after[k] for k in gj]
            if len(gi) == 1 and len(gj) == 1:
                out.append(src[gi[0]])
                continue
            whole = ins[0] if len(ins) == 1 else self.s.make(PROD, ins)
            if len(gj) == 1:
                out.append(whole)
                continue
            pieces = [self.s.new(w) for w in outs_w]
            self._same(whole, self.s.make(PROD, pieces))
            out.extend(pieces)
        self._set(out)

    def _literals(self, sizes: list[Any], axes: Sequence[int]) -> None:
        """Sizes written as numbers in a shape op's call (view(B, T, 4, 8)): each is the width of
        the output axis it sizes; resizing finds the module attribute they came from."""
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = list(sizes[0])
        if len(sizes) != len(axes):
            return
        for value, axis in zip(sizes, axes, strict=True):
            if _written(value) and value > 1:
                self.s.literals.append((self.op.name, value, axis))

    def _permute(self, op: Op, fn: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        src = self._axes(args[0]) if args else None
        if src is None:
            raise _NotFollowed("permutes an untraced tensor")
        rank = len(src)
        perm = op.attrs.get("perm")
        if fn in ("movedim", "moveaxis"):
            source, dest = (list(args[1:3]) + [kwargs.get("source"), kwargs.get("destination")])[:2]
            source = [source] if isinstance(source, int) else list(source or [])
            dest = [dest] if isinstance(dest, int) else list(dest or [])
            try:
                order = [d for d in range(rank) if d not in [s % rank for s in source]]
                perm = [None] * rank
                for s_, d_ in zip(source, dest, strict=True):
                    perm[d_ % rank] = s_ % rank
                rest = iter(order)
                perm = [p if p is not None else next(rest) for p in perm]
            except (TypeError, StopIteration, ValueError):
                perm = None
        elif fn in ("T", "numpy_T"):
            perm = list(reversed(range(rank)))
        elif fn == "mT":
            perm = [*range(rank - 2), rank - 1, rank - 2]
        elif fn in ("t",) and rank < 2:
            perm = list(range(rank))
        elif perm is None and fn in ("transpose", "swapaxes", "swapdims", "transpose_"):
            a, b = (_dim(args[1], rank), _dim(args[2], rank)) if len(args) > 2 else (None, None)
            if a is not None and b is not None:
                perm = list(range(rank))
                perm[a], perm[b] = perm[b], perm[a]
        elif perm is None and fn in ("permute", "permute_copy"):
            dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            perm = [_dim(d, rank) for d in dims]
        if not perm or sorted(p for p in perm if p is not None) != list(range(rank)):
            raise _NotFollowed("its permutation could not be read")
        self._set([src[p] for p in perm])

    def _expand(self, args: list[Any]) -> None:
        src = self._axes(args[0]) if args else None
        if src is None:
            raise _NotFollowed("expands an untraced tensor")
        before, after = self._shape(args[0]), tuple(self.op.shape or ())
        offset = len(after) - len(before)
        out = []
        for k, n in enumerate(after):
            i = k - offset
            if i >= 0 and before[i] == n:
                out.append(src[i])
            else:  # a new or width-1 axis broadcast to n: copies, chosen like any other axis
                out.append(self.s.new(n))
        self._set(out)

    def _repeat(self, fn: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        src = self._axes(args[0]) if args else None
        if src is None:
            raise _NotFollowed("repeats an untraced tensor")
        before, after = self._shape(args[0]), tuple(self.op.shape or ())
        if fn == "repeat_interleave":
            dim = args[2] if len(args) > 2 else kwargs.get("dim")
            d = _dim(dim, len(before)) if dim is not None else None
            if d is None or len(after) != len(before):
                raise _NotFollowed("repeat_interleave without a dim")
            r = after[d] // before[d]
            out = list(src)
            if r > 1:
                out[d] = self.s.make(PROD, [src[d], self.s.new(r)])
            self._set(out)
            return
        offset = len(after) - len(before)
        out = list(self._fresh(after[:offset]))
        for i, a in enumerate(src):
            r = after[offset + i] // before[i] if before[i] else 1
            out.append(a if r == 1 else self.s.make(PROD, [self.s.new(r), a]))
        self._set(out)

    def _cat(self, fn: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)):
            raise _NotFollowed("its tensors could not be read")
        axes = [self._axes(t) for t in tensors]
        shapes = [self._shape(t) for t in tensors]
        out_shape = tuple(self.op.shape or ())
        if any(a is None for a in axes):
            raise _NotFollowed("it joins an untraced tensor")
        if fn == "stack":
            d = _dim(dim, len(out_shape))
            if d is None:
                raise _NotFollowed("its dim could not be read")
            rest = list(axes[0])
            for other in axes[1:]:
                rest = [self._same(x, y) for x, y in zip(rest, other, strict=True)]
            stacked = self.s.new(len(axes), frozen=f"a count of tensors stacked by {self.op.op}")
            self._set([*rest[:d], stacked, *rest[d:]])
            return
        rank = max(len(s) for s in shapes)
        d = _dim(dim, rank)
        kept = [(a, s) for a, s in zip(axes, shapes, strict=True) if len(s) == rank]
        if d is None or not kept:
            raise _NotFollowed("its dim could not be read")
        out = list(kept[0][0])
        for other, _ in kept[1:]:
            out = [
                x if k == d else self._same(x, y)
                for k, (x, y) in enumerate(zip(out, other, strict=True))
            ]
        parts = [a[d] for a, s in kept if s[d] > 0]
        out[d] = parts[0] if len(parts) == 1 else self.s.make(CAT, parts)
        self._set(out)

    def _split(self, op: Op, fn: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        src = self._axes(args[0]) if args else None
        if src is None:
            raise _NotFollowed("splits an untraced tensor")
        shape = self._shape(args[0])
        rank = len(shape)
        if fn == "unbind":
            d = _dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), rank)
            if d is None:
                raise _NotFollowed("its dim could not be read")
            self.s.freeze(src[d], f"unbound into {shape[d]} tensors by {op.op}")
            rest = src[:d] + src[d + 1 :]
            self.s.tuples[op.name] = [rest] * shape[d]
            return
        size_arg = (
            args[1]
            if len(args) > 1
            else kwargs.get(
                "split_size_or_sections",
                kwargs.get("split_size", kwargs.get("chunks", kwargs.get("sections"))),
            )
        )
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        d = _dim(dim, rank)
        if d is None:
            raise _NotFollowed("its dim could not be read")
        n = shape[d]
        if fn in ("chunk", "unsafe_chunk"):
            if not isinstance(size_arg, int) or size_arg < 1:
                raise _NotFollowed("its chunk count could not be read")
            step = -(-n // size_arg)
            sizes = [min(step, n - k) for k in range(0, n, step)]
        elif fn == "tensor_split":
            sizes = _tensor_split_sizes(size_arg, n)
        elif _ints(size_arg):
            sizes = list(size_arg)
        elif isinstance(size_arg, int) and size_arg > 0:
            sizes = [min(size_arg, n - k) for k in range(0, n, size_arg)]
        else:
            raise _NotFollowed("its split sizes could not be read")
        if sum(sizes) != n:
            raise _NotFollowed(f"split sizes {sizes} do not add up to {n}")
        nonzero = [w for w in sizes if w]
        members = [src[d]] if len(nonzero) == 1 else None
        if members is None:
            pieces = [self.s.new(w) for w in nonzero]
            self._same(src[d], self.s.make(CAT, pieces))
            members = pieces
        if _written(size_arg) and fn in ("split", "unsafe_split"):
            self.s.literals.extend((op.name, size_arg, m) for m in members)
        elif fn != "tensor_split" and _ints(size_arg):
            self.s.literals.extend(
                (op.name, w, m)
                for w, m in zip([w for w in size_arg if w], members, strict=False)
                if _written(w)
            )
        it = iter(members)
        self.s.tuples[op.name] = [
            (*src[:d], next(it), *src[d + 1 :]) if w else (*src[:d], self.s.new(0), *src[d + 1 :])
            for w in sizes
        ]

    def _getitem(self, op: Op, args: list[Any]) -> None:
        if len(args) < 2 or not isinstance(args[0], Ref):
            raise _NotFollowed("an index that could not be read")
        parent = args[0].op
        index = args[1]
        if parent is not None and parent in self.s.tuples:
            if not isinstance(index, int) or not -len(self.s.tuples[parent]) <= index < len(
                self.s.tuples[parent]
            ):
                raise _NotFollowed("an index that could not be read")
            axes = self.s.tuples[parent][index]
            if axes is None:
                raise _NotFollowed("takes an output the analysis does not follow")
            self._set(axes)
            return
        src = self._axes(args[0])
        if src is None:
            raise _NotFollowed("indexes an untraced tensor")
        self._index(src, self._shape(args[0]), index)

    def _index(self, src: tuple[int, ...], shape: tuple[int, ...], index: Any) -> None:
        """x[index] with ints, slices, None and Ellipsis, or one index tensor (a gather)."""
        items = list(index) if isinstance(index, tuple) else [index]
        tensors = [k for k, i in enumerate(items) if isinstance(i, (Ref, list))]
        if tensors:
            if len(tensors) > 1 or any(
                i is not Ellipsis and i != slice(None)
                for k, i in enumerate(items)
                if k != tensors[0]
            ):
                raise _NotFollowed("advanced indexing by several tensors or mixed with slices")
            k = tensors[0]
            if Ellipsis in items[:k]:
                k = len(shape) - (len(items) - 1 - k)
            self._gathered(src, shape, k, items[tensors[0]])
            return
        explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items = items[:at] + [slice(None)] * (len(shape) - explicit) + items[at + 1 :]
        items += [slice(None)] * (len(shape) - sum(1 for i in items if i is not None))
        out_shape = tuple(self.op.shape or ())
        out: list[int] = []
        axis = 0
        for item in items:
            if item is None:
                out.append(self.s.new(1))
                continue
            if isinstance(item, bool) or not isinstance(item, (int, slice)):
                raise _NotFollowed("an index that could not be read")
            if isinstance(item, int):
                self._pick(src[axis], shape[axis], "indexed at one position")
            else:
                out.append(self._slice(src[axis], shape[axis], item, out_shape[len(out)]))
            axis += 1
        self._set(out)

    def _gathered(
        self, src: tuple[int, ...], shape: tuple[int, ...], axis: int, index: Any
    ) -> None:
        """x[..., idx, ...] with one index tensor on `axis`: that axis is addressed by values
        (frozen, like an embedding's rows); the index's axes take its place; the rest stay."""
        if not 0 <= axis < len(shape):
            raise _NotFollowed("an index tensor on an axis that could not be read")
        self.s.freeze(src[axis], f"addressed by the values of an index tensor ({self.op.op})")
        out_shape = tuple(self.op.shape or ())
        idx_rank = len(out_shape) - len(shape) + 1
        middle = self._fresh(out_shape[axis : axis + idx_rank], positional=True)
        self._set([*src[:axis], *middle, *src[axis + 1 :]])

    def _slice(self, space: int, n: int, item: slice, size: int) -> int:
        """The space of x[start:stop] along an axis: all of it, or a part of it (the rest frozen
        unless something else reads it)."""
        start = item.start if item.start is not None else 0
        step = item.step if item.step is not None else 1
        if isinstance(start, Ref) or isinstance(step, Ref):
            if size == n:
                return space
            raise _NotFollowed("a slice whose start or step is computed")
        start = start % n if start < 0 else min(start, n)
        if step != 1:
            return self._strided(space, n, start, step, size)
        if start == 0 and size == n:
            return space
        widths = [w for w in (start, size, n - start - size) if w]
        if len(widths) == 1:
            return space
        members = self.s.split(space, CAT, widths)
        if members[0] is None:
            members = self._refine_cat(space, [start, start + size])
        offsets = [0]
        for m in members:
            offsets.append(offsets[-1] + self.s.width(m))
        taken = [m for m, o in zip(members, offsets, strict=False) if start <= o < start + size]
        self.sliced.extend(
            (m, f"left out by the slice {self.op.op} ({self.op.name})") for m in members
        )
        self.taken.extend(taken)
        return taken[0] if len(taken) == 1 else self.s.make(CAT, taken)

    def _strided(self, space: int, n: int, start: int, step: int, size: int) -> int:
        """x[start::step] with start < step and step dividing the axis: the axis is (n / step)
        x step, interleaved (index = j * step + r), and the slice takes r = start of every j."""
        if step < 1 or start >= step or n % step or size != n // step:
            raise _NotFollowed(f"a slice [{start}::{step}] of {n} that is not an interleave")
        every = self.s.new(n // step)
        phase = self.s.new(step, frozen=f"interleaved by the slice {self.op.op} ({self.op.name})")
        self._same(space, self.s.make(PROD, [every, phase]))
        return every

    def _refine_cat(self, space: int, cuts: list[int]) -> list[int]:
        """The parts of an already concatenated space, cut further at `cuts`."""
        found = self.s.structure(space)
        if found is None or found[0] != CAT:
            raise _NotFollowed("slices a space that is structured otherwise")
        parts = self.s._flat(CAT, found[1])
        out, offset = [], 0
        for p in parts:
            w = self.s.width(p)
            inner = sorted({c - offset for c in cuts if 0 < c - offset < w})
            if inner:
                bounds = [0, *inner, w]
                pieces = self.s.split(
                    p, CAT, [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
                )
                if pieces[0] is None:
                    raise _NotFollowed("slices a space that is structured otherwise")
                out.extend(pieces)
            else:
                out.append(p)
            offset += w
        return out

    def _pick(self, space: int, n: int, why: str) -> None:
        if n > 1 and not self.s.positional(space):
            self.s.freeze(space, f"{why} by {self.op.op} ({self.op.name})")

    def _select(self, fn: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        src = self._axes(args[0]) if args else None
        if src is None:
            raise _NotFollowed("slices an untraced tensor")
        shape = self._shape(args[0])
        d = _dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), len(shape))
        if d is None:
            raise _NotFollowed("its dim could not be read")
        if fn.startswith("select"):
            self._pick(src[d], shape[d], "indexed at one position")
            self._set(src[:d] + src[d + 1 :])
            return
        if fn == "narrow":
            start, length = (args + [None, None, None, None])[2:4]
            known = isinstance(start, int) and isinstance(length, int)
            item = slice(start, start + length if known else None)  # a Ref start: not followed
        else:
            start, end, step = (list(args[2:5]) + [None, None, None])[:3]
            item = slice(start, end, step)
        size = (self.op.shape or ())[d]
        self._set([*src[:d], self._slice(src[d], shape[d], item, size), *src[d + 1 :]])

    def _index_op(self, fn: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        src = self._axes(args[0]) if args else None
        if src is None:
            raise _NotFollowed("indexes an untraced tensor")
        shape = self._shape(args[0])
        if fn == "index":  # aten.index(x, [None, idx, None]): None keeps an axis
            items = list(args[1]) if len(args) > 1 else []
            items = [slice(None) if i is None else i for i in items]
            self._index(src, shape, tuple(items))
            return
        d = _dim(args[1] if len(args) > 1 else kwargs.get("dim"), len(shape))
        if d is None:
            raise _NotFollowed("its dim could not be read")
        if fn == "index_select":
            self._gathered(src, shape, d, args[2] if len(args) > 2 else kwargs.get("index"))
            return
        out_shape = tuple(self.op.shape or ())  # gather: out[.., i, ..] = x[.., idx[.., i, ..], ..]
        self.s.freeze(src[d], f"addressed by the values of an index tensor ({self.op.op})")
        out = [
            src[k]
            if k != d and k < len(shape) and shape[k] == n
            else self.s.new(n, positional=True)
            for k, n in enumerate(out_shape)
        ]
        self._set(out)

    def _pad(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        """F.pad: (left, right) pairs from the last axis back; an axis padded by nothing stays, a
        padded one is a new axis (frozen on features: padding channels is not a width)."""
        src = self._axes(args[0]) if args else None
        pads = args[1] if len(args) > 1 else kwargs.get("pad")
        if src is None or not isinstance(pads, (list, tuple)) or len(pads) % 2:
            raise _NotFollowed("a pad that could not be read")
        out = list(src)
        out_shape, in_shape = tuple(self.op.shape or ()), self._shape(args[0])
        if len(out_shape) != len(in_shape):
            raise _NotFollowed("a pad that changes the rank")
        for i in range(min(len(pads) // 2, len(src))):
            k = len(src) - 1 - i
            if out_shape[k] == in_shape[k]:  # padded by nothing (the amounts may be computed)
                continue
            self._pick(src[k], in_shape[k], "padded")
            out[k] = self.s.new(out_shape[k], positional=self.s.positional(src[k]))
        self._set(out)

    def _matmul(self, fn: str, args: list[Any]) -> None:
        bias = None
        if fn in ("addmm", "baddbmm", "addbmm"):
            bias, args = args[0], list(args[1:])
        a, b = (args + [None, None])[:2]
        xa, xb = self._axes(a), self._axes(b)
        if xa is None or xb is None:
            raise _NotFollowed("multiplies an untraced tensor")
        sa, sb = self._shape(a), self._shape(b)
        if len(sa) == 1:
            xa, sa = (self.s.new(1), *xa), (1, *sa)
        if len(sb) == 1:
            xb, sb = (*xb, self.s.new(1)), (*sb, 1)
        self._same(xa[-1], xb[-2])
        batch_a, batch_b = list(xa[:-2]), list(xb[:-2])
        shape_a, shape_b = sa[:-2], sb[:-2]
        n = max(len(batch_a), len(batch_b))
        batch: list[int] = []
        for k in range(n):
            ia, ib = k - (n - len(batch_a)), k - (n - len(batch_b))
            pa = batch_a[ia] if ia >= 0 and shape_a[ia] > 1 else None
            pb = batch_b[ib] if ib >= 0 and shape_b[ib] > 1 else None
            if pa is not None and pb is not None:
                batch.append(self._same(pa, pb))
            else:
                batch.append(pa if pa is not None else pb if pb is not None else self.s.new(1))
        out = [*batch, xa[-2], xb[-1]]
        out_shape = tuple(self.op.shape or ())
        if len(self._shape(args[0])) == 1:
            out.pop(-2)
        if len(self._shape(args[1])) == 1:
            out.pop(-1)
        if len(out) != len(out_shape):
            raise _NotFollowed("a product whose result the rule does not shape")
        if bias is not None:
            bx, bs = self._axes(bias), self._shape(bias)
            if bx is not None:
                for k, (a_, n_) in enumerate(zip(reversed(bx), reversed(bs), strict=False)):
                    if n_ > 1:
                        self._same(out[len(out) - 1 - k], a_)
        self._set(out)

    def _einsum(self, args: list[Any]) -> None:
        equation = args[0] if args and isinstance(args[0], str) else None
        operands = args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        if equation is None or "..." in equation or "->" not in equation:
            raise _NotFollowed(
                "an einsum equation the rule does not read (ellipsis or implicit output)"
            )
        lhs, rhs = equation.replace(" ", "").split("->")
        terms = lhs.split(",")
        if len(terms) != len(operands):
            raise _NotFollowed("an einsum whose operands do not match its equation")
        letters: dict[str, int] = {}
        for term, ref in zip(terms, operands, strict=True):
            axes, shape = self._axes(ref), self._shape(ref)
            if axes is None or len(axes) != len(term):
                raise _NotFollowed("an einsum operand the rule cannot follow")
            for letter, a, n in zip(term, axes, shape, strict=True):
                if n == 1:
                    continue
                letters[letter] = a if letter not in letters else self._same(letters[letter], a)
        out_shape = tuple(self.op.shape or ())
        self._set([letters.get(c, self.s.new(n)) for c, n in zip(rhs, out_shape, strict=True)])

    def _sdpa(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        """q (..., Hq, L, E), k (..., Hk, S, E), v (..., Hk, S, Ev) -> (..., Hq, L, Ev); with fewer
        key/value heads (grouped-query attention) the query heads are key/value heads x group."""
        q, k, v = (args + [kwargs.get(n) for n in ("query", "key", "value")])[:3]
        xq, xk, xv = self._axes(q), self._axes(k), self._axes(v)
        if xq is None or xk is None or xv is None:
            raise _NotFollowed("attends over an untraced tensor")
        sq, sk = self._shape(q), self._shape(k)
        self._same(xq[-1], xk[-1])
        self._same(xk[-2], xv[-2])
        batch = []
        for i in range(len(xq) - 2):
            j = i - (len(xq) - len(xk))
            if j < 0:
                batch.append(xq[i])
                continue
            self._same(xk[j], xv[j])
            if sq[i] == sk[j]:
                batch.append(self._same(xq[i], xk[j]))
            elif sk[j] and sq[i] % sk[j] == 0 and i == len(xq) - 3:
                group = self.s.new(sq[i] // sk[j])
                self._same(xq[i], self.s.make(PROD, [xk[j], group]))
                batch.append(xq[i])
            else:
                raise _NotFollowed(f"{sq[i]} query heads over {sk[j]} key/value heads")
        self._set([*batch, xq[-2], xv[-1]])

    def _functional_norm(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        x = self._axes(args[0]) if args else None
        if x is None:
            raise _NotFollowed("normalises an untraced tensor")
        for ref in [*args[2:4], kwargs.get("weight"), kwargs.get("bias")]:
            dims = self._axes(ref) if isinstance(ref, Ref) else None
            if dims:
                for d, a in zip(dims, x[len(x) - len(dims) :], strict=True):
                    self._same(d, a)
        self._set(x)

    def _functional_channel_norm(self, fn: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        x = self._axes(args[0]) if args else None
        if x is None or len(x) < 2:
            raise _NotFollowed("normalises an untraced tensor")
        for ref in [*args[1:], *_refs(kwargs)]:
            dims = self._axes(ref) if isinstance(ref, Ref) else None
            if dims and len(dims) == 1:
                self._same(dims[0], x[1])
        if fn in ("group_norm", "native_group_norm"):
            self._groups(x, args[1] if len(args) > 1 else kwargs.get("num_groups"))
        self._set(x)

    def _create(self, fn: str, args: list[Any]) -> None:
        if fn.endswith("_like") and args and self._axes(args[0]) is not None:
            self._set(self._axes(args[0]))
            return
        self._set(
            self._fresh(
                self.op.shape or (),
                frozen=f"made by {self.op.op} with a fixed size",
                positional=True,
            )
        )

    def _reduce(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        src = self._axes(args[0]) if args else None
        if src is None:
            raise _NotFollowed("reduces an untraced tensor")
        rank = len(src)
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        if isinstance(dims, str) or (dims is not None and not isinstance(dims, (int, list, tuple))):
            dims = None
        out_shape = tuple(self.op.shape or ())
        if dims is None:
            if out_shape:
                raise _NotFollowed("a reduction whose dims could not be read")
            self._set([])
            return
        dims = [dims] if isinstance(dims, int) else list(dims)
        reduced = {_dim(d, rank) for d in dims}
        if None in reduced:
            raise _NotFollowed("a reduction whose dims could not be read")
        keep = len(out_shape) == rank
        out = (
            [self.s.new(1) if k in reduced else a for k, a in enumerate(src)]
            if keep
            else [a for k, a in enumerate(src) if k not in reduced]
        )
        self._set(out)

    def _along_axis(self, fn: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        src = self._axes(args[0]) if args else None
        if src is None or tuple(self.op.shape or ()) != self._shape(args[0]):
            raise _NotFollowed(f"{fn} of an untraced tensor or of another shape")
        dims = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("dims", -1))
        dims = (
            [dims]
            if isinstance(dims, int)
            else list(dims)
            if isinstance(dims, (list, tuple))
            else []
        )
        for d in dims:
            k = _dim(d, len(src))
            if k is not None:
                self._pick(src[k], self._shape(args[0])[k], "taken in order")
        self._set(src)


class _NotFollowed(Exception):
    """An op the analysis cannot follow, with the reason."""


def _refs(value: Any) -> Iterable[Ref]:
    if isinstance(value, Ref):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _refs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _refs(v)
    elif isinstance(value, slice):
        yield from _refs((value.start, value.stop, value.step))
