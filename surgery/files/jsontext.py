"""JSON read from files: one parser whose every failure is a ValueError, deep nesting included;
and the one codec of the plans (dataclasses to JSON and back by their type hints)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any


def parse_json(text: str | bytes, **options: Any) -> Any:
    """`json.loads` for files: a key named twice in one object, `NaN` / `Infinity`, and a document
    nested too deeply are each a ValueError (callers report a ValueError as invalid JSON, naming
    the file): nothing read is decided by which of two entries comes last."""
    options = {"object_pairs_hook": no_duplicates, "parse_constant": _no_constant, **options}
    try:
        return json.loads(text, **options)
    except RecursionError:
        raise ValueError("nested too deeply to be a real header, plan or index") from None


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when it names a key twice."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"keys named twice: {', '.join(twice)}")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def dataclass_json(obj: Any, indent: int | None = 1) -> str:
    """A dataclass (plans: `Plan`, `FactorPlan`) as JSON; `from_data` reads it back."""
    return json.dumps(dataclasses.asdict(obj), indent=indent)


def from_data(cls: type, data: Any) -> Any:
    """The dataclass `cls` built from parsed JSON, nested dataclasses (also in lists and optional
    fields) by their type hints: the one decoder of every plan. An unknown key is a TypeError, as
    the constructor reports it."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} expects a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {unknown[0]!r}")
    return cls(
        **{key: _value(hints[key], value, f"{cls.__name__}.{key}") for key, value in data.items()}
    )


def _value(hint: Any, value: Any, where: str) -> Any:
    """`value` checked against the type hint `hint` (every plan field is typed): a wrong type is
    a TypeError naming the field, before anything is built from it."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        options = [a for a in options if a is not type(None)]
        if len(options) == 1:
            return _value(options[0], value, where)
        for option in options:
            try:
                return _value(option, value, where)
            except TypeError:
                continue
        raise TypeError(f"{where} is {value!r}, not one of {hint}")
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"{where} is {type(value).__name__}, not a list")
        (item,) = typing.get_args(hint)
        return [_value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where} is {type(value).__name__}, not an object")
        k_hint, v_hint = typing.get_args(hint)
        return {
            _value(k_hint, k, where): _value(v_hint, v, f"{where}[{k!r}]") for k, v in value.items()
        }
    if dataclasses.is_dataclass(hint):
        return from_data(hint, value)
    if hint is Any:
        return value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or value != value or value in (float("inf"), float("-inf")):
            raise TypeError(f"{where} is {value!r}, not a finite number")
        return float(value)
    if hint is int or hint is bool or hint is str:
        if type(value) is not hint:
            raise TypeError(f"{where} is {value!r}, not {hint.__name__}")
        return value
    return value
