"""The student's start taken from a wider teacher (the paper's Assumption 3.4; weight selection):
every thin tensor is the teacher's tensor at the indices the student's index spaces choose.

Both models are analysed by `surgery.analysis.spaces`; the student's spaces are matched to the
teacher's through the parameters they share names with (the same class, wider), structure by
structure: heads with heads, the dims within heads with theirs, each part of a packed qkv with its
part, a grouped-query attention's key/value heads and the query heads grouped over them. Each
unstructured space then takes some of the teacher's indices (all of them at equal widths), chosen
once for every tensor it appears in, so residual adds, tied weights and attention keep lining up:
every parameter and buffer is sliced the same way, whatever module it belongs to (raw
`nn.Parameter`s such as learned positions and class tokens included).

`Selection` is the start step by step (choose, copy, refit); `sample_from_teacher` runs them all.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.analysis.spaces import CAT, PROD, IndexSpaces
from surgery.analysis.widths import WidthTable, width_groups
from surgery.errors import PlanError
from surgery.ir.capture import as_example_inputs

from .rotate import gain_offsets, norm_params, residual_bases, rotated

SELECTS = ("energy", "random", "first", "uniform", "rotation")
SCALES = ("fan_in", "sqrt", "none")
_LINEAR_LIKE = ("linear", "conv")


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
    """Initialise `student` in place from `teacher` (same class and parameter names, wider) and
    return it.

    select: which teacher units each space takes: "energy" (those whose inputs carry the most
    energy in the teacher on `refit`, else the example inputs, measured at every layer reading
    them), "random", "uniform" (evenly spaced: weight selection), "first" (the plain slice), or
    "rotation": energy inside the blocks, and the residual stream that feature norms read turned
    onto its d principal directions instead of cut to d channels (win/rotate.py; no refit there).
    scale: how input-side weights of Linear/Conv layers are scaled: "none" (the plain slice),
    "fan_in" (x D/d: each sampled pre-activation an unbiased estimate of the teacher's), "sqrt",
    or an exponent p: x (D/d)**p.
    refit: calibration inputs (a tensor or tuple, a few hundred examples) on which every layer
    whose inputs or outputs were subsampled is refitted by ridge least squares, in forward order,
    to reproduce the teacher's outputs at the chosen units from the student's own inputs (as in
    channel pruning; beyond the paper). Layers whose weight is tied to another use are left as
    sampled (refitting one use would change the other). None: copy only.
    Both models run in eval mode (no dropout) here; their modes are restored after."""
    selection = Selection(student, teacher, example_inputs, scale=scale)
    selection.choose(select, generator, refit)
    selection.copy()
    if refit is not None:
        selection.refit(as_example_inputs(student, refit), ridge)
    return student


@dataclass
class _Plan:
    """How a student space takes teacher indices: "leaf" (the units chosen for student leaf
    `leaf` of teacher leaf `target`), "one" (one unit of teacher factor `target`), "all" (every
    index of `target`), or a product / concatenation of member plans."""

    kind: str
    members: list[_Plan]
    target: int | None = None
    leaf: int | None = None


class Selection:
    """The start of `student` from `teacher`, step by step: `choose` the teacher units of every
    student space, `copy` the tensors at them, `refit` the layers that lost units."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        example_inputs: Any = None,
        *,
        scale: str | float = "none",
    ) -> None:
        _scale(2.0, scale)  # refuse a bad scale before any work
        self.student, self.teacher = student, teacher
        self.inputs = as_example_inputs(student, example_inputs)
        with _eval(student, teacher):
            self.s: WidthTable = width_groups(student, self.inputs)
            self.t: WidthTable = width_groups(teacher, self.inputs)
        self.scale = scale
        self.pairs: dict[int, int] = {}  # student leaf -> teacher leaf it takes units of
        self.leading: set[int] = set()  # teacher factors the student lacks: it takes one unit
        self.plans: dict[tuple[int, int], _Plan] = {}
        self.dim_plans = {
            name: [self._plan(a, b) for a, b in zip(dims, self.t.spaces.dims[name], strict=True)]
            for name, dims in self.s.spaces.dims.items()
            if len(self.t.spaces.dims.get(name, ())) == len(dims)
        }
        self.axis_plans = {  # the outputs of the layers a refit may fit
            op.name: [self._plan(a, b) for a, b in zip(axes, t_axes, strict=True)]
            for op in self.s.flow.ops.values()
            if op.kind in _LINEAR_LIKE
            and (axes := self.s.spaces.axes.get(op.name)) is not None
            and len(t_axes := self.t.spaces.axes.get(op.name, ())) == len(axes)
        }
        self.chosen: dict[int, torch.Tensor] = {}  # student leaf -> teacher units (sorted)
        self.chosen_leading: dict[int, torch.Tensor] = {}  # teacher factor -> the one unit taken
        self.bases: dict[int, torch.Tensor] = {}  # teacher leaf -> its D x d basis ("rotation")
        self.notes: list[str] = []  # what the log should say about the choice

    # ---- matching student spaces to teacher spaces ----
    def _plan(self, a: int, b: int) -> _Plan:
        """How student space `a` takes its indices from teacher space `b`, member by member. Where
        the teacher's product has more factors (the student has one head, one key/value head),
        the student's factors line up with the teacher's innermost ones and it takes one unit of
        each leading factor (the same unit wherever that factor appears)."""
        s, t = self.s.spaces, self.t.spaces
        key = (s.find(a), t.find(b))
        if key not in self.plans:
            self.plans[key] = self._make_plan(a, b)
        return self.plans[key]

    def _make_plan(self, a: int, b: int) -> _Plan:
        s, t = self.s.spaces, self.t.spaces
        sa, sb = s.structure(a), t.structure(b)
        if sa is not None and sb is not None and sa[0] == sb[0] and len(sa[1]) == len(sb[1]):
            return _Plan(sa[0], [self._plan(x, y) for x, y in zip(sa[1], sb[1], strict=True)])
        atoms_a, atoms_b = s.atoms(a), t.atoms(b)
        if (sa or sb) and 0 < len(atoms_a) <= len(atoms_b) and max(len(atoms_a), len(atoms_b)) > 1:
            lead = [t.find(x) for x in atoms_b[: len(atoms_b) - len(atoms_a)]]
            self.leading.update(lead)
            members = [self._plan(x, y) for x, y in zip(atoms_a, atoms_b[len(lead) :], strict=True)]
            return _Plan(PROD, [*(_Plan("one", [], target=x) for x in lead), *members])
        if sa is not None and s.width(a) == t.width(b):
            return _Plan("all", [], target=t.find(b))  # structured in the student only
        if sa is not None:
            raise PlanError(
                f"sample_from_teacher: the student's {_where(s, a)} is structured "
                f"{_shape_text(s, a)} and the teacher's {_shape_text(t, b)}: they do not match"
            )
        leaf, target = s.find(a), t.find(b)
        known = self.pairs.get(leaf)
        if known is not None and t.find(known) != target:
            raise PlanError(
                f"sample_from_teacher: the student's {_where(s, leaf)} matches two teacher "
                f"spaces ({_where(t, known)}, {_where(t, target)})"
            )
        self.pairs[leaf] = target
        if s.width(leaf) == 1:
            self.leading.add(target)
        return _Plan("leaf", [], target=target, leaf=leaf)

    # ---- choosing ----
    def choose(
        self,
        select: str = "energy",
        generator: torch.Generator | None = None,
        calibration: Any = None,
    ) -> dict[int, torch.Tensor]:
        """Student leaf -> the teacher indices it takes (sorted)."""
        if select not in SELECTS:
            raise PlanError(f"select must be one of {SELECTS}, got {select!r}")
        inputs = self._calibration_inputs(calibration)
        energy = self.energies(inputs) if select in ("energy", "rotation") else {}
        units = "energy" if select == "rotation" else select
        s, t = self.s.spaces, self.t.spaces
        for atom in self.leading:  # one unit of a factor the student lacks (one of the heads)
            self.chosen_leading[atom] = _units(t.width(atom), 1, units, generator, energy.get(atom))
        for leaf, target in self.pairs.items():
            ws, wt = s.width(leaf), t.width(target)
            if wt < ws:
                raise PlanError(
                    f"sample_from_teacher: the teacher is narrower than the student at "
                    f"{_where(s, leaf)} ({wt} < {ws})"
                )
            if ws == wt:
                self.chosen[leaf] = torch.arange(ws)
                continue
            frozen = s.space(leaf).frozen or t.space(target).frozen
            if frozen:
                self.notes.append(f"{_where(s, leaf)}: {ws} of {wt} taken although {frozen}")
            self.chosen[leaf] = (
                self.chosen_leading[target]
                if ws == 1
                else _units(wt, ws, units, generator, energy.get(target))
            )
        if select == "rotation":
            self.bases = residual_bases(self, inputs)
        return self.chosen

    def turned(self, calibration: Any = None) -> Selection:
        """This energy selection as `choose("rotation")` would make it, on a copy: the same units,
        the residual stream turned; the teacher's energies are not measured again."""
        other = copy.copy(self)
        other.bases = residual_bases(other, self._calibration_inputs(calibration))
        return other

    def _calibration_inputs(self, calibration: Any) -> tuple[Any, ...]:
        """The inputs units are chosen on: the calibration batch, else the example inputs."""
        if calibration is None:
            return self.inputs
        return as_example_inputs(self.student, calibration)

    def energies(self, inputs: tuple[Any, ...]) -> dict[int, torch.Tensor]:
        """Teacher leaf -> mean square of each of its units where layers read them (the input of
        every Linear, conv and norm), each reader's vector scaled to mean 1 (one vote each); for a
        unit no layer reads, where layers write it."""
        t, flow = self.t.spaces, self.t.flow
        read: dict[int, torch.Tensor] = {}
        written: dict[int, torch.Tensor] = {}
        modules = dict(self.teacher.named_modules())
        handles = []

        def record(into: dict[int, torch.Tensor], space: int, x: Any, axis: int) -> None:
            if not isinstance(x, torch.Tensor) or x.dim() <= axis % max(x.dim(), 1):
                return
            if x.shape[axis] != t.width(space):
                return
            e = x.detach().double().movedim(axis, -1).pow(2).reshape(-1, x.shape[axis]).mean(0)
            e = e / e.mean().clamp_min(1e-30)
            for leaf, part in _split_energy(t, space, e):
                into[leaf] = into.get(leaf, 0) + part / part.mean().clamp_min(1e-30)

        for op in flow.ops.values():
            if not op.module or op.module not in modules or not op.params or not op.inputs:
                continue
            if op.kind not in ("linear", "conv", "norm", "batch_norm"):
                continue
            x_axes = t.axes.get(op.inputs[0])
            if not x_axes:
                continue
            axis = 1 if op.kind in ("conv", "batch_norm") or op.attrs.get("channels") else -1
            space_in = x_axes[axis]
            out_axis = t.feature_axis(op.name)
            space_out = t.axes[op.name][out_axis] if out_axis is not None else None
            module = modules[op.module]
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, sp=space_in, ax=axis: record(read, sp, a[0] if a else None, ax)
                )
            )
            if space_out is not None and op.kind in _LINEAR_LIKE:
                handles.append(
                    module.register_forward_hook(
                        lambda m, a, o, sp=space_out, ax=out_axis: record(written, sp, o, ax)
                    )
                )
        hooked_forward(self.teacher, inputs, handles)
        return {**written, **read}

    # ---- indices ----
    def indices(self, plan: _Plan) -> torch.Tensor:
        """The teacher indices a plan takes (into its teacher space, in the student's order)."""
        if plan.kind == "leaf":
            return self.chosen[plan.leaf]
        if plan.kind == "one":
            return self.chosen_leading[plan.target]
        if plan.kind == "all":
            return torch.arange(self.t.spaces.width(plan.target))
        picks = [self.indices(m) for m in plan.members]
        widths = [self.teacher_width(m) for m in plan.members]
        if plan.kind == CAT:
            offsets = [0]
            for w in widths[:-1]:
                offsets.append(offsets[-1] + w)
            return torch.cat([p + o for p, o in zip(picks, offsets, strict=True)])
        out = picks[0]
        for p, w in zip(picks[1:], widths[1:], strict=True):
            out = (out[:, None] * w + p[None, :]).flatten()
        return out

    def teacher_width(self, plan: _Plan) -> int:
        if plan.target is not None:
            return self.t.spaces.width(plan.target)
        widths = [self.teacher_width(m) for m in plan.members]
        return math.prod(widths) if plan.kind == PROD else sum(widths)

    # ---- copying ----
    def tensor_indices(self, name: str, shape: tuple[int, ...]) -> list[torch.Tensor | None]:
        """Per dim of student tensor `name`: the teacher indices it takes (None: all of them)."""
        plans = self.dim_plans.get(name)
        t_shape = tuple(self.t.flow.param_shapes.get(name, ()))
        if plans is None:
            if t_shape != shape:
                raise PlanError(
                    f"sample_from_teacher: {name} {shape} is not read by the student's forward and "
                    f"the teacher's is {t_shape}: nothing says which part to take"
                )
            return [None] * len(shape)
        return [self._taken(plan) for plan in plans]

    @torch.no_grad()
    def copy(self) -> dict[str, list[torch.Tensor | None]]:
        """Every parameter and persistent buffer of the student := the teacher's at the chosen
        indices (input-side weights scaled as asked). Returns name -> per-dim indices."""
        s_state = self.student.state_dict(keep_vars=True)
        t_state = self.teacher.state_dict(keep_vars=True)
        input_dims = self._input_dims()
        roles = norm_params(self) if self.bases else {}
        offsets = (
            (gain_offsets(self.teacher, self.t.flow), gain_offsets(self.student, self.s.flow))
            if self.bases
            else ({}, {})
        )
        done: dict[int, list[torch.Tensor | None]] = {}
        taken: dict[str, list[torch.Tensor | None]] = {}
        for name, tensor in s_state.items():
            if name not in t_state:
                raise PlanError(f"sample_from_teacher: the teacher has no {name}")
            if id(tensor) in done:  # a tied tensor: sliced once
                taken[name] = done[id(tensor)]
                continue
            source = t_state[name]
            indices = self.tensor_indices(name, tuple(tensor.shape))
            value = source
            turned = self._rotated_dims(name)
            for d, index in enumerate(indices):
                if d in turned:
                    ends = (offsets[0].get(name), offsets[1].get(name))
                    value = rotated(value, d, turned[d].to(value.device), roles.get(name), ends)
                elif index is not None:
                    value = value.index_select(d, index.to(value.device))
            d_in = input_dims.get(name)
            if d_in is not None and indices[d_in] is not None and d_in not in turned:
                value = value * _scale(source.shape[d_in] / tensor.shape[d_in], self.scale)
            tensor.copy_(value.to(tensor.dtype))
            done[id(tensor)] = taken[name] = indices
        return taken

    def _rotated_dims(self, name: str) -> dict[int, torch.Tensor]:
        """Dim -> basis for the dims of student tensor `name` that a rotated stream indexes."""
        if not self.bases:
            return {}
        return {
            d: self.bases[plan.target]
            for d, plan in enumerate(self.dim_plans.get(name, ()))
            if self._rotated(plan)
        }

    def _rotated(self, plan: _Plan) -> bool:
        """Whether a plan takes a whole rotated stream (a basis, not units)."""
        return plan.kind == "leaf" and plan.target in self.bases

    def _input_dims(self) -> dict[str, int]:
        """Weight name -> its input dim, for the Linear / conv layers (what `scale` scales)."""
        found = {}
        for op in self.s.flow.ops.values():
            weight = op.params.get("weight")
            if weight and op.kind in _LINEAR_LIKE:
                found[weight] = op.attrs.get("weight_in_axis", 1)
        return found

    # ---- refitting ----
    @torch.no_grad()
    def refit(self, inputs: tuple[Any, ...], ridge: float = 1e-3) -> list[str]:
        """Refit every Linear / Conv2d (groups 1) layer whose inputs or outputs lost units, in
        forward order, so that on the student's own inputs it reproduces the teacher's outputs at
        the chosen units (ridge least squares). Returns the layers refitted."""
        layers = self._refittable()
        if not layers:
            return []
        t_modules = dict(self.teacher.named_modules())
        targets: dict[str, torch.Tensor] = {}

        def keep(path: str, out: torch.Tensor) -> None:  # returning it would replace the output
            targets.setdefault(path, out.detach())

        handles = [
            t_modules[path].register_forward_hook(lambda m, a, o, path=path: keep(path, o))
            for path in layers
        ]
        hooked_forward(self.teacher, inputs, handles)
        s_modules = dict(self.student.named_modules())
        done = []
        with _eval(self.student):
            for path, (out_indices, w_in, w_out) in layers.items():
                seen: list[torch.Tensor] = []
                module = s_modules[path]
                h = module.register_forward_pre_hook(
                    lambda m, a, seen=seen: seen.append(a[0].detach())
                )
                try:
                    self.student(*inputs)
                finally:
                    h.remove()
                if not seen:
                    continue
                target = targets[path]
                for axis, index in enumerate(out_indices):
                    if index is not None:
                        target = target.index_select(axis, index.to(target.device))
                if _fit(module, seen[0], target, ridge, w_in, w_out):
                    done.append(path)
        return done

    def _refittable(self) -> dict[str, tuple[list[torch.Tensor | None], int, int]]:
        """Layer path -> (teacher indices of each axis of its output, weight in/out dims) for
        every layer the selection changed, in forward order, called once, weight not tied."""
        flow = self.s.flow
        readers = flow.param_readers()
        found = {}
        for op in flow.ops.values():
            weight = op.params.get("weight")
            if not op.module or not weight or op.kind not in _LINEAR_LIKE or not op.inputs:
                continue
            if op.kind == "conv" and (op.attrs.get("groups", 1) != 1 or len(op.shape or ()) != 4):
                continue
            if flow.module_calls.get(op.module, 1) != 1 or len(readers.get(weight, [])) != 1:
                continue
            if flow.param_aliases.get(weight):
                continue  # tied: refitting here would rewrite the other use
            if self._rotated_dims(weight) or any(
                self._rotated(p) for p in self.axis_plans.get(op.name, ())
            ):
                continue  # a rotated stream has no chosen units to fit to
            shape = tuple(self.s.flow.param_shapes[weight])
            if op.name not in self.axis_plans or all(
                i is None for i in self.tensor_indices(weight, shape)
            ):
                continue
            axes = [self._taken(plan) for plan in self.axis_plans[op.name]]
            w_in = op.attrs.get("weight_in_axis", 1)
            w_out = op.attrs.get("weight_out_axis", 0)
            found[op.module] = (axes, w_in, w_out)
        return found

    def _taken(self, plan: _Plan) -> torch.Tensor | None:
        """A plan's teacher indices, None when it takes all of them in order."""
        index = self.indices(plan)
        width = self.teacher_width(plan)
        return None if len(index) == width and torch.equal(index, torch.arange(width)) else index


