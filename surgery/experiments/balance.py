"""Layer-wise gradient-norm balance (Song 2019, "Trainability and generalization of small-scale
neural networks"): narrow networks start with very unequal gradient norms across layers and train
slowly; rescaling each layer's initial weights so that the norms are equal helps.

- `gradient_norms(model, inputs, targets)`: the norm of each weight's gradient on one batch (every
  parameter with >= 2 dims: Linear/Conv/Embedding weights), as a table with the max/min ratio.
- `balanced_init(model, inputs, targets)`: multiplies each weight W_l by α_l = |g_l| / G and
  repeats on the same batch. G is the geometric mean of the gradient norms of the weights that set
  the output's scale; weights whose scale the loss does not see (a conv before a train-mode
  BatchNorm, detected by doubling them) are scaled freely. Why this balances: scaling a weight by α
  divides its gradient by α when the network is scale-invariant in it (BatchNorm after it) or
  positively homogeneous in it (ReLU/linear layers without biases) — and with ∏ α = 1 over the
  scale-setting weights the function is unchanged — so one step makes every norm G. Biases,
  residual branches without a norm and other non-homogeneous parts make it approximate, hence the
  iterations (each measures again). The report says how close it got.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.report import render_table

MASKED = ".parametrizations.weight.original"  # a masked weight (surgery.sparsity) reads as weight
LossFn = Callable[..., torch.Tensor]


@dataclass
class GradNorms:
    """Per-layer gradient norms of one batch."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    grad_norms: list[float]
    weight_norms: list[float]
    loss: float

    @property
    def ratio(self) -> float:
        """max / min of the layer-wise gradient norms (inf when a layer gets no gradient)."""
        low = min(self.grad_norms)
        return math.inf if low == 0 else max(self.grad_norms) / low

    def table(self, title: str = "Layer-wise gradient norms") -> str:
        """One row per weight: shape, |grad|, |W| and |grad| / |W|."""
        rows = [
            [n, "x".join(map(str, s)), g, w, g / w if w else math.inf]
            for n, s, g, w in zip(
                self.names, self.shapes, self.grad_norms, self.weight_norms, strict=True
            )
        ]
        return render_table(
            title,
            ["weight", "shape", "|grad|", "|W|", "|grad|/|W|"],
            rows,
            caption=f"loss {self.loss:.4g}; max/min |grad| = {self.ratio:.3g}",
        )

    def __str__(self) -> str:
        return self.table()


@dataclass
class BalanceReport:
    """What `balanced_init` did: norms before and after, and the total scale of each weight."""

    before: GradNorms
    after: GradNorms
    scales: dict[str, float] = field(default_factory=dict)
    iterations: int = 0
    scale_invariant: list[str] = field(default_factory=list)  # weights scaled freely (before a BN)

    def table(self) -> str:
        """Per weight: |grad| before and after, and the factor its weights were multiplied by."""
        rows = [
            [n, gb, ga, self.scales[n], "yes" if n in self.scale_invariant else "no"]
            for n, gb, ga in zip(
                self.before.names, self.before.grad_norms, self.after.grad_norms, strict=True
            )
        ]
        return render_table(
            "Balanced initialisation",
            ["weight", "|grad| before", "|grad| after", "scale", "scale-invariant"],
            rows,
            caption=f"max/min |grad|: {self.before.ratio:.3g} -> {self.after.ratio:.3g} "
            f"in {self.iterations} iteration(s); loss {self.before.loss:.4g} -> {self.after.loss:.4g}",
        )

    def __str__(self) -> str:
        return self.table()


def _weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every trainable parameter with >= 2 dims, by a readable name."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.dim() >= 2:
            out[name.replace(MASKED, ".weight")] = p
    return out


def _loss(
    model: nn.Module, inputs: Any, targets: torch.Tensor | None, loss_fn: LossFn | None
) -> torch.Tensor:
    args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    out = model(*args)
    if loss_fn is not None:
        return loss_fn(out, targets) if targets is not None else loss_fn(out)
    if targets is None:
        raise ValueError("pass targets or a loss_fn(output)")
    if targets.is_floating_point():
        return F.mse_loss(out, targets)
    return F.cross_entropy(out, targets)


