"""Batching: padded targets for the batched matcher, and the DataLoader set-up."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

__all__ = ["build_loader", "collate"]


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    """Stack a list of dataset items.

    Returns ``images`` ``(B, 3, S, S)``, ``boxes`` ``(B, max_n, 4)`` relative x1,y1,x2,y2 padded with 0,
    ``labels`` ``(B, max_n)`` int64 padded with -1 (what :func:`odkd.matching.match` takes), and
    ``indices`` ``(B,)`` (dataset positions, to look up annotations).
    """
    max_n = max(len(item["labels"]) for item in batch)
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


def _seed_worker(worker_id: int) -> None:
    """Give each worker's augmentations their own random stream (forked workers share the parent's)."""
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_seed"):
        transform.set_seed(info.seed % 2**32)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 4,
    distributed: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader for training (shuffled, incomplete last batch dropped) or evaluation (in order).

    Workers are persistent and memory is pinned when CUDA is present; under DDP a DistributedSampler
    gives each process its share (call ``loader.sampler.set_epoch(epoch)`` every epoch).
    """
    sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=train) if distributed else None
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=train,
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker,
        generator=generator,
    )