def _units(
    n: int, k: int, select: str, generator: torch.Generator | None, scores: torch.Tensor | None
) -> torch.Tensor:
    """k of n units (sorted): the top-scoring ones, random ones, evenly spaced ones (weight
    selection's uniform choice), or the first ones."""
    if select == "energy" and scores is not None and len(scores) == n:
        return scores.topk(k).indices.sort().values
    if select == "random":
        return torch.randperm(n, generator=generator)[:k].sort().values
    if select == "uniform":
        return torch.div(torch.arange(k) * n, k, rounding_mode="floor")
    return torch.arange(k)


def _split_energy(
    t: IndexSpaces, space: int, e: torch.Tensor
) -> Iterator[tuple[int, torch.Tensor]]:
    """A space's per-index energy as per-unit energies of its leaves (summed over the others)."""
    found = t.structure(space)
    if found is None:
        yield t.find(space), e
        return
    kind, members = found
    widths = [t.width(m) for m in members]
    if kind == CAT:
        for m, part in zip(members, torch.split(e, widths), strict=True):
            yield from _split_energy(t, m, part)
        return
    grid = e.reshape(widths)
    for i, m in enumerate(members):
        others = [d for d in range(len(widths)) if d != i]
        yield from _split_energy(t, m, grid.sum(others) if others else grid)