@contextlib.contextmanager
def _frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Train-mode forwards move BatchNorm running statistics: put them back afterwards."""
    stats = [
        (b, b.detach().clone())
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b in m.buffers()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in stats:
                buffer.copy_(saved)


def gradient_norms(
    model: nn.Module,
    inputs: Any,
    targets: torch.Tensor | None = None,
    *,
    loss_fn: LossFn | None = None,
) -> GradNorms:
    """The gradient norm of each weight on one batch (the model's .grad are left as they were).

    Loss: `loss_fn(output, targets)` (or `loss_fn(output)`), default cross-entropy for integer
    targets and MSE for float targets. Runs in the model's current train/eval mode."""
    weights = _weights(model)
    params = list(weights.values())
    with _frozen_batchnorm_stats(model):
        loss = _loss(model, inputs, targets, loss_fn)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return GradNorms(
        names=list(weights),
        shapes=[tuple(p.shape) for p in params],
        grad_norms=[0.0 if g is None else g.detach().norm().item() for g in grads],
        weight_norms=[p.detach().norm().item() for p in params],
        loss=loss.item(),
    )


def smooth_hinge_loss(
    output: torch.Tensor, labels: torch.Tensor, power: float = 3.0
) -> torch.Tensor:
    """Song's teacher-student loss: mean of l(z) = max(0, 1 + z)^power with z = -label·output
    (labels ±1): exactly zero once a sample is classified with margin 1."""
    z = -labels.to(output.dtype) * output.reshape(labels.shape)
    return torch.relu(1 + z).pow(power).mean()


@torch.no_grad()
def _scale(p: nn.Parameter, factor: float) -> None:
    p.mul_(factor)


@torch.no_grad()
def scale_invariant(
    model: nn.Module,
    inputs: Any,
    targets: torch.Tensor | None = None,
    *,
    loss_fn: LossFn | None = None,
    rtol: float = 1e-3,
) -> list[str]:
    """Weights whose scale does not change the loss on this batch (e.g. a conv followed by a
    train-mode BatchNorm): doubling them leaves the loss within `rtol`."""
    weights = _weights(model)
    out = []
    with _frozen_batchnorm_stats(model):
        base = _loss(model, inputs, targets, loss_fn).item()
        for name, p in weights.items():
            p.mul_(2.0)
            changed = _loss(model, inputs, targets, loss_fn).item()
            p.div_(2.0)  # exact: a power of two
            if abs(changed - base) <= rtol * max(abs(base), 1e-30):
                out.append(name)
    return out


def balanced_init(
    model: nn.Module,
    inputs: Any,
    targets: torch.Tensor | None = None,
    *,
    loss_fn: LossFn | None = None,
    iterations: int = 5,
    tolerance: float = 1.05,
) -> BalanceReport:
    """Rescale each weight of `model` in place so that its gradient norms on this batch are equal
    (see the module docstring); stops when max/min <= `tolerance` or after `iterations`.

    The common level G is the geometric mean over the weights that set the output's scale; the
    scale-invariant ones (before a BatchNorm, found by `scale_invariant`) are scaled freely, so the
    function (and the loss) stays the same for homogeneous and normalised networks."""
    weights = _weights(model)
    before = current = gradient_norms(model, inputs, targets, loss_fn=loss_fn)
    if 0.0 in current.grad_norms:
        dead = [n for n, g in zip(current.names, current.grad_norms, strict=True) if g == 0]
        raise ValueError(f"no gradient reaches {', '.join(dead)}: cannot balance")
    invariant = set(scale_invariant(model, inputs, targets, loss_fn=loss_fn))
    scales = dict.fromkeys(weights, 1.0)
    done = 0
    while done < iterations and current.ratio > tolerance:
        logs = dict(zip(weights, (math.log(g) for g in current.grad_norms), strict=True))
        level = [v for n, v in logs.items() if n not in invariant] or list(logs.values())
        mean = sum(level) / len(level)
        for name, p in weights.items():
            alpha = math.exp(logs[name] - mean)  # ∏ α = 1 over the scale-setting weights
            _scale(p, alpha)
            scales[name] *= alpha
        done += 1
        current = gradient_norms(model, inputs, targets, loss_fn=loss_fn)
    return BalanceReport(before, current, scales, done, sorted(invariant))
