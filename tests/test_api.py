"""The public API as a user drives it: arguments, errors, probes, plans, and what is left untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import max_rel_error, randomise_batchnorm
from torch import nn

import surgery


@pytest.fixture(scope="module")
def resnet():
    return randomise_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32)


def test_wide_below_one_is_refused(resnet, x):
    with pytest.raises(surgery.PlanError, match="wide must be >= 1"):
        surgery.insert_pairs(resnet, (x,), wide=0.5)


def test_wide_mapping_sets_sites_and_widths(resnet, x):
    paired = surgery.insert_pairs(resnet, (x,), wide={"layer1": 100, "layer3": 300})
    assert [(s.name, s.d, s.D) for s in paired.plan.sites] == [
        ("layer1", 64, 100),
        ("layer3", 256, 300),
    ]
    assert paired.pairs["layer1"].widen.weight.shape == (100, 64)
    with pytest.raises(surgery.PlanError, match="D >= d = 64"):
        surgery.insert_pairs(resnet, (x,), wide={"layer1": 10})


def test_multiplier_rounds_up(resnet, x):
    paired = surgery.insert_pairs(resnet, (x,), wide=1.01, sites=["layer1"])
    assert paired.plan.sites[0].D == 65  # ceil(1.01 * 64)


def test_unknown_and_refused_sites_name_the_problem(resnet, x):
    with pytest.raises(surgery.PlanError, match=r"unknown site 'layer9'.*layer1"):
        surgery.insert_pairs(resnet, (x,), sites=["layer9"])
    with pytest.raises(surgery.PlanError, match=r"site 'relu' cannot fold: .*max-pool"):
        surgery.insert_pairs(resnet, (x,), sites=["relu"])
    with pytest.raises(surgery.PlanError, match="init must be one of"):
        surgery.insert_pairs(resnet, (x,), init="orthogonal")


def test_wrong_input_shape_is_a_clear_error(resnet):
    with pytest.raises(
        surgery.PlanError, match=r"example inputs \(\(2, 1, 32, 32\)\) do not fit ResNet"
    ):
        surgery.find_blocks(resnet, (torch.randn(2, 1, 32, 32),))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Branchy()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(x))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # depends on tensor values: neither tracer can capture it
            return self.fc(x)
        return -self.fc(x)


def test_uncapturable_model_names_module_and_line():
    with pytest.raises(surgery.CaptureError) as info:
        surgery.find_blocks(DataDependent(), (torch.randn(4, 8),))
    message = str(info.value)
    assert "module 'body' (Branchy)" in message
    assert "if x.sum() > 0" in message
    assert "torch.export" in message and "Fix:" in message


class ShapeBranch(nn.Module):
    """symbolic_trace cannot branch on a shape; torch.export specialises it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if x.shape[0] > 1:
            h = h * 2.0
        return self.c(torch.relu(self.b(h)))


def test_export_fallback_captures_and_folds():
    model = ShapeBranch().eval()
    x = torch.randn(4, 8)
    table = surgery.find_blocks(model, (x,))
    assert table.flow.method == "torch.export"
    assert {"a", "b"} <= {b.name for b in table.foldable}
    paired = surgery.insert_pairs(model, (x,), init="random").eval()
    thin = surgery.fold(paired)
    with torch.no_grad():
        assert max_rel_error(paired(x), thin(x)) <= 1e-5


def test_original_model_is_untouched(resnet, x):
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    paired = surgery.insert_pairs(resnet, (x,), init="random")
    surgery.fold(paired)
    assert not hasattr(resnet, "pairs") and not hasattr(resnet, "plan")
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in resnet.modules())
    after = resnet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_already_paired_and_not_paired_errors(resnet, x):
    paired = surgery.insert_pairs(resnet, (x,), sites=["layer1"])
    with pytest.raises(surgery.PlanError, match="already paired"):
        surgery.insert_pairs(paired, (x,))
    with pytest.raises(surgery.FoldError, match="not a paired model"):
        surgery.fold(resnet)


def test_plan_round_trips_through_json(resnet, x):
    paired = surgery.insert_pairs(resnet, (x,), bias=True)
    again = surgery.Plan.from_json(paired.plan.to_json())
    assert again == paired.plan
    assert set(again.pair_keys()) <= set(paired.state_dict())


