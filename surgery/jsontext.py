"""JSON read from files: one parser whose every failure is a ValueError, deep nesting included."""

from __future__ import annotations

import json
from typing import Any


def parse_json(text: str | bytes, **options: Any) -> Any:
    """`json.loads`, with the RecursionError of a deeply nested document turned into a ValueError
    (callers already report a ValueError as invalid JSON, naming the file)."""
    try:
        return json.loads(text, **options)
    except RecursionError:
        raise ValueError("nested too deeply to be a real header, plan or index") from None
