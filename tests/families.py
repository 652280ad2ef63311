"""The model families WIN must run on, as users have them: Hugging Face models with their default
configs (`use_cache=True`, dropout on, tied embeddings), timm, and hand-written modules in the
layouts people write attention and convolutions in. Each builder takes a width and returns a model;
`FAMILIES[name]` gives (builder, example inputs, batches)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ, CLASSES = 48, 12, 4


def tokens(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def lm_batches(n: int = 4, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Next-token batches from a fixed random bigram rule (learnable, not trivial)."""
    g = torch.Generator().manual_seed(1)
    table = torch.randint(0, VOCAB, (VOCAB,), generator=g)
    out = []
    for _ in range(n):
        ids = torch.empty(batch, SEQ + 1, dtype=torch.long)
        ids[:, 0] = torch.randint(0, VOCAB, (batch,), generator=g)
        for t in range(SEQ):
            noise = torch.randint(0, VOCAB, (batch,), generator=g)
            keep = torch.rand(batch, generator=g) < 0.8
            ids[:, t + 1] = torch.where(keep, table[ids[:, t]], noise)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def class_batches(make_x: Callable[[int, int], torch.Tensor], n: int = 4, batch: int = 8):
    """Inputs labelled by a fixed random linear rule on their values."""
    out = []
    for i in range(n):
        x = make_x(batch, 100 + i)
        flat = x.float().flatten(1)
        w = torch.randn(flat.shape[1], CLASSES, generator=torch.Generator().manual_seed(7))
        out.append((x, (flat @ w).argmax(1)))
    return out


# ---- Hugging Face, default configs but small ----


def hf_gpt2(width: int = 32, heads: int = 4) -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=width, n_layer=2, n_head=heads
    )
    return transformers.GPT2LMHeadModel(config)


def hf_llama(width: int = 32, heads: int = 4, kv: int = 2) -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32,
        tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def hf_bert_classifier(width: int = 32, heads: int = 4) -> nn.Module:
    import transformers

    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=width, num_hidden_layers=2, num_attention_heads=heads,
        intermediate_size=2 * width, max_position_embeddings=32, num_labels=CLASSES,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def hf_vit(width: int = 32, heads: int = 4) -> nn.Module:
    import transformers

    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=width, num_hidden_layers=2,
        num_attention_heads=heads, intermediate_size=2 * width, num_labels=CLASSES,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


def timm_vit(width: int = 32, heads: int = 4) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=16, patch_size=4, embed_dim=width, depth=2, num_heads=heads, mlp_ratio=2.0,
        num_classes=CLASSES,
    )  # fmt: skip


# ---- hand-written attention, in the layouts people write ----


class NanoAttention(nn.Module):
    """nanoGPT's attention: one packed projection split into q, k, v, each viewed into heads."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.n_head, self.n_embd = heads, width
        self.resid_dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class ComputedSplitAttention(NanoAttention):
    """nanoGPT's attention with the split sizes computed from the activation's shape, as users
    write it: x.split(C, 2), x.split([C, C, C], 2), x.tensor_split(3, 2) or at [C, 2 * C], slices x[..., C:2 * C]
    or x.narrow(2, C, C) (C from x.shape)."""

    def __init__(self, width: int, heads: int, how: str = "split"):
        super().__init__(width, heads)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x)
        if self.how == "split":
            q, k, v = qkv.split(qkv.shape[-1] // 3, dim=2)
        elif self.how == "list":
            q, k, v = qkv.split([C, C, C], dim=2)
        elif self.how == "tensor_split":
            q, k, v = qkv.tensor_split(3, dim=2)
        elif self.how == "tensor_split_at":
            q, k, v = qkv.tensor_split([C, 2 * C], dim=2)
        elif self.how == "slice":
            q, k, v = qkv[..., :C], qkv[:, :, C : 2 * C], qkv[..., 2 * C :]
        else:
            q, k, v = (qkv.narrow(2, i * C, C) for i in range(3))
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class PackedViewAttention(nn.Module):
    """timm's / minGPT's attention: qkv(x).view(B, T, 3, h, hd).permute(2, 0, 3, 1, 4), unbound."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        att = (q @ k.transpose(-2, -1)) * (k.size(-1) ** -0.5)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        return self.proj(y)


class Mlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class GPTBlock(nn.Module):
    def __init__(self, width: int, heads: int, attention: type[nn.Module]):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn, self.mlp = attention(width, heads), Mlp(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OwnGPT(nn.Module):
    """A user's pre-LN GPT: token embedding, learned positions as a raw nn.Parameter (as in timm's
    pos_embed and minGPT), blocks, final norm, a head tied to the embedding."""

    def __init__(
        self, width: int = 32, heads: int = 4, attention: type[nn.Module] = NanoAttention,
        layers: int = 2,
    ):  # fmt: skip
        super().__init__()
        self.wte = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(0.02 * torch.randn(1, 32, width))
        self.drop = nn.Dropout(0.1)
        self.h = nn.ModuleList(GPTBlock(width, heads, attention) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.wte(idx) + self.pos[:, : idx.shape[1]])
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def nano_gpt(width: int = 32, heads: int = 4) -> nn.Module:
    return OwnGPT(width, heads, NanoAttention)


def packed_view_gpt(width: int = 32, heads: int = 4) -> nn.Module:
    return OwnGPT(width, heads, PackedViewAttention)


# ---- convolutional nets without BatchNorm ----


class ConvNet(nn.Module):
    """A residual CNN whose norm is GroupNorm (`groups`) or nothing (None)."""

    def __init__(self, width: int = 8, groups: int | None = 2, depth: int = 2):
        super().__init__()

        def norm(c: int) -> nn.Module:
            return nn.GroupNorm(groups, c) if groups else nn.Identity()

        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), norm(width), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, 2 * width, 3, padding=1),
                norm(2 * width),
                nn.ReLU(),
                nn.Conv2d(2 * width, width, 3, padding=1),
                norm(width),
            )  # fmt: skip
            for _ in range(depth)
        )
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(x.mean((2, 3)))


def groupnorm_cnn(width: int = 8) -> nn.Module:
    return ConvNet(width, groups=2)


def plain_cnn(width: int = 8) -> nn.Module:
    return ConvNet(width, groups=None)


