"""Each fold rule's `check` on small hand-built dataflows (no model, no capture): it accepts what its
algebra folds exactly and names the reason for everything else; `fold` gives the targets in the
order they must run. The property tests beside these prove the algebra on real models."""

from __future__ import annotations

import pytest
from surgery.rewrites import CONSUMER_RULES, PRODUCER_RULES
from surgery.rewrites.attention import PackedAttentionConsumer
from surgery.rewrites.batchnorm import BatchNormProducer
from surgery.rewrites.common import RuleContext
from surgery.rewrites.conv_transpose import ConvTransposeConsumer, ConvTransposeProducer
from surgery.rewrites.embedding import EmbeddingProducer, EmbeddingSumProducer
from surgery.rewrites.linear_conv import LayerConsumer, LayerProducer

from surgery.ir.graph import Dataflow, Layout, Op


def _flow(*ops: Op, calls: dict[str, int] | None = None, aliases=None) -> Dataflow:
    x = Op("x", "input", "input", shape=(2, 8, 4, 4))
    table = {op.name: op for op in (x, *ops)}
    return Dataflow(
        ops=table,
        inputs=["x"],
        side_inputs=[],
        outputs=[ops[-1].name],
        method="hand-built",
        model_class="Net",
        module_calls={op.module: 1 for op in ops if op.module} | (calls or {}),
        scope_types={},
        module_kinds={},
        param_aliases=aliases or {},
        example_shapes=[(2, 8, 4, 4)],
    )


def _layer(name: str, kind: str, inputs=("x",), bias=True, shape=(2, 8, 4, 4), **attrs) -> Op:
    params = {"weight": f"{name}.weight"} | ({"bias": f"{name}.bias"} if bias else {})
    return Op(name, kind, kind, list(inputs), shape, module=name, params=params, attrs=attrs)


def _ctx(flow: Dataflow, bias: bool = False) -> RuleContext:
    return RuleContext(flow, bias)


CONV = dict(groups=1, padding=(0, 0), padding_mode="zeros", kernel_size=(3, 3))
CHANNELS = Layout(axis=1, d=8)


def test_every_rule_module_is_collected():
    assert {type(r) for r in CONSUMER_RULES} >= {
        LayerConsumer,
        PackedAttentionConsumer,
        ConvTransposeConsumer,
    }
    assert {type(r) for r in PRODUCER_RULES} >= {
        LayerProducer,
        BatchNormProducer,
        EmbeddingProducer,
        EmbeddingSumProducer,
        ConvTransposeProducer,
    }


def test_layer_consumer_check_and_order_of_targets():
    conv = _layer("conv", "conv", **CONV)
    flow = _flow(conv)
    rule = LayerConsumer()
    assert rule.check(conv, CHANNELS, _ctx(flow)) is None
    assert "contracts axis 1" in rule.check(conv, Layout(axis=2, d=4), _ctx(flow))
    grouped = _layer("conv", "conv", **{**CONV, "groups": 2})
    assert "groups=2" in rule.check(grouped, CHANNELS, _ctx(_flow(grouped)))
    padded = _layer("conv", "conv", **{**CONV, "padding": (1, 1)})
    assert "zero-padded" in rule.check(padded, CHANNELS, _ctx(_flow(padded), bias=True))
    no_bias = _layer("conv", "conv", bias=False, **CONV)
    assert "no bias" in rule.check(no_bias, CHANNELS, _ctx(_flow(no_bias), bias=True))
    # the pair bias reads the weight before W does: input_bias first, then input_weight
    fold = rule.fold(conv, CHANNELS, _ctx(flow, bias=True))
    assert [t.rule for t in fold.targets] == ["input_bias", "input_weight"]
    assert fold.absorbed == ["conv.weight"] and fold.placements[0].where == "input"


def test_shared_and_tied_weights_are_refused_by_every_rule():
    conv = _layer("conv", "conv", **CONV)
    twice = _flow(conv, calls={"conv": 2})
    assert "called 2 times" in LayerConsumer().check(conv, CHANNELS, _ctx(twice))
    assert "called 2 times" in LayerProducer().check(conv, _ctx(twice))
    tied = _flow(conv, aliases={"conv.weight": ["other.weight"]})
    assert "tied to other.weight" in LayerProducer().check(conv, _ctx(tied))
    function = Op("f", "linear", "linear", ["x"], (2, 8), params={"weight": "w"})
    assert "function call" in LayerProducer().check(function, _ctx(_flow(function)))


