"""Detection evaluation: PASCAL VOC AP exactly as the official devkit computes it (:mod:`odkd.eval.voc`)
and COCO AP through pycocotools (:mod:`odkd.eval.coco`), behind :func:`evaluate_dataset` (a model's
per-image detections) and :func:`evaluate_results` (per-class detections, as result files hold them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from odkd.eval import voc
from odkd.eval.coco import (
    COCO_STATS,
    COCOResult,
    evaluate_coco,
    format_coco_table,
    read_coco_results,
    write_coco_results,
)
from odkd.eval.found import ClassFound, format_found_table, found_per_class
from odkd.eval.voc import *  # noqa: F403  (the public API of odkd.eval.voc, listed in its __all__)
from odkd.eval.voc import ClassDetections, VOCResult, evaluate, format_ap_table

if TYPE_CHECKING:  # scoring needs no torch: the data package loads it
    from odkd.data import DetectionDataset, ImageDetections

__all__ = [
    *voc.__all__,
    "COCO_STATS",
    "ClassFound",
    "COCOResult",
    "evaluate_coco",
    "evaluate_dataset",
    "evaluate_results",
    "format_coco_table",
    "format_found_table",
    "found_per_class",
    "format_result",
    "group_by_class",
    "read_coco_results",
    "write_coco_results",
]


def group_by_class(detections: Mapping[int, ImageDetections], dataset: DetectionDataset) -> dict[str, ClassDetections]:
    """Per-image detections (dataset index -> :class:`ImageDetections`, e.g. from
    :func:`odkd.inference.detect_dataset`) as per-class ones, every class of ``dataset`` present. Images
    are taken in dataset order, so the result does not depend on the order (or shards) they came in:
    AP ranks equal scores in that order."""
    per_class: dict[int, list] = {c: [] for c in range(1, len(dataset.class_names) + 1)}
    for index in sorted(detections):
        image_id = dataset.annotations[index].image_id
        boxes, scores, labels = detections[index]
        for label in np.unique(labels):
            keep = labels == label
            per_class[int(label)].append((image_id, scores[keep], boxes[keep]))
    result = {}
    for label, parts in per_class.items():
        ids = np.array([image_id for image_id, scores, _ in parts for _ in range(len(scores))], dtype=str)
        scores = np.concatenate([s for _, s, _ in parts]) if parts else np.zeros(0)
        boxes = np.concatenate([b for _, _, b in parts]) if parts else np.zeros((0, 4))
        result[dataset.class_names[label - 1]] = ClassDetections(
            ids, scores.astype(np.float64), boxes.astype(np.float64)
        )
    return result


def evaluate_dataset(
    detections: Mapping[int, ImageDetections], dataset: DetectionDataset, metric: str = "voc07"
) -> VOCResult | COCOResult:
    """Score per-image ``detections`` (dataset index -> :class:`ImageDetections`, from
    :func:`odkd.inference.detect_dataset`, every image of ``dataset``) on ``dataset``: grouped by class
    (:func:`group_by_class`), then :func:`evaluate_results`."""
    return evaluate_results(group_by_class(detections, dataset), dataset, metric)


def evaluate_results(
    detections: Mapping[str, ClassDetections], dataset: DetectionDataset, metric: str = "voc07"
) -> VOCResult | COCOResult:
    """Score per-class ``detections`` (class name -> :class:`ClassDetections` in the dataset's pixels, e.g.
    read from result files) on ``dataset``: ``metric`` "voc07" or "area" (devkit AP at IoU 0.5, any
    dataset) or "coco" (pycocotools, a COCO-format dataset)."""
    if metric == "coco":
        if not hasattr(dataset, "annotation_file"):
            raise ValueError("the coco metric needs a COCO-format dataset (data.format: coco)")
        return evaluate_coco(detections, dataset)
    annotations = dataset.annotations
    # The devkit's IoU counts inclusive pixels (+1), right for VOC's 1-based corners (pixel_offset
    # (1, 1, 0, 0)). Corners of another convention (COCO's continuous ones) are moved to VOC's first, or
    # every small box would overlap more than it does.
    to_devkit = np.array((1.0, 1.0, 0.0, 0.0)) - np.array(dataset.pixel_offset)
    if to_devkit.any():
        detections = {name: d._replace(boxes=d.boxes + to_devkit) for name, d in detections.items()}
        annotations = [dataclasses.replace(a, boxes=a.boxes + to_devkit.astype(a.boxes.dtype)) for a in annotations]
    return evaluate(detections, annotations, dataset.class_names, metric=metric)


def format_result(result: VOCResult | COCOResult) -> str:
    """The per-class table of either kind of result."""
    return format_coco_table(result) if isinstance(result, COCOResult) else format_ap_table(result)