@dataclass
class Family:
    """How to build a family's student (`build(width)`), its example inputs and training batches,
    the student's width, and the teacher of wider heads (same head count) where it has heads."""

    build: Callable[..., nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    batches: Callable[[], list]
    width: int = 32


def _lm() -> tuple[torch.Tensor, ...]:
    return (tokens(),)


def _img() -> tuple[torch.Tensor, ...]:
    return (images(),)


FAMILIES: dict[str, Family] = {
    "hf-gpt2": Family(hf_gpt2, _lm, lm_batches),
    "hf-llama": Family(hf_llama, _lm, lm_batches),
    "hf-bert-cls": Family(hf_bert_classifier, _lm, lambda: class_batches(tokens_like)),
    "hf-vit": Family(hf_vit, _img, lambda: class_batches(images_like)),
    "timm-vit": Family(timm_vit, _img, lambda: class_batches(images_like)),
    "nano-gpt": Family(nano_gpt, _lm, lm_batches),
    "packed-view-gpt": Family(packed_view_gpt, _lm, lm_batches),
    "groupnorm-cnn": Family(groupnorm_cnn, _img, lambda: class_batches(images_like), width=8),
    "plain-cnn": Family(plain_cnn, _img, lambda: class_batches(images_like), width=8),
}


def tokens_like(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def images_like(n: int, seed: int) -> torch.Tensor:
    return images(n, seed=seed)


# ---- more layouts of the same classes (beyond the list) ----


class EinsumAttention(nn.Module):
    """Separate q, k, v, heads by einsum; a raw-parameter output projection `y @ self.w_o`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width, bias=False) for _ in range(3))
        self.w_o = nn.Parameter(torch.randn(width, width) / width**0.5)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = self.heads
        q, k, v = (f(x).reshape(B, T, h, C // h) for f in (self.q, self.k, self.v))
        att = torch.einsum("bihd,bjhd->bhij", q, k).softmax(-1)
        y = torch.einsum("bhij,bjhd->bihd", att, v).reshape(B, T, C)
        return y @ self.w_o


class MultiQueryAttention(nn.Module):
    """One key/value head shared by every query head (expand, then attention)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * self.head_dim)
        self.o = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 1, 2 * self.head_dim).transpose(1, 2).chunk(2, dim=-1)
        k, v = (t.expand(B, self.heads, T, self.head_dim) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class RMSNorm(nn.Module):
    """A user's own RMSNorm, written out (not a known layer: traced into)."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


class ScaledBlock(nn.Module):
    """Pre-norm block with a custom RMSNorm and layer scales (raw parameters times activations)."""

    def __init__(self, width: int, heads: int, attention: type[nn.Module]):
        super().__init__()
        self.n1, self.n2 = RMSNorm(width), RMSNorm(width)
        self.attn, self.mlp = attention(width, heads), Mlp(width)
        self.g1 = nn.Parameter(torch.full((width,), 0.1))
        self.g2 = nn.Parameter(torch.full((width,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.g1 * self.attn(self.n1(x))
        return x + self.g2 * self.mlp(self.n2(x))


class TokenGPT(nn.Module):
    """Class token and two register tokens concatenated on the sequence axis, learned positions,
    blocks of `attention`, a classifier on the class token."""

    def __init__(
        self, width: int = 32, heads: int = 4, attention: type[nn.Module] = EinsumAttention
    ):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.reg = nn.Parameter(torch.zeros(1, 2, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, SEQ + 3, width))
        self.blocks = nn.ModuleList(ScaledBlock(width, heads, attention) for _ in range(2))
        self.norm = RMSNorm(width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        B = x.shape[0]
        x = torch.cat([self.cls.expand(B, -1, -1), self.reg.expand(B, -1, -1), x], 1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class Mixer(nn.Module):
    """MLP-Mixer: token mixing by a Linear over the (transposed) sequence axis."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.tokens = nn.Sequential(nn.Linear(SEQ, 2 * SEQ), nn.GELU(), nn.Linear(2 * SEQ, SEQ))
        self.channels = Mlp(width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = x + self.tokens(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.channels(self.ln2(x))
        return self.head(x.mean(1))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.down, self.up = nn.Conv2d(c, max(c // 4, 1), 1), nn.Conv2d(max(c // 4, 1), c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.up(F.relu(self.down(x.mean((2, 3), keepdim=True)))))


class DenseSENet(nn.Module):
    """Channel concatenation (DenseNet), grouped convs (ResNeXt), depthwise convs and
    squeeze-excitation gating, BatchNorm."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.grow = nn.Sequential(
            nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, groups=2)
        )
        self.depthwise = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width)
        self.se = SqueezeExcite(2 * width)
        self.head = nn.Linear(2 * width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.grow(x)], 1)
        x = self.se(F.relu(self.depthwise(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TorchEncoder(nn.Module):
    """torch.nn.TransformerEncoder (packed in_proj_weight, nn.MultiheadAttention)."""

    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


def token_gpt(width: int = 32) -> nn.Module:
    return TokenGPT(width, 4, EinsumAttention)


def mqa_token_gpt(width: int = 32) -> nn.Module:
    return TokenGPT(width, 4, MultiQueryAttention)


MORE_FAMILIES: dict[str, Family] = {
    "einsum-tokens-layerscale": Family(token_gpt, _lm, lambda: class_batches(tokens_like)),
    "multi-query": Family(mqa_token_gpt, _lm, lambda: class_batches(tokens_like)),
    "mlp-mixer": Family(Mixer, _lm, lambda: class_batches(tokens_like)),
    "dense-grouped-se-cnn": Family(DenseSENet, _img, lambda: class_batches(images_like), width=8),
    "torch-transformer": Family(TorchEncoder, _lm, lambda: class_batches(tokens_like)),
}
