"""Outputs written atomically: a temporary beside the destination, fsync, rename; nothing on failure.

A reader never sees a half-written file, and a failure (bad input, a full disk, Ctrl-C) leaves the
destination as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import CheckpointError


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], *, directory: bool = False, inputs: Iterable[str] = ()
) -> Iterator[Path]:
    """Yield a temporary file (or directory) path next to `path`; on success its contents are
    fsynced and it is renamed to `path`, on failure it is removed. `path` may not be, or contain,
    one of `inputs`; an existing directory is only replaced when empty."""
    target = Path(path).absolute()
    refuse_overwrite(target, inputs)
    if directory and target.is_dir() and any(target.iterdir()):
        raise CheckpointError(
            f"{path} is a directory that is not empty: remove it or choose another --out"
        )
    if target.exists() and (target.is_dir() != directory):
        kind = "a directory" if target.is_dir() else "a file"
        raise CheckpointError(f"{path} is {kind}: choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    if directory:
        temp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        temp = Path(name)
    try:
        yield temp
        for file in sorted(temp.rglob("*")) if directory else [temp]:
            if file.is_file():
                _fsync(file)
        if directory:
            _fsync(temp)
            temp.chmod(0o755)
        else:
            temp.chmod(0o644)
        os.replace(temp, target)
        _fsync(target.parent)
    except BaseException:
        if directory:
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        raise


def refuse_overwrite(target: Path, inputs: Iterable[str]) -> None:
    """Raise CheckpointError when writing `target` would replace or contain one of `inputs`."""
    resolved = target.resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        if resolved == source_path or resolved in source_path.parents:
            raise CheckpointError(
                f"the output {target} would overwrite the input {source}: write to another path"
            )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