def _fit(
    m: nn.Module, x: torch.Tensor, y: torch.Tensor, ridge: float, w_in: int, w_out: int
) -> bool:
    """Ridge least squares for the weight (and bias) of `m` so that m(x) ~ y; False (nothing
    changed) when the fit cannot be set up or is not finite."""
    if isinstance(m, nn.Conv2d):
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            return False
        cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # [N, C*k*k, L]
        a = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        b = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    else:
        a, b = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    a, b = a.double(), b.double()
    bias = getattr(m, "bias", None)
    if bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], 1)
    gram = a.T @ a
    scale = gram.diagonal().mean().clamp_min(1e-12)
    gram += ridge * scale * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    w = torch.linalg.solve(gram, a.T @ b).T  # [out, in (+1)]
    if not torch.isfinite(w).all():
        return False
    if bias is not None:
        bias.copy_(w[:, -1].to(bias.dtype))
        w = w[:, :-1]
    weight = m.weight
    if isinstance(m, nn.Conv2d):
        weight.copy_(w.reshape(weight.shape).to(weight.dtype))
    else:
        weight.copy_((w if (w_out, w_in) == (0, 1) else w.T).to(weight.dtype))
    return True


@contextlib.contextmanager
def _eval(*models: nn.Module) -> Iterator[None]:
    """Every module in eval mode (no dropout, running statistics) for the block; modes restored."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def hooked_forward(model: nn.Module, inputs: tuple[Any, ...], handles: list) -> None:
    """One forward of `model` in eval mode for the hooks in `handles`, removed after it."""
    try:
        with _eval(model):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()


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


def _where(spaces: IndexSpaces, space: int) -> str:
    """A space named by a tensor dim that carries it (or the spaces it is part of)."""
    carriers = spaces.carriers(space)
    if carriers:
        name, dim = carriers[0]
        return f"{name} dim {dim}"
    for name, dims in spaces.dims.items():
        for d, s in enumerate(dims):
            if spaces.find(space) in {spaces.find(x) for x in [s, *spaces.leaves(s)]}:
                return f"a part of {name} dim {d}"
    return f"space {space}"


def _shape_text(spaces: IndexSpaces, space: int) -> str:
    found = spaces.structure(space)
    if found is None:
        return str(spaces.width(space))
    sep = " x " if found[0] == PROD else " + "
    return "(" + sep.join(_shape_text(spaces, m) for m in found[1]) + ")"
