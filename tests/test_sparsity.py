"""Static sparsity: the layer-proportional distribution (against 003's Appendix B code and its order
property), exact trainable-parameter counts, masks through optimizer steps and save/load."""

from __future__ import annotations

import bisect
import io

import numpy as np
import pytest
import torch
from conftest import max_rel_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from small_models import SmallResNet, mlp
from torch import nn

from surgery.analysis.widths import widen
from surgery.errors import PlanError
from surgery.experiments.factorize import count_parameters
from surgery.experiments.sparsity import (
    MASK_SUFFIX,
    layer_proportional,
    load_masked,
    masks,
    remove_masks,
    sparsify_wide,
    trainable_parameters,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def get_ntf(num_to_freeze_tot, num_W, tensor_dims, lnames_sorted):
    """003 Appendix B, verbatim but for find_ge (the bisect recipe) and the unused tensor_dims."""

    def find_ge(a, x):
        i = bisect.bisect_left(a, x)
        if i != len(a):
            return a[i], i
        raise ValueError

    num_layers = len(lnames_sorted)
    num_to_freeze = np.zeros(num_layers, dtype=int)
    num_W_sorted_list = [num_W[lname] for lname in lnames_sorted]
    num_W_diffs = np.diff(num_W_sorted_list)
    num_W_diffs = [abs(d) for d in num_W_diffs]
    aux_vect = np.arange(1, len(num_W_diffs) + 1)
    ntf_lims = [np.dot(aux_vect[:k], num_W_diffs[:k]) for k in range(1, num_layers)]
    lim_val, lim_ind = find_ge(ntf_lims, num_to_freeze_tot)
    num_layers_to_sparsify = lim_ind + 1
    base_fill = [sum(num_W_diffs[lind:lim_ind]) for lind in range(lim_ind)]
    base_fill.append(0)
    rest_tot = num_to_freeze_tot - sum(base_fill)
    rest = int(np.floor(rest_tot / num_layers_to_sparsify))
    num_to_freeze[:num_layers_to_sparsify] = np.array(base_fill) + rest
    rest_mismatch = rest_tot - rest * num_layers_to_sparsify
    num_to_freeze[0] += rest_mismatch
    assert sum(num_to_freeze) == num_to_freeze_tot
    return num_to_freeze


@st.composite
def budgets(draw):
    sizes = draw(st.lists(st.integers(1, 5000), min_size=1, max_size=12))
    total = draw(st.integers(0, sum(sizes)))
    return sizes, total


@SETTINGS
@given(budgets())
def test_layer_proportional_sums_exactly_and_keeps_the_order(case):
    sizes, total = case
    remove = layer_proportional(total, sizes)
    assert sum(remove) == total and all(0 <= r <= s for r, s in zip(remove, sizes, strict=True))
    left = [s - r for s, r in zip(sizes, remove, strict=True)]
    involved = [i for i, r in enumerate(remove) if r > 0]
    if not involved:
        return
    # Appendix B: a larger layer never loses fewer weights than a smaller one ...
    for i in range(len(sizes)):
        for j in range(len(sizes)):
            if sizes[i] > sizes[j]:
                assert remove[i] >= remove[j]
    # ... and the layers end level: what the most-cut layer keeps is within the indivisible
    # remainder (< number of layers, taken by the largest) of what the largest survivor keeps
    assert max(left) - min(left[i] for i in involved) <= len(sizes) - 1


@SETTINGS
@given(budgets())
def test_layer_proportional_is_the_papers_get_ntf(case):
    sizes, total = case
    names = [f"l{i}" for i in range(len(sizes))]
    ordered = sorted(names, key=lambda n: -sizes[names.index(n)])
    try:
        theirs = get_ntf(total, dict(zip(names, sizes, strict=True)), None, ordered)
    except ValueError:  # their find_ge has no bin once every layer is levelled to the smallest
        return
    if any(int(v) > sizes[names.index(n)] for n, v in zip(ordered, theirs, strict=True)):
        return  # near total removal their remainder overflows the largest layer; ours passes it on
    ours = layer_proportional(total, sizes)
    assert [ours[names.index(n)] for n in ordered] == [int(v) for v in theirs]


def test_layer_proportional_beyond_the_last_level_and_refusals():
    assert layer_proportional(10, [4, 4, 4]) == [4, 3, 3]
    assert layer_proportional(0, [5]) == [0] and layer_proportional(5, [5]) == [5]
    with pytest.raises(PlanError):
        layer_proportional(13, [4, 4, 4])


MODELS = {
    "resnet": (lambda: SmallResNet(8), (torch.randn(4, 3, 16, 16),)),
    "mlp": (lambda: mlp([20, 16, 16, 5]), (torch.randn(4, 20),)),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("factor, dims", [(2, "all"), (3, "io"), (1.5, "all")])
def test_trainable_parameters_equal_the_dense_original_exactly(name, factor, dims):
    build, inputs = MODELS[name]
    model = build()
    sparse = sparsify_wide(model, factor, inputs, dims=dims, seed=1)
    assert trainable_parameters(sparse) == count_parameters(model)  # exact, not approximately
    wide = widen(model, factor, inputs)
    assert count_parameters(sparse) == count_parameters(wide)  # the stored tensors are dense wide
    plan = sparse.sparsity_plan
    assert plan.target == count_parameters(model) and plan.dense_wide == count_parameters(wide)
    assert sum(row[3] for row in plan.rows) == plan.dense_wide - plan.target
    # BatchNorm is neither masked nor shrunk: it has the wide width, all of it trainable
    for mname, module in sparse.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.num_features == wide.get_submodule(mname).num_features
            assert mname not in masks(sparse)
    with torch.no_grad():
        assert sparse(*inputs).shape == model(*inputs).shape
    assert "connectivity" in str(plan)


def test_io_mode_removes_whole_kernels_but_one():
    model = SmallResNet(8)
    sparse = sparsify_wide(model, 3, (torch.randn(2, 3, 16, 16),), dims="io")
    for name, mask in masks(sparse).items():
        if mask.dim() == 4 and mask.shape[2:] == (3, 3):
            per_kernel = mask.flatten(2).sum(-1)
            partial = ((per_kernel > 0) & (per_kernel < 9)).sum().item()
            assert partial <= 1, name  # at most one kernel loses part of its taps


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_masks_survive_optimizer_steps(opt):
    model = SmallResNet(8)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    sparse = sparsify_wide(model, 2, (x,), seed=3).train()
    before = {k: v.clone() for k, v in masks(sparse).items()}
    optimizer = OPTIMIZERS[opt](sparse.parameters())
    for _ in range(3):
        loss = nn.functional.cross_entropy(sparse(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = masks(sparse)
    assert all(torch.equal(before[k], after[k]) for k in before)
    for name, mask in after.items():
        layer = sparse.get_submodule(name)
        assert torch.all(layer.weight[~mask] == 0)  # what the forward uses
        assert torch.all(layer.parametrizations.weight.original[~mask] == 0)  # what is stored
        assert torch.all(layer.parametrizations.weight.original.grad[~mask] == 0)
        assert layer.weight[mask].abs().sum() > 0
    assert trainable_parameters(sparse) == count_parameters(model)


def test_masks_survive_a_save_load_round_trip():
    model = SmallResNet(8)
    x = torch.randn(4, 3, 16, 16)
    sparse = sparsify_wide(model, 2, (x,), seed=0).eval()
    buffer = io.BytesIO()
    torch.save(sparse.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert sum(k.endswith(MASK_SUFFIX) for k in state) == len(masks(sparse))
    # 1) into a sparse model drawn with another seed: the loaded masks replace its own
    other = sparsify_wide(model, 2, (x,), seed=7).eval()
    assert any(not torch.equal(masks(other)[k], masks(sparse)[k]) for k in masks(sparse))
    other.load_state_dict(state, strict=True)
    assert all(torch.equal(masks(other)[k], masks(sparse)[k]) for k in masks(sparse))
    # 2) into a plain dense wide model: load_masked registers the masks from the file
    plain = load_masked(widen(model, 2, (x,)), state).eval()
    assert trainable_parameters(plain) == count_parameters(model)
    with torch.no_grad():
        assert torch.equal(sparse(x), other(x)) and torch.equal(sparse(x), plain(x))
        baked = remove_masks(sparse).eval()
        assert not masks(baked) and max_rel_error(sparse(x), baked(x)) <= 1e-6
        assert set(baked.state_dict()) == set(widen(model, 2, (x,)).state_dict())
        assert torch.equal(sparse(x), other(x))  # baking a copy left the source model intact


def test_rescale_and_seed():
    model = mlp([20, 16, 16, 5])
    x = (torch.randn(4, 20),)
    torch.manual_seed(5)
    a = sparsify_wide(model, 4, x, seed=0)
    torch.manual_seed(5)
    b = sparsify_wide(model, 4, x, seed=0, rescale=True)
    assert all(torch.equal(masks(a)[k], masks(b)[k]) for k in masks(a))
    layer = "2"  # the hidden 64x64 layer loses most of its weights
    kept = masks(a)[layer].float().mean().item()
    assert kept < 0.5
    scaled = b.get_submodule(layer).weight / a.get_submodule(layer).weight
    mask = masks(a)[layer]
    assert torch.allclose(scaled[mask], torch.full_like(scaled[mask], kept**-0.5))


def test_factor_too_large_is_refused():
    with pytest.raises(PlanError, match="smaller factor"):
        sparsify_wide(mlp([4, 4, 2]), 50, (torch.randn(2, 4),))
    with pytest.raises(PlanError, match="dims"):
        sparsify_wide(mlp([4, 4, 2]), 2, (torch.randn(2, 4),), dims="kernel")
