"""WIN training end to end on tiny models: stage losses fall, the fold is exact, the architecture
comes back; the teacher builders, the sampled start, the closed-form start, and DDP under torchrun."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from conftest import max_rel_error
from small_models import tiny_hf_config
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from win_models import DeepThin, synthetic_batches

import surgery
from surgery import win

X = synthetic_batches()[0][0][:4]


@pytest.fixture(scope="module")
def trained_teacher():
    torch.manual_seed(0)
    teacher = win.widen(DeepThin(), 2.0, X)
    win.train(teacher, synthetic_batches(), 60, lr=0.05)
    return teacher.eval()


def test_win_end_to_end_stages_improve_and_fold_is_exact(trained_teacher, tmp_path):
    torch.manual_seed(1)
    student = DeepThin()
    recipe = win.Recipe(imitation_steps=25, finetune_steps=40, imitation_lr=0.05, finetune_lr=0.01)
    result = win.win(student, trained_teacher, synthetic_batches(), X, recipe)
    assert result.stages == [["stem"], ["blocks.0"], ["blocks.1"], ["blocks.2"], ["blocks"]]
    for stage, losses in result.log.stages.items():
        if stage.startswith("imitate"):
            first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
            assert last < first, f"{stage}: {first:.4f} -> {last:.4f}"
    result.paired.eval()
    with torch.no_grad():
        assert max_rel_error(result.paired(X), result.thin(X)) <= 1e-5
    assert type(result.thin) is DeepThin
    DeepThin().load_state_dict(result.thin.state_dict(), strict=True)
    assert Path(result.log.plot(str(tmp_path / "curves.png"))).stat().st_size > 1000
    assert {n for n, _ in student.named_parameters()} == {
        n for n, _ in result.thin.named_parameters()
    }


def test_merge_after_imitation_fine_tunes_the_thin_model(trained_teacher):
    recipe = win.Recipe(
        stages=[["blocks.1"]], imitation_steps=5, finetune_steps=5, merge="after_imitation"
    )
    result = win.win(DeepThin(), trained_teacher, synthetic_batches(), X, recipe)
    assert type(result.thin) is DeepThin and "fine-tune" in result.log.stages


def test_restarts_keep_the_best_mimic(trained_teacher):
    torch.manual_seed(2)
    paired = surgery.insert_pairs(
        DeepThin(), X, wide=win.teacher_widths(trained_teacher, X, ["blocks.1"]), sites=["blocks.1"]
    )
    log = win.Log()
    finals = win.imitate(
        paired,
        trained_teacher,
        synthetic_batches(),
        X,
        [["blocks.1"]],
        10,
        lr=0.05,
        restarts=2,
        log=log,
    )
    assert len([s for s in log.stages if "restart" in s]) == 3
    held_out = synthetic_batches()[0][0]
    with torch.no_grad():
        again = win.Imitation(paired, trained_teacher, X, sites=["blocks.1"])(held_out).item()
    assert again == pytest.approx(
        finals["imitate blocks.1"], rel=1e-6
    )  # the kept run is the best one


def test_imitation_loss_object_matches_mse_of_probe_and_teacher_block(trained_teacher):
    paired = surgery.insert_pairs(
        DeepThin(),
        X,
        wide=win.teacher_widths(trained_teacher, X, ["blocks.0"]),
        sites=["blocks.0"],
        init="random",
    )
    imitation = win.Imitation(paired, trained_teacher, X, sites=["blocks.0"])
    loss = imitation(X)
    seen = {}
    trained_teacher.blocks[0].register_forward_hook(lambda m, a, o: seen.setdefault("t", o))
    with torch.no_grad(), surgery.probe(paired, ["blocks.0"]) as probes:
        trained_teacher(X)
        paired(X)
        expected = nn.functional.mse_loss(probes["blocks.0"], seen["t"])
    trained_teacher.blocks[0]._forward_hooks.clear()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert paired.pairs["blocks.0"].widen.weight.grad is not None
    assert (
        paired.head.weight.grad is None
    )  # the forward stopped after the probe: later blocks untouched


def test_least_squares_start_fits_the_teacher_and_keeps_the_function(trained_teacher):
    torch.manual_seed(3)
    student = DeepThin().eval()
    paired = surgery.insert_pairs(
        student, X, wide=win.teacher_widths(trained_teacher, X, ["blocks.0"]), sites=["blocks.0"]
    ).eval()
    imitation = win.Imitation(paired, trained_teacher, X, sites=["blocks.0"])
    calibration = synthetic_batches()[1][0]
    with torch.no_grad():
        before = imitation(calibration).item()
        residual = win.least_squares_start(imitation, calibration)
        after = imitation(calibration).item()
        assert after < before and residual["blocks.0"] < 1
        assert (
            max_rel_error(student(X), paired(X)) <= 1e-4
        )  # M2 = pinv(M1): the forward is unchanged


def test_sampled_start_copies_scaled_teacher_neurons(trained_teacher):
    student = win.sample_from_teacher(
        DeepThin(), trained_teacher, X, generator=torch.Generator().manual_seed(0), scale="fan_in"
    )
    stem_t, stem_s = trained_teacher.stem.weight, student.stem.weight
    rows = [i for i in range(16) if any(torch.equal(stem_t[i], stem_s[j]) for j in range(8))]
    assert len(rows) == 8  # input channels are the model's: no scaling, rows copied verbatim
    head_cols = student.head.weight
    assert torch.allclose(
        head_cols * 8 / 16, trained_teacher.head.weight[:, rows]
    )  # scaled by D/d on the input side
    bn_s, bn_t = student.blocks[2].bn, trained_teacher.blocks[2].bn
    assert torch.equal(
        bn_s.running_var, bn_t.running_var[rows]
    )  # residual stream: one sample for all blocks


def test_teacher_builders():
    resnet = torchvision.models.resnet50(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    wide = win.widen(resnet, 2.0, x, residual=False)
    assert (
        wide.layer1[0].conv2.out_channels == 128 and wide.layer1[0].conv3.out_channels == 256
    )  # the paper's ResNet teacher: its 3x3 convs widened, its block outputs kept
    assert win.widen(resnet, 2.0, x).layer1[0].conv3.out_channels == 512  # every free width
    mlp = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 3)
    )
    wide_mlp = win.widen(mlp, 3, torch.randn(2, 8))
    assert [m.weight.shape for m in wide_mlp if hasattr(m, "weight")] == [
        (48, 8),
        (48, 48),
        (48,),
        (3, 48),
    ]
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(
        tiny_hf_config(
            "bert", hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=100
        )
    )
    wide_bert = win.widen(bert, 2)
    assert (
        wide_bert.config.hidden_size,
        wide_bert.config.intermediate_size,
        wide_bert.config.num_attention_heads,
    ) == (128, 256, 4)
    with pytest.raises(surgery.PlanError, match="factor must be >= 1"):
        win.widen(mlp, 0.5)


def test_one_to_k_block_mapping():
    assert win.teacher_site("encoder.layer.0", 2) == "encoder.layer.1"
    assert win.teacher_site("model.layers.5", 2) == "model.layers.11"
    assert win.teacher_site("blocks.3", {"blocks.3": "blocks.7"}) == "blocks.7"
    with pytest.raises(surgery.PlanError, match="no block index"):
        win.teacher_site("stem", 2)


def test_gpt2_student_imitates_a_deeper_teacher_through_probes():
    transformers = pytest.importorskip("transformers")

    def gpt(layers, width):
        config = tiny_hf_config(
            "gpt2", n_embd=width, n_layer=layers, n_head=2, vocab_size=50, n_positions=16
        )
        return transformers.GPT2LMHeadModel(config).eval()

    torch.manual_seed(0)
    student, teacher = gpt(2, 16), gpt(4, 32)
    ids = torch.randint(0, 50, (8, 16))
    batches = [(ids, ids)]
    recipe = win.Recipe(
        stages=[["transformer.h.0"], ["transformer.h.1"]],
        mapping=2,
        imitation_steps=15,
        finetune_steps=3,
        imitation_lr=0.05,
        optimizer="sgd",  # the lr above is an SGD one (attention models default to AdamW)
    )
    result = win.win(student, teacher, batches, ids, recipe)
    kinds = {s.name: s.route.kind for s in result.paired.plan.sites}
    assert kinds == {
        "transformer.h.0": "probe only",
        "transformer.h.1": "probe only",
    }  # pre-LN stream
    losses = result.log.stages["imitate transformer.h.0"]
    assert losses[-1] < losses[0]
    with torch.no_grad():
        assert max_rel_error(result.paired(ids).logits, result.thin(ids).logits) <= 1e-5


def test_stage2_under_torchrun_keeps_ranks_identical(tmp_path):
    out = tmp_path / "weights"
    script = Path(__file__).with_name("ddp_stage2.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=script.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    assert ranks[0]["finals"] == ranks[1]["finals"]
    assert torch.equal(ranks[0]["start"], ranks[1]["start"])  # one start, though fitted per rank


@pytest.mark.parametrize("policy", ["always", "auto"])
def test_training_in_premerged_mode_follows_the_plain_trajectory(policy):
    # the same paired MLP trained a few SGD steps with pairs merged and with pairs on the activations
    torch.manual_seed(5)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 3),
    )
    x = torch.randn(64, 6)
    batches = [(x, torch.randint(0, 3, (64,)))]
    paired = surgery.insert_pairs(mlp, (x,), init="random")
    twin = copy.deepcopy(paired)
    plain = win.train(paired, batches, 5, lr=0.05, premerged=False)
    merged = win.train(twin, batches, 5, lr=0.05, premerged=policy)
    assert max(abs(a - b) for a, b in zip(plain, merged, strict=True)) <= 1e-5
    assert not any(pair.premerged for pair in twin.pairs.values())  # the mode ends with the loop
    for (name, p), q in zip(paired.named_parameters(), twin.parameters(), strict=True):
        assert max_rel_error(p, q) <= 1e-5, name


def _rows(student, teacher):
    """The teacher's residual channels the student's were sampled from (found through the stem)."""
    return [
        i
        for i in range(teacher.stem.weight.shape[0])
        if any(torch.equal(teacher.stem.weight[i], w) for w in student.stem.weight)
    ]


def test_sample_scale_options_and_refit(trained_teacher):
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    fan_in = win.sample_from_teacher(DeepThin(), trained_teacher, X, generator=g(), scale="fan_in")
    plain = win.sample_from_teacher(DeepThin(), trained_teacher, X, generator=g())  # the default
    assert torch.equal(
        plain.head.weight, trained_teacher.head.weight[:, _rows(plain, trained_teacher)]
    )
    root = win.sample_from_teacher(DeepThin(), trained_teacher, X, generator=g(), scale="sqrt")
    assert torch.allclose(fan_in.head.weight, plain.head.weight * 2)
    assert torch.allclose(root.head.weight, plain.head.weight * 2**0.5)
    assert torch.equal(fan_in.stem.weight, plain.stem.weight)  # the model's input: never scaled
    with pytest.raises(surgery.PlanError):
        win.sample_from_teacher(DeepThin(), trained_teacher, X, scale="bogus")
    # refit (in eval mode, as the models run after training): each layer reproduces the teacher's
    # sampled channels better than the plain copy
    calibration = torch.cat([b[0] for b in synthetic_batches()])
    refit = win.sample_from_teacher(
        DeepThin(), trained_teacher, X, generator=g(), scale="none", refit=calibration
    )
    with torch.no_grad():
        logits = trained_teacher.eval()(calibration)
        errors = [
            nn.functional.mse_loss(m.eval()(calibration), logits).item() for m in (plain, refit)
        ]
    assert errors[1] < errors[0]


@pytest.mark.parametrize("loss", ["ln", "std"])
def test_normalised_imitation_losses_are_scale_free(trained_teacher, loss):
    paired = surgery.insert_pairs(
        DeepThin(), X, wide=win.teacher_widths(trained_teacher, X, ["blocks.0"]), sites=["blocks.0"]
    )
    imitation = win.Imitation(paired, trained_teacher, X, sites=["blocks.0"], loss=loss)
    before = imitation(X).item()
    with torch.no_grad():
        paired.pairs["blocks.0"].widen.weight.mul_(7.0)  # rescaling the probe changes nothing
    assert imitation(X).item() == pytest.approx(before, rel=1e-4)


def test_imitation_with_earlier_blocks_at_reduced_lr_and_warmup(trained_teacher):
    stages = [["blocks.0"], ["blocks.2"]]
    sites = ["blocks.0", "blocks.2"]
    paired = surgery.insert_pairs(
        DeepThin(), X, wide=win.teacher_widths(trained_teacher, X, sites), sites=sites
    )
    frozen = copy.deepcopy(paired)
    batches = synthetic_batches()
    win.imitate(frozen, trained_teacher, batches, X, stages, 5, earlier_lr=0.0, warmup=0.2)
    # stage 2 left the first stage's block alone (frozen) but trained its own
    once = copy.deepcopy(paired)
    win.imitate(once, trained_teacher, batches, X, stages[:1], 5, earlier_lr=0.0, warmup=0.2)
    assert torch.equal(frozen.blocks[0].conv.weight, once.blocks[0].conv.weight)
    assert not torch.equal(frozen.blocks[2].conv.weight, paired.blocks[2].conv.weight)
    slow = copy.deepcopy(paired)
    win.imitate(slow, trained_teacher, batches, X, stages, 5, earlier_lr=0.1, warmup=0.2)
    assert not torch.equal(slow.blocks[0].conv.weight, once.blocks[0].conv.weight)
    result = win.win(
        DeepThin(),
        trained_teacher,
        batches,
        X,
        win.Recipe(
            stages=stages,
            imitation_steps=3,
            finetune_steps=3,
            sampled_start=True,
            sample_refit=64,
            sample_scale="none",
            loss="ln",
            earlier_lr=0.1,
            imitation_warmup=0.3,
        ),
    )
    assert type(result.thin) is DeepThin


@pytest.mark.parametrize(
    "merge, steps, share",
    [("after_finetune", 37, 0.1), ("after_imitation", 23, 0.3), ("after_imitation", 40, 0.0)],
)
def test_a_budget_recipe_spends_exactly_its_student_steps(trained_teacher, merge, steps, share):
    """Every optimizer step counted: the start's probes, imitation, the rate probes, fine-tuning;
    a share of 0 is the start followed by fine-tuning only."""
    counted = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: counted.append(1))
    try:
        recipe = win.Recipe(
            steps=steps, imitation_share=share, stages=[["blocks.0"], ["blocks"]], merge=merge
        )  # fmt: skip
        result = win.win(DeepThin(), trained_teacher, synthetic_batches(), X, recipe)
    finally:
        handle.remove()
    assert len(counted) == steps
    imitated = sum(len(v) for k, v in result.log.stages.items() if k.startswith("imitate"))
    probed = sum(len(v) for k, v in result.log.stages.items() if k.startswith("rate probe"))
    started = sum(len(v) for k, v in result.log.stages.items() if k.startswith("start probe"))
    assert started == result.log.spent
    # the start's candidates (own, 3 selections of the teacher's units) distil `start_probe` of the
    # budget each when that fits
    each = max(1, round(win.Recipe().start_probe * steps))
    assert started == (4 * each if 4 * each * 4 <= steps else 0)
    tuned = steps - imitated - started
    # the fine-tuning rate, measured: the grid from the top, until a probe lowers the loss
    tried = [k for k in result.log.start if k.startswith("fine-tuning at")]
    grid = win.Recipe(steps=steps).for_model(DeepThin(), X).finetune_rates
    assert 1 <= len(tried) <= len(grid) and probed == len(tried) * max(
        1, round(win.Recipe().rate_probe * tuned)
    )
    assert imitated == round(steps * share)
    assert len(result.log.stages["fine-tune"]) + probed == tuned
    with pytest.raises(surgery.PlanError, match="restarts"):
        win.win(
            DeepThin(), trained_teacher, synthetic_batches(), X, win.Recipe(steps=10, restarts=1)
        )


def test_the_fine_tuning_rate_is_the_largest_whose_probe_lowers_the_loss(trained_teacher):
    """The rate grid is probed from the top: a rate whose short run does not lower the held-out
    distillation loss (here one that diverges and is rolled back) is passed over, the first that
    lowers it is kept with its run, and the smaller ones are never tried (their steps not spent)."""
    torch.manual_seed(0)
    recipe = win.Recipe(steps=200, finetune_rates=(0.01, 1e4, 0.03))
    result = win.win(DeepThin(), trained_teacher, synthetic_batches(), X, recipe)
    tried = {k: v for k, v in result.log.start.items() if k.startswith("fine-tuning at")}
    before = result.log.start["before fine-tuning"]
    assert [k.split(",")[0] for k in tried] == ["fine-tuning at 10000", "fine-tuning at 0.03"]
    assert not list(tried.values())[0] < before < math.inf
    assert list(tried.values())[1] < before
    assert any("rate 0.03 chosen" in e for e in result.log.events)
    assert all(torch.isfinite(p).all() for p in result.thin.parameters())


def test_a_rate_probe_ramps_up_to_its_rate(trained_teacher):
    """A rate probe warms up over its whole length (the run it stands for warms up too): its
    learning rate climbs linearly towards the rate probed, never jumping to it at the first step."""
    recipe = win.Recipe(steps=200, sample_select="first", finetune_rates=(0.01, 0.03))
    steps = _learning_rates(
        lambda: win.win(DeepThin(), trained_teacher, synthetic_batches(), X, recipe)
    )
    rates = [lr for lr, _ in steps]
    probe = round(win.Recipe().rate_probe * 200)
    assert rates[:probe] == pytest.approx([0.03 * (i + 1) / (probe + 1) for i in range(probe)])


def _learning_rates(run: Callable[[], Any]) -> list[tuple[float, tuple[float, float] | None]]:
    """The (learning rate, AdamW betas) of every optimiser step `run` takes."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen: list[tuple[float, tuple[float, float] | None]] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append(
            (opt.param_groups[0]["lr"], opt.param_groups[0].get("betas"))
        )
    )
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("budget", [True, False])
def test_fine_tuning_decays_linearly_with_a_budget_and_by_cosine_with_a_schedule(
    budget, trained_teacher
):
    """With a budget the fine-tuning rate decays linearly to 0 after its warm-up and AdamW runs with
    betas (0.9, 0.95); with a schedule, the paper's cosine and torch's betas."""
    torch.manual_seed(0)
    fields = dict(steps=60, sample_select="first") if budget else dict(finetune_steps=40)
    recipe = win.Recipe(**fields, optimizer="adam", finetune_lr=0.01, imitation_steps=5)
    result = None

    def run() -> None:
        nonlocal result
        result = win.win(DeepThin(), trained_teacher, synthetic_batches(), X, recipe)

    steps = _learning_rates(run)
    n = len(result.log.stages["fine-tune"])
    tuned, warm = steps[-n:], round(0.05 * n)
    done = [(s - warm) / (n - warm) for s in range(warm, n)]
    if budget:
        expected = [0.01 * (1 - d) for d in done]
    else:
        expected = [0.01 * 0.5 * (1 + math.cos(math.pi * d)) for d in done]
    assert [lr for lr, _ in tuned[warm:]] == pytest.approx(expected)
    assert {b for _, b in tuned} == {(0.9, 0.95) if budget else (0.9, 0.999)}


