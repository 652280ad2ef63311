"""The rotation start (`select="rotation"`, win/rotate.py): the residual stream turned onto its
principal directions instead of cut to channels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, MORE_FAMILIES
from torch import nn

from surgery import win
from surgery.win.sample import Selection

ALL = {**FAMILIES, **MORE_FAMILIES}
VOCAB = 24


class FunctionalRMSNorm(nn.RMSNorm):
    """An RMSNorm that calls the norm function with its own weight (as timm's norms do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class OffsetRMSNorm(nn.Module):
    """An RMSNorm whose weight holds its gain minus 1 (Gemma's: zeros at initialisation)."""

    OFFSET = 1.0

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * scale * (1.0 + self.weight)


class RMSNet(nn.Module):
    """Pre-RMSNorm residual MLP blocks over token embeddings, an untied head."""

    def __init__(self, width: int, hidden: int, blocks: int = 2, norm: type = nn.RMSNorm) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.norms = nn.ModuleList(norm(width) for _ in range(blocks))
        self.ins = nn.ModuleList(nn.Linear(width, hidden) for _ in range(blocks))
        self.outs = nn.ModuleList(nn.Linear(hidden, width) for _ in range(blocks))
        self.final = norm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for norm, up, down in zip(self.norms, self.ins, self.outs, strict=True):
            x = x + down(torch.tanh(up(norm(x))))
        return self.head(self.final(x))


@torch.no_grad()
def _hidden_copy(thin: RMSNet, basis: torch.Tensor) -> RMSNet:
    """A teacher twice as wide that computes exactly what `thin` does: its residual stream is
    `thin`'s turned into a d-dim subspace of D (orthonormal `basis`, D x d), its extra hidden units
    are dead, and its norm gains make up for normalising over D features instead of d."""
    d, h = thin.embed.weight.shape[1], thin.ins[0].out_features
    wide = RMSNet(2 * d, 2 * h, len(thin.ins), type(thin.final))
    q = basis.float()
    gain = math.sqrt(0.5) - getattr(type(thin.final), "OFFSET", 0.0)  # what the weight holds
    wide.embed.weight.copy_(thin.embed.weight @ q.T)
    for i in range(len(thin.ins)):
        wide.norms[i].weight.fill_(gain)
        wide.ins[i].weight.zero_()
        wide.ins[i].bias.zero_()
        wide.ins[i].weight[:h] = thin.ins[i].weight @ q.T
        wide.ins[i].bias[:h] = thin.ins[i].bias
        wide.outs[i].weight.zero_()
        wide.outs[i].weight[:, :h] = q @ thin.outs[i].weight
        wide.outs[i].bias.copy_(q @ thin.outs[i].bias)
    wide.final.weight.fill_(gain)
    wide.head.weight.copy_(thin.head.weight @ q.T)
    wide.head.bias.copy_(thin.head.bias)
    return wide.eval()


@pytest.mark.parametrize("norm", [nn.RMSNorm, FunctionalRMSNorm, OffsetRMSNorm])
def test_a_teacher_hiding_a_thin_model_in_a_turned_subspace_gives_it_back(norm):
    torch.manual_seed(0)
    thin = RMSNet(8, 12, norm=norm).eval()
    basis = torch.linalg.qr(torch.randn(16, 8, dtype=torch.float64)).Q
    teacher = _hidden_copy(thin, basis)
    ids = torch.randint(0, VOCAB, (64, 10))
    assert (teacher(ids) - thin(ids)).abs().max() < 1e-4  # the construction is right
    errors = {}
    for select in ("rotation", "energy"):
        torch.manual_seed(1)
        student = RMSNet(8, 12, norm=norm).eval()
        win.sample_from_teacher(student, teacher, (ids[:2],), select=select, refit=ids)
        errors[select] = (student(ids) - teacher(ids)).abs().max().item()
    assert errors["rotation"] < 1e-4, errors  # the turned subspace found and taken whole
    assert errors["energy"] > 1e-2, errors  # no d channels hold it


@pytest.mark.parametrize("name", sorted(ALL))
def test_rotation_start_runs_on_every_family(name):
    family = ALL[name]
    torch.manual_seed(0)
    student = family.build(family.width)
    x = family.inputs()
    teacher = win.widen(student, 2.0, x).eval()
    calibration = torch.cat([b[0] for b in family.batches()])
    selection = Selection(student, teacher, x)
    selection.choose("rotation", calibration=calibration)
    selection.copy()
    student.eval()
    with torch.no_grad():
        out = student(*x)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    assert torch.isfinite(logits).all(), name
    reads_norms = any(
        op.kind == "norm" and op.attrs.get("normalized") == 1
        for op in selection.t.flow.ops.values()
    )
    assert bool(selection.bases) == reads_norms, name
    for basis in selection.bases.values():  # orthonormal columns
        assert torch.allclose(
            basis.T @ basis, torch.eye(basis.shape[1], dtype=basis.dtype), atol=1e-8
        )


def test_the_measured_start_tries_the_rotation_where_norms_read_the_stream():
    """Where feature norms read the residual stream the measured start tries the rotation beside
    the channel selections (CNNs without such norms skip it: tests/test_win.py); on a teacher that
    hides a thin model in a turned subspace it is the candidate kept, and its start is that model."""
    from surgery.win.start import held_out_batch, recipe_start, start_quality

    torch.manual_seed(0)
    thin = RMSNet(8, 12).eval()
    teacher = _hidden_copy(thin, torch.linalg.qr(torch.randn(16, 8, dtype=torch.float64)).Q)
    ids = torch.randint(0, VOCAB, (40, 16, 10))
    batches = [(x, x) for x in ids]
    student = RMSNet(8, 12)
    recipe = win.Recipe(steps=200).for_model(student, (ids[0][:2],))
    probed = []

    def probe(model, steps, stage):  # a candidate's short distillation, here left out
        probed.append(stage)

    log = recipe_start(student, teacher, batches, (ids[0][:2],), recipe, probe=probe, steps=200)
    names = ["own initialisation", "first", "uniform", "energy", "rotation"]
    assert probed == [f"start probe: {n}" for n in names]
    assert min(log.start, key=log.start.get) == "rotation, after 4 steps"
    assert any("rotation chosen" in e for e in log.events)
    held_out = held_out_batch(batches, recipe.sample_refit)
    assert start_quality(student, teacher, held_out) < 1e-8


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channel norm: channels moved last inside the module, normalised, moved back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias)
        return x.permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, width, 3, padding=1), LayerNorm2d(width)
        self.body, self.head = nn.Conv2d(width, width, 3, padding=1), nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head((x + self.body(self.norm(x))).mean((2, 3)))


