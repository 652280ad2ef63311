"""Map concrete ops (nn modules, torch functions, tensor methods, aten ops) to the canonical kinds of
`surgery.ir.graph`. One table per source; capture calls `classify_*` and never branches on op types itself.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Classified = tuple[str, dict[str, Any]]  # (kind, attrs)

_NONLINEAR_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Softmax,
    nn.LogSoftmax,
    nn.PReLU,
)
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
_SPATIAL_MODULES = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Upsample,
)
_MAXPOOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def _conv_attrs(m: nn.modules.conv._ConvNd) -> dict[str, Any]:
    return {
        "stride": tuple(m.stride),
        "padding": m.padding if isinstance(m.padding, str) else tuple(m.padding),
        "dilation": tuple(m.dilation),
        "groups": m.groups,
        "padding_mode": m.padding_mode,
        "kernel_size": tuple(m.kernel_size),
        "transposed": m.transposed,
    }


def _is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's GPT-2 style Conv1D (that class itself): a linear layer with an [in, out] weight."""
    cls = type(m)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__ == "transformers.pytorch_utils"
        and getattr(m, "weight", None) is not None
    )


_CONVS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_KNOWN_LAYERS = (
    nn.Linear,
    *_CONVS,
    nn.modules.batchnorm._BatchNorm,
    nn.SyncBatchNorm,
    nn.Embedding,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.MultiheadAttention,
    *_DROPOUT_MODULES,
    *_SPATIAL_MODULES,
    *_MAXPOOL_MODULES,
    *_NONLINEAR_MODULES,
    *_NORM_MODULES,
)
# the forward (and the conv kernel call) a torch.nn layer runs; a subclass that replaces either
# computes something else (an activation after a BatchNorm, a standardised conv weight, a scale)
_KNOWN_FORWARDS = {cls.forward for cls in _KNOWN_LAYERS}
_CONV_KERNELS = {cls._conv_forward for cls in _CONVS if hasattr(cls, "_conv_forward")}


def why_not_its_base(m: nn.Module) -> str | None:
    """Why a module that is an instance of a known torch.nn layer must not be taken for that layer:
    its class replaces the layer's forward, or hooks / parametrizations change what it computes.
    None when it runs exactly the layer's own code (or is not a known layer at all)."""
    if not isinstance(m, _KNOWN_LAYERS):
        return None
    cls = type(m)
    if cls.forward not in _KNOWN_FORWARDS or (
        isinstance(m, _CONVS) and getattr(cls, "_conv_forward", None) not in _CONV_KERNELS
    ):
        base = next(
            k for k in cls.__mro__ if k in _KNOWN_LAYERS or k.__module__.startswith("torch.nn")
        )
        return f"{cls.__name__} overrides the forward of {base.__name__}: not folded through as one"
    hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    ours = ("surgery_pair", "surgery_observer")  # pairs (accounted for); recorders (read only)
    if any(not any(getattr(hook, mark, False) for mark in ours) for hook in hooks):
        return f"{cls.__name__} has forward hooks that change what it computes"
    if torch.nn.utils.parametrize.is_parametrized(m):
        return f"{cls.__name__} has parametrized weights (weight_norm, spectral_norm, ...)"
    computed = [
        name
        for name in ("weight", "bias")
        if name not in m._parameters and isinstance(getattr(type(m), name, None), property)
    ]
    if computed:
        return (
            f"{cls.__name__} computes its {computed[0]} (a property, not a parameter): traced "
            "into, not folded as its base"
        )
    return None


def _is_custom_norm(m: nn.Module) -> bool:
    """RMSNorm/LayerNorm modules of model libraries (LlamaRMSNorm, T5LayerNorm, ...)."""
    name = type(m).__name__
    return name.endswith(("RMSNorm", "LayerNorm")) and next(m.children(), None) is None


LEAF_KINDS = ("linear", "conv", "conv_transpose", "batch_norm", "embedding", "norm", "attention")


def is_leaf(m: nn.Module) -> bool:
    """Whether a module call is one op of the dataflow (its internals are not traced through):
    a known layer, or an opaque one (hooks that a trace would not see)."""
    kind, attrs = classify_module(m)
    return kind in LEAF_KINDS or bool(attrs.get("opaque"))


