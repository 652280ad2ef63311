"""The block map: a model's blocks top to bottom, each block boundary (site) between them coloured by
how a pair there folds, and the pairs of a plan marked with their widths.

The picture is laid out once as a list of shapes, then written as SVG (text) or PNG (Pillow).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from surgery.analysis.blocks import NOT_CHECKED, BlockTable, Boundary
from surgery.errors import SurgeryError
from surgery.files.outputs import atomic_output
from surgery.plan import PROBE_ONLY, Plan, Site

WIDTH = 1100
FONT = 13
COLOURS = {
    "consumer": "#2e7d32",
    "producer": "#1565c0",
    "producer through BatchNorm": "#ef6c00",
    "producer embedding": "#6a1b9a",
    "producer embedding sum": "#6a1b9a",
    PROBE_ONLY: "#757575",
    "refused": "#c62828",
}
BLOCK_FILL, LINE, TEXT, MUTED = "#eceff1", "#90a4ae", "#212121", "#546e7a"


@dataclass
class Shape:
    """One drawing primitive: a rect (x, y, w, h), a circle (x, y, r), a line (x, y, x2, y2), or text
    at (x, y) (baseline)."""

    kind: str
    x: float
    y: float
    w: float = 0.0
    h: float = 0.0
    fill: str = TEXT
    text: str = ""
    size: int = FONT
    bold: bool = False


def draw_blocks(table: BlockTable, plan: Plan | None, path: str | os.PathLike[str]) -> Path:
    """Write the block map of `table` (with the pairs of `plan`) as .svg or .png, atomically."""
    target = Path(path)
    if target.suffix.lower() not in (".svg", ".png"):
        raise SurgeryError(f"--picture {target}: the picture is .svg or .png")
    shapes, height = layout(table, plan)
    with atomic_output(target) as temp:
        if target.suffix.lower() == ".svg":
            temp.write_text(to_svg(shapes, height))
        else:
            to_png(shapes, height).save(temp, format="PNG")
    return target


def layout(table: BlockTable, plan: Plan | None) -> tuple[list[Shape], int]:
    """The shapes of the block map and its height."""
    pairs = {site.name: site for site in plan.sites} if plan is not None else {}
    title = f"{table.flow.model_class.rsplit('.', 1)[-1]}: {len(table.foldable)} of {len(table)} block boundaries fold"
    shapes = [Shape("text", 20, 28, text=title, size=16, bold=True)]
    x = 20.0
    for kind in (
        "consumer",
        "producer",
        "producer through BatchNorm",
        "producer embedding",
        PROBE_ONLY,
        "refused",
    ):
        shapes += [
            Shape("circle", x + 6, 50, 6, fill=COLOURS[kind]),
            Shape("text", x + 16, 54, text=kind, size=11, fill=MUTED),
        ]
        x += 26 + 6.6 * len(kind)
    y = 72.0
    inputs = ", ".join("x".join(map(str, s)) for s in table.flow.example_shapes)
    y = _block(shapes, y, f"input {inputs}")
    for boundary in table:
        y = _site(shapes, y, boundary, pairs.get(boundary.name))
        y = _block(shapes, y, boundary.feeds or "output")
    return shapes, int(y + 10)


def _block(shapes: list[Shape], y: float, label: str) -> float:
    shapes += [
        Shape("rect", 40, y, 360, 26, fill=BLOCK_FILL),
        Shape("text", 52, y + 17, text=_fit(label, 340, FONT), fill=TEXT),
    ]
    return y + 26


def _site(shapes: list[Shape], y: float, b: Boundary, site: Site | None) -> float:
    kind = (
        b.route.kind if b.route is not None else (PROBE_ONLY if b.probe is not None else "refused")
    )
    if b.route is not None:
        how = f"{b.route.kind} [{b.checked or NOT_CHECKED}]: absorbed by {', '.join(b.route.absorbed_by)}"
    else:
        how = f"refused{' (probe only)' if b.probe is not None else ''}: {b.reason}"
    shapes += [
        Shape("line", 220, y, 220, y + 50, fill=LINE),
        Shape("circle", 220, y + 25, 9, fill=COLOURS.get(kind, MUTED)),
        Shape("text", 240, y + 21, text=f"{b.name}  {'x'.join(map(str, b.shape))}", bold=True),
        Shape("text", 240, y + 38, text=_fit(how, WIDTH - 420, 11), size=11, fill=MUTED),
    ]
    if site is not None:
        label = f"{'probe' if site.route.kind == PROBE_ONLY else 'pair'} {site.d} -> {site.D}"
        shapes += [
            Shape("rect", WIDTH - 160, y + 12, 140, 26, fill=COLOURS.get(site.route.kind, MUTED)),
            Shape("text", WIDTH - 150, y + 30, text=label, fill="#ffffff", bold=True),
        ]
    return y + 50


def _fit(text: str, width: float, size: int) -> str:
    most = int(width / (0.6 * size))
    return text if len(text) <= most else text[: most - 3] + "..."


def to_svg(shapes: list[Shape], height: int) -> str:
    """The shapes as a standalone SVG document."""
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans Mono, Menlo, monospace">',
        f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>',
    ]
    for s in shapes:
        if s.kind == "rect":
            parts.append(
                f'<rect x="{s.x}" y="{s.y}" width="{s.w}" height="{s.h}" rx="5" fill="{s.fill}" stroke="{LINE}"/>'
            )
        elif s.kind == "circle":
            parts.append(f'<circle cx="{s.x}" cy="{s.y}" r="{s.w}" fill="{s.fill}"/>')
        elif s.kind == "line":
            parts.append(
                f'<line x1="{s.x}" y1="{s.y}" x2="{s.w}" y2="{s.h}" stroke="{s.fill}" stroke-width="2"/>'
            )
        else:
            weight = ' font-weight="bold"' if s.bold else ""
            parts.append(
                f'<text x="{s.x}" y="{s.y}" font-size="{s.size}" fill="{s.fill}"{weight}>{escape(s.text)}</text>'
            )
    return "\n".join([*parts, "</svg>"]) + "\n"


def to_png(shapes: list[Shape], height: int):  # -> PIL.Image.Image
    """The shapes drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (WIDTH, height), "#ffffff")
    draw = ImageDraw.Draw(image)
    fonts: dict[int, ImageFont.ImageFont] = {}
    for s in shapes:
        if s.kind == "rect":
            draw.rounded_rectangle((s.x, s.y, s.x + s.w, s.y + s.h), 5, fill=s.fill, outline=LINE)
        elif s.kind == "circle":
            draw.ellipse((s.x - s.w, s.y - s.w, s.x + s.w, s.y + s.w), fill=s.fill)
        elif s.kind == "line":
            draw.line((s.x, s.y, s.w, s.h), fill=s.fill, width=2)
        else:
            font = fonts.setdefault(s.size, ImageFont.load_default(size=s.size))
            draw.text((s.x, s.y), s.text, fill=s.fill, font=font, anchor="ls")
    return image
