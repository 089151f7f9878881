"""PASCAL VOC detection AP, computed exactly as the official devkit computes it.

For each class, every detection of that class over the whole set is taken in order of decreasing
score (a stable sort: ties keep their input order) and compared with that class's ground truth (GT)
in its image, difficult objects included. Overlap is the devkit's IoU on inclusive pixel boxes: a box
``(xmin, ymin, xmax, ymax)`` covers ``(xmax - xmin + 1) * (ymax - ymin + 1)`` pixels. With the GT of
highest IoU (the first one on ties):

* IoU >= threshold and the GT is difficult: the detection is ignored (neither TP nor FP);
* IoU >= threshold and the GT is not yet taken: true positive (TP), and the GT is taken;
* IoU >= threshold and the GT is taken already: false positive (FP, a duplicate);
* IoU < threshold, or no GT of the class in the image: FP.

``recall = cumsum(TP) / npos`` (npos: non-difficult GT of the class) and
``precision = cumsum(TP) / (cumsum(TP) + cumsum(FP))``. The AP is the 11-point VOC2007 metric
(``"voc07"``) or the area under the interpolated curve of VOC2010 onwards (``"area"``).

A class without non-difficult GT has AP ``nan`` and is left out of the mAP.

Boxes are in devkit pixel coordinates, 1-based and inclusive as in the annotation XML. Result files
are the devkit's ``comp4_det_<image_set>_<class>.txt``, one line per detection:
``<image_id> <score> <xmin> <ymin> <xmax> <ymax>``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # scoring needs no torch: the data package loads it
    from odkd.data.dataset import Annotation

__all__ = [
    "METRICS",
    "ClassDetections",
    "VOCResult",
    "average_precision",
    "devkit_image_set",
    "devkit_iou_rows",
    "evaluate",
    "format_ap_table",
    "match_detections",
    "match_detections_reference",
    "precision_recall",
    "read_devkit_results",
    "results_path",
    "write_devkit_results",
]

METRICS = ("voc07", "area")

# Detection x GT pairs whose IoU is computed at once; bounds the memory of the vectorised matching.
_CHUNK_PAIRS = 1 << 18


class ClassDetections(NamedTuple):
    """All detections of one class over a dataset (any order)."""

    image_ids: np.ndarray  # (D,) str
    scores: np.ndarray  # (D,) float64
    boxes: np.ndarray  # (D, 4) float64 xmin, ymin, xmax, ymax in devkit pixels


def _no_detections() -> ClassDetections:
    return ClassDetections(np.zeros(0, dtype=str), np.zeros(0), np.zeros((0, 4)))


@dataclass
class VOCResult:
    """Per-class AP and PR curves of one evaluation; AP and mAP are fractions in [0, 1]."""

    metric: str
    iou_threshold: float
    mAP: float  # mean AP over the classes whose AP is not nan
    ap: dict[str, float]  # nan for a class without non-difficult GT
    npos: dict[str, int]  # non-difficult GT per class
    recall: dict[str, np.ndarray]  # (D,) per class, in decreasing-score order
    precision: dict[str, np.ndarray]  # (D,)

    def to_json(self) -> dict:
        """``{"metric", "mAP", "ap": {class: AP}}``, with ``None`` (JSON null) for nan."""

        def number(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {"metric": self.metric, "mAP": number(self.mAP), "ap": {k: number(v) for k, v in self.ap.items()}}


# --- matching: which detections are true and false positives ---------------------------------------


def _devkit_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two inclusive pixel boxes, as the devkit computes it (0 if they do not overlap)."""
    iw = max(min(a[2], b[2]) - max(a[0], b[0]) + 1.0, 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]) + 1.0, 0.0)
    inter = iw * ih
    union = (a[2] - a[0] + 1.0) * (a[3] - a[1] + 1.0) + (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0) - inter
    return inter / union