def classify_module(m: nn.Module, one_activation: bool = False) -> Classified:
    """Kind and attributes of a leaf module call. A module is a known layer only if its forward is
    that layer's forward (see why_not_its_base); otherwise it is "other", traced into where it can
    be, and opaque where a trace would miss what it does (hooks, parametrizations).
    `one_activation`: the call's activation inputs are one tensor (attention: q = k = v)."""
    why = why_not_its_base(m)
    if why is not None:
        traced = "overrides the forward" in why or "(a property" in why
        return "other", {"why": why, "opaque": not traced}
    if isinstance(m, nn.Linear):
        return "linear", {"weight_in_axis": 1, "weight_out_axis": 0}
    if _is_hf_conv1d(m):
        return "linear", {"weight_in_axis": 0, "weight_out_axis": 1}
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.transposed:
            return "conv_transpose", {**_conv_attrs(m), "output_padding": tuple(m.output_padding)}
        return "conv", _conv_attrs(m)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "batch_norm", {
            "eps": float(m.eps),
            "affine": m.affine,
            "track_running_stats": m.track_running_stats,
        }
    if isinstance(m, nn.Embedding):
        return "embedding", {"max_norm": m.max_norm}
    if isinstance(m, _DROPOUT_MODULES) or isinstance(m, nn.Identity):
        return "transparent", {"family": "pointwise"}
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return "transparent", {"family": "reshape"}
    if isinstance(m, _SPATIAL_MODULES):
        attrs: dict[str, Any] = {"family": "spatial"}
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            divisor = getattr(m, "divisor_override", None)
            attrs["keeps_constants"] = _avg_pool_keeps_constants(
                m.padding, m.count_include_pad, divisor
            )
        return "transparent", attrs
    if isinstance(m, _MAXPOOL_MODULES):
        return "max_pool", {}
    if isinstance(m, _NONLINEAR_MODULES):
        return "nonlinear", {}
    if isinstance(m, (nn.GroupNorm, nn.LocalResponseNorm)):
        return "norm", {"channels": True, "groups": getattr(m, "num_groups", None)}
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        return "norm", {"normalized": len(m.normalized_shape)}
    if _is_custom_norm(m):
        weight = getattr(m, "weight", None)
        return "norm", {"normalized": weight.dim() if isinstance(weight, torch.Tensor) else 1}
    if isinstance(m, nn.MultiheadAttention):
        return "attention", {"self_attention": one_activation, "num_heads": m.num_heads}
    return "other", {}


