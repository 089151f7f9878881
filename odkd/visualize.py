"""Pictures: detections drawn on images, image grids, precision-recall curves."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from odkd.data import DetectionDataset

__all__ = ["draw_detections", "image_grid", "plot_pr_curves", "training_examples", "write_image"]


def _colour(label: int) -> tuple[int, int, int]:
    """A distinct, stable RGB colour per class (golden-ratio hue steps)."""
    hue = int((label * 0.618033988749895 % 1.0) * 179)
    hsv = np.uint8([[[hue, 200, 255]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[int],
    scores: Sequence[float] | None,
    class_names: Sequence[str],
    min_score: float = 0.3,
) -> np.ndarray:
    """A copy of ``image`` (H, W, 3 uint8 RGB) with the detections above ``min_score`` drawn.

    ``boxes``: (K, 4) x1,y1,x2,y2 in pixels of ``image``; ``labels`` 1..C (class_names[label - 1]);
    ``scores`` None for ground truth (every box drawn, names only).
    """
    out = np.ascontiguousarray(image).copy()
    thickness = max(1, round(min(out.shape[:2]) / 250))
    for box, label, score in zip(np.asarray(boxes), labels, scores or [None] * len(labels), strict=True):
        if score is not None and score < min_score:
            continue
        colour = _colour(int(label))
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness)
        text = class_names[int(label) - 1] + ("" if score is None else f" {score:.2f}")
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        top = max(y1 - th - base, 0)
        cv2.rectangle(out, (x1, top), (x1 + tw, top + th + base), colour, -1)
        cv2.putText(out, text, (x1, top + th), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def training_examples(
    dataset: DetectionDataset, keys: Iterable[tuple[int, int]], class_names: Sequence[str]
) -> np.ndarray:
    """A grid of training items exactly as the model gets them: ``dataset[(index, seed)]`` for each of
    ``keys`` (augmented uint8 images at the model's input size), with their boxes and class names drawn."""
    pictures = []
    for key in keys:
        item = dataset[key]
        image = item["image"].permute(1, 2, 0).numpy()  # (3, S, S) uint8 -> (S, S, 3)
        scale = np.array([image.shape[1], image.shape[0]] * 2, dtype=np.float32)
        boxes = item["boxes"].numpy() * scale  # relative -> pixels
        pictures.append(draw_detections(image, boxes, item["labels"].tolist(), None, class_names))
    return image_grid(pictures)


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Save an (H, W, 3) uint8 RGB image (format from the suffix: .png, .jpg), creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        written = cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    except cv2.error as err:  # e.g. an unknown suffix
        raise OSError(f"could not write {path}: {getattr(err, 'err', err)}") from None
    if not written:
        raise OSError(f"could not write {path}")


def image_grid(images: Sequence[np.ndarray], columns: int = 4, cell: int = 320) -> np.ndarray:
    """Images letterboxed into ``cell x cell`` tiles, ``columns`` per row (uint8 RGB)."""
    rows = math.ceil(len(images) / columns)
    grid = np.full((rows * cell, columns * cell, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        scale = cell / max(image.shape[:2])
        h, w = round(image.shape[0] * scale), round(image.shape[1] * scale)
        r, c = divmod(i, columns)
        grid[r * cell : r * cell + h, c * cell : c * cell + w] = cv2.resize(image, (w, h))
    return grid


def plot_pr_curves(
    recall: dict[str, np.ndarray], precision: dict[str, np.ndarray], ap: dict[str, float], path: str | os.PathLike
) -> Path:
    """One precision-recall subplot per class, titled with its AP, saved as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    names = list(recall)
    columns = min(5, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        ax.plot(recall[name], precision[name], linewidth=1.5)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), title=f"{name}  AP {100 * ap[name]:.1f}")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    fig.supxlabel("recall")
    fig.supylabel("precision")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
