"""`surgery narrow`: a Hugging Face folder at half width, started from itself, written as a folder
`from_pretrained` loads with no surgery import; bad inputs exit 2 with one line and write nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from surgery.cli.main import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> tuple[Path, Path]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=32,
    )  # fmt: skip
    root = tmp_path_factory.mktemp("narrow")
    transformers.LlamaForCausalLM(config).save_pretrained(root / "llama")
    calib = root / "calib.safetensors"
    save_file({"input_ids": torch.randint(0, 64, (32, 12))}, calib)
    return root / "llama", calib


def _run(capsys, *args) -> tuple[int, str, list[str]]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def test_a_llama_folder_narrowed_to_half_width_loads_with_from_pretrained(
    capsys, llama_dir, tmp_path
):
    model, calib = llama_dir
    out = tmp_path / "thin"
    code, printed, _ = _run(
        capsys, "narrow", model, "--factor", "0.5", "--calib", calib, "--out", out
    )
    assert code == 0
    assert "start quality: KL" in printed
    script = (
        "import sys, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
        " c = m.config; print(c.hidden_size, c.intermediate_size, c.num_attention_heads,"
        " c.num_key_value_heads, 'surgery' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["32", "64", "4", "2", "False"]


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(capsys, llama_dir, tmp_path):
    model, calib = llama_dir
    bad_ids = tmp_path / "bad.safetensors"
    save_file({"input_ids": torch.full((2, 4), 999)}, bad_ids)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("taken")
    other = tmp_path / "net.safetensors"
    save_file({"w": torch.zeros(2)}, other)
    cases = {
        "a factor above 1": ["--factor", "2", "--out", tmp_path / "a"],
        "a factor of 0": ["--factor", "0", "--out", tmp_path / "b"],
        "widths not JSON": ["--widths", "{hidden", "--out", tmp_path / "c"],
        "an unknown field": ["--widths", '{"hidden_sise": 32}', "--out", tmp_path / "d"],
        "ids outside the vocabulary": [
            "--factor",
            "0.5",
            "--calib",
            bad_ids,
            "--out",
            tmp_path / "e",
        ],
        "a missing calibration file": [
            "--factor",
            "0.5",
            "--calib",
            tmp_path / "no",
            "--out",
            tmp_path / "f",
        ],
        "out onto the input": ["--factor", "0.5", "--out", model],
        "a non-empty out": ["--factor", "0.5", "--out", full],
    }
    for what, args in cases.items():
        code, _, lines = _run(capsys, "narrow", model, *args)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("surgery: error: "), (
            what,
            lines,
        )
    code, _, lines = _run(capsys, "narrow", other, "--factor", "0.5", "--out", tmp_path / "g")
    assert code == 2 and len(lines) == 1, lines
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.safetensors",
        "full",
        "net.safetensors",
    ]
    assert (full / "x").read_text() == "taken"
