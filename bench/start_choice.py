"""Which start should WIN's default take? Candidate starts of a thin student from a trained 2x
teacher, each followed by the same KD fine-tuning, on character-level language modelling of the
standard library's source (a validation split: every choice here is a development choice).

Per model and seed: the teacher (stage 1), vanilla and KD from a random start (the baselines), then
every candidate start -- the plain slice (first units), uniform (evenly spaced: weight selection),
energy (the loudest units, Minitron-style), each with and without the least-squares refit -- with
its distillation loss at step 0, after a short KD probe, and at the end. The question: does a
start's loss at step 0, or after the probe, predict where it ends?

    python bench/start_choice.py --quick          # one seed, short
    python bench/start_choice.py --seeds 2 --steps 600
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from win_charlm import VOCAB, corpus, windows  # noqa: E402

from surgery import win  # noqa: E402
from surgery.win.sample import Selection  # noqa: E402

CANDIDATES = [
    (select, refit) for select in ("first", "uniform", "energy") for refit in (False, True)
]


def own_gpt(width: int, heads: int, layers: int, context: int) -> torch.nn.Module:
    """A user's own pre-LN GPT (nanoGPT's packed qkv split, raw positions, tied head)."""
    import families

    families.VOCAB = len(VOCAB)
    model = families.OwnGPT(width, heads, families.NanoAttention, layers)
    model.pos = torch.nn.Parameter(0.02 * torch.randn(1, context, width))
    return model


def llama(width: int, heads: int, layers: int, context: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=width, intermediate_size=round(8 * width / 3),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
        max_position_embeddings=context, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


MODELS = {"own-gpt": own_gpt, "hf-llama": llama}


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def bits(model: torch.nn.Module, data: list) -> float:
    model.eval()
    with torch.no_grad():
        losses = [
            F.cross_entropy(logits(model, x).flatten(0, 1), y.flatten()).item() for x, y in data
        ]
    model.train()
    return sum(losses) / len(losses) / math.log(2)


def kl(student: torch.nn.Module, teacher: torch.nn.Module, data: list) -> float:
    student.eval()
    with torch.no_grad():
        value = sum(win.kd_loss(logits(student, x), logits(teacher, x)).item() for x, _ in data)
    student.train()
    return value / len(data)


def run_one(args: tuple) -> dict:
    name, seed, steps, teacher_steps, lr, probe = args
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    context, batch = 64, 32
    ids = corpus(400_000)
    split = int(0.9 * len(ids))
    train = windows(ids[:split], context, batch, seed=seed)
    val = windows(ids[split:], context, 128, seed=100 + seed)[:3]
    build = MODELS[name]
    student0 = build(32, 4, 4, context)
    teacher = build(64, 8, 4, context)
    opts = dict(optimizer="adam", warmup=0.05, clip=1.0)
    started = time.time()
    win.train(teacher, train, teacher_steps, lr=3e-3, **opts)
    teacher.eval()
    out = {"teacher": bits(teacher, val)}
    vanilla = copy.deepcopy(student0)
    win.train(vanilla, train, steps, lr=lr, **opts)
    out["vanilla"] = bits(vanilla, val)
    kd = copy.deepcopy(student0)
    win.train(kd, train, steps, lr=lr, teacher=teacher, kd_weight=1.0, **opts)
    out["KD (random start)"] = bits(kd, val)
    calib = torch.cat([x for x, _ in train[:16]])[:512]
    for select, refit in CANDIDATES:
        student = copy.deepcopy(student0)
        selection = Selection(student, teacher, (train[0][0][:2],))
        selection.choose(select, calibration=calib)
        selection.copy()
        if refit:
            selection.refit((calib,))
        row = f"{select}{' + refit' if refit else ''}"
        at0 = kl(student, teacher, val)
        losses = win.train(student, train, steps, lr=lr, teacher=teacher, kd_weight=1.0, **opts)
        out[row] = bits(student, val)
        out[f"{row} | KL at 0"] = at0
        out[f"{row} | train KD after {probe}"] = sum(losses[probe - 10 : probe]) / 10
    default = win.win(student0, teacher, train, train[0][0][:2], win.Recipe(steps=steps))
    out["default recipe"] = bits(default.thin, val)
    out["seconds"] = time.time() - started
    return {"model": name, "seed": seed, **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    steps = 200 if args.quick else args.steps
    seeds = [0] if args.quick else list(range(args.seeds))
    jobs = [
        (m, s, steps, 3 * steps, args.lr, max(steps // 10, 20))
        for m in args.models.split(",")
        for s in seeds
    ]
    with ProcessPoolExecutor(2) as pool:
        results = list(pool.map(run_one, jobs))
    for model in args.models.split(","):
        rows = [r for r in results if r["model"] == model]
        keys = [k for k in rows[0] if k not in ("model", "seed", "seconds")]
        print(f"\n{model}: validation bits/char over seeds {[r['seed'] for r in rows]} "
              f"({steps} student steps, teacher {3 * steps}), {sum(r['seconds'] for r in rows):.0f} s")  # fmt: skip
        teacher = sum(r["teacher"] for r in rows) / len(rows)
        vanilla = sum(r["vanilla"] for r in rows) / len(rows)
        for key in keys:
            values = [r[key] for r in rows]
            mean = sum(values) / len(values)
            gap = (
                ""
                if "|" in key or key == "teacher"
                else f"  gap closed {100 * (vanilla - mean) / (vanilla - teacher):5.1f}%"
            )
            print(
                f"  {key:38s} "
                + " ".join(f"{v:7.4f}" for v in values)
                + f"   mean {mean:7.4f}{gap}"
            )


if __name__ == "__main__":
    main()
