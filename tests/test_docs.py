"""The documentation: the MkDocs site builds in strict mode with every public name on the API page,
the README stays a short front page with the set-up commands, and every public name has a
docstring of its own."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PUBLIC_MODULES = ("surgery", "surgery.win", "surgery.experiments")
README_LIMIT = 12_000


def public_names(module_name: str) -> list[tuple[str, object]]:
    """(name, object) for each public name of a module: its `__all__`, else the non-underscore
    names its `__init__` imports."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return [(name, getattr(module, name)) for name in names]


def own_docstring(obj: object) -> str | None:
    """The docstring written for `obj`: a class's own (not inherited, not the signature a
    dataclass gets when it has none), a function's `inspect.getdoc`."""
    if isinstance(obj, type):
        doc = obj.__dict__.get("__doc__")
        if doc and dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
            return None  # @dataclass writes "Name(field: type, ...)" when there is no docstring
        return doc.strip() if doc else None
    doc = inspect.getdoc(obj)
    return doc.strip() if doc else None


def test_every_public_name_has_a_docstring():
    missing = [
        f"{module_name}.{name}"
        for module_name in PUBLIC_MODULES
        for name, obj in public_names(module_name)
        if not own_docstring(obj)
    ]
    assert not missing, "public names without a docstring of their own: " + ", ".join(missing)


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT}"


def test_readme_set_up_section_has_the_commands():
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Set up\b.*?(?=^## |\Z)", text, re.M | re.S)
    assert match, "README.md has no '## Set up' section"
    section = match.group(0)
    for command in ('pip install -e ".[test]"', "surgery demo", "pytest -q -n 2"):
        assert command in section, f"README's Set up section lacks {command!r}"


def test_site_builds_strict_with_every_public_name(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    )
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    anchors = set(re.findall(r'id="([^"]+)"', api))
    missing = []
    for module_name in PUBLIC_MODULES:
        for name, obj in public_names(module_name):
            # a function named like the module that defines it is shown under that module's path
            defining = f"{getattr(obj, '__module__', module_name)}.{name}"
            if f"{module_name}.{name}" not in anchors and defining not in anchors:
                missing.append(f"{module_name}.{name}")
    assert not missing, "public names missing from docs/api.md's page: " + ", ".join(missing)
