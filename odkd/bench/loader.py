"""Throughput of the training data pipeline alone: JPEG files or the decoded-image cache, read in one
process or through the DataLoader's workers."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from odkd.bench.synthetic import write_benchmark_images
from odkd.class_names import SYNTHETIC_CLASSES
from odkd.data import VOCDataset, build_loader, build_transform
from odkd.data.image_cache import ImageCache

__all__ = ["LoaderRate", "build_benchmark_cache", "loader_dataset", "loader_rates"]


@dataclass(frozen=True)
class LoaderRate:
    """Images per second read from ``source`` in one process (``workers`` None) or by a DataLoader."""

    source: str  # "JPEG files" or "decoded cache"
    workers: int | None
    images_per_s: float


def loader_dataset(root: str | Path, images: int, size: int) -> VOCDataset:
    """``images`` synthetic 375-500 px JPEGs written under ``root``, read through the train transform
    (decode, photometric, expand, min-IoU crop, flip, resize to ``size``)."""
    write_benchmark_images(root, "trainval", images)
    return VOCDataset(root, "SYN_trainval", SYNTHETIC_CLASSES, transform=build_transform(True, size))


def build_benchmark_cache(root: str | Path, dataset: VOCDataset, workers: int) -> tuple[ImageCache, float]:
    """The decoded-image cache of ``dataset`` under ``root/cache``, and the seconds it took to get ready."""
    start = time.perf_counter()
    cache = ImageCache.for_images(
        Path(root) / "cache", dataset.image_paths, dataset.image_shapes, workers=workers, progress=False
    )
    return cache, time.perf_counter() - start


def loader_rates(
    dataset: VOCDataset, cache: ImageCache, batch: int, worker_counts: Sequence[int], batches: int
) -> Iterator[LoaderRate]:
    """For JPEG files, then the decoded cache: every image of ``dataset`` read in one process, then
    ``batches`` batches of ``batch`` through a DataLoader with each of ``worker_counts`` workers (the
    first batch, the workers' start-up, not timed). One rate at a time, as it is measured."""
    files = dataset.images
    for source in ("JPEG files", "decoded cache"):
        dataset.images = cache if source == "decoded cache" else files
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[(i, i)]
        yield LoaderRate(source, None, len(dataset) / (time.perf_counter() - start))
        for workers in worker_counts:
            loader = build_loader(dataset, batch, train=True, num_workers=workers, max_iters=batches)
            iterator = iter(loader)
            next(iterator)  # worker start-up is not throughput
            start = time.perf_counter()
            count = sum(loaded["images"].shape[0] for loaded in iterator)
            yield LoaderRate(source, workers, count / (time.perf_counter() - start))
