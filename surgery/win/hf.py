"""WIN from a Hugging Face `Trainer` (`pip install surgery[hf]`): the same stages as `win.win`, driven
from `Trainer.train()` with the Trainer's data, arguments, loggers, checkpoints and `save_model`.

    trainer = WinTrainer(model=student, args=TrainingArguments(...), train_dataset=data,
                         teacher=teacher, recipe=win.Recipe())
    trainer.train()                     # or train(resume_from_checkpoint=True)
    trainer.save_model("thin")          # a plain HF folder: from_pretrained loads it, no surgery

The training set is read in one fixed order (shuffled once by `seed`, or `data_seed`), in batches
of `per_device_train_batch_size`, each rank under torchrun taking its own share; a step is an
optimizer step over `gradient_accumulation_steps` batches; `bf16` runs the losses under autocast.
The budget is the recipe's `steps`, else `max_steps`, else the epochs' optimizer steps. Every step's
loss is logged as `loss` and `<stage>/loss`. A checkpoint (`save_steps`) holds the finished stage
runs and the one in progress (`surgery.win.session`): resuming replays the run bit-identically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerState
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from surgery.errors import PlanError

from . import session as sessions
from .loop import Recipe, WinResult, win

STATE_FILE = "win_state.pt"  # in a checkpoint-N folder: the run's resumable state
TRAINER_STATE = "trainer_state.json"


class WinBatches:
    """A training set as WIN's batches, `(inputs, labels)`, in the same order every iteration: the
    dataset shuffled once by `seed`, cut into batches, batch i of every `world` on rank i."""

    def __init__(
        self,
        dataset: Any,
        collator: Any,
        batch_size: int,
        seed: int,
        *,
        input_name: str = "input_ids",
        rank: int = 0,
        world: int = 1,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        cut = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if drop_last:
            cut = [b for b in cut if len(b) == batch_size]
        usable = len(cut) // world * world
        if usable == 0:
            raise PlanError(
                f"the training set holds {len(dataset)} examples: fewer than one batch of "
                f"{batch_size} per process ({world}); give more data or a smaller batch size"
            )
        self.indices = cut[rank:usable:world]
        self.dataset, self.collator, self.input_name, self.device = (
            dataset,
            collator,
            input_name,
            torch.device(device),
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for ids in self.indices:
            yield self._pair(self.collator([self.dataset[i] for i in ids]))

    def _pair(self, batch: Any) -> tuple[Any, Any]:
        if not isinstance(batch, Mapping) or self.input_name not in batch:
            raise PlanError(
                f"the collated batch has no {self.input_name!r} (the model's main input): give a "
                "data_collator that returns a dict with it"
            )
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and not bool(mask.all()):
            raise PlanError(
                "the batch is padded (attention_mask has zeros): WIN's stages call the model with "
                f"{self.input_name!r} only; pack the sequences to one length (e.g. group_texts)"
            )
        labels = batch.get("labels")
        move = (lambda t: t.to(self.device)) if self.device.type != "cpu" else (lambda t: t)
        return move(batch[self.input_name]), (move(labels) if labels is not None else None)


# TrainingArguments' optimiser settings -> the Recipe field that sets them in a WIN run
_OPTIMISER_ARGUMENTS = {
    "learning_rate": "finetune_lr",
    "lr_scheduler_type": "decay",
    "warmup_ratio": "warmup",
    "warmup_steps": "warmup",
    "adam_beta1": "betas",
    "adam_beta2": "betas",
    "weight_decay": "weight_decay",
    "max_grad_norm": "clip",
    "optim": "optimizer",
}


def _unused_optimiser_arguments(args: Any) -> list[str]:
    """The optimiser settings of `args` set away from TrainingArguments' defaults, each with the
    Recipe field to use instead: a WIN run does not read them, and should not do so silently."""
    defaults = {f.name: f.default for f in dataclasses.fields(type(args))}
    unused = []
    for name, field in _OPTIMISER_ARGUMENTS.items():
        value = getattr(args, name, None)
        if name in defaults and value != defaults[name]:
            value = getattr(value, "value", value)  # an enum (lr_scheduler_type) as its name
            unused.append(f"{name}={value!r} (Recipe {field}=)")
    return unused


class WinTrainer(Trainer):
    """A `transformers.Trainer` whose `train()` runs WIN on `model` (the thin student) from
    `teacher` with `recipe` (default `win.Recipe()`), then holds the folded thin model as
    `self.model` (so `save_model` writes a plain HF folder) and the run as `self.win_result`."""

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        *,
        teacher: nn.Module,
        recipe: Recipe | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=model, args=args, **kwargs)
        self.teacher = teacher.to(self.args.device)
        self.recipe = recipe or Recipe()
        self.win_result: WinResult | None = None
        unused = _unused_optimiser_arguments(self.args)
        if unused:
            warnings.warn(
                f"WinTrainer: TrainingArguments {', '.join(unused)} are not used: the WIN recipe "
                "sets the optimiser (with a budget it probes the rate); set them on win.Recipe",
                UserWarning,
                stacklevel=2,
            )

    def win_batches(self) -> WinBatches:
        """The batches `train()` runs on (this process's share), as `win.win` takes them."""
        args = self.args
        return WinBatches(
            self.train_dataset,
            self.data_collator,
            args.per_device_train_batch_size,
            args.data_seed if args.data_seed is not None else args.seed,
            input_name=getattr(self.model, "main_input_name", "input_ids"),
            rank=args.process_index,
            world=args.world_size,
            drop_last=args.dataloader_drop_last,
            device=args.device,
        )

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: Any = None,
        **kwargs: Any,
    ) -> TrainOutput:
        """Run WIN's stages (start, imitation, fold, KD fine-tuning) as the recipe says, logging
        every step, saving a checkpoint every `save_steps`; `resume_from_checkpoint`: a folder
        this trainer saved, or True for the last one in `output_dir`."""
        args = self.args
        if args.fp16:
            raise PlanError(
                "fp16 needs a loss scaler, which WIN's stages do not run: use bf16=True, or fp32"
            )
        saved = self._saved_state(resume_from_checkpoint)
        batches = self.win_batches()
        recipe = self.recipe
        if recipe.steps is None:
            recipe = replace(recipe, steps=self._budget(len(batches)))
        self._save_every = self._every(args.save_steps, recipe.steps)
        if args.save_strategy != "steps":
            self._save_every = 0
        self._log_every = self._every(args.logging_steps, recipe.steps)
        self.state = TrainerState(max_steps=recipe.steps, train_batch_size=args.train_batch_size)
        self.state.is_local_process_zero = self.is_local_process_zero()
        self.state.is_world_process_zero = self.is_world_process_zero()
        if saved is not None and saved[1] is not None:
            self.state.log_history = saved[1].log_history
        run = sessions.Session(
            accumulate=args.gradient_accumulation_steps,
            autocast=self._autocast,
            on_step=self._stepped,
            journal=saved[0]["journal"] if saved else [],
            resume=saved[0]["current"] if saved else None,
            keep_journal=bool(self._save_every),
        )
        torch.manual_seed(args.seed)  # the run's draws from the seed: a resumed run replays them
        started = time.time()
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        example = next(iter(batches))[0][:1]
        with sessions.running(run):
            result = win(self.model, self.teacher, batches, example, recipe)
        self.model = self.model_wrapped = result.thin
        self.win_result = result
        self.state.global_step = run.step
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        tuned = result.log.stages.get("fine-tune") or [math.nan]
        metrics = {"train_runtime": time.time() - started, "train_loss": sum(tuned) / len(tuned)}
        self.log(dict(metrics))
        return TrainOutput(run.step, metrics["train_loss"], metrics)

    def _budget(self, batches: int) -> int:
        """Optimizer steps: `max_steps` when set, else the epochs' worth of this rank's batches."""
        args = self.args
        if args.max_steps and args.max_steps > 0:
            return args.max_steps
        per_epoch = max(1, batches // args.gradient_accumulation_steps)
        return max(1, math.ceil(per_epoch * args.num_train_epochs))

    @staticmethod
    def _every(value: float, steps: int) -> int:
        """A `*_steps` argument in steps (a value under 1 is a share of the run, as in HF)."""
        if not value:
            return 0
        return max(1, math.ceil(value * steps)) if value < 1 else int(value)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.args.bf16:
            return torch.autocast(device_type=self.args.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _stepped(self, run: sessions.Session, stage: str, loss: float) -> None:
        """After each optimizer step of any stage: log, tell the callbacks, save when due."""
        self.state.global_step = run.step
        if self._log_every and run.step % self._log_every == 0:
            self.log({"loss": loss, f"{stage}/loss": loss})
        self.control = self.callback_handler.on_step_end(self.args, self.state, self.control)
        if self._save_every and run.step % self._save_every == 0:
            self._save_checkpoint_state(run)

    def _save_checkpoint_state(self, run: sessions.Session) -> None:
        """`output_dir/checkpoint-N`: the run's state (every rank computes it; the main process
        writes it to a temporary folder renamed into place, so a checkpoint is whole or absent)."""
        state = run.checkpoint()
        if not self.args.should_save:
            return
        root = Path(self.args.output_dir)
        folder = root / f"checkpoint-{run.step}"
        temporary = root / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        torch.save(state, temporary / STATE_FILE)
        self.state.save_to_json(str(temporary / TRAINER_STATE))
        if folder.exists():
            shutil.rmtree(folder)  # this run's own earlier checkpoint of the same step
        os.replace(temporary, folder)

    def _saved_state(
        self, resume: str | bool | None
    ) -> tuple[dict[str, Any], TrainerState | None] | None:
        """The checkpoint to resume from, read and its fields checked (None: a fresh run)."""
        if not resume:
            return None
        if resume is True:
            found = get_last_checkpoint(self.args.output_dir)
            if found is None:
                raise PlanError(
                    f"no checkpoint-N folder in {self.args.output_dir} to resume from: pass a "
                    "checkpoint folder, or train without resume_from_checkpoint"
                )
            resume = found
        file = Path(resume) / STATE_FILE
        if not file.is_file():
            raise PlanError(
                f"{resume} has no {STATE_FILE}: not a checkpoint WinTrainer saved (pass the "
                "checkpoint-N folder it wrote)"
            )
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file gets one reason
            raise PlanError(f"{file} cannot be read as a WinTrainer checkpoint: {error}") from None
        _check_state(state, file)
        trainer_state = Path(resume) / TRAINER_STATE
        return state, (
            TrainerState.load_from_json(str(trainer_state)) if trainer_state.is_file() else None
        )


ENTRY = {"stage": str, "losses": list, "model": dict, "events": list, "steps": int, "rng": dict}
CURRENT = {
    "call": int, "stage": str, "model": dict, "saved": dict, "scale": float, "tries": int,
    "done": int, "begun": int, "consumed": int, "losses": list, "since": list,
    "optimizer": dict, "scheduler": dict, "events": list, "rng": dict,
}  # fmt: skip


def _check_state(state: Any, file: Path) -> None:
    """A checkpoint's fields and their types, before anything is loaded from it."""

    def fields(record: Any, kinds: dict[str, type], where: str) -> None:
        if not isinstance(record, dict):
            raise PlanError(f"{file}: {where} is not a record; the file is not a WinTrainer state")
        for key, kind in kinds.items():
            if not isinstance(record.get(key), kind):
                raise PlanError(
                    f"{file}: {where} has no {key!r} of type {kind.__name__}; the file is not a "
                    "WinTrainer state (or was saved by another version)"
                )

    fields(state, {"version": int, "step": int, "journal": list, "current": dict}, "the state")
    if state["version"] != 1:
        raise PlanError(f"{file}: state version {state['version']}, this surgery reads 1")
    for i, entry in enumerate(state["journal"]):
        fields(entry, ENTRY, f"stage run {i}")
    fields(state["current"], CURRENT, "the stage run in progress")
