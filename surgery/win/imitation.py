"""Stage 2 of WIN as a loss object: each student site's widened output M1(h) (the probe) against the
teacher's output at the mapped block, teacher frozen. Put it in any training loop:

    imitate = Imitation(paired, teacher, example_inputs, sites=["layer1"])
    loss = imitate(x)          # runs teacher (no grad) and student, returns the summed loss
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.analysis.blocks import BlockTable, analyse
from surgery.errors import PlanError
from surgery.ir.capture import as_example_inputs, capture
from surgery.plan import Placement
from surgery.runtime.models import plan_of, unwrap
from surgery.runtime.pairs import probe
from surgery.runtime.sharded import is_sharded, plain_copy

Mapping_ = Mapping[str, str] | int | str


class _Stop(Exception):
    """Raised by a hook once every tensor a forward is needed for has been seen."""


def teacher_site(name: str, mapping: Mapping_) -> str:
    """The teacher block a student site imitates: the same name, an explicit mapping, or 1:k (the
    last index in the name times k: student block i <-> teacher block k*(i+1)-1)."""
    if isinstance(mapping, Mapping):
        return mapping[name]
    if mapping == "same" or mapping == 1:
        return name
    if isinstance(mapping, int) and mapping > 1:
        numbers = list(re.finditer(r"(?<=\.)(\d+)(?=\.|$)", name))
        if not numbers:
            raise PlanError(
                f"cannot map {name!r} 1:{mapping}: the name has no block index; pass an explicit mapping"
            )
        last = numbers[-1]
        return (
            name[: last.start()] + str(mapping * (int(last.group()) + 1) - 1) + name[last.end() :]
        )
    raise PlanError(
        f"mapping must be 'same', an int k >= 1 or a dict student site -> teacher site, got {mapping!r}"
    )


def teacher_table(teacher: nn.Module, example_inputs: Any) -> BlockTable:
    """The teacher's block table. A teacher sharded by FSDP2 is captured as a copy of its module tree
    on the meta device (its structure is all the table needs; nothing is gathered)."""
    if is_sharded(teacher):
        example_inputs = tuple(
            x.to("meta") if isinstance(x, torch.Tensor) else x
            for x in as_example_inputs(teacher, example_inputs)
        )
        teacher = plain_copy(teacher)
    return analyse(capture(teacher, example_inputs), inside_blocks=True)


def teacher_widths(
    teacher: nn.Module, example_inputs: Any, sites: Sequence[str], mapping: Mapping_ = "same"
) -> dict[str, int]:
    """D for each student site: the width of the teacher tensor it will imitate (for insert_pairs)."""
    table = teacher_table(teacher, example_inputs)
    return {s: _lookup(table, teacher_site(s, mapping)).width for s in sites}


def _lookup(table: BlockTable, name: str):
    try:
        return table.get(name)
    except KeyError:
        raise PlanError(
            f"the teacher has no block {name!r}; its blocks: {', '.join(table.names)}"
        ) from None


class _Taps:
    """Forward hooks on the teacher reading its tensors at given placements (the last one stops the forward)."""

    def __init__(
        self, teacher: nn.Module, placements: dict[str, Placement], stop: bool = True
    ) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.handles = []
        order = list(placements)
        for name, p in placements.items():
            module = teacher.get_submodule(p.module)
            last = stop and name == order[-1]
            if p.where == "output":
                self.handles.append(
                    module.register_forward_hook(self._reader(name, p, last, output=True))
                )
            else:
                self.handles.append(
                    module.register_forward_pre_hook(self._reader(name, p, last, output=False))
                )

    def _reader(self, name: str, p: Placement, last: bool, output: bool) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any = None) -> None:
            self.values[name] = (out if output else args[0]).detach()
            if last:
                raise _Stop

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


LOSSES = (
    "mse",
    "nmse",
    "kl",
    "ln",
    "std",
)
# the paper's MSE; MSE over the teacher's mean square; KL over the features; MSE after a LayerNorm
# without parameters over the feature axis of both sides (MobileBERT); MSE after standardising each
# channel of both sides over the batch (and positions)


class Imitation:
    """WIN imitation loss of a paired student against a frozen teacher (see LOSSES)."""

    def __init__(
        self,
        paired: nn.Module,
        teacher: nn.Module,
        example_inputs: Any,
        sites: Sequence[str] | None = None,
        mapping: Mapping_ = "same",
        loss: str = "mse",
    ) -> None:
        if loss not in LOSSES:
            raise PlanError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.paired, self.teacher, self.loss = paired, teacher, loss
        plan = plan_of(paired)
        probed = [s.name for s in plan.sites if s.probe is not None]
        self.sites = list(sites) if sites is not None else probed
        missing = [s for s in self.sites if s not in probed]
        if missing:
            raise PlanError(
                f"sites {missing} have no probe in the paired model; probed sites: {probed}"
            )
        table = teacher_table(teacher, as_example_inputs(teacher, example_inputs))
        self.teacher_placements = {}
        for s in self.sites:
            block = _lookup(table, teacher_site(s, mapping))
            if block.probe is None:
                raise PlanError(
                    f"the teacher's block {block.name!r} cannot be read (no module output/input there)"
                )
            self.teacher_placements[s] = block.probe
        self.last: dict[str, float] = {}
        self.feature_axis = {s: plan.site(s).feature_axis for s in self.sites}

    def teacher_outputs(self, *inputs: Any) -> dict[str, torch.Tensor]:
        """The teacher's tensors at the mapped blocks (no grad; the forward stops after the last)."""
        # a sharded teacher runs its whole forward: FSDP must see every module it unsharded finish
        taps = _Taps(self.teacher, self.teacher_placements, stop=not is_sharded(self.teacher))
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            with torch.no_grad():
                self.teacher(*inputs)
        except _Stop:
            pass
        finally:
            taps.remove()
            self.teacher.train(was_training)
        return taps.values

    def __call__(self, *inputs: Any) -> torch.Tensor:
        """Summed imitation loss over the sites for one batch (per-site values in `self.last`)."""
        targets = self.teacher_outputs(*inputs)
        distributed = isinstance(self.paired, nn.parallel.DistributedDataParallel) or is_sharded(
            self.paired
        )
        with probe(unwrap(self.paired), self.sites) as probes:
            hook = None if distributed else self._stop_after(self.sites[-1])
            if isinstance(self.paired, nn.parallel.DistributedDataParallel):
                # the probes as outputs too: DDP looks for the parameters a step uses from the
                # forward's outputs, and a probe-only site's M1 reaches the loss only via its probe
                hook = unwrap(self.paired).register_forward_hook(
                    lambda module, args, out: (out, [probes[s] for s in self.sites])
                )
            try:
                out = self.paired(*inputs)
            except _Stop:
                out = None
            finally:
                if hook is not None:
                    hook.remove()
            losses = {s: self._loss(probes[s], targets[s], s) for s in self.sites}
        self.last = {s: float(v.detach()) for s, v in losses.items()}
        total = sum(losses.values())
        if distributed:  # every parameter takes part in the reduction (later blocks: zero gradient)
            total = total + 0.0 * sum(t.sum() for t in _tensor_leaves(out))
        return total

    def _stop_after(self, site: str):
        p = plan_of(self.paired).site(site).probe
        module = unwrap(self.paired).get_submodule(p.module)

        def stop(*_: Any) -> None:
            raise _Stop

        return (
            module.register_forward_hook(stop)
            if p.where == "output"
            else module.register_forward_pre_hook(stop)
        )

    def _loss(self, student: torch.Tensor, teacher: torch.Tensor, site: str = "") -> torch.Tensor:
        if student.shape != teacher.shape:
            raise PlanError(
                f"probe shape {tuple(student.shape)} differs from the teacher's {tuple(teacher.shape)}: "
                "size the pairs with wide=surgery.win.teacher_widths(...)"
            )
        if self.loss == "mse":
            return F.mse_loss(student, teacher)
        if self.loss in ("ln", "std"):
            axis = self.feature_axis.get(site, 1 if student.dim() > 2 else -1)
            return F.mse_loss(
                _normalise(student, axis, self.loss), _normalise(teacher, axis, self.loss)
            )
        if (
            self.loss == "nmse"
        ):  # scale-free: the same learning rate works whatever the features' scale
            return F.mse_loss(student, teacher) / teacher.pow(2).mean().clamp_min(1e-12)
        dim = 1 if student.dim() > 2 else -1
        return F.kl_div(
            F.log_softmax(student, dim),
            F.log_softmax(teacher, dim),
            log_target=True,
            reduction="batchmean",
        )


