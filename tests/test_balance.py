"""Layer-wise gradient norms and the balanced initialisation (002)."""

from __future__ import annotations

import math

import pytest
import torch
from small_models import SmallResNet, mlp
from torch import nn

from surgery.experiments.balance import (
    balanced_init,
    gradient_norms,
    scale_invariant,
    smooth_hinge_loss,
)
from surgery.experiments.sparsity import sparsify_wide


def test_gradient_norms_match_autograd_and_leave_the_model_alone():
    model = SmallResNet(4).train()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    model.stem.weight.grad = torch.ones_like(model.stem.weight)
    stats = model.bn.running_mean.clone()
    report = gradient_norms(model, x, y)
    assert torch.equal(model.stem.weight.grad, torch.ones_like(model.stem.weight))
    assert torch.equal(model.bn.running_mean, stats)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    expected = {n: p.grad.norm().item() for n, p in model.named_parameters() if p.dim() >= 2}
    assert report.names == list(expected)
    assert all(
        math.isclose(g, expected[n], rel_tol=1e-5)
        for n, g in zip(report.names, report.grad_norms, strict=True)
    )
    assert report.ratio == max(report.grad_norms) / min(report.grad_norms)
    assert "max/min |grad|" in str(report)


def test_balanced_init_is_exact_on_a_homogeneous_net_and_keeps_its_function():
    model = mlp([20, 4, 4, 4, 1], bias=False).double()
    x, y = torch.randn(64, 20, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    before = model(x).detach()
    report = balanced_init(model, x, y)
    assert report.before.ratio > 1.5 and report.iterations == 1
    assert report.after.ratio < 1 + 1e-9
    assert math.prod(report.scales.values()) == pytest.approx(1.0, rel=1e-12)
    assert (model(x) - before).abs().max() <= 1e-10 * before.abs().max()
    assert "Balanced initialisation" in str(report)


def test_balanced_init_on_a_batchnorm_resnet_keeps_the_loss():
    torch.manual_seed(0)
    model = SmallResNet(4, classes=1).train()
    x = torch.randn(64, 3, 8, 8)
    labels = torch.randint(0, 2, (64,)) * 2 - 1
    invariant = scale_invariant(model, x, labels, loss_fn=smooth_hinge_loss)
    convs = [n for n, p in model.named_parameters() if p.dim() == 4]
    assert invariant == convs  # every conv is followed by a train-mode BatchNorm; fc is not
    report = balanced_init(model, x, labels, loss_fn=smooth_hinge_loss, iterations=10)
    assert report.before.ratio > 2 and report.after.ratio <= 1.05
    assert report.scale_invariant == sorted(convs) and report.scales["fc.weight"] == 1.0
    # equal up to BatchNorm eps (the convs shrink, so eps weighs a little more)
    assert report.after.loss == pytest.approx(report.before.loss, rel=1e-3)


def test_masked_weights_are_reported_by_layer_name():
    model = sparsify_wide(mlp([10, 8, 8, 2]), 2, (torch.randn(2, 10),))
    report = gradient_norms(model, torch.randn(16, 10), torch.randint(0, 2, (16,)))
    assert report.names == ["0.weight", "2.weight", "4.weight"]


def test_smooth_hinge_loss():
    out = torch.tensor([2.0, 0.5, -0.5, -3.0])
    labels = torch.tensor([1, 1, 1, -1])
    # z = -y f: [-2, -0.5, 0.5, -3] -> (1 + z)_+^3 = [0, 0.125, 3.375, 0]
    assert smooth_hinge_loss(out, labels).item() == pytest.approx((0.125 + 3.375) / 4)
    assert smooth_hinge_loss(out, labels, power=2).item() == pytest.approx((0.25 + 2.25) / 4)
