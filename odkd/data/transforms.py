"""SSD data augmentation on albumentations + OpenCV.

Train: photometric distortion -> expand (zoom out onto a mean-filled canvas) -> min-IoU random crop
-> horizontal flip -> resize -> tensor. Eval: resize -> tensor. Boxes are clipped to the image after
every step and boxes that vanish are dropped with their labels.

The image leaves as a ``(3, S, S)`` uint8 tensor: normalisation with the model's preprocessing
(:meth:`odkd.models.SSD.normalize`) runs batched on the training device, so a quarter of
the bytes cross to the GPU. Pass ``preprocessing`` to get normalised float32 images here instead.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.transforms_interface import DualTransform

from odkd.models.ssd import Preprocessing

__all__ = ["DetectionTransform", "Expand", "MinIoURandomCrop", "build_transform", "sample_min_iou_crop"]

# SSD's sampling modes: keep the whole image, a crop whose IoU with every object is at least one of
# these, or any crop ("any", no IoU constraint).
MIN_IOUS = (0.1, 0.3, 0.5, 0.7, 0.9)


def sample_min_iou_crop(
    boxes: np.ndarray,
    width: int,
    height: int,
    rng: random.Random,
    min_ious: Sequence[float] = MIN_IOUS,
    min_scale: float = 0.3,
    aspect_range: tuple[float, float] = (0.5, 2.0),
    max_trials: int = 50,
    max_modes: int = 10,
) -> tuple[tuple[int, int, int, int], float | None]:
    """SSD's random crop. Returns ``((x1, y1, x2, y2) pixels, min_iou)``; ``min_iou`` is None for the whole
    image and ``-inf`` for an unconstrained crop.

    A mode is drawn from {whole image, each of ``min_ious``, any}; for up to ``max_trials`` candidates a
    crop of side ``[min_scale, 1]`` of the image's and aspect ``h/w`` in ``aspect_range`` is accepted when
    its IoU with *every* box is >= the mode's bound and at least one box centre lies inside it. If a
    mode finds no crop, another mode is drawn (at most ``max_modes`` times, then the whole image).
    """
    modes: list[float | None] = [None, *min_ious, -np.inf]
    # Up to max_modes x max_trials candidates are tested against the same few boxes: plain Python floats
    # prepared once (x1, y1, x2, y2, area, centre) and a loop that stops at the first failing box are
    # faster here than array operations on a handful of values; the arithmetic is numpy's float64.
    prepared = [
        (x1, y1, x2, y2, (x2 - x1) * (y2 - y1), (x1 + x2) / 2, (y1 + y2) / 2)
        for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4).tolist()
    ]
    for _ in range(max_modes):
        min_iou = rng.choice(modes)
        if min_iou is None:
            break
        for _ in range(max_trials):
            w = int(rng.uniform(min_scale, 1.0) * width)
            h = int(rng.uniform(min_scale, 1.0) * height)
            if w < 1 or h < 1 or not aspect_range[0] <= h / w <= aspect_range[1]:
                continue
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            right, bottom = left + w, top + h
            if not prepared:
                return (left, top, right, bottom), min_iou
            if any(_crop_iou(box, left, top, right, bottom) < min_iou for box in prepared):
                continue
            if any(left < cx < right and top < cy < bottom for *_, cx, cy in prepared):
                return (left, top, right, bottom), min_iou
    return (0, 0, width, height), None


def _crop_iou(box: tuple[float, ...], left: int, top: int, right: int, bottom: int) -> float:
    """IoU of a prepared box ``(x1, y1, x2, y2, area, ...)`` with the crop ``left, top, right, bottom``."""
    x1, y1, x2, y2, area = box[:5]
    inter = max(min(x2, right) - max(x1, left), 0) * max(min(y2, bottom) - max(y1, top), 0)
    return inter / (area + (right - left) * (bottom - top) - inter)


class MinIoURandomCrop(DualTransform):
    """Albumentations wrapper of :func:`sample_min_iou_crop`: crops the image, keeps the boxes whose centre
    lies inside the crop (clipped to it) and drops the others with their labels."""

    def __init__(
        self,
        min_ious: Sequence[float] = MIN_IOUS,
        min_scale: float = 0.3,
        aspect_range: tuple[float, float] = (0.5, 2.0),
        max_trials: int = 50,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.min_ious = tuple(min_ious)
        self.min_scale = min_scale
        self.aspect_range = tuple(aspect_range)
        self.max_trials = max_trials

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        height, width = params["shape"][:2]
        scale = np.array([width, height, width, height], dtype=np.float64)
        raw = np.asarray(data.get("bboxes", ()), dtype=np.float64)
        boxes = raw[:, :4] * scale if raw.size else np.zeros((0, 4))
        rect, _ = sample_min_iou_crop(
            boxes, width, height, self.py_random, self.min_ious, self.min_scale, self.aspect_range, self.max_trials
        )
        return {"crop": rect}

    def apply(self, img: np.ndarray, crop: tuple[int, int, int, int], **params) -> np.ndarray:
        return img[crop[1] : crop[3], crop[0] : crop[2]]

    def apply_to_bboxes(self, bboxes: np.ndarray, crop: tuple[int, int, int, int], **params) -> np.ndarray:
        """``bboxes``: ``(n, 4 + k)`` normalised to the input image (extra columns carry the labels)."""
        height, width = params["shape"][:2]
        scale = np.array([width, height, width, height], dtype=np.float64)
        pixels = bboxes[:, :4] * scale
        centres = (pixels[:, :2] + pixels[:, 2:]) / 2
        inside = (centres[:, 0] > crop[0]) & (centres[:, 0] < crop[2])
        inside &= (centres[:, 1] > crop[1]) & (centres[:, 1] < crop[3])
        out = bboxes[inside].copy()
        offset = np.array(crop[:2] * 2, dtype=np.float64)
        size = np.array([crop[2] - crop[0], crop[3] - crop[1]] * 2, dtype=np.float64)
        out[:, :4] = (np.clip(pixels[inside], offset, np.array(crop[2:] * 2)) - offset) / size
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_ious", "min_scale", "aspect_range", "max_trials")


class Expand(DualTransform):
    """Zoom out: put the image at a random place on a canvas ``U(1, max_ratio)`` times larger per side,
    filled with ``fill`` (the RGB mean, so the padding normalises to ~0)."""

    def __init__(self, max_ratio: float = 4.0, fill: Sequence[float] = (123.675, 116.28, 103.53), p: float = 0.5):
        super().__init__(p=p)
        self.max_ratio = max_ratio
        self.fill = tuple(fill)

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        height, width = params["shape"][:2]
        ratio = self.py_random.uniform(1.0, self.max_ratio)
        canvas = (int(height * ratio), int(width * ratio))
        top = self.py_random.randint(0, canvas[0] - height)
        left = self.py_random.randint(0, canvas[1] - width)
        return {"canvas": canvas, "top": top, "left": left}

    def apply(self, img: np.ndarray, canvas: tuple[int, int], top: int, left: int, **params) -> np.ndarray:
        # copyMakeBorder fills the margin in C++, 20x faster than filling a NumPy canvas.
        bottom, right = canvas[0] - img.shape[0] - top, canvas[1] - img.shape[1] - left
        fill = [round(v) for v in self.fill] if img.dtype == np.uint8 else list(self.fill)
        return cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=fill)

    def apply_to_bboxes(self, bboxes: np.ndarray, canvas: tuple[int, int], top: int, left: int, **params) -> np.ndarray:
        height, width = params["shape"][:2]
        out = bboxes.copy()
        out[:, [0, 2]] = (bboxes[:, [0, 2]] * width + left) / canvas[1]
        out[:, [1, 3]] = (bboxes[:, [1, 3]] * height + top) / canvas[0]
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_ratio", "fill")


class DetectionTransform:
    """``(image (H, W, 3) uint8 RGB, boxes (n, 4) pixels, labels (n,)) -> (image tensor, boxes (m, 4)
    relative to the output image, labels (m,))``."""

    def __init__(self, transforms: list[A.BasicTransform], size: int, preprocessing: Preprocessing | None) -> None:
        self.size = size
        self.preprocessing = preprocessing
        self.compose = A.Compose(
            transforms,
            # Boxes are validated by the dataset; here they are only clipped and the vanished ones dropped.
            bbox_params=A.BboxParams(
                format="pascal_voc", label_fields=["labels"], clip=True, min_width=1, min_height=1
            ),
        )

    def set_seed(self, seed: int) -> None:
        """Reseed the random augmentations (each DataLoader worker calls this with its own seed)."""
        self.compose.set_random_seed(seed)

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        out = self.compose(image=image, bboxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4), labels=labels)
        height, width = out["image"].shape[:2]
        boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4) / np.float32([width, height] * 2)
        image = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        if self.preprocessing is not None:
            image = self.preprocessing.normalize(image[None])[0]
        return image, np.clip(boxes, 0.0, 1.0), np.asarray(out["labels"], dtype=np.int64)


def build_transform(
    train: bool,
    size: int,
    mean: Sequence[float] = (123.675, 116.28, 103.53),
    preprocessing: Preprocessing | None = None,
) -> DetectionTransform:
    """The SSD train (``train=True``) or eval pipeline to ``size x size``.

    ``mean``: RGB fill of the expand canvas (use the model's preprocessing mean). ``preprocessing``:
    normalise here (float32 output) instead of on the device (uint8 output).
    """
    transforms: list[A.BasicTransform] = []
    if train:
        transforms += [
            # SSD's photometric distortion: brightness +-32, contrast and saturation x[0.5, 1.5], hue +-18 deg.
            A.RandomBrightnessContrast(brightness_limit=32 / 255, contrast_limit=0.5, p=0.5),
            A.ColorJitter(brightness=0, contrast=0, saturation=(0.5, 1.5), hue=18 / 360, p=0.5),
            Expand(max_ratio=4.0, fill=mean, p=0.5),
            MinIoURandomCrop(),
            A.HorizontalFlip(p=0.5),
        ]
    transforms.append(A.Resize(size, size))
    return DetectionTransform(transforms, size, preprocessing)
