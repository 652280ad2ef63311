"""Diagnostics for WIN on the vision task of bench/win_vision.py: one configuration at a time, over
several seeds, with the trained teachers cached (a teacher's training is not the student's budget).

    nice -n 10 python bench/win_diag.py --steps 600 vanilla kd skd:scale=sqrt,lr=0.05
    python bench/win_diag.py --table --steps 600     # the table of everything measured so far

A configuration is `method:key=value,...`; methods: vanilla, kd, skd (sampled start + KD), win.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from win_vision import DeepThinCNN, make_data  # noqa: E402

from surgery import win  # noqa: E402
from surgery.win.start import calibration  # noqa: E402

CACHE = Path(os.environ.get("WIN_DIAG_CACHE", "/tmp/win_diag"))
N_TRAIN, N_TEST, BATCH = 16384, 4096, 128


def data():
    x, y = make_data(N_TRAIN + N_TEST, seed=1234)
    xt, yt, xe, ye = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]
    batches = [(xt[i : i + BATCH], yt[i : i + BATCH]) for i in range(0, N_TRAIN, BATCH)]
    return batches, xt[:4], (xe, ye)


BATCHES, EXAMPLE, (X_TEST, Y_TEST) = data()


def accuracy(model: nn.Module) -> float:
    with torch.no_grad():
        return (model.eval()(X_TEST).argmax(1) == Y_TEST).float().mean().item()


def models(seed: int, factor: float, tsteps: int, tlr: float = 0.05):
    torch.manual_seed(seed)
    student0 = DeepThinCNN()
    teacher = win.widen(student0, factor, EXAMPLE)
    path = CACHE / f"teacher_s{seed}_f{factor}_t{tsteps}_lr{tlr}.pt"
    if path.exists():
        teacher.load_state_dict(torch.load(path))
    else:
        win.train(teacher, BATCHES, tsteps, lr=tlr)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(teacher.state_dict(), path)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student0, teacher.eval()


@torch.no_grad()
def reset_bn(model: nn.Module, n: int = 20) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for x, _ in BATCHES[:n]:
        model(x)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1


def parse(spec: str) -> tuple[str, dict]:
    method, _, rest = spec.partition(":")
    kw = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try:
            kw[k] = json.loads(v)
        except json.JSONDecodeError:
            kw[k] = v
    return method, kw


def _sample(student: nn.Module, teacher: nn.Module, kw: dict) -> None:
    """The sampled start with this run's options (refit examples, scale), taken out of `kw`."""
    n = kw.pop("refit", 0)
    win.sample_from_teacher(
        student,
        teacher,
        EXAMPLE,
        scale=kw.pop("scale", "fan_in"),
        refit=calibration(BATCHES, n) if n else None,
    )


