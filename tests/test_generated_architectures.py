"""Property tests over generated architectures, not only shapes: random small CNNs from a vocabulary
that includes the traps found on models nobody here wrote — subclasses of known layers that
override forward (BatchNorm + activation, a shifted conv, a gated conv, a weight-standardised conv,
a scaled linear head), functional reads of a module's weight, in-place ops, a module called twice,
tied parameters, a custom autograd function, forward hooks. Whatever the net, every site
`insert_pairs` offers folds exactly (float64) or the site is refused with a reason."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import surgery
from surgery.errors import PlanError
from surgery.ir.normalize import classify_module, why_not_its_base

EXAMPLES = int(os.environ.get("SURGERY_ARCH_EXAMPLES", examples(100, ci=300)))


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm that also applies an activation (timm's BatchNormAct2d does this)."""

    def forward(self, x):
        return F.relu(super().forward(x))


class ShiftedConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) + 0.5


class GatedConv(nn.Conv2d):
    def forward(self, x):
        y = super().forward(x)
        return y * torch.sigmoid(y)


class StdConv(nn.Conv2d):
    """Weight standardisation inside the kernel call (timm's StdConv2d)."""

    def _conv_forward(self, x, weight, bias):
        w = (weight - weight.mean((1, 2, 3), keepdim=True)) / (
            weight.std((1, 2, 3), keepdim=True) + 1e-5
        )
        return super()._conv_forward(x, w, bias)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0 + 1.0


