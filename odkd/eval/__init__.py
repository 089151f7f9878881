"""Detection evaluation: PASCAL VOC AP exactly as the official devkit computes it (:mod:`odkd.eval.voc`)
and COCO AP through pycocotools (:mod:`odkd.eval.coco`), behind :func:`evaluate_dataset`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

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
from odkd.eval.voc import *  # noqa: F403  (the public API of odkd.eval.voc, listed in its __all__)
from odkd.eval.voc import ClassDetections, VOCResult, evaluate, format_ap_table

__all__ = [
    *voc.__all__,
    "COCO_STATS",
    "COCOResult",
    "evaluate_coco",
    "evaluate_dataset",
    "format_coco_table",
    "format_result",
    "read_coco_results",
    "write_coco_results",
]


def evaluate_dataset(
    detections: Mapping[str, ClassDetections], dataset, metric: str = "voc07"
) -> VOCResult | COCOResult:
    """Score ``detections`` (from :func:`odkd.inference.detect_dataset`) on ``dataset``: ``metric`` "voc07" or
    "area" (devkit AP at IoU 0.5, any dataset) or "coco" (pycocotools, a COCO-format dataset)."""
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
