"""The numeric self-check: every site the rules would offer is proven on the user's own model first.

Random non-identity pairs go on all candidate sites at once; the paired and the folded forward are
compared on the example inputs in float64 (float32 with a looser tolerance when the model cannot run
in float64). When they differ beyond rounding, bisection finds the sites responsible and exactly
those are refused, with the measured error and the modules on their route. Defence in depth behind
the rules' property tests: an op the rules misjudge is refused, never folded wrong. The user's model
and the global RNG state are untouched (a float64 copy, a forked RNG).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from surgery.analysis.blocks import NOT_CHECKED, BlockTable, Boundary
from surgery.analysis.localcheck import LocalProbe, Recorder, record
from surgery.rewrites import RULES
from surgery.runtime.attach import apply_plan, build_plan
from surgery.runtime.fold import fold

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3}  # normwise relative; ~1e7 roundings each
# a site whose check would cost more float64 multiply-adds than this is reported unchecked (VGG's
# 25088 x 4096 classifier costs 7e9 with the checking pairs taken as their factors)
SITE_FLOP_BUDGET = 2e10
CHECK_RANK = 8  # the rank of the checking pairs' W (see check_width)


CHECKS = ("local", "full")


def self_check(
    model: nn.Module,
    inputs: tuple[Any, ...],
    table: BlockTable,
    mode: str = "local",
    recorded: Recorder | None = None,
) -> BlockTable:
    """Run the numeric check on every foldable boundary of `table` (in place; returned for
    chaining): each gets `checked` = the measured error, or is refused (`route` None) with the
    reason. On the meta device, and for a site over SITE_FLOP_BUDGET, it says it was not checked.
    mode "local" (the default) checks each group of sites on the layers they touch, from one
    recorded forward (surgery.analysis.localcheck; `recorded`: the capture's, when it covers the
    sites); "full" folds a float64 copy of the whole model."""
    if mode not in CHECKS:
        raise ValueError(f"check must be True, False or one of {CHECKS}, got {mode!r}")
    candidates = [b for b in table if b.foldable]
    if any(p.device.type == "meta" for p in [*model.parameters(), *model.buffers()]):
        for boundary in candidates:
            boundary.checked = f"{NOT_CHECKED} (meta device: no weights)"
        return table
    sizes = {name: p.numel() for name, p in model.named_parameters(remove_duplicate=False)}
    for boundary in candidates:
        cost = fold_flops(boundary, sizes)
        if cost > SITE_FLOP_BUDGET:
            boundary.checked = (
                f"{NOT_CHECKED}: its float64 fold costs {cost:.0e} flop, over "
                f"surgery.analysis.selfcheck.SITE_FLOP_BUDGET ({SITE_FLOP_BUDGET:.0e})"
            )
    candidates = [b for b in candidates if not b.checked]
    if not candidates:
        return table
    with torch.random.fork_rng(devices=[]):
        # a model drawing random numbers in eval cannot be proven on (two runs differ): asked up
        # front where the graph draws any, else only when a site fails (then it may be the cause)
        unsteady = draws_random(table) and random_in_eval(model, inputs)
        verdicts: dict[str, tuple[float, str, str]] = {}  # site -> (error, why, how) or refused
        if not unsteady and mode == "local":
            local = record(model, inputs, table, candidates, recorded)
            for batch in local.batches():
                _reseed()
                verdicts.update(_checked(LocalProbe(local), batch))
            rest = local.unsupported
        else:
            rest = [] if unsteady else candidates
        if rest:
            _reseed()
            verdicts.update(_checked(_Probe(model, inputs, table), rest))
        if any(v[2] == "refused" for v in verdicts.values()):
            unsteady = random_in_eval(model, inputs)
    if unsteady:
        for boundary in candidates:
            boundary.reason = unsteady
            boundary.route = None
            boundary.checked = "failed: the model is not deterministic"
        return table
    for boundary in candidates:
        measured, why, how = verdicts[boundary.name]
        if how == "refused":
            boundary.reason = (
                f"numeric check failed: rel err {measured:.1e} through "
                f"{', '.join(_modules(boundary)) or boundary.name}" + (f" ({why})" if why else "")
            )
            boundary.route = None
            boundary.checked = f"failed: rel err {measured:.1e}"
        else:
            boundary.checked = f"checked: rel err {measured:.0e} ({how})"
    return table


def _reseed() -> None:
    """The checking pairs' draws from a fixed seed (they are drawn on the CPU; torch.manual_seed
    would also seed every accelerator backend, a stack trace per call)."""
    torch.random.default_generator.manual_seed(0)


def _checked(probe: Any, candidates: list[Boundary]) -> dict[str, tuple[float, str, str]]:
    """Each candidate's verdict: (error, why, "refused") for the sites responsible for a mismatch
    (found by bisection, then greedily for sites exact alone but not together), (joint error of
    the rest, "", how it was checked) for the others."""
    joint, why = probe.error(candidates)
    refused = _bisect(probe, candidates, joint, why)
    if refused:
        kept = [b for b in candidates if b.name not in refused]
        joint, _ = probe.error(kept) if kept else (0.0, "")
        if joint > probe.tolerance:  # exact alone, not together
            refused.update(_greedy(probe, kept))
            kept = [b for b in candidates if b.name not in refused]
            joint, _ = probe.error(kept) if kept else (0.0, "")
    return {
        b.name: (*refused[b.name], "refused")
        if b.name in refused
        else (joint, "", probe.dtype_name)
        for b in candidates
    }


# ops that draw random numbers (fx and aten names); the dropout family only when training is on
RANDOM_OPS = {
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm",
    "bernoulli", "bernoulli_", "multinomial", "normal", "normal_", "uniform_", "exponential_",
    "geometric_", "cauchy_", "log_normal_", "random_", "poisson", "gumbel_softmax",
}  # fmt: skip
# dropout-like functions -> (position of `training`, its default)
DROPOUTS = {
    "dropout": (2, True), "dropout1d": (2, True), "dropout2d": (2, True),
    "dropout3d": (2, True), "alpha_dropout": (2, False), "feature_alpha_dropout": (2, False),
    "native_dropout": (2, True), "rrelu": (3, False), "rrelu_": (3, False),
}  # fmt: skip


def draws_random(table: BlockTable) -> bool:
    """Whether the captured forward calls a random-number op (a dropout with training on)."""
    for op in table.flow.ops.values():
        fn = op.attrs.get("fn")
        if fn in RANDOM_OPS:
            return True
        if fn in DROPOUTS:
            index, default = DROPOUTS[fn]
            args, kwargs = op.attrs.get("args", ()), op.attrs.get("kwargs", {})
            training = kwargs.get("training", kwargs.get("train", default))
            if len(args) > index:
                training = args[index]
            if training is not False:
                return True
    return False


def random_in_eval(model: nn.Module, inputs: tuple[Any, ...]) -> str | None:
    """Why no fold can be proven on this model: two runs on the same inputs differ in eval mode
    (MC dropout, random masking); None when they agree (or when the model cannot run: the checks
    themselves then say why)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            first, second = (_leaves(model(*inputs)) for _ in range(2))
    except Exception:  # noqa: BLE001 - a model that cannot run here is refused by the checks
        return None
    finally:
        for m, training in modes:
            m.training = training
    if len(first) == len(second) and all(
        torch.equal(a, b) for a, b in zip(first, second, strict=False)
    ):
        return None
    return (
        "the model is not deterministic in eval mode (two runs on the same inputs differ): "
        "no fold can be proven on it; make its eval forward deterministic (no dropout or "
        "random masking under model.eval()) or pass check=False"
    )


