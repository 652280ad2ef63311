"""WIN on a vision task made offline, after the teacher-student set-up of paper 002 (Appendix A): a
fixed random CNN labels random smooth 8x8 images (10 balanced classes); a deep thin residual CNN
learns them. Compares thin-vanilla, thin-KD, thin-WIN and the ablations at equal student steps.

    python bench/win_vision.py            # 3 seeds, 600 student steps (18-25 min on 2 shared cores)
    python bench/win_vision.py --quick    # 2 seeds, short runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from win_common import Setup, run  # noqa: E402


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class DeepThinCNN(nn.Module):
    def __init__(self, width: int = 8, depth: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


# WIN is win.Recipe(steps=N) with the library's defaults (measured with bench/win_diag.py, docs/results.md),
# the learning rates below, and KD at T=2 (the KD baseline too)
RECIPE = dict(temperature=2.0)


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random images and the labels a fixed random CNN gives them (classes balanced)."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, 3, 10, 10, generator=g), 3, 1)  # 8x8, spatially correlated
    x = (x - x.mean()) / x.std()
    oracle = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    with torch.no_grad():
        for p in oracle.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5 if p.dim() > 1 else 1))
        logits = oracle(x)
    logits = (logits - logits.mean(0)) / logits.std(0)
    return x, logits.argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="worker processes, one thread each (default: one per core; 1: this process alone)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_train, n_test, batch = (8192, 4096, 128) if args.quick else (16384, 4096, 128)
    x, y = make_data(n_train + n_test, seed=1234)
    x_train, y_train, x_test, y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    batches = [(x_train[i : i + batch], y_train[i : i + batch]) for i in range(0, n_train, batch)]

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return (model(x_test).argmax(1) == y_test).float().mean().item()

    steps = 200 if args.quick else 600
    setup = Setup(
        make_student=DeepThinCNN,
        teacher_factor=2.0,
        batches=batches,
        example=x_train[:4],
        evaluate=accuracy,
        steps=steps,
        teacher_steps=500 if args.quick else 1500,  # stage 1: not the student's budget
        lr=0.05,
        # the sampled start is fine-tuned at the full learning rate: at 0.02 it ends below vanilla
        finetune_lr=0.05,
        stages=[
            ["blocks.1"],
            ["blocks.4"],
            ["blocks"],
        ],  # 3 chunks of the 8 blocks, not 9 short stages
        imitation_fraction=0.1,
        imitation_lr=0.01,
        recipe=RECIPE,
        eval_every=50 if not args.quick else 25,
    )
    print(
        run(
            setup, seeds=[0, 1] if args.quick else [0, 1, 2], metric="test accuracy", jobs=args.jobs
        )
    )


if __name__ == "__main__":
    main()
