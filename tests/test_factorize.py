"""Linear bottleneck: the factor algebra (property tests), full-rank exactness of `factorize`,
contraction back to the original class/keys/shapes, rank and budget selection, refusals."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import max_rel_error, randomise_batchnorm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from small_models import SmallResNet
from surgery.rewrites import RULES
from surgery.rewrites.factor import factor_product, factor_svd, full_rank
from torch import nn

from surgery.errors import FoldError, PlanError
from surgery.experiments.factorize import (
    Factorized,
    FactorPlan,
    contract,
    contract_state_dict,
    count_parameters,
    factorize,
)
from surgery.plan import Target

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@st.composite
def weights(draw):
    """(weight [out, in/g, *k], groups) for a Linear (no kernel dims) or a Conv1-3d."""
    dims = draw(st.sampled_from([0, 1, 2, 3]))
    groups = 1 if dims == 0 else draw(st.sampled_from([1, 1, 2, 3]))
    out = groups * draw(st.integers(1, 6))
    per_group_in = draw(st.integers(1, 5))
    kernel = [draw(st.integers(1, 3)) for _ in range(dims)]
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, per_group_in, *kernel, generator=g, dtype=torch.float64), groups


@SETTINGS
@given(weights())
def test_svd_split_at_full_rank_is_exact(case):
    weight, groups = case
    rank = full_rank(tuple(weight.shape), groups)
    first, second = factor_svd(weight, rank, groups)
    assert first.shape == (groups * rank, *weight.shape[1:])
    assert second.shape == (weight.shape[0], rank, *[1] * (weight.dim() - 2))
    assert max_rel_error(weight, factor_product(first, second, groups)) <= 1e-10


@SETTINGS
@given(weights(), st.integers(1, 30))
def test_truncated_split_is_the_best_rank_r_approximation(case, r):
    weight, groups = case
    rank = min(r, full_rank(tuple(weight.shape), groups))
    first, second = factor_svd(weight, rank, groups)
    approx = factor_product(first, second, groups)
    per_group = weight.reshape(groups, weight.shape[0] // groups, -1)
    tail = torch.linalg.svdvals(per_group)[:, rank:]  # Eckart-Young: the error is the tail
    error = (weight - approx).reshape(groups, weight.shape[0] // groups, -1)
    expected = tail.square().sum(-1).sqrt()
    assert torch.allclose(torch.linalg.matrix_norm(error), expected, atol=1e-9)


@st.composite
def conv_chains(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    cin, rank, cout = (
        groups * draw(st.integers(1, 3)),
        draw(st.integers(1, 4)),
        groups * draw(st.integers(1, 3)),
    )
    kernel = [draw(st.integers(1, 3)) for _ in range(dims)]
    stride = [draw(st.integers(1, 2)) for _ in range(dims)]
    padding = [draw(st.integers(0, 2)) for _ in range(dims)]
    dilation = [draw(st.integers(1, 2)) for _ in range(dims)]
    size = [dilation[i] * (kernel[i] - 1) + 1 + draw(st.integers(0, 3)) for i in range(dims)]
    return dims, groups, cin, rank, cout, kernel, stride, padding, dilation, size


@SETTINGS
@given(conv_chains(), st.integers(0, 2**31 - 1))
def test_kxk_then_1x1_equals_the_contracted_conv(chain, seed):
    """Any factors (not only SVD ones): running first then second == running their product."""
    dims, groups, cin, rank, cout, kernel, stride, padding, dilation, size = chain
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(groups * rank, cin // groups, *kernel, generator=g, dtype=torch.float64)
    second = torch.randn(cout, rank, *[1] * dims, generator=g, dtype=torch.float64)
    x = torch.randn(2, cin, *size, generator=g, dtype=torch.float64)
    conv = CONV[dims]
    kw = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    chained = conv(conv(x, first, **kw), second, groups=groups)
    direct = conv(x, factor_product(first, second, groups), **kw)
    assert max_rel_error(chained, direct) <= 1e-10
    # the same through the RULES table, as contract_state_dict calls it
    t = Target(rule="factor_product", params={}, groups=groups)
    b = torch.randn(cout, generator=g, dtype=torch.float64)
    out = RULES["factor_product"](
        t, {"first": first, "second": second, "second_bias": b}, None, None
    )
    assert torch.equal(out["weight"], factor_product(first, second, groups))
    assert torch.equal(out["bias"], b)


class Mixed(nn.Module):
    """Every layer kind factorize handles: Conv1d/2d/3d (stride, dilation, reflect padding,
    groups), Linear with and without bias."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=2, dilation=2)
        self.c2 = nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="reflect", bias=False)
        self.c2g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c3 = nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1))
        self.fc = nn.Linear(6 + 8 + 4, 5)
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, seq, img, vol):
        a = torch.relu(self.c1(seq)).mean(-1)
        b = torch.relu(self.c2g(torch.relu(self.c2(img)))).mean((-1, -2))
        c = torch.relu(self.c3(vol)).mean((-1, -2, -3))
        return self.head(torch.relu(self.fc(torch.cat([a, b, c], 1))))