def test_recipe_defaults_are_chosen_from_the_model():
    """AdamW with warm-up and clipping for a model with attention, the paper's SGD for a CNN; a field
    the user set is kept."""
    attention = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    tokens = torch.randn(2, 5, 16)
    chosen = win.Recipe().for_model(attention, (tokens,))
    assert (chosen.optimizer, chosen.finetune_lr, chosen.warmup, chosen.clip) == (
        "adam",
        1e-3,
        0.05,
        1.0,
    )
    cnn = win.Recipe().for_model(DeepThin(), X)
    assert (cnn.optimizer, cnn.imitation_lr, cnn.finetune_lr, cnn.warmup, cnn.clip) == (
        "sgd",
        0.1,
        0.01,
        0.0,
        0.0,
    )
    mine = win.Recipe(finetune_lr=3e-4, clip=0.5).for_model(attention, (tokens,))
    assert (mine.optimizer, mine.finetune_lr, mine.clip) == ("adam", 3e-4, 0.5)
    # with a budget AdamW's rate decays linearly (measured on the transformers), SGD's by cosine
    budget = win.Recipe(steps=100)
    assert budget.for_model(attention, (tokens,)).decay == "linear"
    assert budget.for_model(DeepThin(), X).decay == "cosine"


def test_a_budget_takes_the_measured_recipe_and_a_schedule_the_papers():
    """Recipe(steps=N) left unset is the recipe the WIN benchmarks measured; the schedule form keeps
    the paper's Section 5 choices; a field the user set is kept in both."""
    fields = ("sampled_start", "least_squares_start", "loss", "merge", "sample_select")
    budget = win.Recipe(steps=100).for_model(DeepThin(), X)
    measured = (True, True, "nmse", "after_imitation", "measured")
    assert tuple(getattr(budget, f) for f in fields) == measured
    paper = win.Recipe(imitation_steps=10, finetune_steps=90).for_model(DeepThin(), X)
    assert tuple(getattr(paper, f) for f in fields) == (
        False,
        False,
        "mse",
        "after_finetune",
        "random",
    )
    mine = win.Recipe(steps=100, sampled_start=False, loss="ln", merge="after_finetune")
    mine = mine.for_model(DeepThin(), X)
    assert tuple(getattr(mine, f) for f in fields) == (
        False,
        True,
        "ln",
        "after_finetune",
        "measured",
    )


def test_the_measured_start_keeps_the_candidate_that_distils_best(trained_teacher):
    """Every candidate start distils for the same few steps; the log lists each one's held-out
    distillation loss after them, and the model kept is the lowest one's (its run continues)."""
    from surgery.win.start import held_out_batch, recipe_start, start_quality

    torch.manual_seed(3)
    student, batches = DeepThin(), synthetic_batches()
    recipe = win.Recipe(steps=200).for_model(student, X)
    runs: dict[str, float] = {}

    def probe(model, steps, stage):
        win.train(model, batches, steps, lr=0.01, teacher=trained_teacher)
        runs[stage] = steps

    log = recipe_start(student, trained_teacher, batches, X, recipe, probe=probe, steps=200)
    names = ["own initialisation", "first", "uniform", "energy"]
    assert sorted(log.start) == sorted(f"{n}, after 4 steps" for n in names)
    assert sorted(runs) == sorted(f"start probe: {n}" for n in names)
    assert log.spent == 4 * len(names)
    held_out = held_out_batch(batches, recipe.sample_refit)
    assert start_quality(student, trained_teacher, held_out) == pytest.approx(
        min(log.start.values()), rel=1e-6
    )