def norm_attrs(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a functional (or aten) norm normalises, as its module form records it: the number of
    last axes (layer_norm, rms_norm: len(normalized_shape)) or the channels in groups (group_norm)."""
    if name in ("group_norm", "native_group_norm"):
        at = 6 if name == "native_group_norm" else 1  # aten's (x, w, b, N, C, HxW, group, eps)
        groups = args[at] if len(args) > at else kwargs.get("num_groups")
        return {"channels": True, "groups": groups if isinstance(groups, int) else None}
    shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
    if isinstance(shape, int):
        return {"normalized": 1}
    if isinstance(shape, (tuple, list, torch.Size)) and all(isinstance(n, int) for n in shape):
        return {"normalized": len(shape)}
    return {}


def indexing(args: Sequence[Any]) -> Classified:
    """A getitem: which element of a tuple (e.g. one part of a split) it takes."""
    index = args[1] if len(args) > 1 else None
    return "other", {"why": "indexing", **({"index": index} if isinstance(index, int) else {})}


def layer_reads_parameters(kind: str, attrs: dict[str, Any], params: dict[str, str]) -> Classified:
    """A functional linear / conv / embedding whose weight is computed in forward (not a parameter
    of the model) is no layer a rule can fold into: "other", with the reason."""
    if kind in ("linear", "conv", "embedding", "batch_norm") and "weight" not in params:
        return "other", {"why": f"a {kind} whose weight is computed in forward, not a parameter"}
    return kind, attrs


def in_context(
    kind: str, attrs: dict[str, Any], label: str, activations: int, params: int
) -> Classified:
    """The kind of a call given what it reads: a channel-commuting op that reads a second tensor
    (another activation or a parameter) besides h does not commute with a pair on h."""
    if kind == "transparent" and activations and activations + params > 1:
        return "other", {"why": f"{label} reads a second tensor"}
    return kind, attrs


_NONLINEAR_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.sigmoid,
    F.tanh,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.softmax,
    F.log_softmax,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.softmax,
}
_SPATIAL_FUNCTIONS = {
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.interpolate,
    F.upsample,
}
_MAXPOOL_FUNCTIONS = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
_NORM_FUNCTIONS = {F.layer_norm, F.group_norm, F.rms_norm}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as"}
_POINTWISE_METHODS = {"contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type_as"}
_NONLINEAR_METHODS = {"relu", "relu_", "sigmoid", "tanh", "softmax", "exp", "log", "abs", "square"}


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _binary(name: str, n_tensor_args: int, other: Any) -> Classified:
    """add/mul/div between two activations, or with a Python scalar."""
    if n_tensor_args >= 2:
        return ("add" if name in ("add", "sub") else "mul"), {}
    if name in ("mul", "div") and _is_scalar(other):
        return "transparent", {
            "family": "pointwise",
            "what": f"{name} by a scalar",
            "keeps_constants": False,
        }
    if name in ("add", "sub"):
        return "other", {"why": f"{name} of a constant shifts the tensor (not a channel mix)"}
    return "mul", {}


_OPERATOR_BINARY = {
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    torch.div: "div",
}


def _dims_arg(args: Sequence[Any], kwargs: dict[str, Any], pos: int, key: str) -> Any:
    if len(args) > pos:
        return args[pos]
    return kwargs.get(key)


def _permutation(rank: int, name: str, args: Sequence[Any]) -> list[int] | None:
    """Full permutation of a permute/transpose call on a tensor of `rank` dims (args after the tensor);
    None when it cannot be read (a rank-0 tensor, dims out of range or not integers)."""
    try:
        if name == "permute":
            dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            perm = [_dim(d, rank) for d in dims]
        elif name in ("transpose", "swapaxes", "swapdims"):
            a, b = _dim(args[0], rank), _dim(args[1], rank)
            perm = list(range(rank))
            perm[a], perm[b] = perm[b], perm[a]
        elif name == "t":
            perm = [1, 0] if rank == 2 else list(range(rank))
        else:
            return None
    except (TypeError, ValueError, IndexError):
        return None
    return perm if rank > 0 and sorted(perm) == list(range(rank)) else None


def _dim(dim: Any, rank: int) -> int:
    """A dim argument wrapped into [0, rank); ValueError when out of range (always, for rank 0)."""
    value = int(dim)
    if not -rank <= value < rank:
        raise ValueError(f"dim {value} out of range for rank {rank}")
    return value % rank


def _avg_pool_keeps_constants(padding: Any, count_include_pad: Any, divisor_override: Any) -> bool:
    """Average pooling maps a constant to itself unless zero padding is counted or the divisor is fixed."""
    pads = padding if isinstance(padding, (list, tuple)) else [padding]
    padded = any(int(p) > 0 for p in pads)
    return divisor_override is None and not (
        padded and (count_include_pad is None or bool(count_include_pad))
    )


def _avg_pool_attrs(args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override) of avg_pool."""
    padding = _dims_arg(args, kwargs, 3, "padding") or 0
    count_include_pad = _dims_arg(args, kwargs, 5, "count_include_pad")
    divisor = _dims_arg(args, kwargs, 6, "divisor_override")
    return {
        "family": "spatial",
        "keeps_constants": _avg_pool_keeps_constants(padding, count_include_pad, divisor),
    }


def _reduce_attrs(name: str, rank: int, dims: Any, keepdim: Any) -> Classified:
    if dims is None:
        return "other", {"why": "reduces over every axis, the feature axis included"}
    try:
        dims = sorted(_dim(d, rank) for d in ([dims] if isinstance(dims, int) else list(dims)))
    except (TypeError, ValueError):
        return "other", {"why": f"reduces over dims {dims} of a tensor whose rank is not known"}
    return "transparent", {
        "family": "reduce",
        "dims": dims,
        "keepdim": bool(keepdim),
        "keeps_constants": name == "mean",  # a sum multiplies a constant by the reduced size
    }


_CONV_TRANSPOSE_FUNCTIONS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
_FUNCTIONAL_CONV_TRANSPOSE = (
    "functional transposed convolution: use an nn.ConvTranspose module so the pair has a module "
    "to attach to"
)


def classify_function(
    fn: Any, args: Sequence[Any], kwargs: dict[str, Any], n_tensor_args: int, rank: int
) -> Classified:
    """Kind of an fx `call_function` node. `n_tensor_args` counts activation/parameter tensor args."""
    if fn is operator.getitem:
        return indexing(args)
    if fn in _OPERATOR_BINARY:
        other = args[1] if len(args) > 1 else None
        first = args[0] if args else None
        scalar = other if _is_scalar(other) else first
        return _binary(_OPERATOR_BINARY[fn], n_tensor_args, scalar)
    if fn is F.linear:
        return "linear", {"weight_in_axis": 1, "weight_out_axis": 0}
    if fn in (F.conv1d, F.conv2d, F.conv3d, *_CONV_TRANSPOSE_FUNCTIONS):
        return "other", {
            "why": "functional convolution: use an nn.Conv module so the pair has a module to attach to"
        }
    if fn in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d):
        return "transparent", {"family": "pointwise"}
    if fn in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d):
        return "transparent", _avg_pool_attrs(args, kwargs)
    if fn in _SPATIAL_FUNCTIONS:
        return "transparent", {"family": "spatial"}
    if fn in _MAXPOOL_FUNCTIONS:
        return "max_pool", {}
    if fn in _NONLINEAR_FUNCTIONS:
        return "nonlinear", {}
    if fn in _NORM_FUNCTIONS:
        return "norm", norm_attrs(fn.__name__, args, kwargs)
    if fn in _RESHAPE_FUNCTIONS:
        return "transparent", {"family": "reshape"}
    if fn in (torch.permute, torch.transpose, torch.swapaxes, torch.t):
        name = {torch.permute: "permute", torch.t: "t"}.get(fn, "transpose")
        return "transparent", {"family": "permute", "perm": _permutation(rank, name, args[1:])}
    if fn in (torch.mean, torch.sum):
        return _reduce_attrs(
            fn.__name__,
            rank,
            _dims_arg(args, kwargs, 1, "dim"),
            _dims_arg(args, kwargs, 2, "keepdim"),
        )
    if fn in (torch.cat, torch.concat, torch.stack):
        return "cat", {}
    if fn in (torch.matmul, torch.bmm, torch.mm):
        return "matmul", {}
    if fn is F.scaled_dot_product_attention:
        return "attention", {}
    if fn is F.embedding:
        return "other", {"why": "functional embedding: use nn.Embedding"}
    return "other", {}