def mixed_inputs(dtype=torch.float64):
    return (
        torch.randn(2, 3, 11, dtype=dtype),
        torch.randn(2, 3, 9, 9, dtype=dtype),
        torch.randn(2, 2, 3, 5, 5, dtype=dtype),
    )


def test_full_rank_factorize_reproduces_resnet18(one_thread):
    model = randomise_batchnorm(torchvision.models.resnet18(num_classes=10)).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    factored = factorize(model).eval()
    assert len(factored.factor_plan.sites) == 21 and not factored.factor_plan.skipped
    assert all(s.rank == s.full_rank for s in factored.factor_plan.sites)
    with torch.no_grad():
        assert max_rel_error(model(x), factored(x)) <= 1e-10


def test_full_rank_factorize_reproduces_in_float32():
    model = randomise_batchnorm(SmallResNet(16)).eval()
    x = torch.randn(4, 3, 16, 16)
    factored = factorize(model).eval()
    assert factored.stem.first.weight.dtype == torch.float32
    with torch.no_grad():
        assert max_rel_error(model(x), factored(x)) <= 1e-5


def test_full_rank_factorize_reproduces_every_layer_kind():
    model = Mixed().double()
    inputs = mixed_inputs()
    factored = factorize(model)
    assert {s.name for s in factored.factor_plan.sites} == {"c1", "c2", "c2g", "c3", "fc", "head"}
    assert factored.c2g.first.groups == 2 and factored.c2.first.padding_mode == "reflect"
    with torch.no_grad():
        assert max_rel_error(model(*inputs), factored(*inputs)) <= 1e-10


def test_contract_gives_back_the_original_class_keys_and_shapes(one_thread):
    model = randomise_batchnorm(torchvision.models.resnet18(num_classes=10)).eval().double()
    # (random factors: a torchvision class round trip without the cost of 21 SVDs)
    factored = factorize(model, rank=0.5, init="random")
    with torch.no_grad():  # "training": move every factor away from its start
        for p in factored.parameters():
            p.add_(0.01 * torch.randn_like(p))
    thin = contract(factored)
    assert type(thin) is type(model)
    ref, got = model.state_dict(), thin.state_dict()
    assert list(got) == list(ref)
    assert all(got[k].shape == ref[k].shape and got[k].dtype == ref[k].dtype for k in ref)
    assert not hasattr(thin, "factor_plan") and not any(
        isinstance(m, Factorized) for m in thin.modules()
    )
    torchvision.models.resnet18(num_classes=10).double().load_state_dict(got, strict=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert max_rel_error(factored.eval()(x), thin.eval()(x)) <= 1e-10
        assert max_rel_error(model(x), thin(x)) > 1e-3  # the factors really changed the function


def test_contract_state_dict_needs_no_model_code():
    model = Mixed()
    factored = factorize(model, rank=2)
    plan = FactorPlan.from_json(factored.factor_plan.to_json())
    assert plan == factored.factor_plan
    state = {k: v.clone() for k, v in factored.state_dict().items()}
    thin = contract_state_dict(state, plan)
    assert list(thin) == list(model.state_dict())
    expected = contract(factored).state_dict()
    assert all(torch.equal(thin[k], expected[k]) for k in expected)
    del state["fc.second.weight"]
    with pytest.raises(FoldError, match="fc.second.weight"):
        contract_state_dict(state, plan)


def test_a_factor_plan_saved_before_the_groups_field_still_contracts_the_same():
    # version 1 stored a grouped layer's groups in the target's `outer` field
    factored = factorize(Mixed(), rank=2, init="random")
    assert any(site.groups > 1 for site in factored.factor_plan.sites)
    old = json.loads(factored.factor_plan.to_json())
    old["version"] = 1
    for site in old["sites"]:
        target = site["target"]
        target["outer"] = target.pop("groups")
    plan = FactorPlan.from_json(json.dumps(old))
    assert plan == factored.factor_plan
    state = factored.state_dict()
    expected = contract(factored).state_dict()
    thin = contract_state_dict(state, plan)
    assert all(torch.equal(thin[k], expected[k]) for k in expected)


def test_fp32_contraction_is_done_in_float64():
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
    factored = factorize(model, rank=40, init="random")
    thin = contract(factored)
    x = torch.randn(8, 64, dtype=torch.float64)
    with torch.no_grad():
        reference = factored.double()(x)
        assert max_rel_error(reference, thin.double()(x)) <= 1e-6


def test_rank_choices():
    model = Mixed()
    fulls = {s.name: s.full_rank for s in factorize(model).factor_plan.sites}
    assert fulls == {"c1": 6, "c2": 8, "c2g": 4, "c3": 4, "fc": 5, "head": 3}
    by_int = factorize(model, rank=4).factor_plan
    assert {s.name: s.rank for s in by_int.sites} == {n: min(4, f) for n, f in fulls.items()}
    by_fraction = factorize(model, rank=0.5).factor_plan
    assert {s.name: s.rank for s in by_fraction.sites} == {
        n: max(1, round(0.5 * f)) for n, f in fulls.items()
    }
    with pytest.raises(PlanError, match="rank"):
        factorize(model, rank=-1)
    with pytest.raises(PlanError, match="not both"):
        factorize(model, rank=2, params=100)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9, 1.5])
