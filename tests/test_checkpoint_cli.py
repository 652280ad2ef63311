"""The checkpoint commands as a user runs them, through subprocess on real files: round trips for
torchvision resnet18, Hugging Face BERT and GPT-2 (sharded), and a corpus of bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import max_rel_error, randomise_batchnorm, safetensors_metadata
from safetensors.torch import load_file, save_file
from small_models import tiny_hf_config
from surgery.cli.main import main

from surgery.files.checkpoint import PLAN_KEY, load, save
from surgery.files.stream import fold_checkpoint

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))


def _surgery(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "surgery.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _ok(*args: object) -> str:
    result = _surgery(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---------------------------------------------------------------- round trips


def test_resnet18_insert_fold_strict_load_matches_paired(tmp_path):
    model = randomise_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()
    thin_in, paired, thin = tmp_path / "r18.safetensors", tmp_path / "p.safetensors", tmp_path / "t"
    save(model, thin_in, source="torchvision.models:resnet18", kwargs={"num_classes": 10})

    out = _ok("insert", thin_in, "--input-shape", "1x3x32x32", "--init", "random", "--out", paired)
    assert "layer4" in out and "512 -> 1024" in out and "producer through BatchNorm" in out
    out = _ok("fold", paired, "--out", thin.with_suffix(".safetensors"), "--verify")
    assert "pairs folded             │ 11" in out and "│ OK" in out

    x = torch.randn(1, 3, 32, 32)
    fresh = torchvision.models.resnet18(num_classes=10).eval()
    fresh.load_state_dict(load_file(thin.with_suffix(".safetensors")), strict=True)
    rebuilt = load(paired)  # the original rebuilt from the stored source, pairs attached
    with torch.no_grad():
        assert max_rel_error(rebuilt(x), fresh(x)) <= 1e-5
        assert max_rel_error(model(x), fresh(x)) > 1e-3  # the random pairs changed the function

    out = _ok("inspect", paired, "--picture", tmp_path / "blocks.svg")
    assert "Block boundaries of ResNet" in out and "pairs in this checkpoint" in out
    assert "layer4.0" in (tmp_path / "blocks.svg").read_text()


def test_bert_directory_round_trip_and_onnx_verify(tmp_path):
    config = tiny_hf_config("bert", hidden_size=64, intermediate_size=128)
    transformers.BertModel(config).eval().save_pretrained(tmp_path / "bert")
    paired, thin = tmp_path / "paired", tmp_path / "thin"
    args = ("--input-shape", "2x16", "--init", "random", "--bias", "--out", paired)
    assert "encoder.layer.0" in _ok("insert", tmp_path / "bert", *args)
    _ok("fold", paired, "--out", thin, "--onnx", tmp_path / "thin.onnx")
    assert sorted(p.name for p in thin.iterdir()) == ["config.json", "model.safetensors"]
    assert (tmp_path / "thin.onnx").stat().st_size > 0

    folded = transformers.BertModel.from_pretrained(thin).eval()
    transformers.BertModel(config).load_state_dict(
        load_file(thin / "model.safetensors"), strict=True
    )
    with torch.no_grad():
        a = load(paired)(IDS).last_hidden_state
        assert max_rel_error(a, folded(IDS).last_hidden_state) <= 1e-5

    out = _ok("verify", paired, thin)
    assert "CPUExecutionProvider" in out and "same as the original" in out and "OK" in out


def test_gpt2_sharded_round_trip(tmp_path):
    config = tiny_hf_config("gpt2", n_embd=64)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(tmp_path / "gpt2")
    paired, thin = tmp_path / "paired", tmp_path / "thin"
    probes = "transformer.h.0,transformer.h.1"  # pre-LN residual stream: probe only
    _ok("insert", tmp_path / "gpt2", "--input-shape", "2x16", "--init", "random",
        "--probes", probes, "--max-shard-size", "150KB", "--out", paired)  # fmt: skip
    assert len(json.loads((paired / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    out = _ok("fold", paired, "--out", thin, "--verify")
    assert "probe-only sites dropped │ 2" in out and "│ OK" in out

    index = json.loads((thin / "model.safetensors.index.json").read_text())
    assert not any(name.startswith("pairs.") for name in index["weight_map"])
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(thin / shard))
    transformers.GPT2LMHeadModel(config).load_state_dict(state, strict=True)
    folded = transformers.GPT2LMHeadModel.from_pretrained(thin).eval()
    with torch.no_grad():
        assert max_rel_error(load(paired)(IDS).logits, folded(IDS).logits) <= 1e-5


# ---------------------------------------------------------------- bad files


def _rewrite_header(src: Path, dst: Path, edit) -> None:
    """Copy a safetensors file with its header JSON edited by `edit(header)`."""
    raw = src.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    dst.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])


def _edit_plan(change):
    def edit(header):
        plan = json.loads(header["__metadata__"][PLAN_KEY])
        change(plan)
        header["__metadata__"][PLAN_KEY] = json.dumps(plan)

    return edit


def _tensors_edited(change):
    def make(src: Path, dst: Path) -> None:
        state = load_file(src)
        change(state)
        save_file(state, dst, metadata=safetensors_metadata(src))

    return make


def _pair_key(state: dict, role: str = "widen.weight") -> str:
    return next(k for k in state if k.startswith("pairs.") and k.endswith(role))


def _pickled(src: Path, folder: Path) -> Path:
    dst = folder / "paired.pt"
    torch.save({"state_dict": load_file(src), "plan": safetensors_metadata(src)[PLAN_KEY]}, dst)
    return dst


def _written(write):
    def make(src: Path, folder: Path) -> Path:
        dst = folder / "bad.safetensors"
        write(src, dst)
        return dst

    return make


def _copy(src: Path, folder: Path) -> Path:
    dst = folder / "paired.safetensors"
    dst.write_bytes(src.read_bytes())
    return dst


# case -> (make the bad input in a folder, what the one-line message says, extra CLI arguments)
BAD_FILES = {
    "truncated": (
        _written(lambda src, dst: dst.write_bytes(src.read_bytes()[:-100])),
        "truncated",
    ),
    "garbage header": (
        _written(lambda src, dst: dst.write_bytes(b"\x10" + b"\x00" * 7 + b"\xff" * 64)),
        "header is not valid JSON",
    ),
    "header lies about sizes": (
        _written(
            lambda src, dst: _rewrite_header(
                src, dst, lambda h: h["0.weight"].__setitem__("shape", [16, 9])
            )
        ),
        "the header lies about sizes",
    ),
    "plan names a missing tensor": (
        _written(
            lambda src, dst: _rewrite_header(
                src,
                dst,
                _edit_plan(
                    lambda p: p["sites"][1]["route"]["targets"][0]["params"].update(
                        weight="nope.weight"
                    )
                ),
            )
        ),
        "names 'nope.weight', which the state_dict lacks",
    ),
    "plan with wrong shapes": (
        _written(
            lambda src, dst: _rewrite_header(
                src, dst, _edit_plan(lambda p: p["sites"][0].__setitem__("D", 99))
            )
        ),
        "does not match the plan (widen 99x16",
    ),
    "pickle without the flag": (_pickled, "pass --trust-pickle"),
    "NaN weights": (
        _written(_tensors_edited(lambda s: s["4.bias"].fill_(float("nan")))),
        "'4.bias' holds NaN or Inf",
    ),
}
MORE_BAD_INPUT = {  # the same checks, run in process (a subprocess each costs a torch import)
    "Inf in a pair": (
        _written(_tensors_edited(lambda s: s[_pair_key(s)].view(-1)[3].fill_(float("inf")))),
        "holds NaN or Inf",
    ),
    "mixed dtypes": (
        _written(_tensors_edited(lambda s: s.__setitem__("2.weight", s["2.weight"].half()))),
        "mixed dtypes in the tensors a fold combines (pairs.0.widen.weight is float32, 2.weight is float16)",
    ),
    "output is the input": (_copy, "would overwrite the input"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_exit_2_one_line_no_output(case, paired_file, tmp_path):
    make, message = BAD_FILES[case]
    _refused(tmp_path, make(paired_file, tmp_path), message, _subprocess)


@pytest.mark.parametrize("case", list(MORE_BAD_INPUT))
def test_more_bad_input_exit_2_one_line_no_output(case, paired_file, tmp_path, capsys):
    make, message = MORE_BAD_INPUT[case]

    def in_process(*args: object) -> tuple[int, str]:
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err

    _refused(tmp_path, make(paired_file, tmp_path), message, in_process)


def test_trusted_pickle_folds_to_the_same_bytes(paired_file, tmp_path):
    pickled = _pickled(paired_file, tmp_path)
    _ok("fold", pickled, "--out", tmp_path / "thin.safetensors", "--trust-pickle")
    fold_checkpoint(paired_file, tmp_path / "again.safetensors")
    thin, again = (tmp_path / n for n in ("thin.safetensors", "again.safetensors"))
    assert thin.read_bytes() == again.read_bytes()  # same tensors, same bytes, whatever the source


def _subprocess(*args: object) -> tuple[int, str]:
    result = _surgery(*args)
    return result.returncode, result.stderr


def _refused(folder: Path, bad: Path, message: str, run) -> None:
    """Exit 2, one line on stderr naming the problem, nothing written beside the input."""
    before = {p.name for p in folder.iterdir()}
    out = bad if bad.name == "paired.safetensors" else folder / "thin.safetensors"
    code, stderr = run("fold", bad, "--out", out)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("surgery: error: "), stderr
    assert message in lines[0], lines[0]
    assert {p.name for p in folder.iterdir()} == before