class _Probe:
    """A float64 eval copy of the model, ready to measure random-pair folds; a float32 copy (and its
    looser tolerance) when the model cannot run in float64."""

    def __init__(self, model: nn.Module, inputs: tuple[Any, ...], table: BlockTable) -> None:
        self.table, self.original, self.original_inputs = table, model, inputs
        self.model = copy.deepcopy(model).eval().double()
        self.inputs = tuple(
            x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for x in inputs
        )
        self.dtype_name, self.tolerance = "float64", TOLERANCE[torch.float64]
        self.tried = False

    def _fall_back_if_float64_fails(self) -> bool:
        """On the first failure: if the plain model cannot run in float64 (float32 constants made
        inside forward, ...), switch to float32 and say so (True: retry)."""
        if self.tried or self.dtype_name != "float64":
            return False
        self.tried = True
        try:
            with torch.no_grad():
                self.model(*self.inputs)
            return False
        except Exception:  # noqa: BLE001 - any dtype trouble: run as the user runs it
            self.model, self.inputs = copy.deepcopy(self.original).eval(), self.original_inputs
            self.dtype_name, self.tolerance = "float32", TOLERANCE[torch.float32]
            return True

    def error(self, sites: Sequence[Boundary]) -> tuple[float, str]:
        """Normwise relative error of fold vs paired with random pairs on `sites` (inf and the
        error's text when building, folding or running them fails)."""
        chosen = [(b, check_width(b.width), False) for b in sites]
        try:
            paired = apply_plan(
                self.model, build_plan(self.table, chosen, self.table.bias), init="random"
            )
            paired.eval()
            thin = fold(paired, factored=True)  # the checking pairs have a small D
            with torch.no_grad():
                reference, folded = _leaves(paired(*self.inputs)), _leaves(thin(*self.inputs))
        except Exception as error:  # noqa: BLE001 - any failure refuses the sites, with its text
            if self._fall_back_if_float64_fails():
                return self.error(sites)
            return math.inf, f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}"
        if len(reference) != len(folded):
            return math.inf, "the folded model returns other outputs"
        errors = [_relative(a, b) for a, b in zip(reference, folded, strict=True)]
        return max(errors, default=0.0), ""