def match_detections_reference(
    scores: np.ndarray,
    boxes: np.ndarray,
    image_index: np.ndarray,
    gt_boxes: np.ndarray,
    gt_difficult: np.ndarray,
    gt_image_index: np.ndarray,
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """The devkit's matching as a plain loop over detections: the readable specification of
    :func:`match_detections` (same arguments and result), kept for tests and benchmarks."""
    gt_of_image: dict[int, list[int]] = {}
    for g, image in enumerate(gt_image_index.tolist()):
        gt_of_image.setdefault(image, []).append(g)
    taken = np.zeros(len(gt_boxes), dtype=bool)
    order = np.argsort(-scores, kind="stable")
    tp = np.zeros(len(order), dtype=bool)
    fp = np.zeros(len(order), dtype=bool)
    for rank, d in enumerate(order):
        ovmax, best = -math.inf, -1
        for g in gt_of_image.get(int(image_index[d]), []):
            overlap = _devkit_iou(boxes[d].tolist(), gt_boxes[g].tolist())
            if overlap > ovmax:
                ovmax, best = overlap, g
        if ovmax < iou_threshold:
            fp[rank] = True
        elif gt_difficult[best]:
            continue  # ignored
        elif not taken[best]:
            tp[rank] = taken[best] = True
        else:
            fp[rank] = True
    return tp, fp


def devkit_iou_rows(boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """Devkit IoU (inclusive pixel boxes, ``+1`` sizes) of each box ``(n, 4)`` with each of its GT boxes
    ``(n, w, 4)``, or with each of the same ``(w, 4)`` boxes -> ``(n, w)``."""
    d = boxes[:, None, :]
    iw = np.maximum(np.minimum(d[..., 2], gt_boxes[..., 2]) - np.maximum(d[..., 0], gt_boxes[..., 0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(d[..., 3], gt_boxes[..., 3]) - np.maximum(d[..., 1], gt_boxes[..., 1]) + 1.0, 0.0)
    inter = iw * ih
    det_area = (d[..., 2] - d[..., 0] + 1.0) * (d[..., 3] - d[..., 1] + 1.0)
    gt_area = (gt_boxes[..., 2] - gt_boxes[..., 0] + 1.0) * (gt_boxes[..., 3] - gt_boxes[..., 1] + 1.0)
    return inter / (det_area + gt_area - inter)


def _best_overlaps(
    boxes: np.ndarray, image_index: np.ndarray, gt_boxes: np.ndarray, gt_image_index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each detection's highest IoU with the GT of its image ``(D,)`` (-inf without GT) and that GT's
    index ``(D,)`` (the first on ties; meaningless where the IoU is -inf)."""
    # Each image's GT is a contiguous run of `by_image` (annotation order kept within an image).
    by_image = np.argsort(gt_image_index, kind="stable")
    num_images = 1 + max(image_index.max(initial=-1), gt_image_index.max(initial=-1))
    count = np.bincount(gt_image_index, minlength=num_images)
    start = np.cumsum(count) - count
    width = int(count.max(initial=0))
    ovmax = np.full(len(boxes), -np.inf)
    best = np.zeros(len(boxes), dtype=np.int64)
    if width == 0:
        return ovmax, best
    # Every detection's GT row, padded to the most GT any image has; pad slots get IoU -inf.
    slot = np.arange(width)
    rows_per_chunk = max(1, _CHUNK_PAIRS // width)
    for lo in range(0, len(boxes), rows_per_chunk):
        chunk = slice(lo, lo + rows_per_chunk)
        image = image_index[chunk, None]
        gt = by_image[np.minimum(start[image] + slot, len(by_image) - 1)]  # (n, width)
        overlaps = np.where(slot < count[image], devkit_iou_rows(boxes[chunk], gt_boxes[gt]), -np.inf)
        column = overlaps.argmax(axis=1)
        rows = np.arange(len(column))
        ovmax[chunk] = overlaps[rows, column]
        best[chunk] = gt[rows, column]
    return ovmax, best


def match_detections(
    scores: np.ndarray,
    boxes: np.ndarray,
    image_index: np.ndarray,
    gt_boxes: np.ndarray,
    gt_difficult: np.ndarray,
    gt_image_index: np.ndarray,
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives of one class's detections, vectorised (no loop over detections).

    Args:
        scores: ``(D,)``; boxes: ``(D, 4)`` devkit pixels; image_index: ``(D,)`` int, each detection's image.
        gt_boxes: ``(G, 4)`` devkit pixels; gt_difficult: ``(G,)`` bool; gt_image_index: ``(G,)`` int,
            in annotation order within each image.
        iou_threshold: the least IoU that matches a GT.

    Returns:
        ``tp, fp``: ``(D,)`` bool in decreasing-score order (stable sort); a detection matched to a
        difficult GT is neither.
    """
    order = np.argsort(-scores, kind="stable")
    ovmax, best = _best_overlaps(boxes[order], image_index[order], gt_boxes, gt_image_index)
    matched = ovmax >= iou_threshold
    # Matches to difficult GT are ignored; of the rest, the first (highest-scoring) match of each GT is
    # the TP and later ones are duplicates.
    ranks = np.flatnonzero(matched)
    counted = ~gt_difficult[best[ranks]]
    ranks = ranks[counted]
    _, first = np.unique(best[ranks], return_index=True)
    tp = np.zeros(len(order), dtype=bool)
    tp[ranks[first]] = True
    fp = ~matched
    fp[ranks] = ~tp[ranks]
    return tp, fp


# --- from matches to AP ---------------------------------------------------------------------------


def precision_recall(tp: np.ndarray, fp: np.ndarray, npos: int) -> tuple[np.ndarray, np.ndarray]:
    """``(recall, precision)``, each ``(D,)`` float64, from TP/FP flags in decreasing-score order.

    Recall is nan throughout when ``npos`` (the number of non-difficult GT) is 0.
    """
    tp_sum = np.cumsum(tp, dtype=np.float64)
    fp_sum = np.cumsum(fp, dtype=np.float64)
    recall = tp_sum / npos if npos > 0 else np.full(len(tp_sum), np.nan)
    precision = tp_sum / np.maximum(tp_sum + fp_sum, np.finfo(np.float64).eps)
    return recall, precision


def average_precision(recall: np.ndarray, precision: np.ndarray, metric: str = "voc07") -> float:
    """AP of a PR curve (``(D,)`` each, in decreasing-score order), as a fraction.

    ``"voc07"``: mean over recall thresholds t = 0, 0.1, ..., 1 of the best precision at recall >= t
    (0 if none). The thresholds are ``np.arange(0, 1.1, 0.1)`` as in the devkit's Python port, floating-
    point rounding included (the fourth is 0.30000000000000004, so a recall of exactly 3/10 misses it).
    ``"area"``: area under the curve after making precision non-increasing in recall (VOC2010+).
    """
    if metric == "voc07":
        return float(sum(np.max(precision[recall >= t], initial=0.0) / 11 for t in np.arange(0.0, 1.1, 0.1)))
    if metric == "area":
        mrec = np.concatenate(([0.0], recall, [1.0]))
        mpre = np.concatenate(([0.0], precision, [0.0]))
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        step = np.flatnonzero(mrec[1:] != mrec[:-1])
        return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))
    raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")


def _image_positions(image_ids: Sequence[str] | np.ndarray, sorted_ids: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Position in the annotation list of each of ``image_ids``, ``(D,)`` int, -1 where unknown.

    ``sorted_ids = annotation_ids[order]`` are the annotations' image ids in sorted order.
    """
    ids = np.asarray(image_ids, dtype=str)
    slot = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return np.where(sorted_ids[slot] == ids, order[slot], -1)


def _detection_arrays(
    name: str, detections: ClassDetections | tuple, sorted_ids: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scores (D,), boxes (D, 4), image index (D,))`` of one class; ValueError for an unknown image."""
    image_ids, scores, boxes = detections
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(image_ids) == len(scores) == len(boxes):
        raise ValueError(
            f"{name}: {len(image_ids)} image ids, {len(scores)} scores and {len(boxes)} boxes; they must match"
        )
    index = _image_positions(image_ids, sorted_ids, order)
    unknown = np.flatnonzero(index < 0)
    if len(unknown):
        raise ValueError(
            f"{name}: {len(unknown)} detections are for images not in the annotations, "
            f"the first for image {str(image_ids[unknown[0]])!r}"
        )
    return scores, boxes, index


def evaluate(
    detections: Mapping[str, ClassDetections | tuple],
    annotations: Sequence[Annotation],
    class_names: Sequence[str],
    metric: str = "voc07",
    iou_threshold: float = 0.5,
    *,
    matcher: Callable[..., tuple[np.ndarray, np.ndarray]] = match_detections,
) -> VOCResult:
    """Per-class AP and mAP of ``detections`` against ``annotations``, as the devkit computes them.

    Args:
        detections: class name -> ``(image_ids (D,), scores (D,), boxes (D, 4))``, boxes in devkit
            pixels; a class that is left out has no detections.
        annotations: one :class:`Annotation` per image of the set (label ``i + 1`` is ``class_names[i]``).
        class_names: the classes to evaluate, in table order.
        metric: ``"voc07"`` (11-point) or ``"area"`` (VOC2010+).
        iou_threshold: the least IoU that matches a GT (0.5 in VOC).
        matcher: :func:`match_detections` or, to check it, :func:`match_detections_reference`.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
    if not 0.0 < iou_threshold <= 1.0:  # at 0 a detection touching no GT would still "match" one
        raise ValueError(f"iou_threshold {iou_threshold} must lie in (0, 1]")
    unknown = sorted(set(detections) - set(class_names))
    if unknown:
        raise ValueError(f"detections for unknown classes {unknown}; the class list is {list(class_names)}")
    if not annotations:
        raise ValueError("no annotations to evaluate against")
    annotation_ids = np.array([a.image_id for a in annotations])
    order = np.argsort(annotation_ids, kind="stable")
    sorted_ids = annotation_ids[order]
    repeated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if len(repeated):
        raise ValueError(f"the annotations hold image {str(repeated[0])!r} more than once")

    gt_boxes = np.concatenate([a.boxes for a in annotations]).astype(np.float64)
    gt_labels = np.concatenate([a.labels for a in annotations])
    gt_difficult = np.concatenate([a.difficult for a in annotations])
    gt_image_index = np.repeat(np.arange(len(annotations)), [len(a.labels) for a in annotations])

    ap, npos, recall, precision = {}, {}, {}, {}
    for label, name in enumerate(class_names, start=1):
        scores, boxes, image_index = _detection_arrays(name, detections.get(name, _no_detections()), sorted_ids, order)
        of_class = gt_labels == label
        difficult = gt_difficult[of_class]
        tp, fp = matcher(
            scores, boxes, image_index, gt_boxes[of_class], difficult, gt_image_index[of_class], iou_threshold
        )
        npos[name] = int(np.count_nonzero(~difficult))
        recall[name], precision[name] = precision_recall(tp, fp, npos[name])
        ap[name] = average_precision(recall[name], precision[name], metric) if npos[name] else math.nan
    scored = [v for v in ap.values() if not math.isnan(v)]
    mean_ap = float(np.mean(scored)) if scored else math.nan
    return VOCResult(metric, iou_threshold, mean_ap, ap, npos, recall, precision)


def format_ap_table(result: VOCResult) -> str:
    """Per-class AP (percent, 2 decimals) with the number of non-difficult GT, mAP on the last line."""

    def percent(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{100 * x:.2f}"

    width = max([len("class"), *map(len, result.ap)])
    lines = [
        f"PASCAL VOC AP ({result.metric}, IoU >= {result.iou_threshold:g})",
        f"{'class':<{width}}  {'GT':>6}  {'AP %':>6}",
    ]
    lines += [f"{name:<{width}}  {result.npos[name]:>6}  {percent(ap):>6}" for name, ap in result.ap.items()]
    lines.append("-" * (width + 16))
    lines.append(f"{'mAP':<{width}}  {'':>6}  {percent(result.mAP):>6}")
    if any(math.isnan(ap) for ap in result.ap.values()):
        lines.append("n/a: no non-difficult GT of the class; left out of the mAP")
    return "\n".join(lines)


# --- devkit result files --------------------------------------------------------------------------


def devkit_image_set(image_sets: str) -> str:
    """The ``<image_set>`` of the result files of ``image_sets``: the set's name for one set
    (``"2007_test"`` -> ``"test"``), the whole text for a union of sets."""
    from odkd.data.voc import parse_image_sets  # here: scoring alone loads no torch

    sets = parse_image_sets(image_sets)
    return sets[0][1] if len(sets) == 1 else image_sets


def results_path(results_dir: str | os.PathLike, image_set: str, class_name: str) -> Path:
    """``results_dir/comp4_det_<image_set>_<class_name>.txt``."""
    return Path(results_dir) / f"comp4_det_{image_set}_{class_name}.txt"


def write_devkit_results(
    results_dir: str | os.PathLike,
    image_set: str,
    class_names: Sequence[str],
    detections: Mapping[str, ClassDetections | tuple],
) -> list[Path]:
    """Write one devkit result file per class (empty for a class without detections); returns the paths.

    Lines are ``<image_id> <score> <xmin> <ymin> <xmax> <ymax>``: score with 6 decimals, devkit pixel
    coordinates with 1.
    """
    unknown = sorted(set(detections) - set(class_names))
    if unknown:
        raise ValueError(f"detections for unknown classes {unknown}; the class list is {list(class_names)}")
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    paths = []
    for name in class_names:
        image_ids, scores, boxes = detections.get(name, _no_detections())
        rows = zip(image_ids, np.asarray(scores).tolist(), np.asarray(boxes).reshape(-1, 4).tolist(), strict=True)
        lines = [f"{i} {s:.6f} {x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}\n" for i, s, (x1, y1, x2, y2) in rows]
        path = results_path(results_dir, image_set, name)
        path.write_text("".join(lines))
        paths.append(path)
    return paths


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _first_malformed_line(lines: Sequence[str]) -> tuple[int, str] | None:
    """1-based number and text of the first line that is neither blank nor ``id score x1 y1 x2 y2``."""
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if fields and not (len(fields) == 6 and all(map(_is_number, fields[1:]))):
            return number, line
    return None


def _read_results_file(path: Path) -> ClassDetections:
    lines = path.read_text().splitlines()
    if not any(map(str.strip, lines)):
        return _no_detections()
    # No image id is longer than the longest line; numpy's C reader then parses the file in one go.
    dtype = [("image_id", f"U{max(map(len, lines))}"), ("score", "f8"), ("box", "f8", (4,))]
    try:
        table = np.loadtxt(lines, dtype=dtype, comments=None, ndmin=1)
    except ValueError as err:
        malformed = _first_malformed_line(lines)
        if malformed is None:
            raise ValueError(f"{path}: {err}") from None
        number, line = malformed
        raise ValueError(
            f"{path}:{number}: malformed line {line!r}; expected '<image_id> <score> <xmin> <ymin> <xmax> <ymax>'"
        ) from None
    return ClassDetections(table["image_id"], table["score"], table["box"])


def read_devkit_results(
    results_dir: str | os.PathLike, image_set: str, class_names: Sequence[str]
) -> dict[str, ClassDetections]:
    """Class name -> detections from the devkit result files in ``results_dir``.

    A missing class file gives no detections for that class, with a warning; a malformed line raises
    ValueError naming the file and line number.
    """
    if not Path(results_dir).is_dir():
        raise FileNotFoundError(f"{results_dir}: results folder does not exist")
    detections = {}
    for name in class_names:
        path = results_path(results_dir, image_set, name)
        if path.is_file():
            detections[name] = _read_results_file(path)
        else:
            warnings.warn(f"{path} does not exist: no detections for {name}", stacklevel=2)
            detections[name] = _no_detections()
    return detections
