"""JSON read from files: one parser whose every failure is a ValueError, deep nesting included;
and the one codec of the plans (dataclasses to JSON and back by their type hints)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any


def parse_json(text: str | bytes, **options: Any) -> Any:
    """`json.loads`, with the RecursionError of a deeply nested document turned into a ValueError
    (callers already report a ValueError as invalid JSON, naming the file)."""
    try:
        return json.loads(text, **options)
    except RecursionError:
        raise ValueError("nested too deeply to be a real header, plan or index") from None


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
    return cls(**{key: _value(hints.get(key), value) for key, value in data.items()})


def _value(hint: Any, value: Any) -> Any:
    if value is None or hint is None:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _value(options[0], value) if len(options) == 1 else value
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(hint)
        return [_value(item, v) for v in value]
    if dataclasses.is_dataclass(hint):
        return from_data(hint, value)
    return value
