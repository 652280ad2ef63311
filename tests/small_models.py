"""Small models shared by the width-transform tests (fast on 2 CPU cores)."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """A ResNet BasicBlock: conv-BN-ReLU-conv-BN plus a (projected) skip, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + (x if self.down is None else self.down(x)))


class SmallResNet(nn.Module):
    """Stem, two stages of two BasicBlocks (width w, 2w), global pooling, a Linear head."""

    def __init__(self, width: int = 8, classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(Block(width, width), Block(width, width))
        self.layer2 = nn.Sequential(Block(width, 2 * width, 2), Block(2 * width, 2 * width))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = self.layer2(self.layer1(h))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def mlp(sizes: list[int], bias: bool = True) -> nn.Sequential:
    """Linear-ReLU-...-Linear through `sizes`."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm that also applies an activation in its forward (as timm's BatchNormAct2d does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def bn_act_net() -> nn.Sequential:
    """conv -> BatchNormAct -> max-pool -> conv -> pool -> linear: a pair after the BatchNormAct
    could only fold on the producer side, through the activation (it must not)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        BatchNormAct(8),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


# The tests' one builder of small Hugging Face configs: per family its class and tiny defaults
# (every test passes only what it changes, in the family's own field names).
TINY_HF = {
    "bert": ("BertConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, vocab_size=1000)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=1000,
                                bos_token_id=0, eos_token_id=0)),
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)),
    "mixtral": ("MixtralConfig", dict(vocab_size=100, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2)),
    "bart": ("BartConfig", dict(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1,
                                encoder_attention_heads=4, decoder_attention_heads=4,
                                encoder_ffn_dim=64, decoder_ffn_dim=64)),
}  # fmt: skip


def tiny_hf_config(family: str, **fields):
    """A small Hugging Face config of `family` (see TINY_HF; no KV cache) with `fields` changed."""
    import transformers

    name, defaults = TINY_HF[family]
    return getattr(transformers, name)(**{**defaults, "use_cache": False, **fields})
