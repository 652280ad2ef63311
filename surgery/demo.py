"""The built-in example: a small ResNet through the whole pipeline in well under a minute on a CPU.

block table -> insert pairs -> a few training steps on synthetic data -> read the WIN probes -> fold
-> strict load into a fresh ResNet -> ONNX Runtime verify.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.console import Console
from torchvision.models.resnet import BasicBlock, ResNet

from surgery.paired import find_blocks, insert_pairs
from surgery.report import progress_bar, render_table
from surgery.runtime.fold import fold
from surgery.runtime.pairs import probe
from surgery.verify import verify


def small_resnet(num_classes: int = 10) -> ResNet:
    """A torchvision ResNet with one BasicBlock per stage (4.9M parameters)."""
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


@dataclass
class DemoResult:
    first_loss: float
    last_loss: float
    fold_max_rel: float
    verify_ok: bool


def run_demo(
    steps: int = 20,
    wide: float = 2.0,
    batch: int = 16,
    size: int = 32,
    seed: int = 0,
    console: Console | None = None,
) -> DemoResult:
    """Run the example end to end, printing each stage; returns the numbers a test can check."""
    console = console or Console()
    torch.manual_seed(seed)
    model = small_resnet()
    x = torch.randn(2, 3, size, size)
    console.out(str(find_blocks(model, (x,))))

    paired = insert_pairs(model, (x,), wide=wide, init="identity")
    model.eval(), paired.eval()
    with torch.no_grad():
        same = (paired(x) - model(x)).abs().max().item()
    sites = ", ".join(f"{s.name} ({s.d}->{s.D})" for s in paired.plan.sites)
    console.out(
        f"inserted {len(paired.plan.sites)} pairs: {sites}\nidentity init: max |paired(x) - model(x)| = {same:.2e}\n"
    )

    losses = _train(paired, steps, batch, size, console)
    paired.eval()
    with torch.no_grad(), probe(paired) as probes:
        paired(x)
        rows = [[name, "x".join(map(str, p.shape))] for name, p in probes.items()]
    console.out(
        render_table(
            "WIN probes M1(h) after one forward (what stage 2 imitates)", ["site", "shape"], rows
        )
    )

    thin = fold(paired)
    fresh = small_resnet().eval()
    fresh.load_state_dict(thin.state_dict(), strict=True)
    with torch.no_grad():
        a, b = paired(x), fresh(x)
    fold_rel = ((a - b).abs().max() / a.abs().max()).item()
    console.out(
        render_table(
            "Fold",
            [
                "pairs folded",
                "thin class",
                "parameters (thin)",
                "parameters (paired)",
                "max rel error vs paired",
            ],
            [
                [
                    len(paired.plan.sites),
                    type(thin).__name__,
                    _count(thin),
                    _count(paired),
                    f"{fold_rel:.2e}",
                ]
            ],
        )
    )
    report = verify(paired, fresh, (x,))
    console.out(str(report))
    return DemoResult(losses[0], losses[-1], fold_rel, report.ok)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _train(
    paired: torch.nn.Module, steps: int, batch: int, size: int, console: Console
) -> list[float]:
    """Cross-entropy on synthetic images labelled by a fixed random linear rule on their mean colour."""
    g = torch.Generator().manual_seed(1)
    data = torch.randn(batch * 4, 3, size, size, generator=g)
    labels = (data.mean(dim=(2, 3)) @ torch.randn(3, 10, generator=g)).argmax(dim=1)
    paired.train()
    optimizer = torch.optim.SGD(paired.parameters(), lr=0.01, momentum=0.9)
    losses = []
    start = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task("training the paired model", total=steps)
        for step in range(steps):
            idx = torch.arange(step * batch, (step + 1) * batch) % len(data)
            loss = F.cross_entropy(paired(data[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress.update(
                task, advance=1, description=f"training the paired model (loss {loss.item():.3f})"
            )
    console.out(
        f"trained {steps} steps in {time.perf_counter() - start:.1f}s: cross-entropy {losses[0]:.3f} -> {losses[-1]:.3f}\n"
    )
    return losses
