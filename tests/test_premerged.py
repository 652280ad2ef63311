"""Pre-merged training mode: the same function and gradients as the plain paired forward, at the
cost of the thin model plus one small product per pair."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import max_rel_error, randomise_batchnorm
from small_models import tiny_hf_config

import surgery

transformers = pytest.importorskip("transformers")


def _out(o):
    return o.logits if hasattr(o, "logits") else getattr(o, "last_hidden_state", o)


def _models():
    torch.manual_seed(0)  # the same models whatever the test modules collected before this one
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    gpt = tiny_hf_config("gpt2", n_head=2, tie_word_embeddings=False)
    llama = tiny_hf_config("llama")
    return [
        (
            "resnet18",
            randomise_batchnorm(torchvision.models.resnet18(num_classes=10)).eval(),
            (torch.randn(2, 3, 32, 32),),
            {},
        ),
        (
            "gpt2+bias",
            transformers.GPT2LMHeadModel(gpt).eval(),
            (ids,),
            {"bias": True, "sites": "auto"},
        ),
        ("llama", transformers.LlamaForCausalLM(llama).eval(), (ids,), {}),
        (  # packed q/k/v: the pair merges into MultiheadAttention's in_proj_weight
            "mha+bias",
            torch.nn.Sequential(
                torch.nn.Linear(8, 16),
                torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                torch.nn.Linear(16, 4),  # not the LayerNorm's output: its mean square is ~constant
            ).eval(),
            (torch.randn(2, 5, 8),),
            {"bias": True},
        ),
    ]


@pytest.mark.parametrize("name,model,inputs,kwargs", _models(), ids=[m[0] for m in _models()])
def test_premerged_matches_plain_forward_and_gradients(name, model, inputs, kwargs):
    torch.manual_seed(0)
    # eval mode: dropout masks and batch statistics would differ between two forwards
    paired = surgery.insert_pairs(model, inputs, init="random", **kwargs).eval()
    twin = copy.deepcopy(paired)
    merged_layers = [m for m in twin.modules() if "forward" in m.__dict__]
    assert merged_layers, "no layer can merge its pairs"
    if name.startswith("mha"):
        assert any(isinstance(m, torch.nn.MultiheadAttention) for m in merged_layers)
    plain = _out(paired(*inputs))
    with surgery.premerged(twin, "always"):
        merged = _out(twin(*inputs))
    assert max_rel_error(plain, merged) <= 1e-5
    plain.pow(2).mean().backward()
    merged.pow(2).mean().backward()
    grads = {n: p.grad for n, p in paired.named_parameters() if p.grad is not None}
    for n, p in twin.named_parameters():
        if n in grads:
            assert max_rel_error(grads[n], p.grad) <= 1e-4, n
    assert all(p.pairs[s].widen.weight.grad.abs().sum() > 0 for p in [twin] for s in p.pairs)


def test_premerged_training_then_fold_is_exact_and_probes_still_record():
    torch.manual_seed(1)
    model = randomise_batchnorm(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(4, 3, 32, 32)
    paired = surgery.insert_pairs(
        model, (x,), init="random", sites=["layer1", "layer2", "layer4"]
    ).train()
    opt = torch.optim.SGD(paired.parameters(), lr=0.01)
    with surgery.premerged(paired):
        for _ in range(3):
            loss = paired(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        paired.eval()
        with torch.no_grad(), surgery.probe(paired, ["layer2"]) as probes:
            paired(x)
            merged_probe = probes["layer2"].clone()
    assert not any(pair.premerged for pair in paired.pairs.values())  # restored on exit
    with torch.no_grad(), surgery.probe(paired, ["layer2"]) as probes:
        paired(x)
        assert max_rel_error(probes["layer2"], merged_probe) <= 1e-5
        thin = surgery.fold(paired)
        assert max_rel_error(paired(x), thin(x)) <= 1e-5
    assert not any("forward" in m.__dict__ for m in thin.modules())


def test_set_premerged_needs_a_paired_model():
    with pytest.raises(TypeError, match="not a paired model"):
        surgery.set_premerged(torchvision.models.resnet18())


def _mlp_paired(width: int = 64) -> torch.nn.Module:
    torch.manual_seed(2)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU()
    )
    return surgery.insert_pairs(mlp, (torch.randn(2, 8),), init="random", sites=["1"])


@pytest.mark.parametrize("batch,merges", [(2, False), (4096, True)])
def test_auto_policy_merges_only_where_it_pays_and_matches_plain(batch, merges):
    # the pair on the ReLU output folds into the next Linear (64 x 64): merging costs ~64*128*64
    # multiply-adds whatever the batch, running the pair 2*64*128 per row
    paired = _mlp_paired()
    consumer = paired[2]
    x = torch.randn(batch, 8)
    plain = paired(x)
    with surgery.premerged(paired):  # policy "auto"
        merged = paired(x)
        assert consumer.forward.current is merges
    assert max_rel_error(plain, merged) <= 1e-5


def test_the_product_is_formed_once_per_forward_and_shared_by_q_k_v(monkeypatch):
    config = tiny_hf_config("bert", num_attention_heads=2, vocab_size=30522)
    ids = torch.randint(0, 1000, (2, 8))
    paired = surgery.insert_pairs(transformers.BertModel(config).eval(), (ids,), init="random")
    calls = []
    original = surgery.Pair.mixing
    monkeypatch.setattr(surgery.Pair, "mixing", lambda self: calls.append(self) or original(self))
    plain = paired(ids).last_hidden_state
    with surgery.premerged(paired, "always"):
        merged = paired(ids).last_hidden_state
        assert calls and len(calls) == len(set(map(id, calls)))  # one W per pair per forward
        calls.clear()
        paired(ids)
        assert len(calls) == len(set(map(id, calls)))  # a new forward forms new products
    assert max_rel_error(plain, merged) <= 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_pairs_keep_the_activation_layout(channels_last):
    # a pair must not switch a CNN to channels-last (or back): every later layer would see new strides
    torch.manual_seed(3)
    model = randomise_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    if channels_last:
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.to(memory_format=torch.channels_last),
        )
    layout = torch.channels_last if channels_last else torch.contiguous_format
    paired = surgery.insert_pairs(model, (x,), init="random")
    seen = []
    for module in paired.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_pre_hook(
                lambda m, a: seen.append(a[0].is_contiguous(memory_format=layout))
            )
    for policy in (False, "always"):
        seen.clear()
        surgery.set_premerged(paired, policy)
        paired(x)
        assert seen and all(seen), policy