def _bisect(
    probe: _Probe, sites: Sequence[Boundary], measured: float | None = None, why: str = ""
) -> dict[str, tuple[float, str]]:
    """The sites whose fold is off on their own or within their half (error, text), by bisection;
    `measured`: the error of `sites` together when already known."""
    if measured is None:
        measured, why = probe.error(sites)
    if measured <= probe.tolerance:
        return {}
    if len(sites) == 1:
        return {sites[0].name: (measured, why)}
    half = len(sites) // 2
    return {**_bisect(probe, sites[:half]), **_bisect(probe, sites[half:])}


def _greedy(probe: _Probe, sites: Sequence[Boundary]) -> dict[str, tuple[float, str]]:
    """Sites that are exact alone but not together: keep them in order while the set stays exact."""
    kept: list[Boundary] = []
    refused = {}
    for boundary in sites:
        measured, why = probe.error([*kept, boundary])
        if measured <= probe.tolerance:
            kept.append(boundary)
        else:
            refused[boundary.name] = (measured, why or "only together with earlier sites")
    return refused


def _leaves(output: Any) -> list[torch.Tensor]:
    """The floating tensors of a model output (tensor, tuple, dict or Hugging Face ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        return [t for value in output.values() for t in _leaves(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in _leaves(value)]
    return []


def _relative(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    ref, cand = reference.double(), candidate.double()
    if ref.shape != cand.shape:
        return math.inf
    scale = ref.abs().max().item() if ref.numel() else 0.0
    error = (ref - cand).abs().max().item() if ref.numel() else 0.0
    return error / scale if scale > 0 else error


def check_width(d: int) -> int:
    """D of a checking pair: W = M2 M1 is random of rank min(d, CHECK_RANK). The rules are linear in
    W, and a nonzero linear discrepancy is nonzero at a random low-rank W (with probability 1), so a
    low rank proves as much as a full one at d^2 CHECK_RANK instead of d^3 for the product."""
    return min(d, CHECK_RANK)


def fold_flops(boundary: Boundary, sizes: dict[str, int]) -> float:
    """Multiply-adds of checking one site: the pair product and each target's tensors times d, or
    times 2 D where its rule takes the pair as its two factors (see fold's `factored`)."""
    d, D = boundary.width, check_width(boundary.width)
    route = boundary.route
    cost = float(d) * d * D
    for target in route.targets if route is not None else []:
        algebra = RULES.get(target.rule)
        per_element = 2 * D if algebra is not None and algebra.factors else d
        cost += per_element * sum(sizes.get(name, 0) for name in target.params.values())
    return cost


def _modules(boundary: Boundary) -> list[str]:
    """The modules whose parameters absorb the boundary's pair."""
    route = boundary.route
    names = route.absorbed_by if route is not None else []
    return list(dict.fromkeys(name.rpartition(".")[0] or name for name in names))
