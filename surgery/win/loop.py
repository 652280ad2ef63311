"""The ready-made WIN loops: supervised / KD training (stage 1, stage 3, the baselines), layerwise
imitation (stage 2, with restarts), and the whole recipe (`win`). Each also runs under torchrun: the
model is wrapped in DistributedDataParallel when a process group is initialised, nothing else."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from surgery.analysis.blocks import BlockTable, analyse
from surgery.errors import PlanError
from surgery.ir.capture import as_example_inputs, capture
from surgery.paired import insert_pairs
from surgery.runtime.fold import fold, strip_pairs
from surgery.runtime.models import unwrap
from surgery.runtime.pairs import is_paired
from surgery.runtime.pairs import premerged as premerged_mode
from surgery.runtime.sharded import gathered, is_sharded

from .imitation import Imitation, Mapping_, least_squares_start, teacher_site, teacher_table
from .losses import inputs_of, kd_loss, logits_of, task_loss
from .start import (
    held_out_batch,
    kept_if_better,
    recipe_start,
    same_on_every_rank,
    start_quality,
)
from .steps import Log, distributed, mean_over_ranks, restore, run_steps, snapshot

Batch = tuple[Any, Any]  # (inputs: tensor or tuple of tensors, labels)


def _cycle(batches: Iterable[Batch]) -> Iterator[Batch]:
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise PlanError("the batches iterable is empty")


SHARDINGS = ("auto", "ddp", "fsdp", "none")
Sharding = str | Callable[[nn.Module], nn.Module]


def _wrap(model: nn.Module, sharding: Sharding = "auto") -> nn.Module:
    """The model as it trains: as the user already wrapped it (DDP, or FSDP2's fully_shard); else
    `sharding(model)` for a callable; else, under torchrun, DistributedDataParallel ("auto", "ddp")
    or FSDP2 per block and at the root ("fsdp", see `shard`); a single process trains it as it is."""
    if isinstance(model, nn.parallel.DistributedDataParallel) or is_sharded(model):
        return model
    if callable(sharding):
        return sharding(model)
    if sharding not in SHARDINGS:
        raise PlanError(f"sharding must be one of {SHARDINGS} or a callable, got {sharding!r}")
    if sharding == "none" or not distributed():
        return model
    if sharding == "fsdp":
        return shard(model)
    # a paired model's probe-only widen maps take no part in the loss of a fine-tuning step
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=is_paired(model))


def shard(model: nn.Module, blocks: Sequence[str] | None = None) -> nn.Module:
    """FSDP2 in place: `fully_shard` each block, then the root, over a 1-D mesh of every rank.
    blocks: module paths; default the plan's sites that are modules (a paired model) or else the
    children of every nn.ModuleList (a transformer's layers)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if blocks is None:
        sites = [s.name for s in model.plan.sites] if is_paired(model) else []
        names = dict(model.named_modules())
        blocks = [s for s in sites if s in names and s]
        if not blocks:
            blocks = [
                f"{name}.{child}"
                for name, m in model.named_modules()
                if isinstance(m, nn.ModuleList) and not name.startswith("pairs")
                for child, _ in m.named_children()
            ]
    _check_ties(model, blocks)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for name in blocks:
        fully_shard(model.get_submodule(name), mesh=mesh)
    return fully_shard(model, mesh=mesh)


OPTIMIZERS = ("sgd", "adam")
DECAYS = ("cosine", "linear")  # the learning rate's decay to 0 after the warm-up
ADAM_BETAS = (0.9, 0.999)  # torch's AdamW defaults


def _check_ties(model: nn.Module, blocks: Sequence[str]) -> None:
    """Refuse a sharding that would cut a tie: a parameter shared by modules in different FSDP units
    (each unit shards its own copy, and the tie is silently lost)."""
    units = sorted(blocks, key=len, reverse=True)  # the innermost unit owning a module wins

    def unit(module: str) -> str:
        return next((b for b in units if module == b or module.startswith(b + ".")), "")

    owners: dict[int, dict[str, str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), {})[f"{module_name}.{name}".lstrip(".")] = unit(module_name)
    for names in owners.values():
        if len(set(names.values())) > 1:
            shown = ", ".join(f"{n} (unit {u or 'root'})" for n, u in names.items())
            raise PlanError(
                f"sharding would cut tied weights {shown}: shard both in one unit (leave them at "
                "the root) or untie them before training"
            )


def _optimizer(
    model: nn.Module,
    steps: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    kind: str = "sgd",
    warmup: float = 0.0,
    params: Any = None,
    decay: str = "cosine",
    betas: tuple[float, float] = ADAM_BETAS,
):
    """SGD with momentum (the paper's ResNet recipe) or AdamW (transformers, with `betas`), decayed
    to 0 by `decay` ("cosine", the paper's, or "linear") after a linear warm-up over the first
    `warmup` share of the steps (0: none). `params`: parameter groups (each may carry its own "lr");
    default every trainable parameter of `model`."""
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif kind == "adam":
        opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    else:
        raise PlanError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    if decay not in DECAYS:
        raise PlanError(f"decay must be one of {DECAYS}, got {decay!r}")
    warm = int(round(warmup * steps))

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        done = min(s - warm, steps - warm) / max(steps - warm, 1)
        return 1 - done if decay == "linear" else 0.5 * (1 + math.cos(math.pi * done))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt, sched


def train(
    model: nn.Module,
    batches: Iterable[Batch],
    steps: int,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    teacher: nn.Module | None = None,
    kd_weight: float = 1.0,
    temperature: float = 1.0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = task_loss,
    log: Log | None = None,
    stage: str = "train",
    optimizer: str = "sgd",
    premerged: bool | str = "auto",
    callback: Callable[[nn.Module, int], Any] | None = None,
    warmup: float = 0.0,
    clip: float | None = None,
    sharding: Sharding = "auto",
    decay: str = "cosine",
    betas: tuple[float, float] = ADAM_BETAS,
) -> list[float]:
    """Supervised training (teacher=None: stage 1, the vanilla baseline) or fine-tuning with labels
    plus KD from a frozen teacher's logits (stage 3; kd_weight=1 is the paper's KL-only loss).
    A paired model trains in pre-merged mode with this policy (surgery.set_premerged; False: off).
    callback(model, step) runs after every step (step counts from 1; e.g. to evaluate: the model is
    put back in training mode after it). warmup: share of the steps of linear learning-rate warm-up
    before the decay to 0 ("cosine" or "linear"); clip: gradient-norm clipping (None: off) —
    transformers want both; betas: AdamW's. sharding: how it trains under torchrun (see `_wrap`);
    "fsdp" shards `model` in place."""
    net = _wrap(model, sharding)
    net.train()
    if teacher is not None:
        teacher.eval()

    def loss_of(batch: Batch) -> torch.Tensor:
        x, y = batch
        logits = logits_of(net(*inputs_of(x)))
        loss = torch.zeros((), device=logits.device)
        if teacher is None or kd_weight < 1:
            loss = loss + (1 - (kd_weight if teacher is not None else 0)) * loss_fn(logits, y)
        if teacher is not None and kd_weight > 0:
            with torch.no_grad():
                target = logits_of(teacher(*inputs_of(x)))
            loss = loss + kd_weight * kd_loss(logits, target, temperature)
        return loss

    def after_step(step: int) -> None:
        if callback is not None:
            callback(model, step)
            net.train()

    with _pair_mode(model, premerged):
        return run_steps(
            net,
            steps,
            lambda scale, n: _optimizer(
                net,
                n,
                lr * scale,
                momentum,
                weight_decay,
                optimizer,
                warmup,
                decay=decay,
                betas=betas,
            ),
            loss_of,
            _cycle(batches),
            clip=clip,
            log=log,
            stage=stage,
            after_step=after_step,
        )


def imitate(
    paired: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Batch],
    example_inputs: Any,
    stages: Sequence[Sequence[str]],
    steps: int | Sequence[int],
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    restarts: int = 0,
    mapping: Mapping_ = "same",
    loss: str = "mse",
    log: Log | None = None,
    seed: int = 0,
    optimizer: str = "sgd",
    premerged: bool | str = "auto",
    earlier_lr: float = 1.0,
    warmup: float = 0.0,
    reset_narrow: bool = False,
    clip: float | None = None,
    sharding: Sharding = "auto",
) -> dict[str, float]:
    """Stage 2: stage by stage (each a chunk of consecutive sites), train the student prefix so that
    each site's probe M1(h) matches the teacher's block output; teacher frozen; cosine lr per stage.
    With restarts, the newest block is re-initialised and the run that mimics best is kept.
    The sites being imitated run their pairs plain (their probes need M1(h)); the others run in
    pre-merged mode with this policy (False: off). Returns the final held-out imitation loss per stage.
    earlier_lr: learning-rate factor for everything but the stage's newest blocks and pairs (1: one
    rate for the whole prefix; 0: earlier blocks frozen; MobileBERT keeps them at 0.1). warmup: share
    of each stage's steps spent warming the learning rate up (restarted every stage). reset_narrow:
    after each stage, M2 := pinv(M1) at its sites, so the pairs pass the student's features on
    unchanged (they served as probes). clip: gradient-norm clipping (None: off)."""
    per_stage = [steps] * len(stages) if isinstance(steps, int) else list(steps)
    if len(per_stage) != len(stages):
        raise PlanError(f"{len(per_stage)} step budgets for {len(stages)} stages")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    net = _wrap(paired, sharding)
    data = _cycle(batches)
    held_out = inputs_of(next(data)[0])
    blocks = _newest_blocks(paired, example_inputs, stages) if restarts or earlier_lr != 1 else {}
    finals = {}
    for chunk, budget in zip(stages, per_stage, strict=True):
        name = "imitate " + "+".join(chunk)
        objective = Imitation(net, teacher, example_inputs, sites=chunk, mapping=mapping, loss=loss)
        groups = _stage_groups(unwrap(paired), blocks, chunk, lr, earlier_lr)
        start = copy.deepcopy(unwrap(paired).state_dict())
        best: tuple[float, dict[str, torch.Tensor]] | None = None
        for attempt in range(restarts + 1):
            if attempt:
                unwrap(paired).load_state_dict(start)
                _reinitialise(unwrap(paired), blocks[chunk[-1]], seed + attempt)
            tag = f"{name} (restart {attempt})" if restarts else name
            with _pair_mode(paired, premerged):
                _imitation_stage(
                    net,
                    objective,
                    data,
                    budget,
                    (lr, momentum, optimizer, warmup, groups, clip),
                    log,
                    tag,
                )
            with torch.no_grad():
                score = mean_over_ranks(objective(*held_out).item())
            if best is None or score < best[0]:
                best = (score, copy.deepcopy(unwrap(paired).state_dict()))
        unwrap(paired).load_state_dict(best[1])
        finals[name] = best[0]
        if reset_narrow:
            _reset_narrow(unwrap(paired), chunk)
    return finals


@torch.no_grad()
def _reset_narrow(paired: nn.Module, sites: Sequence[str]) -> None:
    """M2 := pinv(M1) at these sites: each pair passes the student's features through unchanged again
    (imitation moved M1 alone; M2 M1 drifted from I, which distorts everything downstream)."""
    for s in sites:
        pair = paired.pairs[s] if s in paired.pairs else None
        if pair is None or pair.narrow is None:
            continue
        pinv = torch.linalg.pinv(pair.widen.weight.double())
        pair.narrow.weight.copy_(pinv.to(pair.narrow.weight.dtype))
        if pair.narrow.bias is not None:
            pair.narrow.bias.copy_(
                -(pinv @ pair.widen.bias.double()).to(pair.narrow.bias.dtype)
                if pair.widen.bias is not None
                else torch.zeros_like(pair.narrow.bias)
            )


def _imitation_stage(
    net: nn.Module,
    objective: Imitation,
    data: Iterator[Batch],
    steps: int,
    optim: tuple[float, float, str, float, Any, float | None],
    log: Log | None,
    tag: str,
) -> None:
    net.train()
    lr, momentum, kind, warmup, groups, clip = optim

    def optimizer_for(scale: float, n: int) -> tuple[Any, Any]:
        scaled = None if groups is None else [{**g, "lr": g["lr"] * scale} for g in groups]
        return _optimizer(net, n, lr * scale, momentum, 0.0, kind, warmup, scaled)

    run_steps(
        net,
        steps,
        optimizer_for,
        lambda batch: objective(*inputs_of(batch[0])),
        data,
        clip=clip,
        log=log,
        stage=tag,
    )


def _stage_groups(
    model: nn.Module, blocks: dict[str, list[str]], chunk: Sequence[str], lr: float, earlier: float
) -> list[dict[str, Any]] | None:
    """Parameter groups of one imitation stage: the chunk's newest blocks and its pairs at `lr`,
    everything else at `earlier` x lr (left out at 0). None: one group at `lr`."""
    if earlier == 1:
        return None
    newest = {
        id(p)
        for path in blocks[chunk[-1]]
        for p in model.get_submodule(path).parameters(recurse=False)
    }
    pairs = getattr(model, "pairs", None)
    for site in chunk:
        if pairs is not None and site in pairs:
            newest |= {id(p) for p in pairs[site].parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) in newest], "lr": lr}]
    rest = [p for p in trainable if id(p) not in newest]
    if earlier > 0 and rest:
        groups.append({"params": rest, "lr": lr * earlier})
    return groups