def classify_method(
    name: str, args: Sequence[Any], kwargs: dict[str, Any], n_tensor_args: int, rank: int
) -> Classified:
    """Kind of an fx `call_method` node (`args` excludes the tensor itself)."""
    if name in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"):
        return _binary(name.rstrip("_"), n_tensor_args, args[0] if args else None)
    if name in _RESHAPE_METHODS:
        return "transparent", {"family": "reshape"}
    if name in _POINTWISE_METHODS:
        return "transparent", {"family": "pointwise"}
    if name in ("permute", "transpose", "swapaxes", "swapdims", "t"):
        return "transparent", {"family": "permute", "perm": _permutation(rank, name, args)}
    if name in ("mean", "sum"):
        return _reduce_attrs(
            name, rank, _dims_arg(args, kwargs, 0, "dim"), _dims_arg(args, kwargs, 1, "keepdim")
        )
    if name in _NONLINEAR_METHODS:
        return "nonlinear", {}
    if name in ("matmul", "bmm", "mm"):
        return "matmul", {}
    return "other", {}


def _aten(name: str) -> str:
    return name.split(".")[1] if name.startswith("aten.") else name


_ATEN_NONLINEAR = {
    "relu",
    "relu_",
    "gelu",
    "gelu_",
    "silu",
    "silu_",
    "sigmoid",
    "tanh",
    "hardtanh",
    "hardtanh_",
    "hardswish",
    "hardswish_",
    "hardsigmoid",
    "leaky_relu",
    "elu",
    "mish",
    "softmax",
    "_softmax",
    "log_softmax",
    "_log_softmax",
    "prelu",
}
_ATEN_SPATIAL = {
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "_adaptive_avg_pool2d",
    "upsample_nearest1d",
    "upsample_nearest2d",
    "upsample_nearest3d",
    "upsample_bilinear2d",
    "upsample_bicubic2d",
    "upsample_linear1d",
    "upsample_trilinear3d",
}
_ATEN_MAXPOOL = {
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "max_pool2d_with_indices",
    "adaptive_max_pool2d",
    "adaptive_max_pool1d",
}
_ATEN_RESHAPE = {
    "view",
    "reshape",
    "_unsafe_view",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "squeeze_",
    "unsqueeze_",
}
_ATEN_POINTWISE = {
    "dropout",
    "dropout_",
    "clone",
    "contiguous",
    "alias",
    "_to_copy",
    "to",
    "lift_fresh_copy",
    "feature_dropout",
}
_ATEN_NORM = {"layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "rms_norm"}


def classify_aten(target: Any, args: Sequence[Any], n_tensor_args: int, rank: int) -> Classified:
    """Kind of a torch.export (aten) node; `args` excludes nothing (args[0] is the input)."""
    if target is operator.getitem:  # export keeps Python's getitem for tuple outputs (a split)
        return indexing(args)
    name = _aten(str(target))
    if name == "linear":
        return "linear", {"weight_in_axis": 1, "weight_out_axis": 0}
    if name in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        return "other", {"why": _FUNCTIONAL_CONV_TRANSPOSE}
    if name in ("conv1d", "conv2d", "conv3d", "convolution"):
        if name == "convolution":
            stride, padding, dilation, transposed, _, groups = args[3:9]
            if transposed:
                return "other", {"why": _FUNCTIONAL_CONV_TRANSPOSE}
        else:
            stride, padding, dilation, groups = (list(args[3:7]) + [1, 0, 1, 1][len(args[3:7]) :])[
                :4
            ]
        kernel = None
        return "conv", {
            "stride": tuple(stride) if isinstance(stride, (list, tuple)) else (stride,),
            "padding": padding
            if isinstance(padding, str)
            else tuple(padding)
            if isinstance(padding, (list, tuple))
            else (padding,),
            "dilation": tuple(dilation) if isinstance(dilation, (list, tuple)) else (dilation,),
            "groups": int(groups),
            "padding_mode": "zeros",
            "kernel_size": kernel,
            "transposed": False,
        }
    if name in ("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm"):
        eps = (
            args[7]
            if name == "batch_norm"
            else args[6]
            if name == "_native_batch_norm_legit_no_training"
            else args[7]
        )
        return "batch_norm", {
            "eps": float(eps),
            "affine": args[1] is not None,
            "track_running_stats": args[3] is not None,
        }
    if name == "embedding":
        return "embedding", {}
    if name in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"):
        return _binary(name.rstrip("_"), n_tensor_args, args[1] if len(args) > 1 else None)
    if name in _ATEN_POINTWISE:
        return "transparent", {"family": "pointwise"}
    if name in _ATEN_RESHAPE:
        return "transparent", {"family": "reshape"}
    if name in ("permute", "transpose", "t", "swapaxes"):
        return "transparent", {
            "family": "permute",
            "perm": _permutation(rank, "permute" if name == "permute" else name, args[1:]),
        }
    if name in ("avg_pool1d", "avg_pool2d", "avg_pool3d"):
        return "transparent", _avg_pool_attrs(args, {})
    if name in _ATEN_SPATIAL:
        return "transparent", {"family": "spatial"}
    if name in ("mean", "sum"):
        return _reduce_attrs(
            name, rank, args[1] if len(args) > 1 else None, args[2] if len(args) > 2 else False
        )
    if name in _ATEN_MAXPOOL:
        return "max_pool", {}
    if name in _ATEN_NONLINEAR:
        return "nonlinear", {}
    if name in _ATEN_NORM:
        return "norm", norm_attrs(name, args, {})
    if name in ("cat", "concat", "stack"):
        return "cat", {}
    if name in ("matmul", "bmm", "mm", "baddbmm", "addmm"):
        return "matmul", {}
    if name in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention"):
        return "attention", {}
    return "other", {}
