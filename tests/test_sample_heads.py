"""The sampled start of attention models (surgery.win.spaces): whole heads, one residual-stream
subset for every block, packed qkv and grouped-query attention kept consistent."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from small_models import tiny_hf_config
from torch import nn

from surgery import win

TOKENS = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))


def llama(hidden: int, heads: int, kv: int) -> nn.Module:
    config = tiny_hf_config(
        "llama", vocab_size=40, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=heads, num_key_value_heads=kv,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def gpt2(hidden: int, heads: int) -> nn.Module:
    config = tiny_hf_config("gpt2", vocab_size=40, n_embd=hidden, n_head=heads, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def bert(hidden: int, heads: int) -> nn.Module:
    config = tiny_hf_config(
        "bert", vocab_size=40, hidden_size=hidden, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=16,
    )  # fmt: skip
    return transformers.BertModel(config)


class PreLN(nn.Module):
    """A user's own pre-LN transformer block stack built from nn.Linear (separate q, k, v)."""

    def __init__(self, hidden: int, heads: int, layers: int = 2, vocab: int = 40):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.ModuleDict(
                dict(
                    norm1=nn.LayerNorm(hidden),
                    q=nn.Linear(hidden, hidden),
                    k=nn.Linear(hidden, hidden),
                    v=nn.Linear(hidden, hidden),
                    out=nn.Linear(hidden, hidden),
                    norm2=nn.LayerNorm(hidden),
                    up=nn.Linear(hidden, 3 * hidden),
                    down=nn.Linear(3 * hidden, hidden),
                )
            )
            self.blocks.append(block)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, t, _ = x.shape
        for blk in self.blocks:
            h = blk["norm1"](x)
            q, k, v = (blk[n](h).view(b, t, self.heads, -1).transpose(1, 2) for n in "qkv")
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk["out"](a.transpose(1, 2).reshape(b, t, -1))
            x = x + blk["down"](F.gelu(blk["up"](blk["norm2"](x))))
        return self.head(self.norm(x))


FAMILIES = {
    "llama-gqa": (lambda: llama(32, 4, 2), lambda: llama(64, 8, 4)),
    "gpt2": (lambda: gpt2(32, 4), lambda: gpt2(64, 8)),
    "bert": (lambda: bert(32, 4), lambda: bert(64, 8)),
    "own-pre-ln": (lambda: PreLN(32, 4), lambda: PreLN(64, 8)),
}


def _output(model: nn.Module) -> torch.Tensor:
    out = model(TOKENS)
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_of_equal_width_is_sampled_exactly(family):
    _, make_teacher = FAMILIES[family]
    torch.manual_seed(0)
    teacher, student = make_teacher().eval(), make_teacher().eval()
    win.sample_from_teacher(student, teacher, (TOKENS,), generator=torch.Generator().manual_seed(3))
    for name, value in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[name], value), name
    assert torch.equal(_output(student), _output(teacher))


def _indexed(model: nn.Module) -> nn.Module:
    """Every entry of every weight encodes its own (row, column): 1000*row + column."""
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            rows = torch.arange(p.shape[0], dtype=torch.float64)
            if p.dim() == 1:
                p.copy_(rows)
            else:
                p.copy_(1000 * rows[:, None] + torch.arange(p.shape[1], dtype=torch.float64))
    return model


