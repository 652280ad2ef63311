"""The student's start of the paper's Assumption 3.4: each thin layer made of neurons sampled from the
corresponding wide layer (one random subset of channels per width group, shared by every layer that
reads or writes it, so residual adds keep lining up)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.analysis.widths import width_groups
from surgery.errors import PlanError
from surgery.ir.capture import as_example_inputs

from .spaces import Space, SpaceTable, index_spaces


@torch.no_grad()
def sample_from_teacher(
    student: nn.Module,
    teacher: nn.Module,
    example_inputs: Any = None,
    *,
    generator: torch.Generator | None = None,
    scale: str | float = "none",
    refit: Any = None,
    ridge: float = 1e-3,
    select: str = "random",
) -> nn.Module:
    """Initialise `student` in place from `teacher` (same module names, wider layers) and return it.

    scale: how input-side weights are scaled. "none" (the default): the plain slice. "fan_in": x D/d,
    so each sampled pre-activation is an unbiased estimate of the teacher's (the mean-field reading of
    "sampling m neurons from the wide layer"); "sqrt": x sqrt(D/d); a number p: x (D/d)**p. Measured
    (bench/win_diag.py, the vision benchmark, 3 seeds): with BatchNorm after every conv the scale of a
    conv's weights changes nothing in the forward but divides its effective learning rate by the
    square of the factor, and fine-tuned with KD the D/d start ended 0.677 vs the plain slice's 0.699
    (vanilla 0.667); the issue's char-LM experiment also found the plain slice best.

    refit: calibration inputs (a tensor or tuple of tensors, a few hundred examples) to refit every
    sampled Linear / Conv2d (groups=1), in forward order, by ridge least squares, so that on the
    student's own inputs (earlier layers already refitted) it reproduces the teacher's outputs at the
    sampled channels (layerwise reconstruction, as in channel pruning; beyond the paper). A random
    half of a trained network computes nearly nothing (near-chance accuracy); refitted, most of the
    teacher's function survives. None: copy only.

    select (attention models): "random" units, or "energy": the features and heads whose inputs
    carry the most energy in the teacher on `refit` (else the example inputs), measured at every
    norm and every Linear reading them; units nothing reads directly stay random."""
    if select not in ("random", "energy"):
        raise PlanError(f"select must be 'random' or 'energy', got {select!r}")
    inputs = as_example_inputs(student, example_inputs)
    s_spaces = index_spaces(student, inputs)
    if s_spaces.attention:
        t_spaces = index_spaces(teacher, inputs)
        energy = (
            _energies(
                teacher,
                t_spaces,
                as_example_inputs(student, example_inputs if refit is None else refit),
            )
            if select == "energy"
            else {}
        )
        outs = _sample_heads(student, teacher, s_spaces, t_spaces, generator, scale, energy)
    else:
        outs = _sample_channels(student, teacher, inputs, generator, scale)
    if refit is not None:
        _refit(student, teacher, as_example_inputs(student, refit), outs, ridge)
    return student


def _sample_channels(
    student: nn.Module,
    teacher: nn.Module,
    inputs: tuple[Any, ...],
    generator: torch.Generator | None,
    scale: str | float,
) -> dict[str, torch.Tensor]:
    """Convolutional / MLP models: one random channel subset per width group (surgery.analysis.widths)."""
    s_table, t_table = width_groups(student, inputs), width_groups(teacher, inputs)
    chosen: dict[str, torch.Tensor] = {}
    for group in s_table.groups:
        try:
            D = t_table[group.name].width
        except KeyError:
            raise PlanError(
                f"sample_from_teacher: the teacher has no width group {group.name!r}"
            ) from None
        if D < group.width:
            raise PlanError(
                f"sample_from_teacher: the teacher is narrower than the student at {group.name} ({D} < {group.width})"
            )
        same = group.frozen is not None or D == group.width
        chosen[group.name] = (
            torch.arange(group.width)
            if same
            else torch.randperm(D, generator=generator)[: group.width].sort().values
        )
    s_modules, t_modules = dict(student.named_modules()), dict(teacher.named_modules())
    outs: dict[str, torch.Tensor] = {}
    for module, kind, in_group, in_mult, out_group in s_table.layers():
        s, t = s_modules[module], t_modules[module]
        in_idx = _features(chosen[in_group], in_mult) if in_group else torch.arange(_in_features(s))
        ratio = _in_features(t) / _in_features(s)
        factor = _scale(ratio, scale)
        out_idx = chosen[out_group] if out_group else in_idx
        _copy_sampled(s, t, kind, in_idx, out_idx, factor)
        outs[module] = out_idx
    return outs


def _sample_heads(
    student: nn.Module,
    teacher: nn.Module,
    s_spaces: SpaceTable,
    t_spaces: SpaceTable,
    generator: torch.Generator | None,
    scale: str | float,
    energy: dict[int, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Attention models: whole heads, one residual-stream subset shared by every block, the
    query/key-value grouping kept (surgery.win.spaces); every other tensor copied as it is."""
    chosen = _choose(s_spaces, t_spaces, generator, energy)
    s_params = student.state_dict(keep_vars=True)  # tied tensors under each of their names
    t_params = teacher.state_dict(keep_vars=True)
    done: set[str] = set()
    outs: dict[str, torch.Tensor] = {}
    for use in s_spaces.uses.values():
        out_idx = chosen[use.space]
        prefix = f"{use.module}." if use.module else ""
        if use.kind == "norm":
            for name, t in t_params.items():
                local = name[len(prefix) :]
                if name.startswith(prefix) and "." not in local and t.dim() == 1:
                    s_params[name].copy_(t[out_idx])
                    done.add(name)
            continue
        weight = t_params[prefix + "weight"]
        out_axis = use.weight_out_axis
        w = weight.index_select(out_axis, out_idx)
        if use.kind == "linear" and use.in_space is not None:
            in_idx = _features(chosen[use.in_space], use.in_per)
            w = w.index_select(use.weight_in_axis, in_idx)
            w = w * _scale(weight.shape[use.weight_in_axis] / len(in_idx), scale)
        s_params[prefix + "weight"].copy_(w)
        done.add(prefix + "weight")
        bias = t_params.get(prefix + "bias")
        if use.kind == "linear" and bias is not None:
            s_params[prefix + "bias"].copy_(bias[out_idx])
            done.add(prefix + "bias")
        outs[use.module] = out_idx
    for name, p in s_params.items():
        if name in done:
            continue
        if name not in t_params or t_params[name].shape != p.shape:
            raise PlanError(
                f"sample_from_teacher: no rule to sample {name} "
                f"{tuple(p.shape)} from the teacher's {tuple(t_params[name].shape) if name in t_params else 'nothing'}"
            )
        p.copy_(t_params[name])
    return outs


