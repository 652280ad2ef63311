"""Transformers: Hugging Face BERT / GPT-2 / LLaMA, timm and torchvision ViTs, nn.TransformerEncoder.

All built from small configs with random weights; random non-identity pairs everywhere."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import max_rel_error
from small_models import tiny_hf_config
from torch import nn

import surgery

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

IDS = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))


def bert(layers=4):
    config = tiny_hf_config(
        "bert", hidden_size=128, num_hidden_layers=layers, intermediate_size=256
    )
    return transformers.BertModel(config).eval()


def gpt2(tied=True):
    config = tiny_hf_config("gpt2", n_embd=64, n_layer=4, tie_word_embeddings=tied)
    return transformers.GPT2LMHeadModel(config).eval()


def llama():
    config = tiny_hf_config("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    return transformers.LlamaForCausalLM(config).eval()


def _main(output):
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def _fold_exact(model, inputs, fresh, *, onnx=True, **kwargs):
    """random pairs -> fold: exact in fp32, strict load into a fresh instance, ONNX Runtime agrees."""
    paired = surgery.insert_pairs(model, inputs, init="random", **kwargs).eval()
    thin = surgery.fold(paired)
    assert type(thin) is type(model)
    with torch.no_grad():
        a, b, original = paired(*inputs), thin(*inputs), model(*inputs)
    a, b, original = (_main(o) if not isinstance(o, torch.Tensor) else o for o in (a, b, original))
    assert max_rel_error(a, b) <= 1e-5
    assert max_rel_error(a, original) > 1e-3  # the random pairs really changed the function
    fresh().load_state_dict(thin.state_dict(), strict=True)
    if onnx:
        report = surgery.verify(paired, thin, inputs)
        assert report.ok and report.same_ops, str(report)
    return paired, thin


def test_bert_pair_between_every_two_blocks_folds_into_qkv():
    model = bert()
    table = surgery.find_blocks(model, (IDS,))
    for i in range(3):
        route = table.get(f"encoder.layer.{i}").route
        assert route.kind == "consumer"
        prefix = f"encoder.layer.{i + 1}.attention.self"
        assert route.absorbed_by == [
            f"{prefix}.query.weight",
            f"{prefix}.key.weight",
            f"{prefix}.value.weight",
        ]
    _fold_exact(model, (IDS,), bert, sites=[f"encoder.layer.{i}" for i in range(3)], bias=True)


def test_gpt2_tied_embeddings_refused_by_name_and_in_block_sites_fold(tmp_path):
    model = gpt2(tied=True)
    table = surgery.find_blocks(model, (IDS,))
    wte = table.get("transformer.wte")
    assert not wte.foldable and "transformer.wte.weight is tied to lm_head.weight" in wte.reason
    assert "lm_head.weight is tied to transformer.wte.weight" in table.get("transformer").reason
    block = table.get("transformer.h.0")  # pre-LN: the stream feeds only a norm and an add
    assert not block.foldable and block.probe is not None and "normalises" in block.reason
    assert table.get("transformer.h.1.ln_1").route.absorbed_by == [
        "transformer.h.1.attn.c_attn.weight"
    ]
    assert (
        table.get("transformer.h.1.attn.c_proj").route.kind == "producer"
    )  # HF Conv1D, [in, out] weight
    paired, thin = _fold_exact(model, (IDS,), gpt2, probes=[f"transformer.h.{i}" for i in range(4)])
    with torch.no_grad(), surgery.probe(paired, ["transformer.h.2"]) as probes:
        paired(IDS)
        assert probes["transformer.h.2"].shape == (2, 16, 128)
    thin.save_pretrained(tmp_path)
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, thin(IDS).logits)


def test_gpt2_untied_embedding_sum_folds_into_both_tables():
    model = gpt2(tied=False)
    table = surgery.find_blocks(model, (IDS,))
    total = next(
        b for b in table if b.route is not None and b.route.kind == "producer embedding sum"
    )
    assert total.route.absorbed_by == ["transformer.wte.weight", "transformer.wpe.weight"]
    _fold_exact(model, (IDS,), lambda: gpt2(tied=False), sites=[total.name], bias=True, onnx=False)


def test_llama_grouped_query_attention_folds():
    model = llama()
    table = surgery.find_blocks(model, (IDS,))
    norm = table.get("model.layers.1.input_layernorm").route
    assert norm.absorbed_by == [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"]
    assert model.model.layers[1].self_attn.k_proj.out_features == 32  # 2 kv heads of 16
    assert table.get("model.layers.1.mlp").route.absorbed_by == [
        "model.layers.1.mlp.down_proj.weight"
    ]
    _fold_exact(model, (IDS,), llama)


def timm_vit():
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10
    ).eval()


def test_timm_vit_folds():
    model = timm_vit()
    x = torch.randn(2, 3, 32, 32)
    table = surgery.find_blocks(model, (x,))
    assert table.get("blocks.0.norm1").route.absorbed_by == [
        "blocks.0.attn.qkv.weight"
    ]  # fused qkv
    assert not table.get("blocks.0").foldable and table.get("blocks.0").probe is not None
    _fold_exact(model, (x,), timm_vit)


def torchvision_vit():
    return torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=10,
    ).eval()


def test_torchvision_vit_multihead_attention_folds():
    model = torchvision_vit()
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head
    x = torch.randn(2, 3, 32, 32)
    table = surgery.find_blocks(model, (x,))
    ln_1 = table.get("encoder.layers.encoder_layer_0.ln_1").route
    assert ln_1.absorbed_by == ["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"]
    _fold_exact(model, (x,), torchvision_vit, onnx=False)


class EncoderModel(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_transformer_encoder_packed_in_proj_folds(batch_first, bias):
    model = EncoderModel(batch_first).eval()
    x = torch.randn(2, 5, 8)
    table = surgery.find_blocks(model, (x,))
    assert table.get("enc.layers.0").route.absorbed_by == ["enc.layers.1.self_attn.in_proj_weight"]
    _fold_exact(
        model, (x,), lambda: EncoderModel(batch_first), bias=bias, onnx=batch_first and not bias
    )


def test_mixture_of_experts_gets_attention_sites_and_folds_exactly():
    """A rank-0 transpose on the router path once crashed capture; the attention sites fold."""
    config = tiny_hf_config("mixtral")
    model = transformers.MixtralForCausalLM(config).eval()
    ids = IDS[:, :8] % 100
    table = surgery.find_blocks(model, (ids,))
    assert {"model.layers.0.self_attn", "model.layers.1.input_layernorm"} <= {
        b.name for b in table.foldable
    }
    paired = surgery.insert_pairs(model, (ids,), init="random").eval()
    thin = surgery.fold(paired)
    with torch.no_grad():
        assert max_rel_error(paired(ids).logits, thin(ids).logits) <= 1e-5
        assert max_rel_error(model(ids).logits, thin(ids).logits) > 1e-4


def test_encoder_decoder_refusal_names_why():
    config = tiny_hf_config("bart")
    model = transformers.BartForConditionalGeneration(config).eval()
    ids = IDS[:, :8] % 100
    with pytest.raises(surgery.PlanError, match=r"no tensor carries all the activation flow"):
        surgery.insert_pairs(model, (ids,))
    assert "encoder-decoder" in str(surgery.find_blocks(model, (ids,)))
