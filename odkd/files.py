"""Writing files so that a crash, or another process writing the same file, never leaves a partial one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "check_output_path"]


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


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a temporary file of its own in ``path``'s folder, flushed to disk, then renamed
    to ``path``: readers see the old file or the complete new one, and runs writing the same file at
    once (DDP ranks) each rename a complete file of their own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
