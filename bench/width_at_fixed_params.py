"""Width at a fixed parameter count (Golubeva et al.): a dense narrow MLP against wider versions that
keep its number of trainable parameters — static sparsity (`surgery.experiments.sparsify_wide`), a linear
bottleneck (`surgery.experiments.factorize` of a wide model to the baseline's budget) and a non-linear
bottleneck (`surgery.experiments.nonlinear_bottleneck`) — plus a dense wide model with more parameters.

Task: 10-class labels from a random ReLU teacher (64 -> 256 -> 10, argmax) on N(0, 1) inputs of
dimension 64 (an 8x8 "image"; no data sets on this machine). Every model: SGD, momentum 0.9,
lr 0.05, batch 128, cosine decay, cross-entropy, PyTorch default initialisation (the masked layers
keep it, as in 003; one row rescales the kept weights by 1/sqrt(connectivity)).

    python bench/width_at_fixed_params.py            # 20000/5000 samples, 60 epochs, 5 seeds
    python bench/width_at_fixed_params.py --quick    # 6000/3000 samples, 30 epochs, 3 seeds

One thread (small layers run faster without intra-op threads). The learning rate is not tuned per
model (003 tuned it per width for its MLPs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from surgery.analysis.widths import widen
from surgery.experiments.bottleneck import nonlinear_bottleneck
from surgery.experiments.factorize import factorize
from surgery.experiments.sparsity import sparsify_wide, trainable_parameters
from surgery.report import render_table


def mlp(d: int, width: int, classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, classes),
    )


def make_data(n: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(256, d, generator=g) / d**0.5
    w2 = torch.randn(classes, 256, generator=g) / 16
    x = torch.randn(n, d, generator=g)
    return x, (torch.relu(x @ w1.T) @ w2.T).argmax(-1)


def train(model: nn.Module, data, epochs: int, seed: int) -> tuple[float, float]:
    (x, y), (xt, yt) = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps = epochs * ((len(x) + 127) // 128)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        train_acc = (model(x).argmax(-1) == y).float().mean().item()
        test_acc = (model(xt).argmax(-1) == yt).float().mean().item()
    return train_acc, test_acc


def variants(base: nn.Module, example: torch.Tensor, seed: int) -> dict[str, nn.Module]:
    budget = trainable_parameters(base)
    out = {"dense, width 16 (baseline)": base}
    for f in (2, 4, 8):
        out[f"sparse, width {16 * f} (x{f})"] = sparsify_wide(base, f, (example,), seed=seed)
    out["sparse, width 64 (x4), rescaled init"] = sparsify_wide(
        base, 4, (example,), seed=seed, rescale=True
    )
    out["linear bottleneck, width 64"] = factorize(
        widen(base, 4, (example,)), params=budget, init="random"
    )
    bottleneck = nonlinear_bottleneck(base, 2, (example,))
    widths = f"{bottleneck[0].out_features}/{bottleneck[2].out_features}"
    out[f"non-linear bottleneck, widths {widths}"] = bottleneck
    out["dense, width 64 (more parameters)"] = widen(base, 4, (example,))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n_train, n_test, epochs, seeds = (6000, 3000, 30, 3) if args.quick else (20000, 5000, 60, 5)
    d, classes = 64, 10
    torch.set_num_threads(1)
    start = time.perf_counter()
    results: dict[str, list[tuple[float, float]]] = {}
    counts: dict[str, int] = {}
    for seed in range(seeds):
        x, y = make_data(n_train + n_test, d, classes, seed=1000)  # one task, several seeds
        data = ((x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]))
        torch.manual_seed(seed)
        for name, model in variants(mlp(d, 16, classes), x[:2], seed).items():
            counts[name] = trainable_parameters(model)
            results.setdefault(name, []).append(train(model, data, epochs, seed))
    rows = []
    for name, runs in results.items():
        tr = [100 * r[0] for r in runs]
        te = [100 * r[1] for r in runs]
        sd = (lambda v: statistics.stdev(v)) if len(runs) > 1 else (lambda v: 0.0)
        rows.append(
            [
                name,
                counts[name],
                f"{statistics.mean(tr):.2f} ± {sd(tr):.2f}",
                f"{statistics.mean(te):.2f} ± {sd(te):.2f}",
            ]
        )
    print(
        render_table(
            "Width at a fixed number of trainable parameters (2-hidden-layer MLP, synthetic task)",
            ["model", "trainable params", "train acc %", "test acc %"],
            rows,
            caption=f"{n_train} train / {n_test} test samples, {epochs} epochs, mean ± std over "
            f"{seeds} seeds; {time.perf_counter() - start:.0f} s",
        )
    )


if __name__ == "__main__":
    main()
