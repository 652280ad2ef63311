"""Transposed convolutions (rewrites/conv_transpose.py): as a consumer (W into the weight's dim 0) and
as a producer (W into dim 1 and the bias), over random kernels, strides, paddings, output paddings,
dilations, groups and 1d/2d/3d; folded exactly by `fold`, `fold_state_dict` and the streaming
checkpoint fold, and trained pre-merged with the same function and gradients; refused with the
reason where the algebra has no exact fold (groups > 1, a pair bias on the consumer side)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import examples, max_rel_error
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import surgery

EXACT = 1e-10  # float64
SETTINGS = settings(
    max_examples=examples(20, 500),  # two tests: CI proves the family on 1000 cases
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def transposed_convs(draw: st.DrawFn) -> dict:
    """A valid ConvTranspose configuration, its input size and whether the pair has a bias."""
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 1, 2]))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    kernel = draw(st.integers(1, 3))
    config = dict(
        in_channels=groups * draw(st.integers(1, 3)),
        out_channels=groups * draw(st.integers(1, 3)),
        kernel_size=kernel,
        stride=stride,
        padding=draw(st.integers(0, 2)),
        output_padding=draw(st.integers(0, max(stride, dilation) - 1)),
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
    )
    size = draw(st.integers(2, 5 if dims < 3 else 3))
    out = (size - 1) * stride - 2 * config["padding"] + dilation * (kernel - 1)
    assume(out + config["output_padding"] + 1 > 0)
    return dict(dims=dims, size=size, config=config, pair_bias=draw(st.booleans()))


def _inputs(case: dict, channels: int) -> torch.Tensor:
    return torch.randn(2, channels, *[case["size"]] * case["dims"], dtype=torch.float64)


def _check_folds(model: nn.Module, x: torch.Tensor, site: str, pair_bias: bool, tmp_path) -> None:
    """fold, fold_state_dict and the streaming checkpoint fold are exact and agree bit for bit;
    pre-merged training computes the paired forward and gradients."""
    paired = surgery.insert_pairs(model, (x,), init="random", sites=[site], bias=pair_bias)
    assert [s.name for s in paired.plan.sites] == [site]
    thin = surgery.fold(paired)
    with torch.no_grad():
        assert max_rel_error(paired(x), thin(x)) <= EXACT
        if not torch.equal(model(x), model(2 * x)):  # (no output tap may reach an input)
            assert max_rel_error(model(x), paired(x)) > 1e-3  # the random pair changes the function
    by_state = surgery.fold_state_dict(paired.state_dict(), paired.plan)
    for name, tensor in thin.state_dict().items():
        assert torch.equal(by_state[name], tensor), name
    surgery.save(paired, tmp_path / "paired.safetensors")
    surgery.fold_checkpoint(tmp_path / "paired.safetensors", tmp_path / "thin.safetensors")
    streamed = load_file(tmp_path / "thin.safetensors")
    assert streamed.keys() == thin.state_dict().keys()
    for name, tensor in thin.state_dict().items():
        assert torch.equal(streamed[name], tensor), name

    twin = copy.deepcopy(paired)
    merged_layers = [m for m in twin.modules() if "forward" in m.__dict__]
    assert any(isinstance(m, nn.modules.conv._ConvTransposeNd) for m in merged_layers)
    plain = paired(x)
    with surgery.premerged(twin, "always"):
        merged = twin(x)
    assert max_rel_error(plain, merged) <= EXACT
    plain.pow(2).mean().backward()
    merged.pow(2).mean().backward()
    grads = dict(twin.named_parameters())
    for name, p in paired.named_parameters():
        assert max_rel_error(p.grad, grads[name].grad) <= 1e-8, name


@SETTINGS
@given(case=transposed_convs())
def test_transpose_consumer_folds_exactly_or_is_refused(case, tmp_path_factory):
    torch.manual_seed(0)
    config, dims = case["config"], case["dims"]
    model = nn.Sequential(  # site "1" (after the Tanh) can only fold into the transposed conv
        CONV[dims](3, config["in_channels"], 1),
        nn.Tanh(),
        TRANSPOSE[dims](**config),
    ).double()
    x = _inputs(case, 3)
    row = surgery.find_blocks(model, (x,), bias=case["pair_bias"]).get("1")
    if config["groups"] > 1:
        assert not row.foldable and "grouped transposed conv 2 (groups=" in row.reason
    elif case["pair_bias"]:
        assert not row.foldable and "pair bias cannot fold into transposed conv 2" in row.reason
    else:
        assert row.route.kind == "consumer" and row.route.absorbed_by == ["2.weight"]
        _check_folds(model, x, "1", False, tmp_path_factory.mktemp("consumer"))


@SETTINGS
@given(case=transposed_convs())
def test_transpose_producer_folds_exactly_or_is_refused(case, tmp_path_factory):
    torch.manual_seed(0)
    config, dims = case["config"], case["dims"]
    model = nn.Sequential(  # site "0": the Tanh absorbs nothing, so the transposed conv must
        TRANSPOSE[dims](**config),
        nn.Tanh(),
        CONV[dims](config["out_channels"], 2, 1),
    ).double()
    x = _inputs(case, config["in_channels"])
    row = surgery.find_blocks(model, (x,), bias=case["pair_bias"]).get("0")
    if config["groups"] > 1:
        assert not row.foldable and "grouped transposed conv 0 (groups=" in row.reason
    elif case["pair_bias"] and not config["bias"]:
        assert not row.foldable and "0 has no bias to absorb the pair's bias" in row.reason
    else:
        assert row.route.kind == "producer" and row.route.absorbed_by == ["0.weight"]
        _check_folds(model, x, "0", case["pair_bias"], tmp_path_factory.mktemp("producer"))