def test_parameter_budget_is_met_from_below_and_closely(fraction):
    model = SmallResNet(16)
    budget = round(fraction * count_parameters(model))
    factored = factorize(model, params=budget, init="random")
    count = count_parameters(factored)
    plan = factored.factor_plan
    assert count == sum(s.params_after for s in plan.sites) + count_parameters(model) - sum(
        s.params_before for s in plan.sites
    )
    costs = [(s.params_after - (s.weight_shape[0] if s.bias else 0)) // s.rank for s in plan.sites]
    left = budget - count
    assert 0 <= left  # met from below, and no layer below its full rank could take one more:
    assert all(c > left for c, s in zip(costs, plan.sites, strict=True) if s.rank < s.full_rank)
    with pytest.raises(PlanError, match="budget"):
        factorize(model, params=1000)


def test_budget_as_fraction_and_at_full_size():
    model = Mixed()
    full = factorize(model, params=10**9).factor_plan
    assert all(s.rank == s.full_rank for s in full.sites)
    half = factorize(model, params=0.8)
    assert count_parameters(half) <= round(0.8 * count_parameters(model))


def test_refusals_are_reported():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.a = nn.Linear(8, 8)
            self.b = self.a  # one module, two names
            self.emb = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight  # tied weights
            self.c = nn.Linear(8, 8)

        def forward(self, x):
            h = self.attn(x, x, x)[0]
            return self.head(self.c(self.b(self.a(h))))

    model = Shared()
    factored = factorize(model)
    skipped = factored.factor_plan.skipped
    assert "MultiheadAttention" in skipped["attn.out_proj"]
    assert "shared" in skipped["a"] and "tied" in skipped["head"]
    assert [s.name for s in factored.factor_plan.sites] == ["c"]
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        assert max_rel_error(model(x), factored(x)) <= 1e-5
    with pytest.raises(PlanError, match="already factorized"):
        factorize(factored)
    with pytest.raises(FoldError, match="not factorized"):
        contract(model)
    with pytest.raises(PlanError, match="no layer named"):
        factorize(Mixed(), layers=["nope"])


def test_layer_selection_and_table():
    model = Mixed()
    factored = factorize(model, layers=lambda name, m: isinstance(m, nn.Linear))
    assert [s.name for s in factored.factor_plan.sites] == ["fc", "head"]
    assert type(factored.c2) is nn.Conv2d
    text = str(factored.factor_plan)
    assert "fc" in text and "rank" in text and "params after" in text
    assert contract(factored).state_dict().keys() == model.state_dict().keys()


def test_factorized_model_trains_and_deepcopies():
    model = Mixed()
    factored = factorize(model, rank=2)
    twin = copy.deepcopy(factored)
    opt = torch.optim.SGD(factored.parameters(), lr=0.1)
    inputs = mixed_inputs(torch.float32)
    loss = factored(*inputs).square().mean()
    loss.backward()
    opt.step()
    assert not torch.equal(twin.fc.first.weight, factored.fc.first.weight)
    assert math.isfinite(loss.item())
    assert contract(twin).state_dict().keys() == model.state_dict().keys()
