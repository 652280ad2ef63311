"""Paired models under FSDP2 (fully_shard, gloo on CPU, 2 ranks under torchrun)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import max_rel_error
from safetensors.torch import load_file
from small_models import tiny_hf_config


def _torchrun(script: str, out: Path) -> list[dict]:
    """`script` on 2 ranks (torchrun, gloo); what each rank wrote to `out`.RANK."""
    path = Path(__file__).with_name(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*cmd, str(path), str(out)], capture_output=True, text=True, timeout=300, cwd=path.parent
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """tests/fsdp_fold.py on 2 ranks: what each rank folded and the checkpoints it saved."""
    out = tmp_path_factory.mktemp("fsdp") / "fold"
    return out, _torchrun("fsdp_fold.py", out)


def test_fold_of_an_fsdp2_model_equals_the_single_process_fold_bit_for_bit(fsdp_run):
    for rank, got in enumerate(fsdp_run[1]):
        reference = got["reference"]
        assert got["class"] == "DeepThin"  # the user's class, not FSDPDeepThin
        assert list(got["every"]) == list(reference)
        assert all(torch.equal(got["every"][k], v) for k, v in reference.items())
        assert torch.equal(*got["outputs"])
        if rank == 0:
            assert all(torch.equal(got["rank0"][k], v) for k, v in reference.items())
        else:
            assert got["rank0"] is None  # rank0_only: nothing gathered here


def test_save_of_an_fsdp2_model_writes_the_same_bytes_as_unsharded(fsdp_run):
    out = fsdp_run[0]
    unsharded = Path(f"{out}.unsharded.safetensors").read_bytes()
    assert Path(f"{out}.sharded.safetensors").read_bytes() == unsharded


@pytest.fixture(scope="module")
def fsdp_win(tmp_path_factory) -> list[dict]:
    """tests/fsdp_win.py on 2 ranks."""
    return _torchrun("fsdp_win.py", tmp_path_factory.mktemp("fsdp") / "win")


def test_premerged_training_under_fsdp2_follows_the_plain_trajectory(fsdp_win):
    for got in fsdp_win:
        merged, plain = got["premerged"]["always"], got["premerged"]["False"]
        assert len(plain) == 4 and plain[-1] != plain[0]
        assert max(abs(a - b) for a, b in zip(plain, merged, strict=True)) <= 1e-10


def test_win_under_fsdp2_equals_the_single_process_run(fsdp_win):
    """Imitation + fine-tuning sharded per block on 2 ranks (the frozen teacher sharded too), each
    holding half of every batch, ends where one process on the whole batches ends (float64), on a
    CNN, a tiny HF LLaMA and a tied GPT-2."""
    from fsdp_win import FAMILIES, run_win

    ranks = fsdp_win
    for family in FAMILIES:
        single = run_win(family, world=1, rank=0)
        assert not single["sharded"]
        for got in ranks:
            assert got[family]["sharded"] and got[family]["class"] == single["class"]
            assert got[family]["tied"] == single["tied"]  # GPT-2's lm_head stays tied
            assert list(got[family]["thin"]) == list(single["thin"])
            for name, value in single["thin"].items():
                assert torch.equal(got[family]["thin"][name], ranks[0][family]["thin"][name])
                assert max_rel_error(value, got[family]["thin"][name]) <= 1e-10, (family, name)


def test_surgery_fold_of_the_dcp_checkpoint_equals_the_single_process_fold(fsdp_run, tmp_path):
    """A torch.distributed.checkpoint directory written by 2 ranks, folded by the command with no
    process group and no model code, bit for bit the single-process fold (float64)."""
    out, ranks = fsdp_run
    thin = tmp_path / "thin.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "surgery.cli.main", "fold", f"{out}.dcp", "--out", str(thin)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    folded = load_file(thin)
    reference = ranks[0]["reference"]
    assert sorted(folded) == sorted(reference)
    assert all(torch.equal(folded[k], v) for k, v in reference.items())


def test_fold_sharded_folds_in_place_like_the_single_process_fold(fsdp_run):
    """The sharded model itself becomes the thin one (still FSDP2): its gathered state equals the
    single-process fold bit for bit; consumer folds on row-sharded weights fold shard-locally, and
    only the other folded parameters and the pairs crossed ranks."""
    for got in fsdp_run[1]:
        reference = got["reference"]
        assert sorted(got["in_place"]) == sorted(reference)  # the pairs are gone
        assert all(torch.equal(got["in_place"][k], v) for k, v in reference.items())
        assert got["in_place_class"] == "FSDPDeepThin"
        assert torch.equal(got["in_place_output"], got["outputs"][0])
        received, model_bytes = got["bytes"]
        assert 0 < received < model_bytes
        assert any(name.endswith(".weight") for name in got["local"])


def test_a_sharding_that_cuts_tied_weights_is_refused_before_training():
    import transformers

    from surgery import win
    from surgery.errors import PlanError
    from surgery.win.loop import _check_ties

    config = tiny_hf_config("gpt2", vocab_size=32, n_embd=8, n_layer=1, n_head=2, n_positions=8)
    model = transformers.GPT2LMHeadModel(config)
    _check_ties(model, ["transformer.h.0"])  # the tie stays at the root: fine
    with pytest.raises(PlanError, match="tied weights transformer.wte.weight .*lm_head.weight"):
        _check_ties(model, ["transformer.wte"])
    assert win.shard  # the public entry point that runs this check
