"""Outputs written atomically: a temporary beside the destination, fsync, rename; nothing on failure.

A reader never sees a half-written file, and a failure (bad input, a full disk, Ctrl-C) leaves the
destination as it was, removes the directories it created, and no output ever replaces an input.
A temporary is named after its process (`.NAME.tmp-PID-...`): one left by a killed run is removed by
the next run writing the same destination.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from surgery.errors import CheckpointError


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], *, directory: bool = False, inputs: Iterable[str] = ()
) -> Iterator[Path]:
    """Yield a temporary file (or directory) path next to `path`; on success its contents are
    fsynced and it is renamed to `path`, on failure it is removed (with any parent directory made
    for it). `path` may not be, or contain, one of `inputs`; an existing directory is only replaced
    when empty. A file's temporary ends in `path`'s suffix, so it can be read back before the
    rename (a check of the output before it replaces anything)."""
    target = Path(path).absolute()
    refuse_overwrite(target, inputs)
    refuse_special(target, path)
    if directory and target.is_dir() and any(target.iterdir()):
        raise CheckpointError(
            f"{path} is a directory that is not empty: remove it or choose another --out"
        )
    if target.exists() and (target.is_dir() != directory):
        kind = "a directory" if target.is_dir() else "a file"
        raise CheckpointError(f"{path} is {kind}: choose another --out")
    created = _make_parents(target, path)
    remove_stale_temporaries(target)
    prefix = f"{_temp_prefix(target)}{os.getpid()}-"
    try:
        if directory:
            temp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=target.suffix, dir=target.parent)
            os.close(fd)
            temp = Path(name)
    except OSError as error:
        _remove_made(created)
        raise CheckpointError(f"cannot write beside {path}: {error.strerror}") from None
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
        _replace(temp, target, path)
        _fsync(target.parent)
    except BaseException as error:
        if directory:
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        _remove_made(created)
        if isinstance(error, OSError):  # a full disk, a read-only file system, ...
            where = f" ({error.filename})" if error.filename else ""
            raise CheckpointError(
                f"cannot write {path}: {error.strerror or error}{where}; nothing was written"
            ) from None
        raise


def _replace(temp: Path, target: Path, shown: str | os.PathLike[str]) -> None:
    """Rename the finished temporary onto the target; another writer that finished the same
    directory first keeps its result, and this one is refused cleanly."""
    try:
        os.replace(temp, target)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
            raise CheckpointError(
                f"{shown} was written by another run while this one ran: that result is kept; "
                "choose another --out"
            ) from None
        raise


def refuse_special(target: Path, shown: str | os.PathLike[str]) -> None:
    """Refuse an output path that exists as something other than a regular file or a directory
    (a device, a named pipe, a socket, or a symbolic link to one): writing there would replace it."""
    try:
        mode = target.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there (a parent that is a file is refused when parents are made)
    except OSError as error:
        raise CheckpointError(f"cannot use {shown} as an output: {error.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise CheckpointError(
            f"{shown} is a device, pipe or socket, not a file: choose an output file path"
        )


def refuse_overwrite(target: Path, inputs: Iterable[str]) -> None:
    """Raise CheckpointError when writing `target` would replace or contain one of `inputs`
    (compared after resolving symlinks and `..`, and as the same file on disk for hard links)."""
    resolved = target.resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        if (
            resolved == source_path
            or resolved in source_path.parents
            or _same_file(resolved, source_path)
        ):
            raise CheckpointError(
                f"the output {target} would overwrite the input {source}: write to another path"
            )


def check_outputs(outputs: Mapping[str, str | None], inputs: Iterable[str]) -> None:
    """Before any work: no output (option -> path) replaces an input or another output."""
    inputs = list(inputs)
    named = [(option, path) for option, path in outputs.items() if path]
    for i, (option, path) in enumerate(named):
        try:
            refuse_overwrite(Path(path).absolute(), inputs)
        except CheckpointError as error:
            raise CheckpointError(f"{option}: {error}") from None
        for other, other_path in named[i + 1 :]:
            if Path(path).resolve() == Path(other_path).resolve():
                raise CheckpointError(f"{option} and {other} name the same file {path}")


def regular_input(path: str | os.PathLike[str], what: str = "input") -> Path:
    """`path` if it is a regular file or a directory; a clear error for a missing path, a named
    pipe, a device or a socket (reading those could block forever or never end)."""
    found = Path(path)
    try:
        mode = found.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{what} {found} does not exist") from None
    except OSError as error:
        raise CheckpointError(f"cannot read the {what} {found}: {error.strerror}") from None
    except ValueError:  # a NUL byte in the name
        raise CheckpointError(f"the {what} name {str(found)!r} holds a NUL byte") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise CheckpointError(
            f"{what} {found} is not a regular file or directory (a pipe, device or socket): "
            "give the file itself"
        )
    return found


def read_text(path: str | os.PathLike[str], what: str = "input") -> str:
    """The UTF-8 text of a regular file (CheckpointError naming it when it cannot be read or is not
    UTF-8)."""
    found = regular_input(path, what)
    try:
        return found.read_bytes().decode("utf-8")
    except OSError as error:
        raise CheckpointError(f"cannot read the {what} {found}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise CheckpointError(f"the {what} {found} is not UTF-8 text ({error.reason})") from None


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporaries of `target` left by runs that were killed (their process is gone)."""
    removed = []
    prefix = _temp_prefix(target)
    for temp in target.parent.glob(f"{prefix}*"):
        pid = temp.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if temp.is_dir():
                shutil.rmtree(temp, ignore_errors=True)
            else:
                temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _make_parents(target: Path, shown: str | os.PathLike[str]) -> list[Path]:
    """Create the missing parent directories of `target`, outermost first; refuse a parent that
    exists but is not a directory."""
    missing = []
    parent = target.parent
    while not parent.exists():
        if parent.is_symlink():
            raise CheckpointError(f"{shown}: its parent {parent} is a broken symbolic link")
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(
            f"{shown}: {parent} is a file, not a directory: choose another output path"
        )
    made: list[Path] = []
    try:
        for directory in reversed(missing):
            directory.mkdir()
            made.append(directory)
    except OSError as error:
        _remove_made(made)
        raise CheckpointError(f"cannot create {missing[0]}: {error.strerror}") from None
    return made


def _remove_made(made: list[Path]) -> None:
    for directory in reversed(made):
        with contextlib.suppress(OSError):
            directory.rmdir()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
