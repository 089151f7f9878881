"""A training run owns its folder (``train.output_dir``) for as long as it runs.

Two runs writing one folder would interleave metrics.jsonl, delete each other's checkpoints through
``keep_last`` and let a later ``--resume auto`` continue the wrong run. So a run takes a lock on the folder
(``.odkd.lock``, released when the process ends, however it ends), and a fresh run refuses a folder that
holds another run's files unless told to overwrite them. Resuming continues the folder's own run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from odkd.engine.trainer import TrainingError

__all__ = ["RUN_FILES", "RunFolderError", "claim_run_folder", "run_files"]

log = logging.getLogger("odkd")

# What a run leaves in its folder that another run must not mix with its own.
RUN_FILES = ("checkpoint_*.pt", "metrics.jsonl", "best.pt", "model_final.pt", "train_examples.jpg")
LOCK_FILE = ".odkd.lock"


class RunFolderError(TrainingError):
    """The run cannot use its folder (another run holds it, or it holds another run's files)."""


def run_files(folder: Path) -> list[Path]:
    """The files of :data:`RUN_FILES` in ``folder``, sorted."""
    return sorted(path for pattern in RUN_FILES for path in folder.glob(pattern))


@contextmanager
def claim_run_folder(folder: str | os.PathLike, fresh: bool, overwrite: bool = False) -> Iterator[None]:
    """Hold ``folder`` for one run while the block runs.

    :class:`RunFolderError` if another process holds it, or if a ``fresh`` run finds another run's files
    there and ``overwrite`` is off (with ``overwrite`` they are deleted first). Temporary files left by
    writes that a crash interrupted (``.<name>.<random>.tmp``) are removed: with the lock held, no write
    of this folder is under way.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the whole block
    try:
        _lock_or_explain(lock, folder)
        if fresh and (found := run_files(folder)):
            if not overwrite:
                raise RunFolderError(
                    f"train.output_dir {folder} holds another run ({', '.join(p.name for p in found[:3])}"
                    f"{', ...' if len(found) > 3 else ''}): continue it with --resume auto, choose another "
                    "train.output_dir, or pass --overwrite to delete its files"
                )
            for path in found:
                path.unlink()
            log.warning("--overwrite: deleted the %d files of the previous run in %s", len(found), folder)
        if orphans := sorted(folder.glob(".*.tmp")):
            for path in orphans:
                path.unlink()
            log.info("removed %d temporary files of interrupted writes from %s", len(orphans), folder)
        yield
    finally:
        lock.close()  # releases the lock


def _lock_or_explain(lock, folder: Path) -> None:
    """Take an exclusive lock on the open file ``lock`` and write this process's id into it."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the files check above still guards fresh runs
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        raise RunFolderError(
            f"train.output_dir {folder} is in use by another run (process {holder}): wait for it to end, "
            "or choose another train.output_dir"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