def _rows(w: torch.Tensor) -> torch.Tensor:
    return (w[:, 0] // 1000).long()


def _cols(w: torch.Tensor) -> torch.Tensor:
    return (w[0] % 1000).round().long()


def _heads(idx: torch.Tensor, size: int) -> list[int]:
    """Teacher head of each student head, checking each student head is one whole teacher head."""
    blocks = idx.view(-1, size)
    assert torch.equal(blocks - blocks[:, :1], torch.arange(size).expand_as(blocks))
    assert (blocks[:, 0] % size == 0).all()
    return (blocks[:, 0] // size).tolist()


@pytest.mark.parametrize(
    "seed, select", [(0, "energy"), (1, "random"), (2, "random"), (3, "random")]
)
def test_llama_gqa_heads_stay_whole_and_grouped(seed, select):
    teacher = _indexed(llama(64, 8, 2))  # 4 query heads per key/value head
    student = llama(32, 4, 1).double()  # 4 query heads over 1 key/value head
    win.sample_from_teacher(
        student, teacher, (TOKENS,), generator=torch.Generator().manual_seed(seed), select=select
    )
    residual = None
    for layer in student.model.layers:
        attn = layer.self_attn
        q, k, v = (
            _heads(_rows(getattr(attn, n).weight), 8) for n in ("q_proj", "k_proj", "v_proj")
        )
        o = _heads(_cols(attn.o_proj.weight), 8)
        assert q == o and k == v
        assert [h // 4 for h in q] == [k[i // 4] for i in range(len(q))]
        for w in (attn.q_proj.weight, attn.k_proj.weight, layer.mlp.up_proj.weight):
            cols = _cols(w)
            residual = cols if residual is None else residual
            assert torch.equal(cols, residual)  # one residual-stream subset for every block
        assert torch.equal(_rows(attn.o_proj.weight), residual)
        assert torch.equal(layer.input_layernorm.weight.long(), residual)
        assert torch.equal(_rows(layer.mlp.gate_proj.weight), _rows(layer.mlp.up_proj.weight))
        assert torch.equal(_cols(layer.mlp.down_proj.weight), _rows(layer.mlp.up_proj.weight))
    assert len(set(residual.tolist())) == 32


def test_gpt2_packed_qkv_takes_the_same_heads_from_each_part():
    teacher = _indexed(gpt2(64, 8))
    student = gpt2(32, 4).double()
    win.sample_from_teacher(student, teacher, (TOKENS,), generator=torch.Generator().manual_seed(1))
    for block in student.transformer.h:
        cols = _cols(block.attn.c_attn.weight)  # Conv1D [in, out]: the output index is the column
        q, k, v = cols[:32], cols[32:64] - 64, cols[64:] - 128
        assert (
            _heads(q, 8)
            == _heads(k, 8)
            == _heads(v, 8)
            == _heads(_rows(block.attn.c_proj.weight), 8)
        )


def test_narrower_heads_take_dims_within_each_head_with_their_rotary_partners():
    """Equal head counts, heads half as wide: every head is kept and takes the same dims within
    it; rotary embedding rotates dim i with dim i + hd/2, so those stay pairs."""
    teacher = _indexed(llama(64, 8, 4))  # heads of 8
    student = llama(32, 8, 4).double()  # heads of 4
    win.sample_from_teacher(student, teacher, (TOKENS,), select="random")
    for layer in student.model.layers:
        for name in ("q_proj", "k_proj"):
            rows = _rows(getattr(layer.self_attn, name).weight).view(-1, 4)
            assert torch.equal(rows[:, 0] // 8, torch.arange(rows.shape[0]))  # every head, once
            within = rows % 8
            assert (within == within[:1]).all()  # the same dims in every head
            assert torch.equal(within[0, 2:], within[0, :2] + 4)  # rotary partners together


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_half_width_student_runs(family):
    make_student, make_teacher = FAMILIES[family]
    student, teacher = make_student().eval(), make_teacher().eval()
    win.sample_from_teacher(student, teacher, (TOKENS,), refit=(TOKENS,))
    assert torch.isfinite(_output(student)).all()


def test_energy_selection_keeps_the_teachers_loudest_features_and_heads():
    """select="energy": the residual features and the heads whose inputs carry the most energy in the
    teacher are the ones the student takes (here made 100x louder than the rest)."""
    torch.manual_seed(0)
    teacher, student = gpt2(64, 8).eval(), gpt2(32, 4).eval()
    loud = [3, 17, 40, 41, 60]
    with torch.no_grad():
        teacher.transformer.wte.weight[:, loud] *= 100
        for block in teacher.transformer.h:  # value head 5: its output columns of the packed c_attn
            block.attn.c_attn.weight[:, 128 + 5 * 8 : 128 + 6 * 8] *= 100
    win.sample_from_teacher(student, teacher, (TOKENS,), select="energy")
    quiet = teacher.transformer.wte.weight.abs().median()
    loud_columns = student.transformer.wte.weight.abs().mean(0) > 10 * quiet
    assert int(loud_columns.sum()) == len(loud)  # every loud residual feature, once
    for block in student.transformer.h:
        v_heads = block.attn.c_attn.weight[:, 64:].reshape(32, 4, 8).norm(dim=(0, 2))
        assert v_heads.max() > 10 * v_heads.median()  # the loud value head was taken
