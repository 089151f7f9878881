"""Writing files so that a crash, or another process writing the same file, never leaves a partial one."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["FileWriteError", "atomic_write", "check_output_path", "json_line", "shared_file_mode", "umask"]


def umask() -> int:
    """The process's umask. Linux tells it in /proc; elsewhere os.umask is the only way, and it can only
    read the mask by setting another for a moment (a thread creating a file then would get that one)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_file_mode(fd: int) -> None:
    """Give the open file ``fd`` the mode a plain ``open()`` would (0666 less the umask): a temporary file
    of mkstemp is 0600, which a file renamed into a shared place (a dataset's caches, a run folder
    others read) must not keep."""
    os.fchmod(fd, 0o666 & ~umask())


def json_line(record: Any) -> str:
    """``record`` as one line of strict JSON: NaN and infinities (a diverged loss, an AP without GT) become
    null, where ``json.dumps`` writes the bare tokens NaN and Infinity that strict readers reject."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(record), allow_nan=False)


def check_output_path(path: str | os.PathLike, what: str, folder: bool = False) -> None:
    """ValueError naming ``what`` and ``path`` when nothing can be written there: ``path`` (a file, or with
    ``folder`` a folder to write into) or a folder above it is an existing file, or a file's ``path`` is an
    existing folder. Called before the work that ends in the write (a training run, an export)."""
    path = Path(path)
    if not folder and path.is_dir():
        raise ValueError(f"{what} {path} is a folder: give a file name")
    for place in (path, *path.parents) if folder else path.parents:
        if place.is_dir():
            return
        if place.exists():
            raise ValueError(f"{what} {path}: {place} is a file, not a folder")


class FileWriteError(OSError):
    """A file could not be written (disk full, quota, permissions); names the file and why."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a temporary file of its own in ``path``'s folder, flushed to disk, then renamed
    to ``path``: readers see the old file or the complete new one, and runs writing the same file at
    once (DDP ranks) each rename a complete file of their own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        shared_file_mode(fd)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):  # torch.save says only "unexpected pos" on a full disk
            free = shutil.disk_usage(path.parent).free
            reason = os.strerror(err.errno) if getattr(err, "errno", None) else str(err).partition("\n")[0][:200]
            raise FileWriteError(
                f"could not write {path}: {reason} ({free / 2**20:.0f} MiB free on its disk); "
                f"{'the previous file is kept' if path.exists() else 'nothing was written'}"
            ) from err
        raise