def _pair_mode(model: nn.Module, policy: bool | str) -> contextlib.AbstractContextManager:
    """Pre-merged mode for a paired model; nothing for any other (a teacher, a folded student)."""
    if policy is False or not is_paired(model):
        return contextlib.nullcontext()
    return premerged_mode(model, policy)


def _newest_blocks(
    paired: nn.Module, example_inputs: Any, stages: Sequence[Sequence[str]]
) -> dict[str, list[str]]:
    """For each stage's last site, the modules computed after the previous stage's last site."""
    thin = strip_pairs(paired)
    flow = capture(thin, example_inputs)
    order = list(flow.ops)
    plan = unwrap(paired).plan
    blocks: dict[str, list[str]] = {}
    previous = -1
    for chunk in stages:
        end = order.index(plan.site(chunk[-1]).tensor)
        modules = {
            flow.ops[n].module
            for n in order[previous + 1 : end + 1]
            if flow.ops[n].module and flow.ops[n].params
        }
        blocks[chunk[-1]] = sorted(modules)
        previous = end
    return blocks


def _reinitialise(model: nn.Module, modules: list[str], seed: int) -> None:
    """Fresh default initialisation of a block (same seed on every rank)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for path in modules:
            module = model.get_submodule(path)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    finally:
        torch.random.set_rng_state(state)


@dataclass
class Recipe:
    """WIN stages 2-3. Given a budget (`steps=N`), every field left unset takes the recipe chosen on
    the validation splits of bench/win_eval.py (the measured start, then KD fine-tuning at a probed
    rate (AdamW: decaying linearly to 0, betas (0.9, 0.95)); imitation when `imitation_share` is
    set: closed-form M1, normalised MSE, fold after imitation); given a schedule
    (`imitation_steps`, `finetune_steps`), the paper's Section 5 defaults."""

    stages: str | Sequence[Sequence[str]] = (
        "blocks"  # "blocks" (each its own), "resolution", or explicit chunks
    )
    # a budget instead of a schedule: `steps` student steps in all, `imitation_share` of them
    # imitating (split evenly over the stages), the rest fine-tuning; overrides the two fields below
    steps: int | None = None
    # 0 by default: on the validation splits of bench/win_eval.py (digits ViT, 4 dev seeds; GPT-2
    # char LM, 2) spending 10% of the budget imitating ended no better than fine-tuning the
    # measured start for those steps (docs/results.md); 0.1 is WIN's stage 2 at the share that
    # measured best of 10-30% on bench/win_vision.py
    imitation_share: float = 0.0
    imitation_steps: int | Sequence[int] = 100  # per stage
    # None: chosen from the model by `for_model` (attention models: AdamW, warm-up, clipping)
    imitation_lr: float | None = None  # SGD 0.1, AdamW 1e-3
    finetune_steps: int = 500
    # None: with a budget, chosen by measurement (from the top of `finetune_rates`, each fine-tunes
    # `rate_probe` of the fine-tuning steps from the same start, its rate ramped up linearly over
    # the probe; the first whose held-out distillation loss ends below the start's is kept and its
    # run continues: `probe_rate`; every probe step counts in the budget); with a schedule, the
    # paper's SGD 0.01 (AdamW 1e-3)
    finetune_lr: float | None = None
    # None: AdamW 1e-3, 3e-3, 1e-2, 2e-2, 3.5e-2 (2e-2, then 3.5e-2 added on the held-out GPT's
    # validation split, each lifting the share of the gap; docs/results.md); SGD 0.003, 0.01, 0.03
    finetune_rates: Sequence[float] | None = None
    rate_probe: float = 0.03
    momentum: float = 0.9
    optimizer: str | None = None  # "sgd" (CNNs, the paper's) or "adam" (AdamW, transformers)
    weight_decay: float = 0.0  # the paper uses none in stages 2 and 3
    kd_weight: float = 1.0  # 1: KL to the teacher's logits only (the paper); 0: labels only
    temperature: float = 1.0
    restarts: int = 0
    # None: "nmse" with a budget (divides by the teacher's mean square: one lr fits every model),
    # else the paper's "mse"; also "ln" / "std" (both sides standardised), "kl"
    loss: str | None = None
    mapping: Mapping_ = "same"  # student site -> teacher block: "same", k (1:k), or a dict
    # Assumption 3.4: thin layers sampled from the wide ones (None: with a budget only; it carries
    # most of the measured gain, docs/results.md)
    sampled_start: bool | None = None
    sample_scale: str | float = "none"  # plain slice; "fan_in" (x D/d), "sqrt": sample_from_teacher
    # which teacher units the start takes: "random" (the paper), "first", "uniform", "energy" (the
    # most energetic features and heads, sample_from_teacher), or "measured": each of those and the
    # student's own initialisation distil for `start_probe` of the budget and the best is kept
    # (win/start.py; the probe steps count in the budget); None: "measured" with a budget
    sample_select: str | None = None
    start_probe: float = 0.02
    reset_narrow: bool = False  # M2 := pinv(M1) after each stage (pairs pass features on unchanged)
    sample_refit: int = (
        512  # examples of `batches` the sampled layers are refitted on (0: copy only)
    )
    earlier_lr: float = 1.0  # lr factor of earlier blocks during a later stage (0: frozen)
    imitation_warmup: float = (
        0.0  # share of each imitation stage spent warming up (restarted per stage)
    )
    warmup: float | None = None  # share of fine-tuning steps warming up (SGD 0, AdamW 0.05)
    # the fine-tuning rate's decay to 0 after the warm-up, "cosine" or "linear" (None: linear for
    # AdamW with a budget, measured better on the transformers' validation splits, docs/results.md;
    # otherwise the paper's cosine); imitation stages keep the paper's cosine
    decay: str | None = None
    # AdamW's betas in fine-tuning (None: (0.9, 0.95) with a budget, measured better on the same
    # validation splits; torch's (0.9, 0.999) with a schedule)
    betas: tuple[float, float] | None = None
    clip: float | None = None  # gradient-norm clipping in every stage (SGD 0: off, AdamW 1.0)
    # closed-form M1 before the gradient steps (beyond the paper; None: with a budget only)
    least_squares_start: bool | None = None
    # "after_finetune" (the paper) or "after_imitation": fold, then fine-tune the thin model
    # (None: after_imitation with a budget, where fine-tuning the pairs sometimes diverged)
    merge: str | None = None
    premerged: bool | str = "auto"  # train the paired model with merged pairs (surgery.premerged)
    # under torchrun: "auto"/"ddp" (DistributedDataParallel), "fsdp" (FSDP2 per block and at the
    # root), "none", or a callable wrapping the model; a model already wrapped is used as it is
    sharding: Sharding = "auto"
    # called as callback(model, student_step) after every fine-tuning step (step counted over the
    # whole recipe, imitation included): e.g. to measure time to quality
    callback: Callable[[nn.Module, int], Any] | None = None

    def for_model(self, model: nn.Module, example_inputs: Any = None) -> Recipe:
        """This recipe with every field left at None chosen for `model`: a model with attention
        trains with AdamW (5% warm-up, gradient norm clipped at 1; imitation lr 1e-3), any other
        with the paper's SGD (imitation lr 0.1, no warm-up, no clipping); the fine-tuning rate is
        probed with a budget (see `finetune_lr`), the paper's with a schedule; the start, the
        imitation loss, the merge, the rate's decay and AdamW's betas as the class docstring says
        (budget: measured; schedule: paper)."""
        optimizer = self.optimizer
        if optimizer is None:
            flow = capture(model, as_example_inputs(model, example_inputs))
            attention = any(op.kind in ("attention", "matmul") for op in flow.ops.values())
            optimizer = "adam" if attention else "sgd"
        adam, measured = optimizer == "adam", self.steps is not None
        chosen = dict(
            optimizer=optimizer,
            imitation_lr=1e-3 if adam else 0.1,
            finetune_lr=None if measured else 1e-3 if adam else 0.01,
            finetune_rates=(1e-3, 3e-3, 1e-2, 2e-2, 3.5e-2) if adam else (0.003, 0.01, 0.03),
            warmup=0.05 if adam else 0.0,
            decay="linear" if measured and adam else "cosine",
            betas=(0.9, 0.95) if measured else ADAM_BETAS,
            clip=1.0 if adam else 0.0,
            sampled_start=measured,
            least_squares_start=measured,
            loss="nmse" if measured else "mse",
            merge="after_imitation" if measured else "after_finetune",
            sample_select="measured" if measured else "random",
        )
        return replace(self, **{k: v for k, v in chosen.items() if getattr(self, k) is None})


