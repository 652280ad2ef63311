"""The default numeric self-check runs on the layers each site touches (surgery.analysis.localcheck),
not on a float64 copy of the whole model: it must still refuse every site a wrong rule would fold
wrong, on every architecture family of the suite, and agree with the whole-model check."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, MORE_FAMILIES
from small_models import SmallResNet, mlp
from surgery.rewrites import RULES
from surgery.rewrites.rule import Algebra

import surgery

ALL = {**FAMILIES, **MORE_FAMILIES}
EXTRA = {
    "resnet (BatchNorm, producer through BN)": (
        lambda: SmallResNet(8).eval(),
        lambda: (torch.randn(2, 3, 16, 16),),
    ),
    "mlp": (lambda: mlp([8, 16, 16, 16, 4]).eval(), lambda: (torch.randn(3, 8),)),
}


def _cases():
    for name, fam in ALL.items():
        yield name, fam.build, fam.inputs
    for name, (build, inputs) in EXTRA.items():
        yield name, build, inputs


CASES = {name: (build, inputs) for name, build, inputs in _cases()}


def _broken(rule: str) -> Algebra:
    """The rule's algebra, off by a little (what a subtle bug in a rule would be)."""
    right = RULES[rule]

    def wrong(target, tensors, W, c):
        out = right.apply(target, tensors, W, c)
        return {k: v * 1.001 for k, v in out.items()}

    return Algebra(wrong, right.factors)


@pytest.mark.parametrize("name", list(CASES))
def test_a_rule_broken_on_purpose_is_refused_by_the_local_check(name, monkeypatch, one_thread):
    build, inputs = CASES[name]
    torch.manual_seed(0)
    model, x = build().eval(), inputs()
    honest = surgery.find_blocks(model, x)
    offered = [b for b in honest if b.foldable and b.checked.startswith("checked")]
    assert offered, name
    assert all("float64, local" in b.checked for b in offered), [b.checked for b in offered]
    used = {t.rule for b in offered for t in b.route.targets}
    for rule in used:
        monkeypatch.setitem(RULES, rule, _broken(rule))
    table = surgery.find_blocks(model, x)
    for b in offered:
        site = table.get(b.name)
        assert not site.foldable and site.reason.startswith("numeric check failed"), (name, b.name)


@pytest.mark.parametrize(
    "name", ["resnet (BatchNorm, producer through BN)", "hf-gpt2", "torch-transformer"]
)
def test_the_local_and_the_whole_model_checks_agree(name, one_thread):
    build, inputs = CASES[name]
    torch.manual_seed(0)
    model, x = build().eval(), inputs()
    local = surgery.find_blocks(model, x)
    full = surgery.find_blocks(model, x, check="full")
    assert [(b.name, b.foldable) for b in local] == [(b.name, b.foldable) for b in full]


def test_the_local_check_refuses_a_batchnorm_with_an_activation(monkeypatch, one_thread):
    """The refusal the whole-model check was built for (a BatchNorm subclass that applies an
    activation, taken for a BatchNorm by rules that did not look at its forward)."""
    from torch import nn

    from surgery.ir import normalize

    class BatchNormAct(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    monkeypatch.setattr(normalize, "why_not_its_base", lambda module: None)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), BatchNormAct(8), nn.MaxPool2d(2), nn.Conv2d(8, 4, 1)
    ).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].bias.normal_()
    site = surgery.find_blocks(model, (torch.randn(2, 3, 8, 8),)).get("1")
    assert not site.foldable and "numeric check failed" in site.reason