def _normalise(x: torch.Tensor, axis: int, how: str, eps: float = 1e-5) -> torch.Tensor:
    """ "ln": zero mean, unit variance over the feature axis at every position; "std": the same per
    channel over every other axis (the batch and positions)."""
    axis = axis % x.dim()
    dims = (axis,) if how == "ln" else tuple(i for i in range(x.dim()) if i != axis)
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + eps)


def _tensor_leaves(out: Any) -> list[torch.Tensor]:
    from torch.utils import _pytree

    return [
        t for t in _pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]


CONDITION = 1e3  # the largest ratio of M1's singular values the closed-form start allows


@torch.no_grad()
def least_squares_start(
    imitation: Imitation, *inputs: Any, ridge: float = 1e-4
) -> dict[str, float]:
    """Closed-form start for each probed pair (beyond the paper): M1 = the least-squares map from the
    student's h to the teacher's block output over a calibration batch, M2 = pinv(M1) so that the
    paired forward is unchanged (M2 M1 = I). Returns the relative residual per site."""
    paired = unwrap(imitation.paired)
    targets = imitation.teacher_outputs(*inputs)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    plan = plan_of(paired)

    def keep(site: str, value: torch.Tensor) -> None:  # a hook returning a value would replace it
        seen.setdefault(site, value.detach())

    for s in imitation.sites:
        p = plan.site(s).probe
        module = paired.get_submodule(p.module)
        # prepend: read h before the pair's own hook on the same module maps it
        if p.where == "output":
            handles.append(
                module.register_forward_hook(lambda m, a, o, s=s: keep(s, o), prepend=True)
            )
        else:
            handles.append(
                module.register_forward_pre_hook(lambda m, a, s=s: keep(s, a[0]), prepend=True)
            )
    try:
        paired(*inputs)
    finally:
        for h in handles:
            h.remove()
    residuals = {}
    for s in imitation.sites:
        site = plan.site(s)
        pair = paired.pairs[s]
        h = seen[s].movedim(site.feature_axis, -1).reshape(-1, site.d).double()
        t = targets[s].movedim(site.feature_axis, -1).reshape(-1, site.D).double()
        gram = h.T @ h
        gram += ridge * gram.diagonal().mean() * torch.eye(site.d, dtype=gram.dtype)
        m1 = torch.linalg.solve(gram, h.T @ t).T  # [D, d]
        # its singular values floored at CONDITION of the largest: M2 = M1^-1 stays well
        # conditioned, so M2 M1 = I holds in the pairs' own dtype and the forward is unchanged
        u, sv, vh = torch.linalg.svd(m1, full_matrices=False)
        sv = sv.clamp_min(sv[0].clamp_min(1e-30) / CONDITION)
        m1 = (u * sv) @ vh
        residuals[s] = float((h @ m1.T - t).norm() / t.norm().clamp_min(1e-30))
        pair.widen.weight.copy_(m1)
        if pair.widen.bias is not None:
            pair.widen.bias.zero_()
        if pair.narrow is not None:
            pair.narrow.weight.copy_((vh.T / sv) @ u.T)
            if pair.narrow.bias is not None:
                pair.narrow.bias.zero_()
    return residuals