def run_one(method: str, kw: dict, student: nn.Module, teacher: nn.Module, steps: int, seed: int):
    kw = dict(kw)
    lr = kw.pop("lr", 0.05)
    T = kw.pop("T", 1.0)
    w = kw.pop("w", 1.0)
    extra = {}
    torch.manual_seed(seed + 1)
    if method == "vanilla":
        win.train(student, BATCHES, steps, lr=lr)
        return student, extra
    if method == "kd":
        win.train(student, BATCHES, steps, lr=lr, teacher=teacher, temperature=T, kd_weight=w)
        return student, extra
    if method in ("skd", "sample"):
        _sample(student, teacher, kw)
        if kw.pop("bn", 0):
            reset_bn(student)
        extra["start_acc"] = accuracy(student)
        if method == "sample":
            return student, extra
        win.train(student, BATCHES, steps, lr=lr, teacher=teacher, temperature=T, kd_weight=w)
        return student, extra
    if method == "win":
        frac = kw.pop("frac", 0.2)
        stages = kw.pop("stages", "3")
        chunks = {
            "3": [["blocks.1"], ["blocks.4"], ["blocks"]],
            "2": [["blocks.3"], ["blocks"]],
            "1": [["blocks"]],
            "4": [["blocks.1"], ["blocks.3"], ["blocks.5"], ["blocks"]],
        }[str(stages)]
        sampled = kw.pop("sampled", 1)
        if sampled:
            _sample(student, teacher, kw)
        per_stage = max(1, int(steps * frac) // len(chunks))
        recipe = win.Recipe(
            stages=chunks,
            imitation_steps=per_stage,
            finetune_steps=steps - per_stage * len(chunks),
            imitation_lr=kw.pop("ilr", lr),
            finetune_lr=lr,
            temperature=T,
            kd_weight=w,
            loss=kw.pop("loss", "nmse"),
            **kw,
        )
        result = win.win(student, teacher, BATCHES, EXAMPLE, recipe)
        extra["imitation"] = result.imitation
        return result.thin, extra
    raise SystemExit(f"unknown method {method}")


def key(spec, steps, factor, tsteps, seed):
    return f"{spec}|steps={steps}|f={factor}|t={tsteps}|seed={seed}"


def load_results() -> dict:
    path = CACHE / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_result(k: str, value: dict) -> None:
    path = CACHE / "results.json"
    lock = CACHE / "results.lock"
    CACHE.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL)
            break
        except FileExistsError:
            time.sleep(0.1)
    try:
        results = load_results()
        results[k] = value
        path.write_text(json.dumps(results, indent=1))
    finally:
        os.close(fd)
        os.unlink(lock)


def table(steps, factor, tsteps, seeds):
    results = load_results()
    specs = sorted(
        {k.split("|")[0] for k in results if f"|steps={steps}|f={factor}|t={tsteps}|" in k}
    )

    def vals(spec):
        return [
            results[key(spec, steps, factor, tsteps, s)]["acc"]
            for s in seeds
            if key(spec, steps, factor, tsteps, s) in results
        ]

    teach = [results.get(f"teacher|f={factor}|t={tsteps}|seed={s}", {}).get("acc") for s in seeds]
    van = vals("vanilla")
    print(f"steps={steps} factor={factor} teacher_steps={tsteps}  teacher per seed {teach}")
    if len(van) == len(seeds) and None not in teach:
        gaps = [t - v for t, v in zip(teach, van, strict=True)]
        print(f"teacher - vanilla per seed: {[round(g, 4) for g in gaps]}")
    kd = vals("kd")
    print(f"{'config':55s} {'acc mean +- std':18s} gap%  vsKD(mean/std diff)  per-seed")
    for spec in specs:
        v = vals(spec)
        if not v:
            continue
        m = statistics.mean(v)
        sd = statistics.stdev(v) if len(v) > 1 else 0
        gap = ""
        if len(van) == len(seeds) and None not in teach and len(v) == len(seeds):
            gap = f"{100 * (m - statistics.mean(van)) / (statistics.mean(teach) - statistics.mean(van)):+.0f}%"
        vs = ""
        if len(kd) == len(v) == len(seeds):
            d = [a - b for a, b in zip(v, kd, strict=True)]
            vs = f"{statistics.mean(d):+.4f}/{statistics.stdev(d):.4f}"
        print(f"{spec:55s} {m:.4f} +- {sd:.4f} {gap:>5s} {vs:>20s}  {[round(x, 4) for x in v]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="*")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--tsteps", type=int, default=1500)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = load_results()
    for seed in seeds:
        student0, teacher = models(seed, args.factor, args.tsteps)
        tk = f"teacher|f={args.factor}|t={args.tsteps}|seed={seed}"
        if tk not in results:
            save_result(tk, {"acc": accuracy(teacher)})
        for spec in args.specs:
            k = key(spec, args.steps, args.factor, args.tsteps, seed)
            if k in load_results():
                continue
            method, kw = parse(spec)
            start = time.time()
            model, extra = run_one(method, kw, copy.deepcopy(student0), teacher, args.steps, seed)
            value = {"acc": accuracy(model), "s": time.time() - start, **extra}
            save_result(k, value)
            print(f"seed {seed} {spec}: {value}", flush=True)
    table(args.steps, args.factor, args.tsteps, seeds)


if __name__ == "__main__":
    main()