def test_layer_producer_needs_a_bias_for_a_pair_bias():
    linear = _layer("fc", "linear", bias=False, shape=(2, 8))
    assert LayerProducer().check(linear, _ctx(_flow(linear))) is None
    assert "no bias" in LayerProducer().check(linear, _ctx(_flow(linear), bias=True))
    fold = LayerProducer().fold(_layer("fc", "linear", shape=(2, 8)), _ctx(_flow(linear)))
    assert [t.rule for t in fold.targets] == ["output_weight", "output_bias"]


def test_batchnorm_producer_needs_a_layer_it_alone_reads():
    conv = _layer("conv", "conv", **CONV)
    bn = Op(
        "bn",
        "batch_norm",
        "BatchNorm2d",
        ["conv"],
        (2, 8, 4, 4),
        module="bn",
        params={r: f"bn.{r}" for r in ("weight", "bias", "running_mean", "running_var")},
        attrs={"eps": 1e-5, "affine": True, "track_running_stats": True},
    )
    rule = BatchNormProducer()
    assert rule.check(bn, _ctx(_flow(conv, bn))) is None
    fold = rule.fold(bn, _ctx(_flow(conv, bn)))
    assert fold.targets[0].params["producer_weight"] == "conv.weight" and fold.notes
    relu = Op("relu", "nonlinear", "relu", ["conv"], (2, 8, 4, 4))
    both = _flow(conv, relu, bn)
    assert "also feeds other ops" in rule.check(bn, _ctx(both))
    plain = Op("bn", "batch_norm", "BatchNorm2d", ["x"], module="bn", params=bn.params)
    plain.attrs = {"affine": False, "track_running_stats": True}
    assert "no affine parameters" in rule.check(plain, _ctx(_flow(plain)))


def test_embedding_rules():
    table = Op("emb", "embedding", "Embedding", ["x"], (2, 8, 16), module="emb")
    table.params = {"weight": "emb.weight"}
    assert EmbeddingProducer().check(table, _ctx(_flow(table))) is None
    renorm = Op("emb", "embedding", "Embedding", ["x"], module="emb", attrs={"max_norm": 1.0})
    renorm.params = {"weight": "emb.weight"}
    assert "max_norm" in EmbeddingProducer().check(renorm, _ctx(_flow(renorm)))
    pos = Op("pos", "embedding", "Embedding", ["x"], (2, 8, 16), module="pos")
    pos.params = {"weight": "pos.weight"}
    total = Op("sum", "add", "add", ["emb", "pos"], (2, 8, 16))
    fold = EmbeddingSumProducer().fold(total, _ctx(_flow(table, pos, total), bias=True))
    assert [t.add_bias for t in fold.targets] == [True, False]  # the pair bias goes in once
    relu = Op("relu", "nonlinear", "relu", ["x"], (2, 8, 16))
    residual = Op("res", "add", "add", ["relu", "emb"], (2, 8, 16))
    flow = _flow(table, relu, residual)
    assert "residual add" in EmbeddingSumProducer().check(residual, _ctx(flow))


def test_packed_attention_consumer_only_for_self_attention():
    attn = Op("attn", "attention", "MultiheadAttention", ["x"], (2, 8, 16), module="attn")
    attn.params = {"in_proj_weight": "attn.in_proj_weight", "in_proj_bias": "attn.in_proj_bias"}
    last = Layout(axis=3, d=4)
    attn.attrs = {"self_attention": True}
    assert PackedAttentionConsumer().check(attn, last, _ctx(_flow(attn))) is None
    attn.attrs = {"self_attention": False}
    assert "cross-attention" in PackedAttentionConsumer().check(attn, last, _ctx(_flow(attn)))


@pytest.mark.parametrize("groups", [1, 2])
def test_transpose_rules_refuse_groups_and_a_consumer_pair_bias(groups):
    up = _layer("up", "conv_transpose", **{**CONV, "groups": groups, "output_padding": (0, 0)})
    flow = _flow(up)
    consumer, producer = ConvTransposeConsumer(), ConvTransposeProducer()
    if groups > 1:
        assert "groups=2" in consumer.check(up, CHANNELS, _ctx(flow))
        assert "groups=2" in producer.check(up, _ctx(flow))
        return
    assert consumer.check(up, CHANNELS, _ctx(flow)) is None
    assert "pair bias cannot fold" in consumer.check(up, CHANNELS, _ctx(flow, bias=True))
    assert producer.check(up, _ctx(flow, bias=True)) is None
    assert consumer.fold(up, CHANNELS, _ctx(flow)).targets[0].axis == 0  # [in, out/g, *k]
    assert producer.fold(up, _ctx(flow)).targets[0].axis == 1