def test_a_norm_of_a_tensor_made_inside_its_module_is_not_read_from_the_module_input():
    """A norm function called on a tensor the module computed (LayerNorm2d's permute) does not
    normalise the module's input: no stream is turned by what that module's input holds (its
    last axis is a spatial one of the same size here), and the start is the energy selection."""
    torch.manual_seed(0)
    student, x = ConvNeXtish(8), (torch.randn(4, 3, 16, 16),)
    teacher = win.widen(student, 2.0, x).eval()
    selection = Selection(student, teacher, x)
    selection.choose("rotation", calibration=torch.randn(16, 3, 16, 16))
    assert selection.bases == {}


@pytest.mark.parametrize("family", ["Gemma", "Llama"])
def test_a_norm_gain_stored_as_an_offset_is_measured(family):
    """Gemma's RMSNorm multiplies by 1 + weight: the rotation reads its gain as 1 + weight (and
    writes weight = gain - 1); Llama's multiplies by the weight itself: no offset."""
    transformers = pytest.importorskip("transformers")
    from surgery.win.rotate import gain_offsets

    config = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=16,
    )  # fmt: skip
    model = getattr(transformers, f"{family}ForCausalLM")(config)
    ids = torch.randint(0, VOCAB, (2, 6))
    offsets = gain_offsets(model, Selection(model, model, (ids,)).t.flow)
    norms = [n for n, p in model.named_parameters() if "norm" in n]
    if family == "Gemma":
        assert sorted(offsets) == sorted(norms) and len(norms) == 5
        assert all(torch.allclose(v, torch.ones_like(v)) for v in offsets.values())
    else:
        assert offsets == {}
