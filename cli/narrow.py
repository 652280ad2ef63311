"""`surgery narrow`: a Hugging Face model folder at smaller widths, started from itself.

    surgery narrow HF_DIR --factor 0.5 --calib calib.safetensors --out THIN_DIR
    surgery narrow HF_DIR --widths '{"hidden_size": 256, "intermediate_size": 688}' --out THIN_DIR

The thin model is the same class with every free width times the factor (or the config fields
given), its tensors taken from the original at the units the calibration inputs say carry the most
energy and refitted on them (surgery.win.narrow); it is written as a plain Hugging Face folder
(`save_pretrained`: config with the new widths and the weights, loadable with `from_pretrained`
and no surgery import) with the output rules of `surgery fold`: atomically, never over an input,
bad input one line and exit 2. It prints the start's quality: the distillation loss (KL from the
original's outputs to the thin model's) on the calibration inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
from typing import Any

import torch

from surgery.errors import SurgeryError
from surgery.files.checkpoint import load
from surgery.files.jsontext import parse_json
from surgery.files.outputs import atomic_output, check_outputs, regular_input
from surgery.files.tensorfile import TensorFile
from surgery.report import render_table


def register(commands: argparse._SubParsersAction) -> None:
    """Add `narrow` to the `surgery` parser."""
    narrow = commands.add_parser(
        "narrow", help="a Hugging Face model folder at smaller widths, started from itself"
    )
    narrow.add_argument("model", metavar="HF_DIR", help="a Hugging Face model folder")
    how = narrow.add_mutually_exclusive_group(required=True)
    how.add_argument("--factor", type=float, help="every free width times this, e.g. 0.5")
    how.add_argument("--widths", help="config fields as JSON, e.g. '{\"hidden_size\": 256}'")
    narrow.add_argument(
        "--calib",
        metavar="FILE",
        help="calibration inputs: a safetensors file of the forward's inputs (e.g. input_ids "
        "[N, T]); without it, random token ids choose the units and nothing is refitted",
    )
    narrow.add_argument("--out", required=True, help="the thin model's folder")
    narrow.add_argument("--seed", type=int, default=0)
    narrow.set_defaults(run=run_narrow)


def run_narrow(args: argparse.Namespace) -> int:
    """Narrow HF_DIR and write the thin folder (see the module docstring)."""
    from surgery import win
    from surgery.ir.capture import synthesise_inputs
    from surgery.win.start import start_quality
    from surgery.win.widen import is_hf

    model_dir = regular_input(args.model, "model")
    inputs = [str(p) for p in model_dir.iterdir()] if model_dir.is_dir() else [str(model_dir)]
    if args.calib:
        inputs.append(args.calib)
    check_outputs({"--out": args.out}, inputs)
    how = args.factor if args.widths is None else _widths(args.widths)
    if isinstance(how, float) and not 0 < how <= 1:
        raise SurgeryError(f"--factor must be in (0, 1], got {how}: narrow makes a model thinner")
    torch.manual_seed(args.seed)
    model = load(args.model)
    if not is_hf(model):
        raise SurgeryError(
            f"{args.model} is not a Hugging Face model folder (config.json and weights): surgery "
            "narrow writes Hugging Face folders; narrow other models with surgery.win.narrow"
        )
    model.eval()
    calib = _calibration(args.calib, model) if args.calib else synthesise_inputs(model)
    example = tuple(t[:2] for t in calib)
    with contextlib.redirect_stdout(io.StringIO()):  # the library's own progress lines
        thin = win.narrow(model, how, example, calibration=calib if args.calib else None).eval()
    quality = start_quality(thin, model, calib)
    with atomic_output(args.out, directory=True, inputs=inputs) as temp:
        thin.save_pretrained(temp)
    changed = [
        (field, f"{getattr(model.config, field)} -> {getattr(thin.config, field)}")
        for field in sorted(thin.config.to_dict())
        if isinstance(getattr(thin.config, field, None), int)
        and getattr(model.config, field, None) != getattr(thin.config, field)
    ]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    rows = [
        *changed,
        ("parameters", f"{count(model):,} -> {count(thin):,}"),
        ("start quality", f"KL {quality:.4g} on {calib[0].shape[0]} calibration inputs"),
        ("output", args.out),
    ]
    print(render_table(f"surgery narrow {type(model).__name__}", ("", ""), rows))
    print(f"start quality: KL from the original's outputs to the thin model's {quality:.6g}")
    return 0


def _widths(text: str) -> dict[str, int]:
    try:
        widths = parse_json(text)
    except ValueError as error:
        raise SurgeryError(f"--widths is not JSON: {error}") from None
    if not isinstance(widths, dict) or not all(
        isinstance(k, str) and type(v) is int and v > 0 for k, v in widths.items()
    ):
        raise SurgeryError(
            '--widths must map config fields to positive ints, e.g. {"hidden_size": 256}'
        )
    return widths


def _calibration(path: str, model: Any) -> tuple[torch.Tensor, ...]:
    """The calibration inputs of a safetensors file: one tensor, or the forward's argument names."""
    with contextlib.closing(TensorFile(regular_input(path, "calibration file"))) as file:
        names = list(file.entries)
        if not names:
            raise SurgeryError(f"{path} holds no tensor")
        parameters = list(inspect.signature(model.forward).parameters)
        ordered = [n for n in parameters if n in names] or names[:1]
        tensors = tuple(file.read(n) for n in ordered)
    if any(t.dim() < 1 or t.shape[0] != tensors[0].shape[0] for t in tensors):
        raise SurgeryError(f"{path}: the calibration tensors need one leading batch dimension")
    vocab = getattr(model.config, "vocab_size", None)
    ids = tensors[0]
    if not ids.is_floating_point() and vocab and (ids.min() < 0 or ids.max() >= vocab):
        raise SurgeryError(f"{path}: token ids outside the vocabulary (0..{vocab - 1})")
    return tensors
