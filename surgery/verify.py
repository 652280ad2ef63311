"""verify: show that a folded model computes what the paired model does, in the runtime it ships to.

With ONNX Runtime both models are exported (dynamo exporter, in memory) and run on the same inputs;
the candidate's graph is also compared with the original thin model's (operator histogram and
parameter count), which shows that the fold added nothing to the architecture.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils import _pytree

from surgery.errors import SurgeryError
from surgery.ir.capture import _eval_mode, as_example_inputs
from surgery.plan import Plan
from surgery.runtime.fold import strip_pairs
from surgery.runtime.models import unwrap

if TYPE_CHECKING:  # onnx and onnxruntime load only when a verify runs: `import surgery` stays light
    import onnx
from surgery.report import render_table

RUNTIMES = ("onnxruntime", "torch")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class VerifyReport:
    """How closely `candidate` reproduces `reference`, and whether its graph matches the original.

    max_rel is the normwise relative error max|a - b| / max|ref| (worst output); `ok` needs
    max|a - b| <= atol + rtol * max|ref| for every output (scale-aware: float rounding of a logit near
    zero is measured against the output's scale, not the logit's), plus the structural check.
    op_difference maps each operator whose count differs to (candidate count, original count)."""

    runtime: str
    provider: str
    max_abs: float
    max_rel: float
    rtol: float
    atol: float
    ok: bool
    outputs: int
    structure_checked: bool = False
    same_ops: bool | None = None
    op_difference: dict[str, tuple[int, int]] = field(default_factory=dict)
    candidate_params: int | None = None
    original_params: int | None = None
    reason: str | None = None
    seconds: float = 0.0

    def __str__(self) -> str:
        rows = [
            ("runtime", self.runtime),
            ("provider", self.provider),
            ("outputs compared", self.outputs),
            ("max abs error", self.max_abs),
            ("max rel error (normwise)", self.max_rel),
            ("tolerance", f"max|a - b| <= {self.atol:g} + {self.rtol:g} * max|ref|"),
            ("structure: op histogram", self._ops_cell()),
            ("parameters", self._params_cell()),
            ("verdict", "OK" if self.ok else f"FAILED: {self.reason}"),
            ("time", f"{self.seconds:.1f} s"),
        ]
        return render_table("verify: candidate vs reference", ("check", "result"), rows)

    def _ops_cell(self) -> str:
        if self.runtime == "torch":
            return "n/a (needs runtime='onnxruntime')"
        if not self.structure_checked:
            return "n/a (no original: pass original= or a paired reference)"
        if self.same_ops:
            return "same as the original"
        diff = ", ".join(f"{op} {c} vs {o}" for op, (c, o) in sorted(self.op_difference.items()))
        return f"differs (candidate vs original): {diff}"

    def _params_cell(self) -> str:
        if not self.structure_checked:
            return "n/a"
        return f"candidate {self.candidate_params:,}, original {self.original_params:,}"


def verify(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: Any,
    *,
    runtime: str = "onnxruntime",
    rtol: float = 1e-5,
    atol: float = 1e-6,
    original: nn.Module | None = None,
) -> VerifyReport:
    """Run both models in eval mode on the same inputs and compare outputs (and, with ONNX, the
    candidate's graph against the original thin model: `original`, or the paired reference's
    architecture). Training flags are restored afterwards."""
    if runtime not in RUNTIMES:
        raise ValueError(
            f"runtime must be one of {', '.join(map(repr, RUNTIMES))}, got {runtime!r}"
        )
    start = time.perf_counter()
    inputs = as_example_inputs(reference, example_inputs)
    if runtime == "onnxruntime":
        original = original if original is not None else _original_of(reference)
    models = {"reference": reference, "candidate": candidate, "original": original}
    with torch.no_grad(), ExitStack() as stack:
        for model in {id(m): m for m in models.values() if m is not None}.values():
            stack.enter_context(_eval_mode(model))
        report = _compare_in(runtime, models, inputs, rtol, atol)
    report.seconds = time.perf_counter() - start
    return report


def _original_of(reference: nn.Module) -> nn.Module | None:
    """The original thin architecture when `reference` is a paired model, else None."""
    if isinstance(getattr(unwrap(reference), "plan", None), Plan):
        return strip_pairs(reference)
    return None


def _compare_in(
    runtime: str,
    models: dict[str, nn.Module | None],
    inputs: tuple[Any, ...],
    rtol: float,
    atol: float,
) -> VerifyReport:
    """Outputs of reference and candidate in `runtime`, compared; plus the structural check."""
    if runtime == "torch":
        ref, cand = (_tensors(models[role](*inputs)) for role in ("reference", "candidate"))
        return _compare(ref, cand, runtime, "torch", rtol, atol)
    protos = {role: export_onnx(m, inputs, role) for role, m in models.items() if m is not None}
    ref, provider = _run_onnx(protos["reference"], inputs, "reference")
    cand, _ = _run_onnx(protos["candidate"], inputs, "candidate")
    report = _compare(ref, cand, runtime, provider, rtol, atol)
    if "original" in protos:
        _check_structure(report, protos["candidate"], protos["original"])
    return report


def _tensors(output: Any) -> list[torch.Tensor]:
    """The tensor leaves of a model output (tuples, dicts, HF ModelOutput), in pytree order."""
    return [leaf for leaf in _pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def export_onnx(model: nn.Module, inputs: tuple[Any, ...], role: str) -> onnx.ModelProto:
    """The model as an in-memory ONNX ModelProto (dynamo exporter, progress prints silenced).

    optimize=False: the exporter's optimizer drops all-zero biases and merges equal-valued
    initializers, which would make the structural check depend on weight values, not architecture;
    ONNX Runtime applies its own graph optimisations when it loads the model."""
    with _blame(f"could not export the {role} model ({type(model).__name__}) to ONNX"):
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(model, inputs, dynamo=True, verbose=False, optimize=False)
        return program.model_proto


@contextlib.contextmanager
def _blame(what: str) -> Iterator[None]:
    """Re-raise any error as a one-line SurgeryError saying what failed and its root cause."""
    try:
        yield
    except SurgeryError:
        raise
    except Exception as error:  # noqa: BLE001 - exporter and runtime failures are reported alike
        cause = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        lines = _ANSI.sub("", str(cause)).strip().splitlines()
        raise SurgeryError(
            f"{what}: {type(cause).__name__}: {lines[0] if lines else ''}"
        ) from error


def _providers() -> list[str]:
    if torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _run_onnx(
    proto: onnx.ModelProto, inputs: tuple[Any, ...], role: str
) -> tuple[list[torch.Tensor], str]:
    """The model's outputs from ONNX Runtime, and the execution provider that actually ran."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: keep provider-assignment warnings out of the CLI
    with _blame(f"ONNX Runtime could not run the {role} model"):
        arrays = [leaf.detach().cpu().numpy() for leaf in _tensors(inputs)]
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=_providers())
        names = [i.name for i in session.get_inputs()]
        if len(names) != len(arrays):
            raise SurgeryError(
                f"the {role} ONNX graph takes {len(names)} inputs, "
                f"example_inputs hold {len(arrays)} tensors"
            )
        outputs = session.run(None, dict(zip(names, arrays, strict=True)))
    return [torch.as_tensor(o) for o in outputs], session.get_providers()[0]