def test_callable_init_is_used(resnet, x):
    seen = []

    def init(pair, site):
        seen.append(site.name)
        surgery.runtime.pairs.init_identity(pair, site)

    paired = surgery.insert_pairs(resnet, (x,), init=init, sites=["layer2", "layer3"])
    assert seen == ["layer2", "layer3"]
    W, _ = paired.pairs["layer2"].product()
    assert torch.allclose(W, torch.eye(128, dtype=torch.float64), atol=1e-5)


def test_probes_give_widened_outputs_with_gradients(resnet, x):
    paired = surgery.insert_pairs(
        resnet, (x,), wide=2, sites=["maxpool", "layer1.0", "layer4"]
    ).train()
    with surgery.probe(paired) as probes:
        out = paired(x)
        shapes = {name: tuple(p.shape) for name, p in probes.items()}
        (out.sum() + sum(p.square().mean() for _, p in probes.items())).backward()
    assert shapes == {
        "maxpool": (2, 128, 8, 8),
        "layer1.0": (2, 128, 8, 8),
        "layer4": (2, 1024, 1, 1),
    }
    assert all(paired.pairs[n].widen.weight.grad is not None for n in shapes)
    assert all(paired.pairs[n].probe is None for n in shapes)  # released after the block
    with pytest.raises(KeyError, match="layer9"):
        with surgery.probe(paired, ["layer9"]):
            pass


def test_probe_equals_widen_of_the_boundary_tensor(resnet, x):
    paired = surgery.insert_pairs(resnet, (x,), init="random", sites=["layer2"]).eval()
    captured = {}
    resnet.layer2.register_forward_hook(lambda m, a, out: captured.setdefault("h", out))
    with torch.no_grad(), surgery.probe(paired, ["layer2"]) as probes:
        paired(x)
        resnet(x)
        expected = paired.pairs["layer2"].widen(captured["h"].movedim(1, -1)).movedim(-1, 1)
        assert max_rel_error(expected, probes["layer2"]) <= 1e-6
    resnet.layer2._forward_hooks.clear()


def test_paired_copies_and_state_dicts_stay_consistent(resnet, x):
    paired = surgery.insert_pairs(resnet, (x,), init="random", sites=["layer1", "layer3"]).eval()
    twin = copy.deepcopy(paired)
    with torch.no_grad():
        twin.pairs["layer1"].narrow.weight.mul_(2.0)
        assert not torch.allclose(twin(x), paired(x))  # the copy's hooks drive the copy's pairs
        fresh = surgery.insert_pairs(resnet, (x,), sites=["layer1", "layer3"]).eval()
        fresh.load_state_dict(paired.state_dict(), strict=True)
        assert torch.equal(fresh(x), paired(x))


def test_fold_keeps_paired_model_usable(resnet, x):
    paired = surgery.insert_pairs(resnet, (x,), init="random").eval()
    with torch.no_grad():
        before = paired(x)
        thin = surgery.fold(paired)
        assert torch.equal(paired(x), before)
        assert not hasattr(thin, "pairs") and set(thin.state_dict()) == set(resnet.state_dict())


def test_sequential_root_pairs_and_folds():
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Dropout(0.1), nn.Linear(16, 3)
    ).eval()
    x = torch.randn(5, 6)
    paired = surgery.insert_pairs(model, (x,), init="random").eval()
    assert [s.name for s in paired.plan.sites] == ["0", "1", "2"]  # "3" (dropout) merges into "2"
    thin = surgery.fold(paired)
    assert type(thin) is nn.Sequential and len(thin) == len(model)
    with torch.no_grad():
        assert max_rel_error(paired(x), thin(x)) <= 1e-5
        assert (
            max_rel_error(paired(x), model(x)) > 1e-3
        )  # the random pairs really changed the function


def test_import_surgery_is_the_pipeline_only_and_loads_no_onnx():
    """The top level keeps to the pipeline (<= 30 names); onnx / onnxruntime load only for verify."""
    import subprocess
    import sys

    code = (
        "import surgery, sys; import surgery.experiments as ex; "
        "print(len(surgery.__all__), 'onnx' in sys.modules, 'onnxruntime' in sys.modules, "
        "all(n not in surgery.__all__ for n in ex.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, onnx, ort, apart = out.stdout.split()
    assert int(count) <= 30 and (onnx, ort, apart) == ("False", "False", "True")
