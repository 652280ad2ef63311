"""Tables for people: every report this package prints goes through `render_table`."""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table


def render_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None
) -> str:
    """A plain-text table (no colour codes), wrapped to the terminal width."""
    table = Table(
        title=title, caption=caption, show_lines=False, title_justify="left", caption_justify="left"
    )
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    width = max(120, shutil.get_terminal_size((160, 24)).columns)
    console = Console(
        file=io.StringIO(), width=width, color_system=None, force_terminal=False, highlight=False
    )
    console.print(table)
    return console.file.getvalue().rstrip() + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def progress_bar(*, enabled: bool = True) -> Progress:
    """A transient progress bar on stderr, shown only on a terminal (logs and pipes stay clean)."""
    console = Console(stderr=True)
    return Progress(console=console, transient=True, disable=not (enabled and console.is_terminal))
