"""Models the analysis once misread, each told the true reason: a Linear whose weight is a
property, a model random in eval mode, a dataclass output, blocks held in ModuleDict/ModuleList
containers, and a second output that hides the boundaries of the first."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from small_models import mlp
from torch import nn

import surgery

X = torch.randn(2, 8)


class ScaledLinear(nn.Linear):
    """A Linear whose `weight` is a property: a raw parameter times a buffer (a reparametrisation)."""

    def __init__(self, a: int, b: int):
        super().__init__(a, b)
        raw = self.weight.detach().clone()
        del self.weight
        self.raw = nn.Parameter(raw)
        self.register_buffer("gain", torch.full((b, 1), 0.5))

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.raw * self.gain


def test_a_property_weight_is_refused_by_name_and_the_rest_folds(one_thread):
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), ScaledLinear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    ).eval()
    table = surgery.find_blocks(model, X)  # once: KeyError 'weight'
    by_name = {b.name: b for b in table}
    assert "weight is computed" in by_name["1"].reason and "in 2" in by_name["1"].reason
    paired = surgery.insert_pairs(model, X, init="random")
    assert {s.name for s in paired.plan.sites} == {"0", "3"}
    with torch.no_grad():
        assert torch.allclose(surgery.fold(paired)(X), paired(X), atol=1e-5)


RANDOM_IN_EVAL = {
    "MC dropout": lambda h: F.dropout(h, 0.2, training=True),
    "dropout default": lambda h: F.dropout(h, 0.2),  # F.dropout trains unless told otherwise
    "random mask": lambda h: h * (torch.rand_like(h) > 0.3),  # MAE-style masking
    "bernoulli": lambda h: h * torch.bernoulli(torch.full_like(h, 0.7)),
    "noise": lambda h: h + 0.01 * torch.randn(h.shape),
}


@pytest.mark.parametrize("noise", RANDOM_IN_EVAL)
def test_a_model_random_in_eval_mode_is_told_so(one_thread, noise):
    """Random between two layers: every fold there is exact, yet nothing can be proven on the
    model as a whole; the reason says so, whichever way the randomness is drawn."""

    class Random(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp([8, 16, 16, 16])
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(RANDOM_IN_EVAL[noise](self.body(x)))

    table = surgery.find_blocks(Random().eval(), X)
    assert table and all("not deterministic in eval mode" in b.reason for b in table)


def test_dropout_off_in_eval_is_deterministic(one_thread):
    """nn.Dropout and F.dropout(training=self.training) draw nothing in eval: sites are offered."""

    class Regular(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp([8, 16, 16, 16])
            self.drop = nn.Dropout(0.2)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(F.dropout(self.drop(self.body(x)), 0.1, training=self.training))

    table = surgery.find_blocks(Regular().eval(), X)
    assert [b for b in table if b.foldable] and not any(
        "not deterministic" in (b.reason or "") for b in table
    )


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    features: torch.Tensor


class ReturnsDataclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        features = self.b(torch.relu(self.a(x)))
        return Output(self.c(torch.relu(features)), features)


def test_a_dataclass_output_is_captured_as_outputs(one_thread):
    table = surgery.find_blocks(ReturnsDataclass().eval(), X)
    assert table.foldable  # once: "no tensor carries the whole flow (an encoder-decoder ...)"
    paired = surgery.insert_pairs(ReturnsDataclass().eval(), X, init="random")
    with torch.no_grad():
        out, thin = paired(X), surgery.fold(paired)(X)
    assert isinstance(thin, Output) and torch.allclose(thin.logits, out.logits, atol=1e-5)


class ContainerBlocks(nn.Module):
    """Pre-norm blocks held as nn.ModuleDicts in an nn.ModuleList, called from the parent."""

    def __init__(self, width: int = 16, layers: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm": nn.LayerNorm(width),
                    "up": nn.Linear(width, 2 * width),
                    "down": nn.Linear(2 * width, width),
                }
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block["down"](torch.relu(block["up"](block["norm"](x))))
        return self.head(self.norm(x))


def test_blocks_held_in_containers_offer_their_inner_sites(one_thread):
    table = surgery.find_blocks(ContainerBlocks().eval(), X)
    inner = {b.name for b in table if b.in_block and b.foldable}
    assert {"blocks.0.norm", "blocks.0.down", "blocks.1.norm", "blocks.1.down"} <= inner


def test_a_second_output_that_hides_boundaries_is_named(one_thread):
    class AlsoEmbeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 16)
            self.body = mlp([16, 16, 16, 16])
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            e = self.embed(x)
            return self.head(torch.relu(self.body(torch.relu(e)))), e

    table = surgery.find_blocks(AlsoEmbeddings().eval(), X)
    text = str(table)
    assert "hidden by the output embed" in text.replace("\n", " ")