class FunctionalConv(nn.Module):
    """Reads its weight with F.conv2d: no nn.Conv2d a pair could attach to."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, 1, 1) / c_in**0.5)

    def forward(self, x):
        return F.conv2d(x, self.weight)


class Doubler(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2 + 0.25

    @staticmethod
    def backward(ctx, g):
        return g * 2


class CustomFunction(nn.Module):
    def forward(self, x):
        return Doubler.apply(x)


class InPlace(nn.Module):
    def forward(self, x):
        y = x.clone()
        y.add_(0.1)
        return F.relu(y, inplace=True)


class CalledTwice(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.conv(F.relu(self.conv(x)))


class Tied(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, c, 1, bias=False)
        self.b = nn.Conv2d(c, c, 1, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


class Residual(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def _hooked_conv(c_in, c_out):
    conv = nn.Conv2d(c_in, c_out, 1)
    conv.register_forward_hook(lambda module, args, out: out * 1.5 + 0.1)
    return conv


# cell -> builder(c_in, c_out) -> module; widths change only where a cell maps c_in -> c_out
CELLS = {
    "conv": lambda a, b: nn.Conv2d(a, b, 3, padding=1),
    "conv1x1": lambda a, b: nn.Conv2d(a, b, 1),
    "bn": lambda a, b: nn.BatchNorm2d(a),
    "relu": lambda a, b: nn.ReLU(),
    "avgpool": lambda a, b: nn.AvgPool2d(3, 1, 1, count_include_pad=False),
    "bn_act": lambda a, b: BatchNormAct(a),
    "shifted_conv": lambda a, b: ShiftedConv(a, b, 1),
    "gated_conv": lambda a, b: GatedConv(a, b, 3, padding=1),
    "std_conv": lambda a, b: StdConv(a, b, 3, padding=1),
    "functional_conv": FunctionalConv,
    "custom_function": lambda a, b: CustomFunction(),
    "in_place": lambda a, b: InPlace(),
    "called_twice": lambda a, b: CalledTwice(a),
    "tied": lambda a, b: Tied(a),
    "hooked_conv": _hooked_conv,
    "residual": lambda a, b: Residual(nn.Sequential(nn.Conv2d(a, a, 1), nn.BatchNorm2d(a))),
}
CHANGES_WIDTH = {
    "conv",
    "conv1x1",
    "shifted_conv",
    "gated_conv",
    "std_conv",
    "functional_conv",
    "hooked_conv",
}


class Net(nn.Module):
    def __init__(self, cells: list[tuple[str, int]], head: str):
        super().__init__()
        layers, c = [nn.Conv2d(3, 4, 3, padding=1)], 4
        for name, width in cells:
            out = width if name in CHANGES_WIDTH else c
            layers.append(CELLS[name](c, out))
            c = out
        self.body = nn.Sequential(*layers)
        self.head = ScaledLinear(c, 3) if head == "scaled" else nn.Linear(c, 3)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


architectures = st.tuples(
    st.lists(st.tuples(st.sampled_from(sorted(CELLS)), st.integers(2, 6)), min_size=1, max_size=6),
    st.sampled_from(["plain", "scaled"]),
    st.booleans(),
    st.integers(0, 2**16),
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(architectures, st.booleans())
def test_every_offered_site_folds_exactly_or_is_refused(arch, check):
    """With the numeric self-check (the product) and without it (the rules alone must hold too:
    the check is defence in depth, not the proof)."""
    cells, head, bias, seed = arch
    torch.manual_seed(seed)
    model = _randomise(Net(cells, head), seed).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    table = surgery.find_blocks(model, (x,), bias=bias, check=check)
    for boundary in table:
        assert boundary.foldable or boundary.reason, f"{boundary.name} refused without a reason"
    try:
        paired = surgery.insert_pairs(model, (x,), init="random", bias=bias, check=check).eval()
    except PlanError as error:
        assert str(error).strip()
        return
    thin = surgery.fold(paired)
    with torch.no_grad():
        reference, folded = paired(x), thin(x)
        if not torch.equal(model(x), model(2 * x)):  # (a model whose output ignores its input)
            assert not torch.equal(reference, model(x))  # the random pairs changed the function
    error = ((reference - folded).abs().max() / reference.abs().max()).item()
    assert error <= 1e-9, (
        f"{cells} {head} bias={bias}: rel err {error:.2e}, sites {[s.name for s in paired.plan.sites]}"
    )


@pytest.mark.parametrize(
    "module, reason",
    [
        (BatchNormAct(4), "overrides the forward of BatchNorm2d"),
        (ShiftedConv(2, 2, 1), "overrides the forward of Conv2d"),
        (StdConv(2, 2, 1), "overrides the forward of Conv2d"),
        (ScaledLinear(2, 2), "overrides the forward of Linear"),
        (_hooked_conv(2, 2), "forward hooks"),
        (nn.utils.parametrizations.weight_norm(nn.Linear(2, 3)), "parametrized"),
    ],
    ids=["bn+act", "shifted conv", "standardised conv", "scaled linear", "hooks", "weight norm"],
)
def test_a_subclass_that_changes_the_computation_is_not_its_base(module, reason):
    assert reason in why_not_its_base(module)
    kind, attrs = classify_module(module)
    assert kind == "other" and reason in attrs["why"]


def test_subclasses_that_keep_the_forward_are_still_known_layers():
    class Renamed(nn.Linear):
        pass

    assert why_not_its_base(Renamed(2, 3)) is None and classify_module(Renamed(2, 3))[0] == "linear"
    mha_out = nn.MultiheadAttention(8, 2).out_proj  # NonDynamicallyQuantizableLinear
    assert classify_module(mha_out)[0] == "linear"
    assert classify_module(nn.SyncBatchNorm(4))[0] == "batch_norm"


def test_a_batchnorm_that_applies_an_activation_is_never_folded_through():
    """The silent wrong fold found on a popular vision library: 20-40% off, exit 0."""
    model = _randomise(
        nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), BatchNormAct(6), nn.Conv2d(6, 4, 1)), 0
    ).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    table = surgery.find_blocks(model, (x,))
    kinds = {b.name: b.route.kind if b.route else None for b in table}
    assert "producer through BatchNorm" not in kinds.values()
    paired = surgery.insert_pairs(model, (x,), init="random").eval()
    with torch.no_grad():
        assert torch.allclose(paired(x), surgery.fold(paired)(x), rtol=1e-10, atol=1e-12)
