"""Atomic file output: write to a temporary file beside the target, then rename over it.

An existing file is never left half-written: on any error (full disk, cancelled run, a bug in
the writer) the temporary file is removed and the target keeps its old content.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import LabelsWriteError
from ._text import short_path, short_text


def check_writable_target(path: str | os.PathLike) -> Path:
    """Fail early, with a clear message, when ``path`` cannot be written."""
    target = Path(path).expanduser()
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise LabelsWriteError(f"Cannot write {short_path(target)}: it is a folder. Give a file name.")
    if parent.exists() and not parent.is_dir():
        raise LabelsWriteError(f"Cannot write {target.name}: {short_path(parent)} is a file, not a folder.")
    if not parent.exists():
        raise LabelsWriteError(
            f"Cannot write {target.name}: the folder {short_path(parent)} does not exist. "
            "Create it or choose another path."
        )
    if not os.access(parent, os.W_OK):
        raise LabelsWriteError(
            f"Cannot write {target.name}: no permission to write in {short_path(parent)}. Choose another folder."
        )
    if target.exists() and not os.access(target, os.W_OK):
        raise LabelsWriteError(f"Cannot write {short_path(target)}: the existing file is read-only.")
    return target


def _suffix(path: Path) -> str:
    # Keep the full suffix (".nii.gz") so libraries that dispatch on the name still work.
    name = path.name
    for double in (".nii.gz",):
        if name.lower().endswith(double):
            return name[-len(double):]
    return path.suffix


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; move it onto ``path`` only if the block succeeds.

    OSErrors (e.g. ENOSPC, EACCES) become :class:`LabelsWriteError` with a plain message.
    """
    target = check_writable_target(path)
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=f".partial{_suffix(target)}", dir=target.parent or "."
        )
        os.close(fd)
    except OSError as exc:
        raise LabelsWriteError(_explain_os_error(exc, target)) from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync(tmp)
        if target.exists():
            # Keep the permissions the user had on the file being replaced.
            with contextlib.suppress(OSError):
                os.chmod(tmp, target.stat().st_mode & 0o7777)
        else:
            with contextlib.suppress(OSError):
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except OSError as exc:
        _remove_quietly(tmp)
        raise LabelsWriteError(_explain_os_error(exc, target)) from exc
    except BaseException:
        _remove_quietly(tmp)
        raise


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _explain_os_error(exc: OSError, target: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return (
            f"Could not write {short_path(target)}: the disk is full. Free some space and save again; "
            "nothing was changed."
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"Could not write {short_path(target)}: permission denied. Choose another folder; nothing was changed."
    return f"Could not write {short_path(target)}: {short_text(str(exc.strerror or exc), 80)}. Nothing was changed."
