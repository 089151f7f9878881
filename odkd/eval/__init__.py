"""Detection evaluation: PASCAL VOC AP exactly as the official devkit computes it (:mod:`odkd.eval.voc`)
and COCO AP through pycocotools (:mod:`odkd.eval.coco`), behind :func:`evaluate_dataset`."""

from __future__ import annotations

from collections.abc import Mapping

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
    return evaluate(detections, dataset.annotations, dataset.class_names, metric=metric)


def format_result(result: VOCResult | COCOResult) -> str:
    """The per-class table of either kind of result."""
    return format_coco_table(result) if isinstance(result, COCOResult) else format_ap_table(result)