def _compare(
    ref: Sequence[torch.Tensor],
    cand: Sequence[torch.Tensor],
    runtime: str,
    provider: str,
    rtol: float,
    atol: float,
) -> VerifyReport:
    """Pairwise float64 comparison of two flat output lists (normwise: see VerifyReport)."""
    report = VerifyReport(
        runtime, provider, float("nan"), float("nan"), rtol, atol, False, len(ref)
    )
    report.reason = _mismatch(ref, cand)
    if report.reason is not None:
        return report
    report.max_abs = report.max_rel = 0.0
    failing = []
    for i, (r, c) in enumerate(zip(ref, cand, strict=True)):
        r, c = r.detach().cpu().double(), c.detach().cpu().double()
        diff = (r - c).abs()
        max_abs, max_ref = _max(diff), _max(r.abs())
        rel = max_abs / max_ref if max_ref > 0 else (0.0 if max_abs == 0 else float("inf"))
        report.max_abs, report.max_rel = max(report.max_abs, max_abs), max(report.max_rel, rel)
        if not max_abs <= atol + rtol * max_ref:  # NaN fails too
            failing.append(
                f"output {i}: max abs error {max_abs:.3g} > {atol:g} + {rtol:g} * {max_ref:.3g}"
            )
    report.ok = not failing
    report.reason = "; ".join(failing) or None
    return report


def _mismatch(ref: Sequence[torch.Tensor], cand: Sequence[torch.Tensor]) -> str | None:
    """Why two output lists cannot be compared element by element, or None when they can."""
    if not ref:
        return "the reference returned no tensors"
    if len(ref) != len(cand):
        return f"the candidate returns {len(cand)} tensors, the reference {len(ref)}"
    for i, (r, c) in enumerate(zip(ref, cand, strict=True)):
        if r.shape != c.shape:
            return f"output {i}: candidate shape {tuple(c.shape)}, reference {tuple(r.shape)}"
    return None


def _max(t: torch.Tensor) -> float:
    """max of a tensor, NaN-propagating; 0 for an empty tensor."""
    return float(t.max()) if t.numel() else 0.0


def _check_structure(
    report: VerifyReport, candidate: onnx.ModelProto, original: onnx.ModelProto
) -> None:
    """Record whether the candidate's graph has the original's operators and parameter count."""
    ops_c, ops_o = _op_histogram(candidate), _op_histogram(original)
    report.structure_checked = True
    report.op_difference = {
        op: (ops_c[op], ops_o[op]) for op in ops_c | ops_o if ops_c[op] != ops_o[op]
    }
    report.same_ops = not report.op_difference
    report.candidate_params, report.original_params = (
        _param_count(candidate),
        _param_count(original),
    )
    structural = []
    if not report.same_ops:
        structural.append("the candidate's operators differ from the original's")
    if report.candidate_params != report.original_params:
        structural.append(
            f"the candidate has {report.candidate_params:,} parameters, "
            f"the original {report.original_params:,}"
        )
    report.ok = report.ok and not structural
    report.reason = "; ".join(filter(None, [report.reason, *structural])) or None


def _op_histogram(proto: onnx.ModelProto) -> Counter[str]:
    """op_type counts over the main graph and the model's local functions."""
    nodes = [*proto.graph.node, *(n for f in proto.functions for n in f.node)]
    return Counter(n.op_type for n in nodes)


def _param_count(proto: onnx.ModelProto) -> int:
    """Elements in the graph's initializers (parameters and buffers such as BatchNorm statistics)."""
    return sum(math.prod(init.dims) for init in proto.graph.initializer)