def _energies(
    teacher: nn.Module, t_spaces: SpaceTable, inputs: tuple[Any, ...]
) -> dict[int, torch.Tensor]:
    """Teacher space root -> mean square of each feature where it is read: the input of every norm
    over it and of every Linear reading it, each reader's vector scaled to mean 1 (one vote each)."""
    energy: dict[int, torch.Tensor] = {}

    def record(root: int, x: torch.Tensor) -> None:
        if x.shape[-1] != t_spaces.space(root).width:
            return
        e = x.detach().double().pow(2).flatten(0, -2).mean(0)
        energy[root] = energy.get(root, 0) + e / e.mean().clamp_min(1e-30)

    modules = dict(teacher.named_modules())
    handles = []
    for use in t_spaces.uses.values():
        read = use.space if use.kind == "norm" else use.in_space if use.in_per == 1 else None
        if use.kind == "embedding" or read is None:
            continue
        root = t_spaces.find(read)
        handles.append(
            modules[use.module].register_forward_pre_hook(
                lambda m, a, root=root: record(root, a[0])
            )
        )
    try:
        with torch.no_grad():
            teacher(*inputs)
    finally:
        for h in handles:
            h.remove()
    return energy


def _choose(
    s_spaces: SpaceTable,
    t_spaces: SpaceTable,
    generator: torch.Generator | None,
    energy: dict[int, torch.Tensor],
) -> dict[int, torch.Tensor]:
    """Student space id (every id, not only roots) -> the teacher's feature indices it takes."""
    t_by_key = {t_spaces.space(r).key: r for r in t_spaces.roots()}
    by_root: dict[int, torch.Tensor] = {}
    roots = s_spaces.roots()
    # key/value heads before the query heads grouped over them; packed outputs after their parts
    order = sorted(
        roots,
        key=lambda r: (s_spaces.space(r).grouped is not None, s_spaces.space(r).parts is not None),
    )
    for r in order:
        s = s_spaces.space(r)
        if s.key not in t_by_key:
            raise PlanError(f"sample_from_teacher: the teacher has nothing matching {s.key}")
        t = t_spaces.space(t_by_key[s.key])
        if s.parts is not None:
            offsets = [0]
            for part in t.parts or []:
                offsets.append(offsets[-1] + t_spaces.space(part).width)
            if t.parts is None or len(t.parts) != len(s.parts):
                raise PlanError(
                    f"sample_from_teacher: {s.key} is packed differently in the teacher"
                )
            by_root[r] = torch.cat(
                [by_root[s_spaces.find(p)] + offsets[i] for i, p in enumerate(s.parts)]
            )
            continue
        by_root[r] = _pick(s, t, s_spaces, by_root, generator, energy.get(t_by_key[s.key]))
    return {i: by_root[s_spaces.find(i)] for i in range(len(s_spaces))}


