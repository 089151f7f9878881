"""The benchmarks' synthetic data: random matching targets, VOC-like annotations with detections (no
images), and JPEG datasets at VOC's photo sizes (:func:`odkd.data.synthetic.make_synthetic_voc`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from odkd.class_names import SYNTHETIC_CLASSES, VOC_CLASSES
from odkd.data.synthetic import make_synthetic_voc
from odkd.data.voc import Annotation

__all__ = [
    "MAX_SIZE",
    "MIN_SIZE",
    "benchmark_classes",
    "random_targets",
    "synthetic_voc_detections",
    "write_benchmark_images",
]

# The benchmark JPEGs' sides in pixels: VOC photos are mostly 500 x 375-500, so decoding and resizing them costs
# what it costs on VOC.
MIN_SIZE, MAX_SIZE = 375, 500


def write_benchmark_images(root: str | Path, split: str, images: int) -> Path:
    """``images`` synthetic JPEGs of 375-500 px a side as the VOC-format image set ``SYN_<split>`` under ``root``
    (kept when already written with these settings); returns the dataset's folder."""
    return make_synthetic_voc(root, {split: images}, min_size=MIN_SIZE, max_size=MAX_SIZE)


def benchmark_classes() -> list[str]:
    """VOC's 20 object classes for the heads' sizes: the five synthetic ones and 15 that never occur."""
    return [*SYNTHETIC_CLASSES, *(f"unused{i}" for i in range(20 - len(SYNTHETIC_CLASSES)))]


def random_targets(batch: int, num_gt: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, num_gt, 4)`` xyxy boxes of side 0.05-0.6 inside the image and ``(B, num_gt)`` labels 1..20."""
    centre = torch.rand(batch, num_gt, 2, generator=generator) * 0.8 + 0.1
    size = torch.rand(batch, num_gt, 2, generator=generator) * 0.55 + 0.05
    boxes = torch.cat((centre - size / 2, centre + size / 2), dim=-1).clamp(0.0, 1.0)
    labels = torch.randint(1, 21, (batch, num_gt), generator=generator)
    return boxes, labels


def _random_pixel_boxes(image_sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One box per ``(width, height)`` row of ``image_sizes``: sides 5-70% of the image, devkit pixels."""
    size = rng.uniform(0.05, 0.7, image_sizes.shape) * image_sizes
    centre = rng.uniform(0.0, 1.0, image_sizes.shape) * image_sizes
    return _clip_to_image(np.concatenate((centre - size / 2, centre + size / 2), axis=1), image_sizes)


def _clip_to_image(boxes: np.ndarray, image_sizes: np.ndarray) -> np.ndarray:
    """Round ``(n, 4)`` boxes to whole pixels inside ``[1, width] x [1, height]``, corners in order."""
    low = np.clip(np.round(np.minimum(boxes[:, :2], boxes[:, 2:])), 1, image_sizes)
    high = np.clip(np.round(np.maximum(boxes[:, :2], boxes[:, 2:])), low, image_sizes)
    return np.concatenate((low, high), axis=1)


def synthetic_voc_detections(
    num_images: int, num_detections: int, seed: int
) -> tuple[list[Annotation], dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """VOC-like annotations, and detections per VOC class as (image ids, scores, ``(n, 4)`` xyxy devkit
    pixel boxes), for the 20 VOC classes.

    Images are 300-500 pixels a side with 1 + Poisson(1.5) objects each, 15% difficult, "person" 8x as
    frequent as any other class. Half the detections are GT boxes jittered by ~10% of their size (90% with
    the right class, scores ~ Beta(4, 2)), half are random boxes in random images (scores ~ Beta(1.5, 6)).
    """
    rng = np.random.default_rng(seed)
    image_sizes = rng.integers(300, 501, (num_images, 2)).astype(np.float64)
    counts = 1 + rng.poisson(1.5, num_images)
    gt_image = np.repeat(np.arange(num_images), counts)
    gt_boxes = _random_pixel_boxes(image_sizes[gt_image], rng)
    frequency = np.where(np.array(VOC_CLASSES) == "person", 8.0, 1.0)
    gt_labels = rng.choice(len(VOC_CLASSES), len(gt_image), p=frequency / frequency.sum()) + 1
    gt_difficult = rng.random(len(gt_image)) < 0.15
    starts = np.cumsum(counts) - counts
    annotations = [
        Annotation(
            f"{i:06d}",
            int(w),
            int(h),
            gt_boxes[s : s + n].astype(np.float32),
            gt_labels[s : s + n],
            gt_difficult[s : s + n],
        )
        for i, ((w, h), s, n) in enumerate(zip(image_sizes.tolist(), starts, counts, strict=True))
    ]

    near = rng.integers(0, len(gt_image), num_detections // 2)
    gt_size = np.tile(gt_boxes[near, 2:] - gt_boxes[near, :2], 2)
    near_boxes = _clip_to_image(
        gt_boxes[near] + rng.normal(0.0, 0.1, gt_size.shape) * gt_size, image_sizes[gt_image[near]]
    )
    wrong_class = rng.random(len(near)) >= 0.9
    near_labels = np.where(wrong_class, rng.integers(1, len(VOC_CLASSES) + 1, len(near)), gt_labels[near])
    far_image = rng.integers(0, num_images, num_detections - len(near))
    image = np.concatenate((gt_image[near], far_image))
    boxes = np.concatenate((near_boxes, _random_pixel_boxes(image_sizes[far_image], rng)))
    labels = np.concatenate((near_labels, rng.integers(1, len(VOC_CLASSES) + 1, len(far_image))))
    scores = np.concatenate((rng.beta(4, 2, len(near)), rng.beta(1.5, 6, len(far_image)))).round(6)
    image_ids = np.array([a.image_id for a in annotations])[image]
    detections = {}
    for label, name in enumerate(VOC_CLASSES, start=1):
        of_class = labels == label
        detections[name] = (image_ids[of_class], scores[of_class], boxes[of_class])
    return annotations, detections
