"""Stage 1 of WIN: build the wide teacher B from the thin student S.

- torchvision ResNets with Bottleneck blocks: the paper's choice, the 3x3 convs widened and the 1x1
  convs keeping the widened size (`width_per_group` x factor); block outputs keep their width.
- Hugging Face configs (BERT, GPT-2, LLaMA, ...): hidden size, FFN width and heads x factor.
- anything else: every free width group x factor (surgery.analysis.widths: residual streams stay lined up,
  the model's input channels and output features stay).
The teacher is freshly initialised (train it, or pass an existing trained big model instead).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from surgery.analysis import widths
from surgery.errors import PlanError

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
    return widths.widen(model, factor, example_inputs)


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
