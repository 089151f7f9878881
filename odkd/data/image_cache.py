"""Decoded training images in one memory-mapped file: JPEG decoding once per dataset, not once per epoch.

Decoding a VOC-sized JPEG is about a third of an item's time in the SSD train pipeline (see
docs/BENCHMARKS.md). With ``data.cache_dir`` set, the first run decodes every training image into
``<cache_dir>/images-<key>.rgb`` (uint8 RGB pixels, image after image, in dataset order) and every later
read is a slice of that file; the OS page cache keeps it in memory, shared by all loader workers and
processes. VOC07+12 trainval (16,551 images) takes about 9 GB.

The key hashes each image's path, file size, modification time and annotated size, so a changed dataset
gets a new file instead of stale pixels. The pixels are exactly those :func:`read_image` returns.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from odkd.data.dataset import DatasetError, read_image
from odkd.data.loader import worker_signals
from odkd.files import shared_file_mode

__all__ = ["ImageCache", "build_image_cache", "image_cache_path"]


def _offsets(shapes: Sequence[tuple[int, int]]) -> np.ndarray:
    """``(N + 1,)`` byte offsets of ``(height, width)`` RGB images stored one after another."""
    sizes = np.array([h * w * 3 for h, w in shapes], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(sizes)])


def image_cache_path(directory: str | os.PathLike, paths: Sequence[Path], shapes: Sequence[tuple[int, int]]) -> Path:
    """The cache file of these images (``shapes``: ``(height, width)`` each) in ``directory``."""
    digest = hashlib.sha1()
    for path, (h, w) in zip(paths, shapes, strict=True):
        try:
            stat = path.stat()
        except OSError as err:
            raise DatasetError(f"{path}: image file does not exist or cannot be read ({err.strerror})") from err
        digest.update(f"{path.resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}\t{h}x{w}\n".encode())
    return Path(directory) / f"images-{digest.hexdigest()[:16]}.rgb"


class _DecodeInto(Dataset):
    """Item ``i`` decodes image ``i`` into its slice of the (pre-sized) cache file; returns a problem or None."""

    def __init__(self, file: Path, paths: Sequence[Path], shapes: Sequence[tuple[int, int]]) -> None:
        self.file, self.paths, self.shapes = file, paths, shapes
        self.offsets = _offsets(shapes)
        self._pixels: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str | None:
        try:
            image = read_image(self.paths[index], self.shapes[index])
        except DatasetError as err:  # raised by the main process, not from inside a worker's traceback
            return str(err)
        if self._pixels is None:  # opened in the worker process that writes
            self._pixels = np.memmap(self.file, dtype=np.uint8, mode="r+")
        self._pixels[self.offsets[index] : self.offsets[index + 1]] = image.reshape(-1)
        return None


def build_image_cache(
    path: Path, paths: Sequence[Path], shapes: Sequence[tuple[int, int]], workers: int = 4, progress: bool = True
) -> Path:
    """Decode ``paths`` into the cache file ``path`` unless it is already there; returns ``path``.

    The file appears only when complete (written under a name of its own, flushed to disk, then renamed),
    so an interrupted build is redone, never read. Runs that need the same file at once (two trainings
    on one machine) take turns through a lock file: one decodes, the others wait and read its result.
    :class:`DatasetError` names an image that does not read or does not match its annotated size, or a
    disk without room.
    """
    total = int(_offsets(shapes)[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if path.is_file() and path.stat().st_size == total:
            return path
        free = shutil.disk_usage(path.parent).free
        if free < total:
            raise DatasetError(
                f"the decoded-image cache needs {total / 2**30:.1f} GiB but {path.parent} has "
                f"{free / 2**30:.1f} GiB free: point data.cache_dir to a larger disk, or unset it"
            )
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.stem}-", suffix=".tmp")
        tmp = Path(name)
        try:
            shared_file_mode(handle)  # the cache may serve other users' runs too
            with os.fdopen(handle, "wb") as f:
                f.truncate(total)
            decode = _DecodeInto(tmp, paths, shapes)
            loader = DataLoader(decode, batch_size=None, num_workers=workers, worker_init_fn=worker_signals)
            for problem in tqdm(loader, total=len(decode), desc=f"decoding images into {path}", disable=not progress):
                if problem is not None:
                    raise DatasetError(problem)
            if decode._pixels is not None:  # written in this process (no workers)
                decode._pixels.flush()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())  # on disk before it gets the name that says "complete"
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return path


class ImageCache:
    """Read access to a cache file: ``cache[i]`` is image ``i`` as ``(H, W, 3)`` uint8 RGB (a copy, so
    transforms may change it in place). The file is mapped lazily in each process that reads it."""

    def __init__(self, path: Path, shapes: Sequence[tuple[int, int]]) -> None:
        self.path = Path(path)
        self.shapes = list(shapes)
        self.offsets = _offsets(self.shapes)
        if not self.path.is_file() or self.path.stat().st_size != self.offsets[-1]:
            raise DatasetError(f"{self.path}: missing or incomplete decoded-image cache")
        self._pixels: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.memmap(self.path, dtype=np.uint8, mode="r")
        h, w = self.shapes[index]
        return np.array(self._pixels[self.offsets[index] : self.offsets[index + 1]]).reshape(h, w, 3)

    def __getstate__(self) -> dict:
        # Loader workers started by spawn get the path, not a pickled copy of the pixels.
        return {**self.__dict__, "_pixels": None}

    @classmethod
    def for_images(
        cls, directory: str | os.PathLike, paths: Sequence[Path], shapes: Sequence[tuple[int, int]],
        build: bool = True, workers: int = 4, progress: bool = True,
    ) -> ImageCache:  # fmt: skip
        """The cache of the images at ``paths`` (of annotated ``(height, width)`` ``shapes``) in ``directory``,
        decoded first if ``build`` and not there yet (under DDP one process builds, the others wait and pass
        ``build=False``). Bound to its folder (``functools.partial``), this opens a dataset's images
        (:data:`odkd.data.dataset.OpenImages`)."""
        path = image_cache_path(directory, paths, shapes)
        if build:
            build_image_cache(path, paths, shapes, workers, progress)
        return cls(path, shapes)
