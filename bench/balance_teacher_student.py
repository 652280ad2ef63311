"""Song (2019)'s teacher-student benchmark: does balancing the initial layer-wise gradient norms help
a narrow network train?

A random narrow teacher (stem conv, two BasicBlocks, global pooling, a hidden Linear and a Linear
output; all weights N(0, 1), BatchNorm at its eval-mode identity) labels random 3x8x8 inputs by the
sign of its output; samples inside the teacher's margin (|f| < 1, positive loss) are dropped, so the
teacher itself has zero loss. Students are trained with the smooth hinge loss max(0, 1 + z)^p,
z = -y f(x), p = 2, SGD with momentum 0.9, lr 0.05 divided by 10 at 50% and 75% of the epochs (002:
lr 0.1, divided at plateaus; 0.1 made the wide student diverge here with p = 3), batch 128:
- narrow, He init: the teacher's architecture and width;
- narrow, balanced: the same, then `surgery.experiments.balanced_init` on the first batch;
- wide, He init: `surgery.widen(narrow, 16)` (width 4 -> 64; 4 -> 16 with --quick).
Inputs are N(0, 1) images, not the rescaled CIFAR-10 images of 002 (no data sets on this machine);
the teacher's output bias is set to minus its median output so that the two labels are balanced.
One thread (these tiny layers run faster without intra-op threads).

    python bench/balance_teacher_student.py            # 30000/10000 samples, 30 epochs, 5 seeds
    python bench/balance_teacher_student.py --quick    # 5000/2000 samples, 15 epochs, 5 seeds
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

from surgery.analysis.widths import widen
from surgery.experiments.balance import balanced_init, gradient_norms, smooth_hinge_loss
from surgery.report import render_table


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class Net(nn.Module):
    """Two BasicBlocks, then a fully connected layer and the output layer (002, Appendix A)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.fc = nn.Linear(width, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(torch.relu(self.bn(self.stem(x))))
        h = torch.relu(self.fc(h.mean((2, 3))))
        return self.out(h).squeeze(-1)


def he_init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def make_data(n_train: int, n_test: int, width: int, seed: int):
    g = torch.Generator().manual_seed(10_000 + seed)
    teacher = Net(width).eval()
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if ".bn" not in name and not name.startswith("bn"):
                p.copy_(torch.randn(p.shape, generator=g))
        # the output bias at minus the median output: balanced labels (a random teacher's raw
        # sign is mostly one class)
        teacher.out.bias -= teacher(torch.randn(8192, 3, 8, 8, generator=g)).median()
    xs, ys, drawn = [], [], 0
    while sum(len(x) for x in xs) < n_train + n_test:
        x = torch.randn(4096, 3, 8, 8, generator=g)
        with torch.no_grad():
            f = teacher(x)
        keep = f.abs() >= 1  # teacher loss exactly zero
        xs.append(x[keep])
        ys.append(torch.sign(f[keep]).long())
        drawn += len(x)
    x, y = torch.cat(xs)[: n_train + n_test], torch.cat(ys)[: n_train + n_test]
    kept = sum(len(v) for v in xs) / drawn
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]), kept


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, power: float):
    model.eval()
    f = torch.cat([model(b) for b in x.split(2048)])
    model.train()
    return (torch.sign(f) == y).float().mean().item(), smooth_hinge_loss(f, y, power).item()


def train(
    model, train_set, test_set, epochs: int, power: float, seed: int, balance: bool, lr: float
):
    x, y = train_set
    g = torch.Generator().manual_seed(seed)
    batch = 128
    first = torch.randperm(len(x), generator=g)[:batch]
    loss_fn = lambda out, t: smooth_hinge_loss(out, t, power)  # noqa: E731
    model.train()
    if balance:
        balanced_init(model, x[first], y[first], loss_fn=loss_fn, iterations=10)
    ratio = gradient_norms(model, x[first], y[first], loss_fn=loss_fn).ratio
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, [int(0.5 * epochs), int(0.75 * epochs)], gamma=0.1
    )
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    train_acc, train_loss = evaluate(model, x, y, power)
    test_acc, test_loss = evaluate(model, *test_set, power)
    return {
        "ratio": ratio,
        "train_acc": train_acc,
        "train_loss": train_loss,
        "test_acc": test_acc,
        "test_loss": test_loss,
    }


def mean_std(values: list[float], percent: bool = False) -> str:
    if not all(math.isfinite(v) for v in values):
        return f"{sum(not math.isfinite(v) for v in values)} of {len(values)} runs diverged"
    scale = 100 if percent else 1
    m = statistics.mean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.2f} ± {s:.2f}" if percent else f"{m:.3g} ± {s:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--width", type=int, default=4, help="teacher and narrow student width")
    parser.add_argument("--wide", type=int, default=None, help="wide student width (64; 16 quick)")
    parser.add_argument("--power", type=float, default=2.0, help="p of the smooth hinge loss")
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    n_train, n_test, epochs, seeds = (5000, 2000, 15, 5) if args.quick else (30000, 10000, 30, 5)
    args.wide = args.wide or (16 if args.quick else 64)
    torch.set_num_threads(1)
    start = time.perf_counter()
    results: dict[str, list[dict]] = {}
    params: dict[str, int] = {}
    kept = []
    for seed in range(seeds):
        train_set, test_set, frac = make_data(n_train, n_test, args.width, seed)
        kept.append(frac)
        example = train_set[0][:2]
        variants = {}
        torch.manual_seed(seed)
        variants["narrow, He init"] = (he_init(Net(args.width)), False)
        torch.manual_seed(seed)
        variants["narrow, balanced init"] = (he_init(Net(args.width)), True)
        torch.manual_seed(seed)
        wide = he_init(widen(Net(args.width), args.wide / args.width, (example,)))
        variants[f"wide (width {args.wide}), He init"] = (wide, False)
        for name, (model, balance) in variants.items():
            params[name] = sum(p.numel() for p in model.parameters())
            results.setdefault(name, []).append(
                train(model, train_set, test_set, epochs, args.power, seed, balance, args.lr)
            )
    rows = [
        [
            name,
            params[name],
            mean_std([r["ratio"] for r in runs]),
            mean_std([r["train_acc"] for r in runs], percent=True),
            mean_std([r["train_loss"] for r in runs]),
            mean_std([r["test_acc"] for r in runs], percent=True),
            mean_std([r["test_loss"] for r in runs]),
            f"{sum(not r['train_loss'] < 0.95 for r in runs)} of {len(runs)}",
        ]
        for name, runs in results.items()
    ]
    print(
        render_table(
            "Teacher-student (Song 2019): narrow student, standard vs balanced init, and a wide student",
            [
                "student",
                "params",
                "initial max/min |grad|",
                "train acc %",
                "train loss",
                "test acc %",
                "test loss",
                "stuck (train loss >= 0.95)",
            ],
            rows,
            caption=f"teacher width {args.width}; {n_train} train / {n_test} test samples "
            f"({100 * statistics.mean(kept):.0f}% of draws outside the teacher's margin); "
            f"{epochs} epochs; smooth hinge p = {args.power}; lr {args.lr}; mean ± std over "
            f"{seeds} seeds (a network stuck at a constant output has loss 1); "
            f"{time.perf_counter() - start:.0f} s",
        )
    )


if __name__ == "__main__":
    main()
