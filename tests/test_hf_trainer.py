"""WinTrainer: WIN from a Hugging Face Trainer. Its losses are win.win's, step for step (float64,
the same batches); its thin model is a plain HF folder; under torchrun the ranks agree; a run
resumed from a checkpoint saved in the middle of imitation ends bit-identical to one not stopped."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hf_trainer_run import RECIPE, setup, trainer
from torch.optim.optimizer import register_optimizer_step_post_hook

from surgery import PlanError, win
from surgery.win.hf import STATE_FILE, WinBatches, WinTrainer

HERE = Path(__file__).parent


def logged_losses(run) -> list[float]:
    return [h["loss"] for h in run.state.log_history if "loss" in h]


def test_the_trainer_runs_win_and_writes_a_plain_hf_folder(tmp_path):
    """In float64 on the same batches, the losses the Trainer logs are win.win's to 1e-10, stage by
    stage (start probes, imitation, rate probes, fine-tuning); the saved folder loads with
    AutoModelForCausalLM in a fresh process that never imports surgery, and computes the thin model."""
    student, teacher, data = setup(torch.float64)
    run = trainer(student, teacher, data, tmp_path / "run")
    output = run.train()
    assert output.global_step == RECIPE.steps
    torch.manual_seed(0)
    ids = next(iter(run.win_batches()))[0][:1]
    reference = win.win(copy.deepcopy(student), teacher, list(run.win_batches()), ids, RECIPE)
    expected = [v for losses in reference.log.stages.values() for v in losses]
    assert any(k.startswith("imitate") for k in reference.log.stages)
    logged = logged_losses(run)
    assert len(logged) == len(expected) == RECIPE.steps
    assert max(abs(a - b) for a, b in zip(logged, expected, strict=True)) <= 1e-10
    stages = {k.removesuffix("/loss") for h in run.state.log_history for k in h if "/" in k}
    assert stages == set(reference.log.stages)
    folder = tmp_path / "thin"
    run.save_model(str(folder))
    probe = torch.randint(0, 32, (2, 16))
    torch.save(probe, tmp_path / "probe.pt")
    code = (
        "import sys, torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()\n"
        f"out = m(torch.load({str(tmp_path / 'probe.pt')!r})).logits\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
        "assert not any(name.split('.')[0] == 'surgery' for name in sys.modules)\n"
        "print(type(m).__name__, m.config.n_embd)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["GPT2LMHeadModel", "16"]
    loaded = torch.load(tmp_path / "out.pt")
    expected_logits = run.model.eval()(probe).logits
    assert torch.allclose(loaded.double(), expected_logits, rtol=1e-5, atol=1e-6)


def test_a_run_resumed_mid_imitation_ends_bit_identical(tmp_path):
    """Checkpoints every 8 steps; the one at step 8 is in the middle of the imitation stage. A new
    trainer resumed from it takes only the remaining 32 optimizer steps and ends with the same
    weights, bit for bit, and the same logged losses as the run that was never stopped."""
    student, teacher, data = setup()

    def trained(out: Path, resume=None, **arguments):
        steps: list[int] = []
        hook = register_optimizer_step_post_hook(lambda *_: steps.append(1))
        try:
            run = trainer(student, teacher, data, out, **arguments)
            run.train(resume_from_checkpoint=resume)
        finally:
            hook.remove()
        return run, len(steps)

    whole, whole_steps = trained(tmp_path / "a", save_strategy="steps", save_steps=8)
    checkpoint = tmp_path / "a" / "checkpoint-8"
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert state["current"]["stage"].startswith("imitate") and 0 < state["current"]["done"]
    assert not (tmp_path / "b").exists()
    resumed, resumed_steps = trained(tmp_path / "b", resume=str(checkpoint))
    assert (whole_steps, resumed_steps) == (40, 32)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(whole) == logged_losses(resumed)
    again, _ = trained(tmp_path / "a", resume=True)  # the last checkpoint of output_dir: step 40
    assert all(torch.equal(a[k], again.model.state_dict()[k]) for k in a)


def test_a_checkpoint_from_another_run_or_no_checkpoint_is_refused(tmp_path):
    student, teacher, data = setup()
    with pytest.raises(PlanError, match="no checkpoint-N folder"):
        trainer(student, teacher, data, tmp_path / "empty").train(resume_from_checkpoint=True)
    with pytest.raises(PlanError, match="has no win_state.pt"):
        trainer(student, teacher, data, tmp_path).train(resume_from_checkpoint=str(tmp_path))
    broken = tmp_path / "checkpoint-3"
    broken.mkdir()
    torch.save(
        {"version": 1, "step": 3, "journal": [{"stage": 1}], "current": {}}, broken / STATE_FILE
    )
    with pytest.raises(PlanError, match="stage run 0 has no 'stage'"):
        trainer(student, teacher, data, tmp_path).train(resume_from_checkpoint=str(broken))
    (broken / STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(PlanError, match="cannot be read"):
        trainer(student, teacher, data, tmp_path).train(resume_from_checkpoint=str(broken))


def test_under_torchrun_both_ranks_end_with_identical_thin_weights(tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(HERE / "hf_trainer_run.py"), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=HERE)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank-{r}.pt") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert (tmp_path / "thin" / "config.json").is_file()


def test_gradient_accumulation_and_bf16_keep_the_budget_in_optimizer_steps(tmp_path):
    """gradient_accumulation_steps=2: each of the 40 optimizer steps reads two batches, so the run
    reads exactly 40 batches more than with one (the start's calibration reads are the same);
    bf16: the losses under autocast, the thin model finite and in the student's dtype."""
    student, teacher, data = setup()

    def batches_read(accumulate: int) -> tuple[int, int, WinTrainer]:
        steps: list[int] = []
        read: list[int] = []
        hook = register_optimizer_step_post_hook(lambda *_: steps.append(1))
        original = WinBatches._pair
        WinBatches._pair = lambda self, batch: (read.append(1), original(self, batch))[1]
        try:
            run = trainer(
                student, teacher, data, tmp_path, gradient_accumulation_steps=accumulate, bf16=True
            )
            run.train()
        finally:
            WinBatches._pair = original
            hook.remove()
        return len(steps), len(read), run

    steps_1, read_1, _ = batches_read(1)
    steps_2, read_2, run = batches_read(2)
    assert steps_1 == steps_2 == RECIPE.steps == len(logged_losses(run))
    assert read_2 - read_1 == RECIPE.steps
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in run.model.parameters())


def test_optimiser_arguments_the_recipe_overrides_are_not_dropped_silently(tmp_path):
    """TrainingArguments' learning rate, scheduler, betas... are the recipe's in a WIN run: setting
    them away from their defaults warns and names the Recipe field to use; the defaults do not."""
    student, teacher, data = setup()
    with pytest.warns(UserWarning) as caught:
        trainer(student, teacher, data, tmp_path, learning_rate=1e-3, adam_beta2=0.98)
    text = " ".join(str(w.message) for w in caught)
    assert "learning_rate=0.001 (Recipe finetune_lr=)" in text
    assert "adam_beta2=0.98 (Recipe betas=)" in text
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="WinTrainer", category=UserWarning)
        trainer(student, teacher, data, tmp_path)
