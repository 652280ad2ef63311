"""Width groups, resize/widen and the non-linear bottleneck on MLPs and ResNet-style CNNs."""

from __future__ import annotations

import pytest
import torch
import torchvision
from small_models import SmallResNet, mlp
from torch import nn

from surgery.analysis.widths import resize, widen, width_groups
from surgery.errors import PlanError
from surgery.experiments.bottleneck import nonlinear_bottleneck, plan_bottleneck
from surgery.experiments.factorize import count_parameters

X_IMG = torch.randn(2, 3, 16, 16)


def test_resnet_groups_streams_hidden_and_output():
    table = width_groups(SmallResNet(8), (X_IMG,))
    by_name = {g.name: g for g in table.groups}
    stream1 = by_name["stem"]
    assert stream1.residual and stream1.width == 8
    assert set(stream1.producers) == {"stem", "layer1.0.conv2", "layer1.1.conv2"}
    assert {"bn", "layer1.0.bn2", "layer1.1.bn2"} <= set(stream1.tied)
    stream2 = by_name["layer2.0.conv2"]
    assert stream2.residual and "layer2.0.down.0" in stream2.producers
    hidden = [g for g in table.free if not g.residual]
    assert [g.name for g in hidden] == [f"layer{i}.{j}.conv1" for i in (1, 2) for j in (0, 1)]
    assert by_name["fc"].frozen == "a model output"
    assert "residual" in str(table) and "a model output" in str(table)


@pytest.mark.parametrize(
    "build, inputs",
    [
        (lambda: SmallResNet(8), (X_IMG,)),
        (lambda: mlp([20, 16, 12, 5]), (torch.randn(2, 20),)),
        (
            lambda: torchvision.models.mobilenet_v3_small(num_classes=5),
            (torch.randn(2, 3, 32, 32),),
        ),
    ],
)
def test_widen_counts_and_runs(build, inputs):
    model = build().eval()
    table = width_groups(model, inputs)
    widths = {g.name: 2 * g.width for g in table.free}
    assert table.parameters() == count_parameters(model)
    wide = (
        widen(model, 2, inputs)
        if len(table.groups) < 20
        else resize(model, widths, inputs, table=table)
    ).eval()
    assert count_parameters(wide) == table.parameters(widths)  # the count needs no build
    assert type(wide) is type(model)
    with torch.no_grad():
        assert wide(*inputs).shape == model(*inputs).shape


def test_depthwise_layer_norm_and_flatten_follow_their_group():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8, padding=1),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.LayerNorm(16),
        nn.GELU(),
        nn.Linear(16, 3),
    )
    x = torch.randn(2, 3, 8, 8)
    wide = widen(model, 3, (x,))
    assert wide[3].groups == wide[3].in_channels == 24 and wide[1].num_features == 24
    assert wide[6].in_features == 24 * 4  # Flatten of 2x2 pooled channels
    assert wide[7].normalized_shape == (48,) and wide[9].out_features == 3


def test_concatenated_features_widen_and_frozen_groups_say_why():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(12, 2)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], -1))

    x = torch.randn(2, 4)
    table = width_groups(Cat(), (x,))
    assert [g.name for g in table.free] == ["a", "b"]  # a concatenation's parts change apart
    wide = widen(Cat(), 2, (x,))
    assert (wide.a.out_features, wide.b.out_features, wide.c.in_features) == (12, 12, 24)

    class Ordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), -1))

    table = width_groups(Ordered(), (x,))
    assert "taken in order by cumsum" in table["a"].frozen and table.free == []
    with pytest.raises(PlanError, match="cannot change"):
        resize(Ordered(), {"a": 8}, (x,))

    class HardCoded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)).view(-1, 6))

    with pytest.raises(PlanError, match="hard-codes a width"):
        widen(HardCoded(), 2, (torch.randn(2, 4),))


def test_nonlinear_bottleneck_resnet_widens_streams_and_narrows_blocks():
    model = SmallResNet(8)
    bottleneck = nonlinear_bottleneck(model, 2, (X_IMG,))
    plan = bottleneck.bottleneck_plan
    assert set(plan.wide) == {"stem", "layer2.0.conv2"}
    assert bottleneck.stem.out_channels == 16 and bottleneck.layer2[1].conv2.out_channels == 32
    assert all(plan.widths[n] < width_groups(model, (X_IMG,))[n].width for n in plan.narrow)
    count = count_parameters(bottleneck)
    assert count == plan.params_after <= plan.params_before == count_parameters(model)
    table = width_groups(model, (X_IMG,))
    gap = plan.params_before - count
    for name in plan.narrow:  # as close as integers allow: no narrow group fits one more channel
        one_more = table.parameters(plan.widths | {name: plan.widths[name] + 1})
        assert one_more - count > gap
    with torch.no_grad():
        assert bottleneck(X_IMG).shape == (2, 10)
    assert "->" in str(plan)


def test_nonlinear_bottleneck_mlp_alternates():
    model = mlp([32, 64, 64, 64, 10])
    x = (torch.randn(2, 32),)
    narrow_first = nonlinear_bottleneck(model, 2, x)
    assert narrow_first[2].out_features == 128  # hidden widths: narrow, wide, narrow
    assert narrow_first[0].out_features < 64 and narrow_first[4].out_features < 64
    assert count_parameters(narrow_first) <= count_parameters(model)
    wide_first = plan_bottleneck(model, 1.5, x, start="wide")
    assert wide_first.wide == ["0", "4"] and wide_first.narrow == ["2"]
    with pytest.raises(PlanError, match="two free hidden widths"):
        nonlinear_bottleneck(mlp([8, 16, 4]), 2, (torch.randn(2, 8),))
    with pytest.raises(PlanError, match="budget"):
        nonlinear_bottleneck(model, 200, x)
