"""Stage 1 of WIN and its inverse: the wide teacher (`widen`) and the thin model (`narrow`).

Both change every free width of the model by one factor (`surgery.analysis.widths`: a residual
stream, an MLP's hidden units, an attention's heads; never an input, an output or a vocabulary)
and return the same class. A Hugging Face model is rebuilt from its config, each width field set
once under its real name (`n_embd`, not also its alias `hidden_size`), so `save_pretrained` /
`from_pretrained` keep working; the result is checked against the widths the index-space analysis
asks for. Any other model is rebuilt module by module (`surgery.runtime.resize`).

`widen` gives a freshly initialised teacher (train it, or pass an existing trained big model to
`win.win` instead). `narrow` is the pretrained-to-thin path (weight selection, Minitron, SliceGPT):
the thin model starts from the given one (`surgery.win.sample.sample_from_teacher`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from surgery.analysis.widths import WidthTable, width_groups
from surgery.errors import PlanError
from surgery.ir.capture import as_example_inputs
from surgery.runtime.resize import rebuild, rebuild_scaled

# Hugging Face config fields that size a free width (each family names its own; aliases resolve
# through config.attribute_map): model widths, feed-forward widths, head counts. Head sizes
# (head_dim, d_kv) stay: a wider model has more heads, as BERT-large has over BERT-base.
HF_WIDTH_FIELDS = (
    "hidden_size", "n_embd", "d_model", "dim", "embed_dim", "embedding_size",
    "word_embed_proj_dim", "intermediate_size", "n_inner", "ffn_dim", "hidden_dim", "d_ff",
    "encoder_ffn_dim", "decoder_ffn_dim", "moe_intermediate_size",
    "shared_expert_intermediate_size", "num_attention_heads", "n_head", "n_heads", "num_heads",
    "num_key_value_heads", "num_kv_heads", "encoder_attention_heads", "decoder_attention_heads",
)  # fmt: skip


def widen(
    model: nn.Module, factor: float = 2.0, example_inputs: Any = None, *, residual: bool = True
) -> nn.Module:
    """A freshly initialised copy of `model` (same class) with every free width times `factor`.
    `residual=False` keeps the residual streams (block outputs) at their width, as the paper's
    ResNet teacher does (its 3x3 convs widened, its block outputs not)."""
    if factor < 1:
        raise PlanError(
            f"factor must be >= 1 (a teacher is at least as wide as its student), got {factor}; "
            "win.narrow makes a model thinner"
        )
    inputs = as_example_inputs(model, example_inputs)
    return _resized(model, width_groups(model, inputs), factor, inputs, residual)


def narrow(
    model: nn.Module,
    factor_or_widths: float | Mapping[str, int],
    example_inputs: Any = None,
    *,
    calibration: Any = None,
    select: str = "energy",
) -> nn.Module:
    """The same class as `model` at smaller widths, started from `model`: a factor (every free
    width times it, e.g. 0.5), or widths by name (Hugging Face: config fields, e.g.
    {"hidden_size": 256, "intermediate_size": 688}; other models: width groups of
    `surgery.analysis.widths.width_groups`). The thin model takes the units `select` chooses
    ("energy": those carrying the most energy on the example inputs, or `calibration`; "first";
    "random"), refitted by least squares on `calibration` when given."""
    from surgery.win.sample import sample_from_teacher

    inputs = as_example_inputs(model, example_inputs)
    table = width_groups(model, inputs)
    if isinstance(factor_or_widths, Mapping):
        thin = _at_widths(model, table, dict(factor_or_widths), inputs)
    else:
        factor = float(factor_or_widths)
        if not 0 < factor <= 1:
            raise PlanError(f"narrow takes a factor in (0, 1], got {factor}; win.widen widens")
        thin = _resized(model, table, factor, inputs, True)
    sample_from_teacher(thin, model, inputs, refit=calibration, select=select)
    return thin.train(model.training)


def is_hf(model: nn.Module) -> bool:
    """A Hugging Face model: built from a config it can be rebuilt from."""
    config = getattr(model, "config", None)
    return hasattr(config, "to_dict") and hasattr(model, "save_pretrained")


def _resized(
    model: nn.Module, table: WidthTable, factor: float, inputs: tuple[Any, ...], residual: bool
) -> nn.Module:
    if not is_hf(model):
        return rebuild_scaled(model, table, factor, inputs, residual=residual)
    if not residual:
        raise PlanError(
            "residual=False is not expressible in a Hugging Face config (one hidden size sizes "
            "every residual stream); widen the model's own width fields with win.narrow-style widths"
        )
    fields = {
        name: max(1, round(value * factor)) for name, value in _width_fields(model.config).items()
    }
    if not fields:
        raise PlanError(
            f"{type(model.config).__name__} has none of the width fields {HF_WIDTH_FIELDS}"
        )
    errors = []
    built = _from_config(model, fields)
    for inner, outputs in ((False, False), (False, True), (True, False), (True, True)):
        try:
            expected = table.shapes(table.scaled(factor, inner=inner, outputs=outputs))
        except PlanError as error:
            errors.append(str(error))
            continue
        why = _mismatch(built, expected)
        if why is None:
            return built
        errors.append(why)
    raise PlanError(
        f"the config fields {fields} do not scale every free width of {type(model).__name__} by "
        f"{factor}: {errors[0]}"
    )


def _width_fields(config: Any) -> dict[str, int]:
    """Real field name -> value of every width field the config has (each tensor width once)."""
    aliases = getattr(config, "attribute_map", {}) or {}
    found: dict[str, int] = {}
    for field in HF_WIDTH_FIELDS:
        real = aliases.get(field, field)
        value = getattr(config, real, None)
        if real not in found and type(value) is int and value > 0:
            found[real] = value
    return found


def _from_config(model: nn.Module, fields: Mapping[str, int]) -> nn.Module:
    config = copy.deepcopy(model.config)
    for name, value in fields.items():
        setattr(config, name, value)
    param = next(model.parameters(), None)
    built = type(model)(config)
    if param is not None:
        built = built.to(device=param.device, dtype=param.dtype)
    return built.train(model.training)


def _mismatch(built: nn.Module, expected: Mapping[str, tuple[int, ...]]) -> str | None:
    got = {
        name: tuple(t.shape)
        for name, t in [
            *built.named_parameters(remove_duplicate=False),
            *built.named_buffers(remove_duplicate=False),
        ]
    }
    for name, shape in expected.items():
        if name in got and got[name] != tuple(shape):
            return f"{name} is {got[name]}, the free widths need {tuple(shape)}"
    missing = sorted(set(expected) ^ set(got))
    if missing:
        return f"the rebuilt model's tensors differ: {', '.join(missing[:4])}"
    return None


def _at_widths(
    model: nn.Module, table: WidthTable, widths: dict[str, int], inputs: tuple[Any, ...]
) -> nn.Module:
    if is_hf(model):
        known = {**_width_fields(model.config)}
        unknown = [name for name in widths if getattr(model.config, name, None) is None]
        if unknown:
            raise PlanError(
                f"{type(model.config).__name__} has no field {unknown[0]!r}; its width fields: "
                f"{', '.join(known) or 'none'}"
            )
        try:
            built = _from_config(model, widths)
            with torch.no_grad():
                built.eval()(*inputs)
        except Exception as error:  # noqa: BLE001 - the config's own code rejecting the widths
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise PlanError(
                f"{type(model).__name__} with {widths} does not build or run "
                f"({type(error).__name__}: {first}): give widths its config accepts"
            ) from None
        return built.train(model.training)
    return rebuild(model, table, table.leaf_widths(widths), inputs)
