"""The numeric self-check (surgery.analysis.selfcheck): a site the rules misjudge is refused with the measured
error and the modules on its route, the others are offered with theirs; the user's model and RNG are
untouched; on the meta device every site says it was not checked."""

from __future__ import annotations

import torch
from conftest import randomise_batchnorm
from torch import nn

import surgery
from surgery.ir import normalize


class BatchNormAct(nn.BatchNorm2d):
    def forward(self, x):
        return torch.relu(super().forward(x))


def _net(norm: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    torch.manual_seed(0)
    return randomise_batchnorm(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            norm(8),
            nn.MaxPool2d(2),  # no consumer: a pair at 1 folds on the producer side
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )
    ).eval()


X = torch.randn(2, 3, 8, 8)


def test_a_site_the_rules_misjudge_is_refused_with_the_measured_error(monkeypatch):
    # the rules as they were: a BatchNorm subclass that applies an activation taken for a BatchNorm
    monkeypatch.setattr(normalize, "why_not_its_base", lambda module: None)
    model = _net(BatchNormAct)
    unchecked = surgery.find_blocks(model, (X,), check=False).get("1")
    assert unchecked.route.kind == "producer through BatchNorm"  # wrong: the ReLU is inside
    paired = surgery.insert_pairs(model, (X,), init="random", sites=["1"], check=False).eval()
    with torch.no_grad():
        wrong = (paired(X) - surgery.fold(paired)(X)).abs().max() / paired(X).abs().max()
    assert wrong > 1e-3  # the silent wrong fold the check exists for

    table = surgery.find_blocks(model, (X,))
    site = table.get("1")
    assert not site.foldable
    assert site.reason.startswith("numeric check failed: rel err") and "through 1, 0" in site.reason
    assert site.checked.startswith("failed")
    for other in table.foldable:
        assert other.checked.startswith("checked: rel err") and "float64" in other.checked
    assert any("numeric check failed" in row[8] for row in table.rows())

    paired = surgery.insert_pairs(model, (X,), init="random").eval()  # auto: the rest
    assert "1" not in {s.name for s in paired.plan.sites} and paired.plan.sites
    with torch.no_grad():
        error = (paired(X) - surgery.fold(paired)(X)).abs().max() / paired(X).abs().max()
    assert error <= 1e-5


def test_the_check_leaves_the_model_and_the_rng_alone():
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dtype = next(model.parameters()).dtype
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    table = surgery.find_blocks(model, (X,))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert next(model.parameters()).dtype == dtype and not model.training
    assert all(b.checked for b in table.foldable)


def test_on_the_meta_device_sites_say_they_were_not_checked():
    with torch.device("meta"):
        model = _net()
    table = surgery.find_blocks(model, (torch.empty(2, 3, 8, 8, device="meta"),))
    assert table.foldable
    assert all("not numerically checked (meta device" in b.checked for b in table.foldable)
    assert all("not numerically checked" in row[7] for row in table.rows() if row[7] != "-")


def test_a_model_that_cannot_run_in_float64_is_checked_in_float32():
    class Float32Inside(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):  # a float32 matrix made inside forward: float64 inputs fail here
            return self.b(self.a(x) @ torch.eye(6, dtype=torch.float32))

    x = (torch.randn(4, 6),)
    table = surgery.find_blocks(Float32Inside().eval(), x, check="full")
    assert table.foldable and all("(float32)" in b.checked for b in table.foldable)
    # the default check runs only the touched layers, in float64 whatever forward does around them
    table = surgery.find_blocks(Float32Inside().eval(), x)
    assert table.foldable and all("float64, local" in b.checked for b in table.foldable)