def _clip(value: float | None) -> float | None:
    return value or None  # 0: off


@dataclass
class WinResult:
    """What `win` returns: `thin`, the trained student in its own architecture (pairs folded);
    `paired`, the paired model that was folded (the thin one when nothing was imitated); the
    run's `log`; the final imitation loss per stage (`imitation`); and the `stages` (site names
    per stage) that were imitated."""

    thin: nn.Module
    paired: nn.Module
    log: Log
    imitation: dict[str, float]
    stages: list[list[str]]


def budget(recipe: Recipe, n_stages: int) -> tuple[list[int], int]:
    """(imitation steps per stage, fine-tuning steps) of a recipe: from `steps` and
    `imitation_share` when a budget is given (they add up to exactly `steps`), else as written."""
    if recipe.steps is None:
        steps = recipe.imitation_steps
        per_stage = [steps] * n_stages if isinstance(steps, int) else list(steps)
        return per_stage, recipe.finetune_steps
    if recipe.restarts:
        raise PlanError(
            "Recipe(steps=N) is a budget of N student steps, and restarts repeat stages beyond it: "
            "give imitation_steps and finetune_steps instead, or restarts=0"
        )
    if not 0 <= recipe.imitation_share < 1 or recipe.steps < n_stages + 1:
        raise PlanError(
            f"Recipe(steps={recipe.steps}, imitation_share={recipe.imitation_share}): need a share "
            f"in [0, 1) and at least one step per stage ({n_stages}) plus one to fine-tune"
        )
    if recipe.imitation_share == 0:  # no imitation: the start, then fine-tuning
        return [0] * n_stages, recipe.steps
    imitating = max(n_stages, round(recipe.steps * recipe.imitation_share))
    base, extra = divmod(imitating, n_stages)
    per_stage = [base + (1 if i < extra else 0) for i in range(n_stages)]
    return per_stage, recipe.steps - imitating


