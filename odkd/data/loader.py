"""Batching: padded targets for the batched matcher, a resumable training sampler, and DataLoaders."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Iterator
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["IterationSampler", "build_loader", "collate", "prefetch_to_device", "worker_signals"]


def worker_signals(worker_id: int = 0) -> None:
    """A loader worker's start. SIGINT and SIGTERM go to the whole process group (Ctrl-C, Slurm, most
    schedulers), and the main process answers them by finishing its step, checkpointing and ending the
    run. A worker ignores SIGINT and ends quietly (exit status 0) on SIGTERM: killed by the signal, the
    loader would fail the run before its checkpoint; ignoring SIGTERM would leave the worker running when
    the loader or Python's exit terminates it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def collate(batch: list[dict], gt_slots: int = 0) -> dict[str, torch.Tensor]:
    """Stack a list of dataset items.

    Returns ``images`` ``(B, 3, S, S)``, ``boxes`` ``(B, max_n, 4)`` relative x1,y1,x2,y2 padded with 0,
    ``labels`` ``(B, max_n)`` int64 padded with -1 (what :func:`odkd.matching.match` takes), and
    ``indices`` ``(B,)`` (dataset positions, to look up annotations). ``max_n`` is the most objects of an
    item, or ``gt_slots`` if that is more (a fixed shape for every batch: what CUDA graphs replay).
    """
    max_n = max(gt_slots, *(len(item["labels"]) for item in batch))
    boxes = torch.zeros(len(batch), max_n, 4)
    labels = torch.full((len(batch), max_n), -1, dtype=torch.int64)
    for i, item in enumerate(batch):  # host-side copy of a few boxes per image
        n = len(item["labels"])
        boxes[i, :n] = item["boxes"]
        labels[i, :n] = item["labels"]
    return {
        "images": torch.stack([item["image"] for item in batch]),
        "boxes": boxes,
        "labels": labels,
        "indices": torch.tensor([item["index"] for item in batch]),
    }


class IterationSampler(Sampler):
    """The training stream: ``(dataset index, augmentation seed)`` pairs for iterations
    ``start_iter .. max_iters - 1`` of ``batch_size`` items per process.

    Each epoch is a fresh permutation drawn from ``seed + epoch``, split between processes like
    DistributedSampler (rank r takes every world_size-th item). Every item carries its own augmentation
    seed, so what an iteration sees depends only on (seed, iteration, rank): not on the number of
    loader workers, and a run resumed at iteration k continues exactly as if it had never stopped.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        max_iters: int,
        start_iter: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.per_epoch = dataset_size // world_size  # equal shares, the remainder is dropped
        if self.per_epoch < 1:
            raise ValueError(f"a dataset of {dataset_size} images cannot feed {world_size} processes")
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start, self.stop = start_iter * batch_size, max_iters * batch_size

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def _epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.dataset_size, generator=generator)
        seeds = torch.randint(0, 2**31 - 1, (self.dataset_size,), generator=generator)
        share = slice(self.rank, self.per_epoch * self.world_size, self.world_size)
        return order[share], seeds[share]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        while position < self.stop:
            epoch, offset = divmod(position, self.per_epoch)
            order, seeds = self._epoch(epoch)
            end = min(self.per_epoch, offset + self.stop - position)
            yield from zip(order[offset:end].tolist(), seeds[offset:end].tolist(), strict=True)
            position += end - offset


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 4,
    max_iters: int = 0,
    start_iter: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    gt_slots: int = 0,
) -> DataLoader:
    """A DataLoader for training (:class:`IterationSampler`: ``max_iters`` batches from ``start_iter``)
    or evaluation (in order; under DDP each process takes every world_size-th image, none twice).
    ``gt_slots``: pad the targets to at least this many objects per image (:func:`collate`).

    Workers are persistent, leave SIGINT/SIGTERM to the main process (:func:`worker_signals`), and
    memory is pinned when CUDA is present.
    """
    if train:
        if max_iters < 1:
            raise ValueError("a training loader needs max_iters >= 1")
        sampler = IterationSampler(len(dataset), batch_size, max_iters, start_iter, seed, rank, world_size)
    else:
        # Every world_size-th image from rank's: no padding, so no image is scored twice once gathered.
        sampler = range(rank, len(dataset), world_size) if world_size > 1 else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=partial(collate, gt_slots=gt_slots) if gt_slots else collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=train,
        persistent_workers=num_workers > 0,
        worker_init_fn=worker_signals if num_workers > 0 else None,
    )


def prefetch_to_device(batches: Iterable[dict], device: torch.device) -> Iterator[Batch]:
    """Each collated batch's ``(images, boxes, labels)`` on ``device``.

    On CUDA the next batch is copied on a side stream while the current one is being used: copies on the
    compute stream would wait for the previous step's kernels and hold up the next step's (~0.7 ms for 64
    uint8 images of 300 px from pinned memory). uint8 images travel: a quarter of float32's bytes.
    """
    keys = ("images", "boxes", "labels")
    if device.type != "cuda":
        yield from (tuple(batch[k].to(device) for k in keys) for batch in batches)
        return
    copy_stream, compute_stream = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def start_copy(batch: dict | None) -> Batch | None:
        if batch is None:
            return None
        with torch.cuda.stream(copy_stream):
            return tuple(batch[k].to(device, non_blocking=True) for k in keys)

    source = iter(batches)
    pending = start_copy(next(source, None))
    while pending is not None:
        compute_stream.wait_stream(copy_stream)
        for tensor in pending:  # made on the copy stream, freed after the compute stream is done with it
            tensor.record_stream(compute_stream)
        current, pending = pending, start_copy(next(source, None))
        yield current