def _pick(
    s: Space,
    t: Space,
    s_spaces: SpaceTable,
    by_root: dict[int, torch.Tensor],
    generator: torch.Generator | None,
    energy: torch.Tensor | None,
) -> torch.Tensor:
    """The teacher features student space `s` takes: all of them at equal width, else whole units,
    the most energetic ones when `energy` is known, else at random (query heads inside the
    key/value heads already chosen under grouped attention)."""
    if t.width < s.width:
        raise PlanError(
            f"sample_from_teacher: the teacher is narrower than the student at {s.key} ({t.width} < {s.width})"
        )
    if t.width == s.width:
        return torch.arange(s.width)
    if s.frozen:
        raise PlanError(f"sample_from_teacher: {s.key} cannot be sampled: {s.frozen}")
    if s.unit != t.unit:
        raise PlanError(
            f"sample_from_teacher: {s.key} has heads of {s.unit} features in the student and "
            f"{t.unit} in the teacher; whole heads can only be sampled between equal head sizes"
        )
    if (s.grouped is None) != (t.grouped is None):
        raise PlanError(
            f"sample_from_teacher: {s.key}: grouped-query attention in only one of student and teacher"
        )
    scores = None if energy is None else energy.reshape(-1, t.unit).sum(1)  # per unit
    if s.grouped is not None:
        kv = by_root[s_spaces.find(s.grouped[0])][:: s.unit] // s.unit  # the chosen key/value heads
        per_s, per_t = s.grouped[1], t.grouped[1]
        if per_t < per_s:
            raise PlanError(
                f"sample_from_teacher: {s.key} groups {per_s} query heads per key/value head, the "
                f"teacher only {per_t}"
            )
        heads = torch.cat(
            [h * per_t + _units(per_t, per_s, generator, scores, h * per_t) for h in kv]
        )
    else:
        heads = _units(t.width // t.unit, s.width // s.unit, generator, scores, 0)
    return _features(heads, s.unit)


def _units(
    n: int, k: int, generator: torch.Generator | None, scores: torch.Tensor | None, first: int
) -> torch.Tensor:
    """k of the n units first .. first+n-1 (as offsets, sorted): the top-scoring ones, or random."""
    if scores is None:
        return torch.randperm(n, generator=generator)[:k].sort().values
    return scores[first : first + n].topk(k).indices.sort().values


def _refit(
    student: nn.Module,
    teacher: nn.Module,
    inputs: tuple[Any, ...],
    outs: dict[str, torch.Tensor],
    ridge: float,
) -> None:
    fittable = {
        name: m
        for name, m in student.named_modules()
        if name in outs
        and (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))
    }
    t_modules = dict(teacher.named_modules())
    targets: dict[str, torch.Tensor] = {}
    order: list[str] = []
    handles = [
        t_modules[name].register_forward_hook(
            lambda m, a, o, name=name: targets.setdefault(name, o.detach())
        )
        for name in fittable
    ]
    handles += [
        m.register_forward_pre_hook(lambda m, a, name=name: order.append(name))
        for name, m in fittable.items()
    ]
    modes = [(m, m.training) for m in (student, teacher)]
    teacher_buffers = {name: b.clone() for name, b in teacher.named_buffers()}
    student.train(), teacher.train()  # batch statistics: what the student trains with
    try:
        teacher(*inputs)
        student(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.train(mode)
        for name, b in teacher.named_buffers():  # the frozen teacher keeps its running statistics
            b.copy_(teacher_buffers[name])
    student.train()
    try:
        for name in dict.fromkeys(order):
            m = fittable[name]
            seen: list[torch.Tensor] = []
            h = m.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].detach()))
            try:
                student(*inputs)
            finally:
                h.remove()
            _fit(m, seen[0], targets[name].index_select(_axis(m), outs[name]), ridge)
    finally:
        for m, mode in modes:
            m.train(mode)