MIN_STAGE_STEPS = 10  # a budget's automatic stages are chunked to get at least this many each


def chunked(stages: list[list[str]], recipe: Recipe) -> list[list[str]]:
    """With a budget (`steps=N`) and automatic stages, consecutive stages grouped into chunks so
    that each imitates for at least MIN_STAGE_STEPS steps (one chunk when the budget is smaller):
    many very short stages wreck training, and a deep model must still fit a small budget."""
    if recipe.steps is None or not isinstance(recipe.stages, str) or not stages:
        return stages
    imitating = round(recipe.steps * recipe.imitation_share)
    n = max(1, min(len(stages), imitating // MIN_STAGE_STEPS))
    if n == len(stages):
        return stages
    bounds = [round(i * len(stages) / n) for i in range(n + 1)]
    return [
        [s for chunk in stages[a:b] for s in chunk]
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]


def probe_rate(
    model: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Batch],
    recipe: Recipe,
    steps: int,
    held_out: tuple[Any, ...],
    log: Log,
) -> tuple[float, int]:
    """The fine-tuning rate chosen by measurement: the largest of `recipe.finetune_rates` whose
    run of `recipe.rate_probe` of `steps` (the rate ramped up linearly over it) lowers the held-out
    distillation loss below the model's as it is; that run is kept (the larger rates' runs are
    rolled back); when none lowers it, the lowest. Not the lowest loss after the probe: a short run favours a small rate that ends worse
    (on the validation splits of bench/win_eval.py the lowest-loss rule picked 3e-3 where 1e-2
    ended best). Returns (the rate, the steps all probes spent), every step counted in the budget."""
    rates = sorted(recipe.finetune_rates or (), reverse=True)
    probe = max(1, round(recipe.rate_probe * steps))
    if len(rates) < 2 or probe * len(rates) >= steps:
        return (rates[-1] if rates else 1e-3), 0
    start = snapshot(unwrap(model))
    before = mean_over_ranks(start_quality(unwrap(model), teacher, held_out))
    log.start["before fine-tuning"] = before
    best: tuple[float, float, dict[str, torch.Tensor]] | None = None
    # each probe ramps up to its rate over its whole length: the run warms up over its first
    # steps, and a probe that jumps to the rate at once judges the jump (on GPT-2's validation
    # split it passed over 2e-2 and 1e-2 for a start already distilled and kept 3e-3, 0.02 worse)
    options = {**finetune_options(recipe, teacher), "log": log, "warmup": 1.0}
    for tried, rate in enumerate(rates, 1):
        restore(unwrap(model), start)
        train(model, batches, probe, **{**options, "lr": rate, "stage": f"rate probe {rate:g}"})
        score = mean_over_ranks(start_quality(unwrap(model), teacher, held_out))
        log.start[f"fine-tuning at {rate:g}, after {probe} steps"] = score
        if math.isfinite(score) and score < before:
            log.event(f"fine-tuning: rate {rate:g} chosen, the largest that lowered the loss")
            return rate, probe * tried
        if math.isfinite(score) and (best is None or score <= best[0]):  # a tie: the smaller
            best = (score, rate, snapshot(unwrap(model)))
    if best is None:
        restore(unwrap(model), start)
        log.event(f"fine-tuning: every probed rate made the model non-finite; {rates[-1]:g} used")
        return rates[-1], probe * len(rates)
    restore(unwrap(model), best[2])
    log.event(f"fine-tuning: no probed rate lowered the loss; {best[1]:g}, the lowest loss, chosen")
    return best[1], probe * len(rates)


def finetune_options(recipe: Recipe, teacher: nn.Module) -> dict[str, Any]:
    """The `train` arguments of the recipe's stage 3 (KD fine-tuning from `teacher`); `recipe` as
    resolved by `Recipe.for_model`."""
    return dict(
        lr=recipe.finetune_lr,
        momentum=recipe.momentum,
        optimizer=recipe.optimizer,
        weight_decay=recipe.weight_decay,
        teacher=teacher,
        kd_weight=recipe.kd_weight,
        temperature=recipe.temperature,
        premerged=recipe.premerged,
        warmup=recipe.warmup or 0.0,
        clip=_clip(recipe.clip),
        sharding=recipe.sharding,
        decay=recipe.decay or "cosine",
        betas=recipe.betas or ADAM_BETAS,
    )


def _distiller(
    teacher: nn.Module, batches: Iterable[Batch], recipe: Recipe, log: Log
) -> Callable[[nn.Module, int, str], list[float]]:
    """KD fine-tuning of a model for a few steps at the (lower) middle of the rate grid (or the
    recipe's fine-tuning rate): how the start's candidates are compared (`measured_start`): 1e-2
    on the AdamW grid, 0.01 on the SGD one (docs/results.md)."""
    rates = sorted(recipe.finetune_rates or ())
    rate = recipe.finetune_lr or (rates[(len(rates) - 1) // 2] if rates else 1e-3)
    options = {**finetune_options(recipe, teacher), "lr": rate, "log": log}
    return lambda model, steps, stage: train(model, batches, steps, **{**options, "stage": stage})


def _finetune(
    model: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Batch],
    recipe: Recipe,
    steps: int,
    done: int,
    held_out: tuple[Any, ...],
    log: Log,
) -> None:
    """Stage 3: KD fine-tuning for `steps` (its rate probed first when the recipe leaves it open,
    the probes counted in `steps`); `done` student steps were spent before it (for the callback)."""
    options = {**finetune_options(recipe, teacher), "log": log, "stage": "fine-tune"}
    if recipe.finetune_lr is None:
        rate, spent = probe_rate(model, teacher, batches, recipe, steps, held_out, log)
        options["lr"] = rate
        done, steps = done + spent, steps - spent
    if recipe.callback is not None:
        options["callback"] = lambda m, step: recipe.callback(m, done + step)
    train(model, batches, steps, **options)


def _finetuned(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Batch],
    recipe: Recipe,
    log: Log,
) -> WinResult:
    """`win` with `imitation_share=0`: the start, then fine-tuning for the whole budget."""
    steps = budget(recipe, 0)[1] - log.spent
    held_out = held_out_batch(batches, recipe.sample_refit if recipe.sampled_start else 0)
    _finetune(student, teacher, batches, recipe, steps, log.spent, held_out, log)
    thin = gathered(student)
    return WinResult(thin.eval(), thin, log, {}, [])


def choose_stages(
    table: BlockTable,
    teacher_blocks: BlockTable,
    how: str | Sequence[Sequence[str]],
    mapping: Mapping_,
) -> list[list[str]]:
    """Imitation stages: explicit chunks, every block boundary the teacher also has ("blocks"), or
    chunks that end where the boundary shape changes ("resolution": ResNet's 4 chunks)."""
    if not isinstance(how, str):
        return [list(chunk) for chunk in how]
    candidates = [
        b
        for b in table
        if b.probe is not None
        and not b.in_block
        and not b.inside_block
        and b.tensor not in table.flow.outputs
    ]
    names = set(teacher_blocks.names) | {a for b in teacher_blocks for a in b.aliases}
    candidates = [b for b in candidates if teacher_site(b.name, mapping) in names]
    if how == "blocks":
        return [[b.name] for b in candidates]
    if how == "resolution":
        chunks: list[list[str]] = []
        for i, b in enumerate(candidates):
            if not chunks or chunks[-1] == []:
                chunks.append([])
            chunks[-1].append(b.name)
            nxt = candidates[i + 1] if i + 1 < len(candidates) else None
            if nxt is None or nxt.shape != b.shape:
                chunks.append([])
        return [c for c in chunks if c]
    raise PlanError(f"stages must be 'blocks', 'resolution' or a list of chunks, got {how!r}")


def _stage_tables(
    student: nn.Module, teacher: nn.Module, inputs: tuple[Any, ...], how: Any, mapping: Mapping_
):
    table = analyse(capture(student, inputs), inside_blocks=True)
    t_table = teacher_table(teacher, inputs)
    stages = choose_stages(table, t_table, how, mapping)
    if not stages:
        raise PlanError(
            "no block of the student has a counterpart in the teacher to imitate; pass recipe.stages and recipe.mapping"
        )
    return table, t_table, stages


def plan_stages(
    student: nn.Module,
    teacher: nn.Module,
    example_inputs: Any,
    stages: str | Sequence[Sequence[str]] = "blocks",
    mapping: Mapping_ = "same",
) -> list[list[str]]:
    """The imitation stages `win` would run (see choose_stages)."""
    return _stage_tables(
        student, teacher, as_example_inputs(student, example_inputs), stages, mapping
    )[2]


def win(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Batch],
    example_inputs: Any,
    recipe: Recipe | None = None,
) -> WinResult:
    """Stages 2 and 3 of WIN on a trained teacher: pairs sized to the teacher's widths at every stage
    site (probe-only where a site cannot fold), layerwise imitation, fine-tuning with KD, fold.
    `student` is not modified; the result's `thin` has the student's exact architecture."""
    inputs = as_example_inputs(student, example_inputs)
    recipe = (recipe or Recipe()).for_model(student, inputs)
    student = copy.deepcopy(student)
    log = Log()
    if recipe.sampled_start:
        distil = _distiller(teacher, batches, recipe, log)
        recipe_start(student, teacher, batches, inputs, recipe, log, distil, recipe.steps or 0)
    if recipe.steps is not None and recipe.imitation_share == 0:  # no stages to plan
        return _finetuned(student, teacher, batches, recipe, log)
    table, t_table, stages = _stage_tables(student, teacher, inputs, recipe.stages, recipe.mapping)
    sites = [s for chunk in stages for s in chunk]
    widths = {s: t_table.get(teacher_site(s, recipe.mapping)).width for s in sites}
    foldable = [s for s in sites if table.get(s).foldable]
    paired = insert_pairs(
        student, inputs, wide=widths, sites=foldable, probes=[s for s in sites if s not in foldable]
    )
    stages = chunked(stages, recipe)
    per_stage, finetune_steps = budget(recipe, len(stages))
    held_out = held_out_batch(batches, recipe.sample_refit if recipe.sampled_start else 0)

    def quality() -> float:
        return start_quality(paired, teacher, held_out)

    if recipe.least_squares_start:
        ls_inputs = inputs_of(next(_cycle(batches))[0])
        objective = Imitation(paired, teacher, inputs, sites=sites, mapping=recipe.mapping)
        with torch.no_grad():
            kept_if_better(
                paired,
                lambda: least_squares_start(objective, *ls_inputs),
                quality,
                mean_over_ranks(quality()),
                "closed-form M1",
                log,
            )
        same_on_every_rank(paired)
    finals: dict[str, float] = {}

    def imitation() -> None:
        finals.update(
            imitate(
                paired,
                teacher,
                batches,
                inputs,
                stages,
                per_stage,
                lr=recipe.imitation_lr,
                momentum=recipe.momentum,
                optimizer=recipe.optimizer,
                restarts=recipe.restarts,
                mapping=recipe.mapping,
                loss=recipe.loss,
                log=log,
                premerged=recipe.premerged,
                earlier_lr=recipe.earlier_lr,
                warmup=recipe.imitation_warmup,
                reset_narrow=recipe.reset_narrow,
                clip=_clip(recipe.clip),
                sharding=recipe.sharding,
            )
        )

    # imitation is a means to a better start for the fine-tuning: kept only if it is one
    kept_if_better(paired, imitation, quality, mean_over_ranks(quality()), "imitation", log)
    imitation_total = sum(per_stage) * (recipe.restarts + 1)
    if recipe.merge not in ("after_imitation", "after_finetune"):
        raise PlanError(
            f"merge must be 'after_finetune' or 'after_imitation', got {recipe.merge!r}"
        )
    tuned = fold(paired.eval()) if recipe.merge == "after_imitation" else paired
    spent = imitation_total + log.spent  # the start's probes, then imitation, then fine-tuning
    _finetune(tuned, teacher, batches, recipe, finetune_steps - log.spent, spent, held_out, log)
    if recipe.merge == "after_imitation":
        thin = gathered(tuned)  # a plain model again when fine-tuning sharded it
    else:
        thin = fold(paired.eval())
    return WinResult(thin.eval(), paired, log, finals, stages)
