"""Detection evaluation: PASCAL VOC AP exactly as the official devkit computes it."""

from odkd.eval.voc import (
    METRICS,
    ClassDetections,
    VOCResult,
    average_precision,
    evaluate,
    format_ap_table,
    match_detections,
    match_detections_reference,
    precision_recall,
    read_devkit_results,
    results_path,
    write_devkit_results,
)

__all__ = [
    "METRICS",
    "ClassDetections",
    "VOCResult",
    "average_precision",
    "evaluate",
    "format_ap_table",
    "match_detections",
    "match_detections_reference",
    "precision_recall",
    "read_devkit_results",
    "results_path",
    "write_devkit_results",
]
