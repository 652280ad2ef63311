"""`surgery inspect` as a user runs it: every site of a torchvision, timm and Hugging Face model says
it was numerically checked, with the measured error; a BatchNorm subclass that applies an
activation is never folded through."""

from __future__ import annotations

import re

import pytest
from small_models import tiny_hf_config
from surgery.cli.main import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    """Rows on one line each (the table wraps to the terminal width), so cells can be read."""
    monkeypatch.setenv("COLUMNS", "400")


def _inspect(capsys, *args: str) -> list[str]:
    assert main(["inspect", *args]) == 0
    out = capsys.readouterr().out
    return [line for line in out.splitlines() if re.match(r"│ +\d+ ", line)]


def _site_rows(rows: list[str]) -> list[list[str]]:
    return [[cell.strip() for cell in row.strip("│").split("│")] for row in rows]


@pytest.mark.parametrize(
    "model, shape",
    [
        ("torchvision.models:resnet18", "1x3x32x32"),
        ("timm.models:mobilenetv3_small_050", "1x3x32x32"),
        # VGG's 25088 x 4096 and 4096 x 4096 classifier sites were once left unchecked (over the
        # self-check's cost budget): the checking pairs now fold as their factors
        ("torchvision.models:vgg11", "1x3x32x32"),
    ],
)
def test_inspect_says_every_site_was_checked(capsys, model, shape):
    rows = _site_rows(_inspect(capsys, model, "--input-shape", shape))
    folding = [r for r in rows if not r[6].startswith("refused")]
    assert folding and all(r[7].startswith("checked: rel err") for r in folding), rows
    assert all(float(r[7].split()[3]) <= 1e-9 for r in folding)


def test_inspect_of_a_hugging_face_config_is_checked(capsys, tmp_path):
    config = tiny_hf_config("bert", vocab_size=100)
    config.save_pretrained(tmp_path)
    rows = _site_rows(_inspect(capsys, str(tmp_path), "--input-shape", "1x8"))
    folding = [r for r in rows if not r[6].startswith("refused")]
    assert folding and all(r[7].startswith("checked: rel err") for r in folding)


def test_inspect_never_folds_through_a_batchnorm_that_applies_an_activation(capsys):
    rows = _site_rows(_inspect(capsys, "small_models:bn_act_net", "--input-shape", "2x3x8x8"))
    assert not any("producer through BatchNorm" in r[6] for r in rows)
    after_bn = next(r for r in rows if r[1] == "1")
    assert after_bn[6].startswith("refused") or after_bn[7].startswith("checked")


def test_resnetv2_with_groupnorm_and_standardised_convs_shows_its_true_widths(capsys):
    """timm's BiT ResNetV2 (GroupNormAct, StdConv2d): every boundary's feature axis is its
    channels (a GroupNorm's output is channels-first), so each shows its width, not a spatial size."""
    rows = _site_rows(
        _inspect(capsys, "timm.models.resnetv2:resnetv2_50x1_bit", "--input-shape", "1x3x32x32")
    )
    by_site = {row[1]: row for row in rows}
    widths = {"stages.0": "256", "stages.1": "512", "stages.2": "1024", "stages": "2048"}
    for site, width in widths.items():
        shape, axis, shown = by_site[site][3:6]
        assert (axis, shown) == ("1", width) and shape.split("x")[1] == width, by_site[site]
    for row in rows:
        shape, axis, width = row[3].split("x"), row[4], row[5]
        assert axis == "1" and shape[1] == width, row
