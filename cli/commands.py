"""The checkpoint commands: inspect, insert, fold, verify (one function each, plus their arguments).

Every command reports bad input as a SurgeryError (the caller prints one line and exits 2); a run
that works but fails its check (a verify over tolerance) returns 1.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from torch import nn

from surgery.errors import SurgeryError
from surgery.files.checkpoint import build_original, is_checkpoint, load, open_checkpoint, save
from surgery.files.jsontext import parse_json
from surgery.files.outputs import atomic_output, check_outputs
from surgery.files.sources import Source, source_of
from surgery.files.stream import fold_checkpoint
from surgery.ir.capture import synthesise_inputs
from surgery.paired import find_blocks, insert_pairs
from surgery.picture import draw_blocks
from surgery.plan import Plan
from surgery.report import render_table
from surgery.verify import export_onnx, verify

MODEL_HELP = (
    "an import path package.module:factory (e.g. torchvision.models:resnet18), a Hugging Face "
    "config directory or config.json, or a checkpoint (.safetensors, *.safetensors.index.json, a "
    "directory)"
)


def register(commands: argparse._SubParsersAction) -> None:
    """Add inspect, insert, fold and verify to the `surgery` parser."""
    inspect = commands.add_parser(
        "inspect", help="the block table of a model: every boundary and how a pair there folds"
    )
    inspect.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    _model_options(inspect)
    inspect.add_argument("--picture", metavar="FILE", help="also draw the block map (.svg or .png)")
    inspect.add_argument(
        "--bias", action="store_true", help="plan for pairs with biases (fewer sites fold)"
    )
    inspect.add_argument(
        "--inside-blocks", action="store_true", help="also list cuts inside innermost blocks"
    )
    _check_option(inspect)
    inspect.set_defaults(run=run_inspect)

    insert = commands.add_parser(
        "insert", help="insert widen/narrow pairs and save the paired checkpoint"
    )
    insert.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    _model_options(insert)
    insert.add_argument(
        "--wide", type=float, default=2.0, help="width multiplier D = ceil(wide*d) (default 2)"
    )
    insert.add_argument(
        "--sites", type=_names, default=[], action="extend", help="comma-separated (default: auto)"
    )
    insert.add_argument(
        "--probes", type=_names, default=[], action="extend", help="probe-only sites (WIN probe)"
    )
    insert.add_argument("--bias", action="store_true", help="give the pairs biases")
    insert.add_argument("--init", choices=("identity", "random"), default="identity")
    _check_option(insert)
    insert.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="with a directory --out: shards of at most SIZE (e.g. 2GB)",
    )
    insert.add_argument(
        "--out", required=True, help="paired.safetensors, or a directory (Hugging Face layout)"
    )
    insert.set_defaults(run=run_insert)

    fold = commands.add_parser(
        "fold", help="fold a paired checkpoint into the original architecture, tensor by tensor"
    )
    fold.add_argument("paired", metavar="PAIRED", help="a paired checkpoint")
    fold.add_argument(
        "--out", required=True, help="thin.safetensors, or a directory (mirrors the input's shards)"
    )
    fold.add_argument("--plan", metavar="JSON", help="a plan file to use instead of the metadata's")
    fold.add_argument(
        "--verify", action="store_true", help="rebuild both models and compare their outputs"
    )
    fold.add_argument("--onnx", metavar="FILE", help="also export the thin model to ONNX")
    fold.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1x3x224x224")
    _tolerance_options(fold)
    _trust_options(fold)
    fold.set_defaults(run=run_fold)

    check = commands.add_parser(
        "verify", help="compare two models in ONNX Runtime (max error, operators, parameters)"
    )
    check.add_argument("a", metavar="A", help="the reference: " + MODEL_HELP)
    check.add_argument("b", metavar="B", help="the candidate, same forms as A")
    _model_options(check)
    check.add_argument("--runtime", choices=("onnxruntime", "torch"), default="onnxruntime")
    _tolerance_options(check)
    check.set_defaults(run=run_verify)


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1x3x224x224")
    parser.add_argument(
        "--kwargs",
        type=_kwargs,
        default={},
        help="factory kwargs as JSON, e.g. '{\"num_classes\": 10}'",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs")
    _trust_options(parser)


def _check_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip the numeric self-check of each site (random pairs, paired vs folded in float64)",
    )


def _tolerance_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rtol", type=float, default=1e-5, help="max|a - b| <= atol + rtol*max|a|")
    parser.add_argument("--atol", type=float, default=1e-6)


def _trust_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-pickle", action="store_true", help="allow unpickling .pt/.pth/.bin/.ckpt files"
    )
    parser.add_argument(
        "--trust-source",
        action="store_true",
        help="allow a checkpoint to name any factory to rebuild its model",
    )


def _shape(text: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\d+([x,]\d+)*", text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape such as 1x3x224x224")
    return tuple(int(n) for n in re.split("[x,]", text.strip()))


def _kwargs(text: str) -> dict[str, Any]:
    try:
        value = parse_json(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--kwargs is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--kwargs must be a JSON object")
    return value


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


# ---------------------------------------------------------------- commands


def run_inspect(args: argparse.Namespace) -> int:
    """Print the block table (and a paired checkpoint's plan); draw the block map."""
    check_outputs({"--picture": args.picture}, _model_inputs(args))
    torch.manual_seed(args.seed)
    if is_checkpoint(args.model):
        with open_checkpoint(args.model, trust_pickle=args.trust_pickle) as checkpoint:
            plan = checkpoint.plan
            build = functools.partial(build_original, checkpoint, trust_source=args.trust_source)
            model = _for_inspection(build, args.check)
    else:
        plan, source = None, source_of(args.model, args.kwargs)
        model = _for_inspection(source.build, args.check)
    bias = args.bias or (plan is not None and any(site.bias for site in plan.sites))
    inputs = synthesise_inputs(model, args.input_shape or _plan_shape(plan))
    table = find_blocks(
        model, inputs, bias=bias, inside_blocks=args.inside_blocks, check=args.check
    )
    print(table)
    if plan is not None:
        print(plan_table(plan, "pairs in this checkpoint"))
    if args.picture:
        print(f"drew {draw_blocks(table, plan, args.picture)}")
    return 0


def run_insert(args: argparse.Namespace) -> int:
    """Insert pairs into a model (its weights, when MODEL is a checkpoint) and save the result."""
    check_outputs({"--out": args.out}, _model_inputs(args))
    torch.manual_seed(args.seed)
    source = _source(args)
    model = load(
        args.model,
        kwargs=args.kwargs,
        trust_pickle=args.trust_pickle,
        trust_source=args.trust_source,
    )
    if isinstance(getattr(model, "plan", None), Plan):
        raise SurgeryError(f"{args.model} is already paired: fold it first (surgery fold)")
    inputs = synthesise_inputs(model, args.input_shape)
    paired = insert_pairs(
        model,
        inputs,
        wide=args.wide,
        init=args.init,
        sites=args.sites or "auto",
        probes=args.probes,
        bias=args.bias,
        check=args.check,
    )
    path = save(paired, args.out, source=source, max_shard_size=args.max_shard_size)
    print(plan_table(paired.plan, f"pairs inserted into {source}"))
    count = sum(p.numel() for p in paired.parameters())
    print(f"wrote {path} ({count:,} parameters, pairs included)")
    return 0


def run_fold(args: argparse.Namespace) -> int:
    """Fold a paired checkpoint on disk; optionally verify the result and export it to ONNX, both
    before the output is committed (a failed check writes nothing)."""
    with open_checkpoint(args.paired, plan=args.plan, trust_pickle=args.trust_pickle) as opened:
        inputs = opened.inputs
    check_outputs({"--out": args.out, "--onnx": args.onnx}, inputs)
    checked: list[tuple[str, Any]] = []

    def check(thin_path: Path) -> None:
        checked.extend(_check_thin(args, thin_path, inputs))

    console = Console(stderr=True)
    columns = (
        TextColumn("folding"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("fold", total=None)
            summary = fold_checkpoint(
                args.paired,
                args.out,
                plan=args.plan,
                trust_pickle=args.trust_pickle,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                before_commit=check if args.verify or args.onnx else None,
            )
    except _CheckFailed as failed:
        rows = [*failed.rows, ("output", f"not written: {args.out} is unchanged")]
        print(render_table("surgery fold", ("", ""), rows))
        return 1
    rows: list[tuple[str, Any]] = [
        ("pairs folded", summary.pairs_folded),
        ("probe-only sites dropped", summary.probes_dropped),
        ("tensors touched", summary.tensors_touched),
        ("parameters touched", f"{summary.parameters_touched:,}"),
        ("tensors written", summary.tensors_written),
        ("bytes written", f"{summary.bytes_written:,}"),
        ("time", f"{summary.seconds:.2f} s"),
        ("output", summary.path),
        *checked,
    ]
    print(render_table("surgery fold", ("", ""), rows))
    return 0


class _CheckFailed(Exception):
    """`fold --verify` found the thin model off: the output is not committed."""

    def __init__(self, rows: list[tuple[str, Any]]) -> None:
        super().__init__("verify failed")
        self.rows = rows


def _check_thin(args: argparse.Namespace, thin_path: Path, inputs: list[str]) -> list[tuple]:
    """--verify and --onnx on the folded output before it is committed (under its temporary
    name); raise _CheckFailed when verify is over tolerance."""
    torch.manual_seed(0)
    options = {"plan": args.plan, "trust_pickle": args.trust_pickle}
    paired = load(args.paired, trust_source=args.trust_source, **options)
    thin = load(thin_path, trust_source=args.trust_source)
    examples = synthesise_inputs(thin, args.input_shape or _plan_shape(paired.plan))
    rows: list[tuple[str, Any]] = []
    if args.verify:
        report = verify(paired, thin, examples, runtime="torch", rtol=args.rtol, atol=args.atol)
        rows += [
            ("max abs error vs paired", report.max_abs),
            ("max rel error vs paired", report.max_rel),
            ("verify", "OK" if report.ok else f"FAILED: {report.reason}"),
        ]
        if not report.ok:
            raise _CheckFailed(rows)
    if args.onnx:
        proto = export_onnx(thin.eval(), examples, "thin")
        with atomic_output(args.onnx, inputs=[*inputs, str(thin_path)]) as temp:
            temp.write_bytes(proto.SerializeToString())
        rows.append(("onnx", args.onnx))
    return rows


def run_verify(args: argparse.Namespace) -> int:
    """The ONNX Runtime (or torch) comparison of two models; exit 1 when it fails."""
    torch.manual_seed(args.seed)
    options = {
        "kwargs": args.kwargs,
        "trust_pickle": args.trust_pickle,
        "trust_source": args.trust_source,
    }
    reference, candidate = load(args.a, **options), load(args.b, **options)
    shape = args.input_shape or _plan_shape(getattr(reference, "plan", None))
    inputs = synthesise_inputs(reference, shape)
    report = verify(
        reference, candidate, inputs, runtime=args.runtime, rtol=args.rtol, atol=args.atol
    )
    print(report)
    return 0 if report.ok else 1


# ---------------------------------------------------------------- helpers


def plan_table(plan: Plan, title: str) -> str:
    """The sites of a plan: widths and what absorbs each pair."""
    rows = [
        [
            site.name,
            f"{site.d} -> {site.D}",
            "yes" if site.bias else "no",
            site.route.kind,
            ", ".join(site.route.absorbed_by) or "-",
        ]
        for site in plan.sites
    ]
    return render_table(title, ["site", "d -> D", "bias", "fold", "absorbed by"], rows)


def _model_inputs(args: argparse.Namespace) -> list[str]:
    """The files MODEL reads (a checkpoint's weights, shards, index and config; a config file)."""
    if is_checkpoint(args.model):
        with open_checkpoint(args.model, trust_pickle=args.trust_pickle) as checkpoint:
            return checkpoint.inputs
    path = Path(args.model)
    return [str(p) for p in (path, path / "config.json") if p.exists()]


def _source(args: argparse.Namespace) -> Source | None:
    if is_checkpoint(args.model):
        with open_checkpoint(args.model, trust_pickle=args.trust_pickle) as checkpoint:
            return checkpoint.source
    return source_of(args.model, args.kwargs)


def _plan_shape(plan: Plan | None) -> tuple[int, ...] | None:
    """The example input shape a plan was made with (when it had one input)."""
    if plan is None or len(plan.example_shapes) != 1:
        return None
    return tuple(plan.example_shapes[0])


CHECK_LIMIT = 200_000_000  # parameters: above this, inspect plans on the meta device, unchecked


def _for_inspection(build: Callable[[], nn.Module], check: bool) -> nn.Module:
    """The model to inspect: with random weights, so each site can be checked numerically, unless
    the check is off or the model is too big to hold twice in float64 (then on the meta device,
    instantly, and the table says the sites were not numerically checked)."""
    model = _on_meta(build)
    count = sum(p.numel() for p in model.parameters())
    if not check or count > CHECK_LIMIT or not any(p.is_meta for p in model.parameters()):
        return model
    return build()


def _on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """Build on the meta device (no weight memory: inspecting a 7B config is instant); factories
    that cannot run there are built normally."""
    try:
        with torch.device("meta"):
            return build()
    except Exception as error:  # noqa: BLE001 - e.g. a factory that reads tensor values
        if isinstance(error, SurgeryError):  # bad input, not the meta device: say so
            raise
        return build()
