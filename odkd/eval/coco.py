"""COCO evaluation through pycocotools: AP@[.5:.95], AP50, AP75, AP small/medium/large and ARs.

Detections come as :class:`~odkd.eval.voc.ClassDetections` per class name, boxes in the dataset's
0-based pixels (what :func:`odkd.inference.detect_dataset` returns for a
:class:`~odkd.data.coco.COCODataset`); they are scored against the dataset's own annotation file,
restricted to the images and categories the dataset holds.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from odkd.eval.voc import ClassDetections

__all__ = ["COCO_STATS", "COCOResult", "evaluate_coco", "format_coco_table", "read_coco_results", "write_coco_results"]

# The twelve numbers of COCOeval.summarize(), in its order.
COCO_STATS = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip


@dataclass
class COCOResult:
    """COCO metrics as fractions in [0, 1]; ``mAP`` is AP@[.5:.95] (what "COCO AP" means), nan where a
    class has no ground truth."""

    mAP: float
    stats: dict[str, float]  # COCO_STATS -> value
    ap: dict[str, float]  # per class AP@[.5:.95]
    ap50: dict[str, float]  # per class AP@.5
    metric: str = "coco"

    def to_json(self) -> dict:
        def number(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {
            "metric": self.metric,
            "mAP": number(self.mAP),
            "stats": {k: number(v) for k, v in self.stats.items()},
            "ap": {k: number(v) for k, v in self.ap.items()},
            "ap50": {k: number(v) for k, v in self.ap50.items()},
        }


def _results(detections: Mapping[str, ClassDetections | tuple], dataset) -> list[dict]:
    """pycocotools' result records: image id, category id, ``[x, y, w, h]``, score."""
    records = []
    for name, category in zip(dataset.class_names, dataset.category_ids, strict=True):
        if name not in detections:
            continue
        image_ids, scores, boxes = detections[name]
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        xywh = np.concatenate((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), axis=1)
        rows = zip(np.asarray(image_ids).tolist(), np.asarray(scores).tolist(), xywh.tolist(), strict=True)
        records += [{"image_id": int(i), "category_id": category, "bbox": box, "score": s} for i, s, box in rows]
    return records


def write_coco_results(detections: Mapping[str, ClassDetections | tuple], dataset, path: str | os.PathLike) -> Path:
    """Write ``detections`` as a COCO results file (a JSON list of ``{image_id, category_id, bbox, score}``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_results(detections, dataset)))
    return path


def read_coco_results(path: str | os.PathLike, dataset) -> dict[str, ClassDetections]:
    """A COCO results file (any tool's) as per-class detections for :func:`evaluate_coco`; records of
    categories outside ``dataset``'s class list are left out."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: results file does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    name_of = dict(zip(dataset.category_ids, dataset.class_names, strict=True))
    images = {str(i) for i in dataset.coco_ids}
    parts: dict[str, list[tuple[str, float, list[float]]]] = {name: [] for name in dataset.class_names}
    for record in records if isinstance(records, list) else [records]:
        try:
            image_id, category, (x, y, w, h), score = (
                str(record["image_id"]),
                record["category_id"],
                record["bbox"],
                float(record["score"]),
            )
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: {record!r} is not a COCO result (image_id, category_id, bbox, score)") from None
        if image_id not in images:
            raise ValueError(f"{path}: {record!r} names an image the ground truth does not have")
        if category not in name_of:  # a class left out of the evaluated class list
            continue
        parts[name_of[category]].append((image_id, score, [x, y, x + w, y + h]))
    return {
        name: ClassDetections(
            np.array([p[0] for p in rows], dtype=str),
            np.array([p[1] for p in rows], dtype=np.float64),
            np.array([p[2] for p in rows], dtype=np.float64).reshape(-1, 4),
        )
        for name, rows in parts.items()
    }


def evaluate_coco(detections: Mapping[str, ClassDetections | tuple], dataset) -> COCOResult:
    """COCO metrics of ``detections`` (class name -> detections) on ``dataset`` (a
    :class:`~odkd.data.coco.COCODataset`)."""
    try:
        from pycocotools.cocoeval import COCOeval
    except ImportError as err:
        raise ImportError('COCO evaluation needs pycocotools: pip install -e ".[coco]"') from err

    records = _results(detections, dataset)
    nan = float("nan")
    if not records:  # pycocotools cannot load an empty result list; nothing detected scores 0
        labels = {int(label) for ann in dataset.annotations for label in ann.labels}
        ap = {name: 0.0 if k in labels else nan for k, name in enumerate(dataset.class_names, start=1)}
        return COCOResult(0.0, {k: 0.0 for k in COCO_STATS}, ap, dict(ap))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools narrates every step on stdout
        ground_truth = _ground_truth(Path(dataset.annotation_file))
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(records), "bbox")
        evaluation.params.imgIds = list(dataset.coco_ids)
        evaluation.params.catIds = list(dataset.category_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # precision: [IoU threshold (10), recall (101), class, area (all, s, m, l), max detections (1, 10, 100)]
    precision = evaluation.eval["precision"][:, :, :, 0, -1]

    def mean_valid(p: np.ndarray) -> float:
        valid = p[p > -1]
        return float(valid.mean()) if valid.size else nan

    # pycocotools sorts params.catIds: the class axis is in category-id order, not the class list's.
    column = [evaluation.params.catIds.index(category) for category in dataset.category_ids]
    ap = {name: mean_valid(precision[:, :, k]) for name, k in zip(dataset.class_names, column, strict=True)}
    ap50 = {name: mean_valid(precision[0, :, k]) for name, k in zip(dataset.class_names, column, strict=True)}
    stats = {k: (nan if v < 0 else float(v)) for k, v in zip(COCO_STATS, evaluation.stats, strict=True)}
    return COCOResult(stats["AP"], stats, ap, ap50)


def _ground_truth(path: Path):
    """pycocotools' index of the annotation file, loaded once per file version (about 1 s for val2017,
    at every evaluation of a training run otherwise)."""
    stat = path.stat()
    return _load_ground_truth(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _load_ground_truth(path: str, mtime_ns: int, size: int):
    from pycocotools.coco import COCO

    return COCO(path)


def format_coco_table(result: COCOResult) -> str:
    """Per-class AP and AP50 (percent) and the summary numbers."""

    def percent(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{100 * x:.2f}"

    width = max([len("class"), *map(len, result.ap)])
    lines = ["COCO AP (IoU 0.50:0.95, area all, 100 detections)", f"{'class':<{width}}  {'AP %':>6}  {'AP50 %':>6}"]
    lines += [f"{name:<{width}}  {percent(result.ap[name]):>6}  {percent(result.ap50[name]):>6}" for name in result.ap]
    lines.append("-" * (width + 16))
    lines.append("  ".join(f"{k} {percent(v)}" for k, v in list(result.stats.items())[:6]))
    lines.append("  ".join(f"{k} {percent(v)}" for k, v in list(result.stats.items())[6:]))
    return "\n".join(lines)
