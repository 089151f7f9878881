"""Found, or found and scored? Why a class's AP is low.

AP ranks all of a class's detections over the set by score, so a class can sit near 0 AP in two ways:
the detector does not *find* its objects, or it finds them but scores them no higher than its false
positives (*found but not scored*). Per class, of the non-difficult objects: how many are *found* (the
best-scoring detection overlapping the object by IoU >= 0.5, of any class, carries the object's class)
and the median score of those detections. A class with most objects found, a low median score and a low
AP is one the detector has learnt to recognise but not yet to score above background.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from odkd.eval.voc import devkit_iou_rows

if TYPE_CHECKING:
    from odkd.data import Annotation, ImageDetections

__all__ = ["ClassFound", "format_found_table", "found_per_class"]


class ClassFound(NamedTuple):
    """One class's objects: how many there are, how many are found, how high those are scored."""

    objects: int  # non-difficult objects
    found: int  # objects whose best-scoring overlapping detection is of their class
    median_score: float  # of those detections, median over the found objects; nan if none is found


def found_per_class(
    detections: Mapping[int, ImageDetections],
    annotations: Sequence[Annotation],
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
) -> dict[str, ClassFound]:
    """:class:`ClassFound` per class name. ``detections``: image index -> its detections (an image that is
    missing has none), boxes in the annotations' pixels; overlaps are the devkit's IoU (``+1`` pixel
    sizes). Difficult objects are left out, as the devkit leaves them out of AP."""
    found_scores: list[list[float]] = [[] for _ in class_names]
    objects = np.zeros(len(class_names), dtype=np.int64)
    for index, ann in enumerate(annotations):
        gt_boxes, gt_labels = ann.boxes[~ann.difficult], ann.labels[~ann.difficult]
        objects += np.bincount(gt_labels - 1, minlength=len(class_names))
        image = detections.get(index)
        if image is None or len(image.scores) == 0 or len(gt_boxes) == 0:
            continue
        overlaps = devkit_iou_rows(gt_boxes.astype(np.float64), image.boxes)  # (objects, detections)
        scores = np.where(overlaps >= iou_threshold, image.scores[None, :], -np.inf)
        best = scores.argmax(axis=1)
        best_score = scores[np.arange(len(best)), best]
        found = (best_score > -np.inf) & (image.labels[best] == gt_labels)
        for label, score in zip(gt_labels[found], best_score[found], strict=True):
            found_scores[label - 1].append(float(score))
    medians = [float(np.median(scores)) if scores else math.nan for scores in found_scores]
    return {name: ClassFound(int(objects[c]), len(found_scores[c]), medians[c]) for c, name in enumerate(class_names)}


def format_found_table(found: Mapping[str, ClassFound], ap: Mapping[str, float] | None = None) -> str:
    """Per class: objects, share found (percent), median score of the found, and AP (percent) if given."""
    header = f"{'class':<12} {'GT':>6} {'found %':>8} {'median score':>13}" + (f" {'AP %':>7}" if ap else "")
    lines = [header]
    for name, row in found.items():
        share = f"{100 * row.found / row.objects:8.1f}" if row.objects else f"{'-':>8}"
        median = f"{row.median_score:13.2f}" if row.found else f"{'-':>13}"
        line = f"{name:<12} {row.objects:>6} {share} {median}"
        if ap:
            line += f" {100 * ap[name]:7.2f}" if not math.isnan(ap[name]) else f" {'-':>7}"
        lines.append(line)
    return "\n".join(lines)