def _axis(m: nn.Module) -> int:
    return 1 if isinstance(m, nn.Conv2d) else -1


def _fit(m: nn.Module, x: torch.Tensor, y: torch.Tensor, ridge: float) -> None:
    """Ridge least squares for the weight (and bias) of `m` so that m(x) ~ y."""
    if isinstance(m, nn.Conv2d):
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            return  # leave it as sampled
        cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # [N, C*k*k, L]
        a = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        b = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    else:
        a, b = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    a, b = a.double(), b.double()
    if m.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    gram = a.T @ a
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram, a.T @ b).T  # [out, in (+1)]
    if m.bias is not None:
        m.bias.copy_(w[:, -1].to(m.bias.dtype))
        w = w[:, :-1]
    m.weight.copy_(w.reshape(m.weight.shape).to(m.weight.dtype))


SCALES = ("fan_in", "sqrt", "none")


def _scale(ratio: float, how: str | float) -> float:
    if isinstance(how, (int, float)) and not isinstance(how, bool):
        return ratio ** float(how)
    if how == "fan_in":
        return ratio
    if how == "sqrt":
        return ratio**0.5
    if how == "none":
        return 1.0
    raise PlanError(f"scale must be one of {SCALES} or an exponent, got {how!r}")


def _features(channels: torch.Tensor, inner: int) -> torch.Tensor:
    """Channel indices -> feature indices when each channel spans `inner` features (c*inner + j)."""
    return (channels.unsqueeze(1) * inner + torch.arange(inner)).flatten()


def _in_features(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else getattr(m, "in_channels", 1)


def _copy_sampled(
    s: nn.Module, t: nn.Module, kind: str, in_idx: torch.Tensor, out_idx: torch.Tensor, scale: float
) -> None:
    if kind in ("linear", "conv"):
        s.weight.copy_(t.weight[out_idx][:, in_idx] * scale)
    elif kind == "depthwise":
        s.weight.copy_(t.weight[out_idx])
    elif kind in ("batch_norm", "layer_norm"):
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(s, name, None) is not None:
                getattr(s, name).copy_(getattr(t, name)[out_idx])
        return
    else:
        raise PlanError(f"sample_from_teacher: no rule to sample a {type(s).__name__}")
    if s.bias is not None:
        s.bias.copy_(t.bias[out_idx])
