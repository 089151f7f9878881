"""SSD data augmentation on albumentations + OpenCV.

Train: photometric distortion (:class:`PhotometricDistort`) -> expand (zoom out onto a mean-filled
canvas) -> min-IoU random crop -> horizontal flip -> resize -> tensor, the four geometric steps done as
one (:class:`ExpandCropFlipResize`). Eval: resize -> tensor. Boxes are clipped to the image and boxes that
vanish (under one output pixel) are dropped with their labels.

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
from albumentations.core.transforms_interface import DualTransform, ImageOnlyTransform

from odkd.augmentation import MIN_IOUS, Augmentation
from odkd.preprocessing import Preprocessing

__all__ = [
    "DetectionTransform",
    "ExpandCropFlipResize",
    "PhotometricDistort",
    "build_transform",
    "sample_min_iou_crop",
]


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


CHANNEL_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
_LEVELS = np.arange(256, dtype=np.float32)


class PhotometricDistort(ImageOnlyTransform):
    """SSD's photometric distortion (ssd.pytorch's and lufficc/SSD's) on uint8 RGB. Each step is drawn on
    its own with probability ``p_each``: brightness ``+ U(-brightness, brightness)``; contrast ``x
    U(contrast)``, before or after (a fair coin) the HSV steps, saturation ``x U(saturation)`` and hue
    ``+ U(-hue, hue)`` degrees; then, with probability ``channel_swap_p``, the channels in one of their
    six orders (identity included).

    The references work in float and never clip; here each step clips to 0-255 (as torchvision's
    ``RandomPhotometricDistort`` does) so the image stays uint8. Brightness and contrast are one lookup
    table; hue and saturation another on OpenCV's 8-bit full-circle HSV (256 hue steps of 1.4 degrees).
    """

    def __init__(
        self,
        brightness: float = 32.0,
        contrast: tuple[float, float] = (0.5, 1.5),
        saturation: tuple[float, float] = (0.5, 1.5),
        hue: float = 18.0,
        p_each: float = 0.5,
        channel_swap_p: float = 0.5,
    ) -> None:
        super().__init__(p=1.0)
        self.brightness, self.contrast, self.saturation = brightness, tuple(contrast), tuple(saturation)
        self.hue, self.p_each, self.channel_swap_p = hue, p_each, channel_swap_p

    def get_params(self) -> dict:
        rng, p = self.py_random, self.p_each
        return {
            "brightness": rng.uniform(-self.brightness, self.brightness) if rng.random() < p else 0.0,
            "contrast": rng.uniform(*self.contrast) if rng.random() < p else 1.0,
            "contrast_first": rng.random() < 0.5,
            "saturation": rng.uniform(*self.saturation) if rng.random() < p else 1.0,
            "hue": rng.uniform(-self.hue, self.hue) if rng.random() < p else 0.0,
            "channels": rng.choice(CHANNEL_ORDERS) if rng.random() < self.channel_swap_p else CHANNEL_ORDERS[0],
        }

    def apply(
        self,
        img: np.ndarray,
        brightness: float,
        contrast: float,
        contrast_first: bool,
        saturation: float,
        hue: float,
        channels: tuple[int, int, int],
        **params,
    ) -> np.ndarray:
        """``img`` ``(H, W, 3)`` uint8 RGB with the drawn parameters applied (degrees for ``hue``)."""
        hsv_steps = saturation != 1.0 or hue != 0.0
        contrast_first = contrast_first or not hsv_steps  # with nothing between, one table does both
        before = np.clip(_LEVELS + brightness, 0, 255)
        if contrast_first:
            before = np.clip(before * contrast, 0, 255)
        if brightness or (contrast_first and contrast != 1.0):
            img = cv2.LUT(img, np.round(before).astype(np.uint8))
        if hsv_steps:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)  # hue 0-255 for the full circle
            hue_lut = np.round(_LEVELS + hue * 256 / 360) % 256
            lut = np.stack((hue_lut, np.clip(np.round(_LEVELS * saturation), 0, 255), _LEVELS), axis=-1)
            img = cv2.cvtColor(cv2.LUT(hsv, lut.astype(np.uint8)[None]), cv2.COLOR_HSV2RGB_FULL)
        if not contrast_first and contrast != 1.0:
            img = cv2.LUT(img, np.clip(np.round(_LEVELS * contrast), 0, 255).astype(np.uint8))
        if tuple(channels) != CHANNEL_ORDERS[0]:  # mixChannels: 7x faster than NumPy's img[..., channels]
            swapped = np.empty_like(img)
            cv2.mixChannels([img], [swapped], [channels[0], 0, channels[1], 1, channels[2], 2])
            img = swapped
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness", "contrast", "saturation", "hue", "p_each", "channel_swap_p")


class ExpandCropFlipResize(DualTransform):
    """SSD's geometric augmentation in one step: expand (zoom out onto a ``fill`` canvas ``U(1, max_ratio)``
    times larger per side, with probability ``expand_p``), the min-IoU random crop of
    :func:`sample_min_iou_crop` (keeping the boxes whose centre lies inside it, clipped to it; none when
    ``crop`` is false), horizontal flip (probability ``flip_p``) and resize to ``size x size`` (bilinear).

    The output is, up to rounding, what the four steps give one after another, but only the crop of the
    canvas is ever built (the canvas itself can be 16x the image), the flip runs on the small output
    (bilinear resizing commutes with a flip) and the boxes are checked once, not after every step.
    """

    def __init__(
        self,
        size: int,
        fill: Sequence[float] = (123.675, 116.28, 103.53),
        max_ratio: float = 4.0,
        expand_p: float = 0.5,
        flip_p: float = 0.5,
        min_ious: Sequence[float] = MIN_IOUS,
        min_scale: float = 0.3,
        aspect_range: tuple[float, float] = (0.5, 2.0),
        max_trials: int = 50,
        crop: bool = True,
    ) -> None:
        super().__init__(p=1.0)
        self.size, self.fill, self.max_ratio = size, tuple(fill), max_ratio
        self.expand_p, self.flip_p = expand_p, flip_p
        self.min_ious, self.min_scale = tuple(min_ious), min_scale
        self.aspect_range, self.max_trials, self.crop = tuple(aspect_range), max_trials, crop

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        """``offset``: where the image lies on the canvas; ``crop``: ``(x1, y1, x2, y2)`` canvas pixels."""
        height, width = params["shape"][:2]
        canvas_w, canvas_h, left, top = width, height, 0, 0
        if self.py_random.random() < self.expand_p:
            ratio = self.py_random.uniform(1.0, self.max_ratio)
            canvas_w, canvas_h = int(width * ratio), int(height * ratio)
            left, top = self.py_random.randint(0, canvas_w - width), self.py_random.randint(0, canvas_h - height)
        raw = np.asarray(data.get("bboxes", ()), dtype=np.float64)
        boxes = raw[:, :4] * [width, height, width, height] + [left, top, left, top] if raw.size else np.zeros((0, 4))
        crop = (0, 0, canvas_w, canvas_h)
        if self.crop:
            crop, _ = sample_min_iou_crop(
                boxes, canvas_w, canvas_h, self.py_random,
                self.min_ious, self.min_scale, self.aspect_range, self.max_trials,
            )  # fmt: skip
        return {"offset": (left, top), "crop": crop, "flip": self.py_random.random() < self.flip_p}

    def apply(
        self, img: np.ndarray, offset: tuple[int, int], crop: tuple[int, int, int, int], flip: bool, **params
    ) -> np.ndarray:
        out = cv2.resize(self._canvas_crop(img, offset, crop), (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        return cv2.flip(out, 1) if flip else out

    def _canvas_crop(self, img: np.ndarray, offset: tuple[int, int], crop: tuple[int, int, int, int]) -> np.ndarray:
        """The ``crop`` of the expanded canvas: the part of the image inside it, bordered with the fill."""
        x1, y1, x2, y2 = crop[0] - offset[0], crop[1] - offset[1], crop[2] - offset[0], crop[3] - offset[1]
        height, width = img.shape[:2]
        inner = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)  # the crop on the image itself
        fill = [round(v) for v in self.fill] if img.dtype == np.uint8 else list(self.fill)
        if inner[0] >= inner[2] or inner[1] >= inner[3]:  # only an unconstrained crop with no box can miss it
            return np.full((y2 - y1, x2 - x1, img.shape[2]), fill, dtype=img.dtype)
        pads = inner[1] - y1, y2 - inner[3], inner[0] - x1, x2 - inner[2]
        part = img[inner[1] : inner[3], inner[0] : inner[2]]
        # copyMakeBorder fills the margin in C++, 20x faster than filling a NumPy canvas.
        return cv2.copyMakeBorder(part, *pads, cv2.BORDER_CONSTANT, value=fill) if any(pads) else part

    def apply_to_bboxes(
        self, bboxes: np.ndarray, offset: tuple[int, int], crop: tuple[int, int, int, int], flip: bool, **params
    ) -> np.ndarray:
        """``bboxes``: ``(n, 4 + k)`` normalised to the input image (extra columns carry the labels);
        returns the kept ones normalised to the output."""
        height, width = params["shape"][:2]
        pixels = bboxes[:, :4] * [width, height, width, height] + [*offset, *offset]  # canvas pixels
        centres = (pixels[:, :2] + pixels[:, 2:]) / 2
        inside = ((centres > crop[:2]) & (centres < crop[2:])).all(axis=1)
        out = bboxes[inside].copy()
        low, high = crop[:2] * 2, crop[2:] * 2  # (x1, y1, x1, y1) and (x2, y2, x2, y2)
        size = [crop[2] - crop[0], crop[3] - crop[1]] * 2
        out[:, :4] = (np.clip(pixels[inside], low, high) - low) / size
        if flip:
            out[:, [0, 2]] = 1.0 - out[:, [2, 0]]
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return (
            "size",
            "fill",
            "max_ratio",
            "expand_p",
            "flip_p",
            "min_ious",
            "min_scale",
            "aspect_range",
            "max_trials",
            "crop",
        )


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
        """Reseed the random augmentations (the dataset does, with each training item's own seed).

        Each transform gets its own stream spawned from ``seed``: albumentations seeds them all alike, so
        every p = 0.5 decision of an item would come from the same first draw (photometric distortion,
        expand and flip all applied, or none)."""
        self.compose.set_random_seed(seed)
        streams = np.random.SeedSequence(seed).generate_state(len(self.compose.transforms))
        for transform, stream in zip(self.compose.transforms, streams.tolist(), strict=True):
            transform.set_random_seed(stream)

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
    augment: Augmentation | None = None,
) -> DetectionTransform:
    """The SSD train (``train=True``) or eval pipeline to ``size x size``.

    ``mean``: RGB fill of the expand canvas (use the model's preprocessing mean). ``preprocessing``:
    normalise here (float32 output) instead of on the device (uint8 output). ``augment``: the train
    augmentation's settings (default: SSD's).
    """
    transforms: list[A.BasicTransform] = []
    if train:
        a = augment or Augmentation()
        if problems := a.problems():
            raise ValueError(f"augmentation settings: {'; '.join(problems)}")
        distort = PhotometricDistort(a.brightness, a.contrast, a.saturation, a.hue, a.distort_p, a.channel_swap_p)
        geometry = ExpandCropFlipResize(
            size, mean, a.expand_max_ratio, a.expand_p, a.flip_p,
            a.min_ious, a.min_crop_scale, a.crop_aspect, crop=a.crop,
        )  # fmt: skip
        transforms += [distort, geometry]
    else:
        transforms.append(A.Resize(size, size))
    return DetectionTransform(transforms, size, preprocessing)
