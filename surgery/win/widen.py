"""Stage 1 of WIN: build the wide teacher B from the thin student S.

- torchvision ResNets with Bottleneck blocks: the paper's choice, the 3x3 convs widened and the 1x1
  convs keeping the widened size (`width_per_group` x factor); block outputs keep their width.
- Hugging Face configs (BERT, GPT-2, LLaMA, ...): hidden size, FFN width and heads x factor.
- anything else made of Linear / Conv / BatchNorm / LayerNorm / Embedding / MultiheadAttention:
  every hidden width x factor (the model's input channels and output features stay).
The teacher is freshly initialised (train it, or pass an existing trained big model instead).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from surgery.capture import capture
from surgery.errors import PlanError

from .spaces import Spaces, channel_spaces

_HF_WIDTHS = (
    "hidden_size",
    "n_embd",
    "d_model",
    "intermediate_size",
    "n_inner",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
)


def widen(model: nn.Module, factor: float = 2.0, example_inputs: Any = None) -> nn.Module:
    """A wide teacher of the same family as `model` (see the module docstring), freshly initialised."""
    if factor < 1:
        raise PlanError(
            f"factor must be >= 1 (a teacher is at least as wide as its student), got {factor}"
        )
    if hasattr(model, "config") and hasattr(model.config, "to_dict"):
        return _widen_hf(model, factor)
    if _is_bottleneck_resnet(model):
        return _widen_bottleneck_resnet(model, factor)
    return widen_uniform(model, factor, example_inputs)


def _widen_hf(model: nn.Module, factor: float) -> nn.Module:
    config = copy.deepcopy(model.config)
    changed = []
    for key in _HF_WIDTHS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            setattr(config, key, int(round(value * factor)))
            changed.append(key)
    if not changed:
        raise PlanError(
            f"widen: {type(model.config).__name__} has none of the width fields {_HF_WIDTHS}"
        )
    return type(model)(config).to(next(model.parameters()).device)


def _is_bottleneck_resnet(model: nn.Module) -> bool:
    from torchvision.models.resnet import Bottleneck, ResNet

    return type(model) is ResNet and isinstance(model.layer1[0], Bottleneck)


def _widen_bottleneck_resnet(model: nn.Module, factor: float) -> nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet

    layers = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    return ResNet(
        Bottleneck,
        layers,
        num_classes=model.fc.out_features,
        groups=model.groups,
        width_per_group=int(model.base_width * factor),
    )


def widen_uniform(model: nn.Module, factor: float, example_inputs: Any = None) -> nn.Module:
    """Every hidden channel space x factor; layers are rebuilt fresh with the new sizes."""
    flow = capture(model, example_inputs)
    spaces = channel_spaces(flow)
    wide = copy.deepcopy(model)
    modules = dict(wide.named_modules())
    seen: set[str] = set()
    for op in flow.ops.values():
        if op.module is None or op.module in seen or not op.params:
            continue
        seen.add(op.module)
        if op.name in spaces.opaque:
            raise PlanError(f"widen: {spaces.opaque[op.name]}; pass your own teacher")
        src = op.inputs[0] if op.inputs else op.name
        new_in = _new_width(spaces, src, factor)
        new_out = _new_width(spaces, op.name, factor)
        fresh = _resized(modules[op.module], new_in * spaces.inner.get(src, 1), new_out)
        parent, _, leaf = op.module.rpartition(".")
        setattr(modules[parent] if parent else wide, leaf, fresh)
    _check_no_stale_params(wide, model, seen)
    with torch.no_grad():
        try:
            wide.eval()(*flow_inputs(model, example_inputs))
        except Exception as error:  # noqa: BLE001
            raise PlanError(
                f"widen: the widened model does not run ({error}); does its code hard-code a width?"
            ) from error
    return wide.train(model.training)


def flow_inputs(model: nn.Module, example_inputs: Any) -> tuple[Any, ...]:
    from surgery.capture import as_example_inputs

    return as_example_inputs(model, example_inputs)


def _new_width(spaces: Spaces, op_name: str, factor: float) -> int:
    width = spaces.width[spaces.of(op_name)]
    return width if spaces.is_fixed(op_name) else max(1, math.ceil(width * factor))


def _check_no_stale_params(wide: nn.Module, model: nn.Module, rebuilt: set[str]) -> None:
    for name, _ in model.named_parameters():
        owner = name.rpartition(".")[0]
        if not any(owner == r or owner.startswith(r + ".") for r in rebuilt):
            raise PlanError(
                f"widen: parameter {name} belongs to no layer widen knows; pass your own teacher"
            )


def _resized(m: nn.Module, new_in: int, new_out: int) -> nn.Module:
    """A fresh module like `m` reading `new_in` and writing `new_out` features."""
    device = next(m.parameters()).device
    dtype = next(m.parameters()).dtype
    if isinstance(m, nn.Linear):
        return nn.Linear(new_in, new_out, bias=m.bias is not None, device=device, dtype=dtype)
    if isinstance(m, nn.modules.conv._ConvNd):
        groups = m.groups
        if groups > 1:
            if groups != m.in_channels:
                raise PlanError(f"widen: grouped conv with groups={groups}; pass your own teacher")
            groups = new_in
        return type(m)(
            new_in,
            new_out,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            groups,
            m.bias is not None,
            m.padding_mode,
            device=device,
            dtype=dtype,
        )
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return type(m)(
            new_in, m.eps, m.momentum, m.affine, m.track_running_stats, device=device, dtype=dtype
        )
    if isinstance(m, nn.LayerNorm):
        shape = (*m.normalized_shape[:-1], new_in)
        return nn.LayerNorm(
            shape, m.eps, m.elementwise_affine, m.bias is not None, device=device, dtype=dtype
        )
    if isinstance(m, nn.GroupNorm):
        return nn.GroupNorm(m.num_groups, new_in, m.eps, m.affine, device=device, dtype=dtype)
    if isinstance(m, nn.Embedding):
        return nn.Embedding(m.num_embeddings, new_out, m.padding_idx, device=device, dtype=dtype)
    if isinstance(m, nn.MultiheadAttention):
        return nn.MultiheadAttention(
            new_in,
            m.num_heads,
            m.dropout,
            m.in_proj_bias is not None,
            batch_first=m.batch_first,
            device=device,
            dtype=dtype,
        )
    raise PlanError(f"widen: no rule to widen {type(m).__name__}; pass your own teacher")
