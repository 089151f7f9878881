"""SSD augmentation: photometric distortion, the crop's IoU rule, expand and flip geometry, and valid
boxes whatever happens."""

import colorsys
import itertools
import random

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from odkd.augmentation import Augmentation
from odkd.data.transforms import (
    CHANNEL_ORDERS,
    DetectionTransform,
    ExpandCropFlipResize,
    PhotometricDistort,
    build_transform,
    sample_min_iou_crop,
)
from odkd.preprocessing import IMAGENET


def iou(box, rect):
    iw = max(0.0, min(box[2], rect[2]) - max(box[0], rect[0]))
    ih = max(0.0, min(box[3], rect[3]) - max(box[1], rect[1]))
    inter = iw * ih
    return inter / ((box[2] - box[0]) * (box[3] - box[1]) + (rect[2] - rect[0]) * (rect[3] - rect[1]) - inter)


def test_crop_honours_its_iou_constraint():
    rng = random.Random(0)
    np_rng = np.random.default_rng(0)
    seen = set()
    for _ in range(2000):
        width, height = int(np_rng.integers(100, 500)), int(np_rng.integers(100, 500))
        if np_rng.random() < 0.3:  # one large object: the only kind a 0.9 crop can satisfy
            x1, y1 = np_rng.uniform(0, 0.1 * width), np_rng.uniform(0, 0.1 * height)
            boxes = np.array([[x1, y1, x1 + 0.8 * width, y1 + 0.8 * height]])
        else:
            n = int(np_rng.integers(1, 5))
            x1, y1 = np_rng.uniform(0, width - 20, n), np_rng.uniform(0, height - 20, n)
            x2 = np.minimum(x1 + np_rng.uniform(10, 300, n), width)
            y2 = np.minimum(y1 + np_rng.uniform(10, 300, n), height)
            boxes = np.stack([x1, y1, x2, y2], axis=1)
        rect, min_iou = sample_min_iou_crop(boxes, width, height, rng)
        seen.add(min_iou)
        if min_iou is None:
            assert rect == (0, 0, width, height)
            continue
        w, h = rect[2] - rect[0], rect[3] - rect[1]
        assert rect[0] >= 0 and rect[1] >= 0 and rect[2] <= width and rect[3] <= height
        assert 0.3 * width - 1 <= w <= width and 0.3 * height - 1 <= h <= height
        assert 0.5 <= h / w <= 2.0
        # The rule the reference implementations get wrong: every object overlaps the crop enough.
        assert all(iou(b, rect) >= min_iou for b in boxes)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        assert any(rect[0] < cx < rect[2] and rect[1] < cy < rect[3] for cx, cy in centres)
    assert {None, 0.1, 0.3, 0.5, 0.7, 0.9, -np.inf} <= seen


def reference_min_iou_crop(boxes, width, height, rng, min_ious=(0.1, 0.3, 0.5, 0.7, 0.9), max_trials=50):
    """SSD's crop sampling written plainly with arrays: the same random draws in the same order."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    for _ in range(10):
        min_iou = rng.choice([None, *min_ious, -np.inf])
        if min_iou is None:
            break
        for _ in range(max_trials):
            w, h = int(rng.uniform(0.3, 1.0) * width), int(rng.uniform(0.3, 1.0) * height)
            if w < 1 or h < 1 or not 0.5 <= h / w <= 2.0:
                continue
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            rect = (left, top, left + w, top + h)
            if len(boxes) == 0:
                return rect, min_iou
            low, high = np.maximum(boxes[:, :2], rect[:2]), np.minimum(boxes[:, 2:], rect[2:])
            inter = np.prod(np.maximum(high - low, 0), axis=1)
            areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
            if (inter / (areas + w * h - inter)).min() < min_iou:
                continue
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            if ((centres > rect[:2]) & (centres < rect[2:])).all(axis=1).any():
                return rect, min_iou
    return (0, 0, width, height), None


def test_crop_sampler_makes_the_reference_choices():
    np_rng = np.random.default_rng(1)
    for case in range(1500):
        width, height = int(np_rng.integers(50, 1500)), int(np_rng.integers(50, 1500))
        n = [0, 1, 2, 3, 5, 40][case % 6]  # up to a crowded VOC image
        x1, y1 = np_rng.uniform(0, width * 0.9, n), np_rng.uniform(0, height * 0.9, n)
        boxes = np.stack([x1, y1, x1 + np_rng.uniform(1, width / 2, n), y1 + np_rng.uniform(1, height / 2, n)], 1)
        got = sample_min_iou_crop(boxes, width, height, random.Random(case))
        assert got == reference_min_iou_crop(boxes, width, height, random.Random(case)), case


def test_geometry_keeps_boxes_whose_centre_is_inside_clips_and_flips_them():
    step = ExpandCropFlipResize(size=100, fill=(1, 2, 3))
    # A 100 x 50 image at (20, 10) on the canvas, cropped to canvas (10, 0)-(110, 50), flipped.
    params = {"offset": (20, 10), "crop": (10, 0, 110, 50), "flip": True, "shape": (50, 100, 3)}
    # Normalised to the image, label in the last column. In canvas pixels: (30, 15, 50, 55), centre (40, 35)
    # inside -> clipped (30, 15, 50, 50) -> crop-relative (0.2, 0.3, 0.4, 1) -> flipped (0.6, 0.3, 0.8, 1);
    # (20, 10, 120, 60) -> (10, 10, 100, 50) in the crop -> (0.1, 0.2, 1, 1) -> (0, 0.2, 0.9, 1);
    # (105, 10, 120, 20) has its centre (112.5, 15) right of the crop: dropped with its label.
    boxes = np.array([[0.1, 0.1, 0.3, 0.9, 1], [0, 0, 1, 1, 2], [0.85, 0, 1, 0.2, 3]])
    out = step.apply_to_bboxes(boxes, **params)
    np.testing.assert_allclose(out, [[0.6, 0.3, 0.8, 1.0, 1], [0.0, 0.2, 0.9, 1.0, 2]], atol=1e-12)
    # The pixels: canvas x < 20 or y < 10 is fill; the crop is stretched x2 vertically, then flipped.
    image = np.full((50, 100, 3), 200, dtype=np.uint8)
    pixels = step.apply(image, **params)
    assert pixels.shape == (100, 100, 3)
    assert (pixels[5, 50] == [1, 2, 3]).all()  # row 5 -> canvas y 2.25: above the image
    assert (pixels[60, 95] == [1, 2, 3]).all()  # column 95 -> unflipped column 4 -> canvas x 14
    assert (pixels[60, 5] == 200).all() and (pixels[60, 50] == 200).all()


def steps_apart(image, boxes, offset, crop, flip, size, fill):
    """Expand, crop, flip and resize one after another, the plain way: the whole canvas is built."""
    height, width = image.shape[:2]
    left, top = offset
    canvas_h, canvas_w = max(crop[3], top + height), max(crop[2], left + width)
    canvas = np.empty((canvas_h, canvas_w, 3), dtype=image.dtype)
    canvas[:] = fill
    canvas[top : top + height, left : left + width] = image
    part = canvas[crop[1] : crop[3], crop[0] : crop[2]]
    if flip:
        part = part[:, ::-1]
    out = cv2.resize(np.ascontiguousarray(part), (size, size), interpolation=cv2.INTER_LINEAR)
    kept = []
    for x1, y1, x2, y2 in boxes:
        x1, y1, x2, y2 = x1 + left, y1 + top, x2 + left, y2 + top
        if not (crop[0] < (x1 + x2) / 2 < crop[2] and crop[1] < (y1 + y2) / 2 < crop[3]):
            continue
        x1, x2 = min(max(x1, crop[0]), crop[2]) - crop[0], min(max(x2, crop[0]), crop[2]) - crop[0]
        y1, y2 = min(max(y1, crop[1]), crop[3]) - crop[1], min(max(y2, crop[1]), crop[3]) - crop[1]
        w, h = crop[2] - crop[0], crop[3] - crop[1]
        if flip:
            x1, x2 = w - x2, w - x1
        kept.append([x1 / w, y1 / h, x2 / w, y2 / h])
    return out, np.array(kept).reshape(-1, 4)


def test_one_step_geometry_equals_the_steps_apart():
    rng = np.random.default_rng(0)
    fill = (124, 116, 104)
    for case in range(300):
        height, width = int(rng.integers(20, 200)), int(rng.integers(20, 200))
        image = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (5, 5), 2)
        ratio = 1.0 if case % 3 == 0 else rng.uniform(1, 4)
        canvas_w, canvas_h = int(width * ratio), int(height * ratio)
        offset = int(rng.integers(0, canvas_w - width + 1)), int(rng.integers(0, canvas_h - height + 1))
        cw, ch = int(rng.integers(1, canvas_w + 1)), int(rng.integers(1, canvas_h + 1))
        x1, y1 = int(rng.integers(0, canvas_w - cw + 1)), int(rng.integers(0, canvas_h - ch + 1))
        crop, flip, size = (x1, y1, x1 + cw, y1 + ch), bool(case % 2), int(rng.choice([32, 64, 300]))
        n = int(rng.integers(0, 6))
        bx, by = rng.uniform(0, width - 1, n), rng.uniform(0, height - 1, n)
        boxes = np.stack(
            [
                bx,
                by,
                np.minimum(bx + rng.uniform(1, width, n), width),
                np.minimum(by + rng.uniform(1, height, n), height),
            ],
            1,
        )
        expected_image, expected_boxes = steps_apart(image, boxes, offset, crop, flip, size, fill)

        step = ExpandCropFlipResize(size, fill=fill)
        params = {"offset": offset, "crop": crop, "flip": flip, "shape": image.shape}
        got = step.apply(image, **params)
        # Bilinear resizing and a flip commute up to the rounding of the interpolation weights.
        assert got.shape == expected_image.shape and np.abs(got.astype(int) - expected_image).max() <= 1, case
        normalised = np.concatenate([boxes / [width, height, width, height], np.arange(n)[:, None]], 1)
        got_boxes = step.apply_to_bboxes(normalised, **params)
        np.testing.assert_allclose(got_boxes[:, :4], expected_boxes, atol=1e-9, err_msg=str(case))


def test_geometry_draws_expand_crop_and_flip_as_configured():
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    boxes = np.array([[0.2, 0.2, 0.6, 0.7]])
    step = ExpandCropFlipResize(64)
    draws = []
    for seed in range(400):
        step.set_random_seed(seed)
        params = step.get_params_dependent_on_data({"shape": image.shape}, {"bboxes": boxes})
        (left, top), crop, flip = params["offset"], params["crop"], params["flip"]
        expanded = (left, top) != (0, 0) or crop[2] > 160 or crop[3] > 120
        assert 0 <= crop[0] < crop[2] and 0 <= crop[1] < crop[3]
        draws.append((expanded, flip, crop == (0, 0, crop[2], crop[3]) and not expanded))
    expanded, flipped, _ = np.mean(draws, axis=0)
    assert 0.4 < expanded < 0.6 and 0.4 < flipped < 0.6  # p = 0.5 each (a few expansions land at (0, 0))
    never = ExpandCropFlipResize(64, expand_p=0.0, flip_p=0.0)
    never.set_random_seed(0)
    params = never.get_params_dependent_on_data({"shape": image.shape}, {"bboxes": boxes})
    assert params["offset"] == (0, 0) and not params["flip"]
    assert params["crop"][2] <= 160 and params["crop"][3] <= 120


def photometric_decisions(params: dict) -> list[bool]:
    """Which of the five steps of :class:`PhotometricDistort` the parameters apply."""
    return [
        params["brightness"] != 0.0,
        params["contrast"] != 1.0,
        params["saturation"] != 1.0,
        params["hue"] != 0.0,
        tuple(params["channels"]) != (0, 1, 2),
    ]


def test_each_augmentation_of_an_item_decides_independently():
    """The item's seed must not make its p = 0.5 choices alike: albumentations seeds every transform with
    the same number, which applied photometric distortion, expand and flip all together or not at all."""
    transform = build_transform(True, 64)
    photometric, geometry = transform.compose.transforms
    image_shape, boxes = (120, 160, 3), np.array([[0.2, 0.2, 0.6, 0.7]])
    decisions = []
    for seed in range(400):
        transform.set_seed(seed)
        row = photometric_decisions(photometric.get_params())[:4]  # the channel swap is p = 5/12
        params = geometry.get_params_dependent_on_data({"shape": image_shape}, {"bboxes": boxes})
        crop = params["crop"]
        row += [params["offset"] != (0, 0) or crop[2] > 160 or crop[3] > 120, params["flip"]]
        decisions.append(row)
    decisions = np.array(decisions)
    assert ((decisions.mean(axis=0) > 0.4) & (decisions.mean(axis=0) < 0.6)).all()  # each p = 0.5
    for i, j in itertools.combinations(range(decisions.shape[1]), 2):
        assert 0.4 < (decisions[:, i] == decisions[:, j]).mean() < 0.6, (i, j)  # independent, not the same draw
    transform.set_seed(7)
    first = photometric.get_params()
    transform.set_seed(7)
    assert photometric.get_params() == first  # and still reproducible from the seed


def distort(pixel, **params) -> list[int]:
    """One RGB pixel through PhotometricDistort with the given parameters (the rest: no change)."""
    full = {"brightness": 0.0, "contrast": 1.0, "contrast_first": True, "saturation": 1.0, "hue": 0.0}
    image = np.full((4, 4, 3), pixel, dtype=np.uint8)
    out = PhotometricDistort().apply(image, **{**full, "channels": (0, 1, 2), **params})
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3) and (out == out[0, 0]).all()
    return out[0, 0].tolist()


def hsv_reference(pixel, saturation: float = 1.0, hue_degrees: float = 0.0) -> np.ndarray:
    """The same step in float with colorsys (no 8-bit HSV)."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in pixel))
    return np.array(colorsys.hsv_to_rgb((h + hue_degrees / 360) % 1.0, min(s * saturation, 1.0), v)) * 255


def test_photometric_steps_by_hand():
    assert distort((100, 50, 0), brightness=20.0, contrast=1.5) == [180, 105, 30]  # (v + 20) x 1.5
    # Clipped after each step: 100 + 200 -> 255, x 0.5 -> 127.5 -> 128 (the references' float gives 150).
    assert distort((100, 100, 100), brightness=200.0, contrast=0.5) == [128, 128, 128]
    assert distort((10, 20, 30), channels=(2, 0, 1)) == [30, 10, 20]
    # Hue and saturation against colorsys: within 8-bit HSV's rounding (1.4 degrees of hue, 1/255 of S).
    for pixel, sat, hue in [((255, 0, 0), 1.0, 18.0), ((200, 100, 100), 0.5, 0.0), ((40, 180, 90), 1.4, -18.0)]:
        np.testing.assert_allclose(distort(pixel, saturation=sat, hue=hue), hsv_reference(pixel, sat, hue), atol=4)
    # Contrast before or after the HSV steps, where clipping makes the order show: (200, 100, 100) x 1.5
    # = (255, 150, 150), hue + 18 deg -> (255, 181.5, 150); hue first -> (200, 130, 100), x 1.5 -> (255, 195, 150).
    np.testing.assert_allclose(distort((200, 100, 100), contrast=1.5, hue=18.0), [255, 181.5, 150], atol=4)
    np.testing.assert_allclose(
        distort((200, 100, 100), contrast=1.5, hue=18.0, contrast_first=False), [255, 195, 150], atol=4
    )


def test_photometric_draws_follow_ssd():
    """Each step p = 0.5 on its own, contrast before or after HSV by a fair coin, every channel order alike
    (identity included, so a visible swap is 5/12), values in SSD's ranges."""
    distortion = PhotometricDistort()
    distortion.set_random_seed(0)
    draws = [distortion.get_params() for _ in range(4000)]
    applied = np.array([photometric_decisions(d) for d in draws])
    np.testing.assert_allclose(applied.mean(axis=0), [0.5, 0.5, 0.5, 0.5, 5 / 12], atol=0.03)
    for i, j in itertools.combinations(range(4), 2):
        assert abs((applied[:, i] & applied[:, j]).mean() - 0.25) < 0.03, (i, j)  # independent
    assert abs(np.mean([d["contrast_first"] for d in draws]) - 0.5) < 0.03
    orders = [tuple(d["channels"]) for d, a in zip(draws, applied[:, 4], strict=True) if a]
    counts = np.array([orders.count(order) for order in CHANNEL_ORDERS[1:]]) / len(orders)
    np.testing.assert_allclose(counts, 0.2, atol=0.03)  # the five visible orders alike
    for key, low, high in [("brightness", -32, 32), ("contrast", 0.5, 1.5), ("saturation", 0.5, 1.5), ("hue", -18, 18)]:
        values = np.array([d[key] for d in draws])
        assert low <= values.min() and values.max() <= high
        used = values[(values != 0) & (values != 1)]
        assert np.quantile(used, 0.05) < low + 0.1 * (high - low) and np.quantile(used, 0.95) > high - 0.1 * (
            high - low
        )


def test_augmentation_settings_reach_the_steps():
    """``data.augment``: with every step off the train pipeline is the eval resize, pixel for pixel; each
    probability and range reaches its step."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    boxes, labels = np.array([[10, 20, 60, 80], [70, 5, 119, 40]], dtype=np.float32), np.array([1, 2])
    off = Augmentation(distort_p=0.0, channel_swap_p=0.0, expand_p=0.0, crop=False, flip_p=0.0)
    resized, expected_boxes, _ = build_transform(False, 64)(image, boxes, labels)
    train = build_transform(True, 64, augment=off)
    for seed in range(5):
        train.set_seed(seed)
        tensor, out_boxes, out_labels = train(image, boxes, labels)
        assert torch.equal(tensor, resized)
        np.testing.assert_allclose(out_boxes, expected_boxes, atol=1e-6)
        np.testing.assert_allclose(out_boxes, boxes / [120, 90, 120, 90], atol=1e-6)  # by hand
        assert out_labels.tolist() == [1, 2]

    settings_ = Augmentation(distort_p=1.0, brightness=8, contrast=[0.9, 1.1], hue=5, channel_swap_p=0.0, flip_p=1.0)
    distort, geometry = build_transform(True, 64, augment=settings_).compose.transforms
    distort.set_random_seed(0)
    for params in (distort.get_params() for _ in range(200)):
        assert photometric_decisions(params)[:4] == [True] * 4 and tuple(params["channels"]) == (0, 1, 2)
        assert abs(params["brightness"]) <= 8 and 0.9 <= params["contrast"] <= 1.1 and abs(params["hue"]) <= 5
    assert geometry.flip_p == 1.0 and geometry.crop and geometry.min_ious == (0.1, 0.3, 0.5, 0.7, 0.9)
    with pytest.raises(ValueError, match=r"flip_p is a probability, got -1"):
        build_transform(True, 64, augment=Augmentation(flip_p=-1))


def test_flip_maps_boxes_exactly():
    image = np.zeros((50, 100, 3), dtype=np.uint8)
    transform = DetectionTransform([A.HorizontalFlip(p=1.0)], size=100, preprocessing=None)
    _, boxes, labels = transform(
        image, np.array([[10, 5, 30, 45], [0, 0, 100, 50]], dtype=np.float32), np.array([4, 1])
    )
    # x -> W - x: (10, 30) -> (70, 90); relative to 100x50.
    np.testing.assert_allclose(boxes, [[0.7, 0.1, 0.9, 0.9], [0.0, 0.0, 1.0, 1.0]], atol=1e-6)
    assert labels.tolist() == [4, 1]


def test_eval_transform_resizes_and_can_normalise():
    image = np.full((50, 100, 3), 255, dtype=np.uint8)
    tensor, boxes, _ = build_transform(False, 300)(image, np.array([[0, 0, 50, 25]], dtype=np.float32), np.array([1]))
    assert tensor.shape == (3, 300, 300) and tensor.dtype == torch.uint8
    np.testing.assert_allclose(boxes, [[0.0, 0.0, 0.5, 0.5]], atol=1e-6)
    tensor, _, _ = build_transform(False, 300, preprocessing=IMAGENET)(image, np.zeros((0, 4), np.float32), np.zeros(0))
    assert tensor.dtype == torch.float32
    assert tensor[0, 0, 0].item() == pytest.approx((255 - 123.675) / 58.395, rel=1e-5)


box_strategy = st.tuples(
    st.floats(0, 0.95), st.floats(0, 0.95), st.floats(0.01, 1.0), st.floats(0.01, 1.0), st.integers(1, 20)
)


@settings(max_examples=150, deadline=None)
@given(
    width=st.integers(16, 400),
    height=st.integers(16, 400),
    raw_boxes=st.lists(box_strategy, min_size=0, max_size=8),
    seed=st.integers(0, 2**31 - 1),
)
def test_train_transform_never_yields_an_invalid_box(width, height, raw_boxes, seed):
    boxes, labels = [], []
    for x, y, w, h, label in raw_boxes:
        x1, y1 = x * width, y * height
        x2, y2 = min(width, x1 + max(1.0, w * width)), min(height, y1 + max(1.0, h * height))
        if x2 > x1 and y2 > y1:
            boxes.append([x1, y1, x2, y2])
            labels.append(label)
    transform = build_transform(True, 64)
    transform.set_seed(seed)
    image = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    tensor, out_boxes, out_labels = transform(image, np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(labels))
    assert tensor.shape == (3, 64, 64)
    assert out_boxes.shape == (len(out_labels), 4) and len(out_labels) <= len(labels)
    assert np.isfinite(out_boxes).all()
    assert ((out_boxes >= 0) & (out_boxes <= 1)).all()
    assert (out_boxes[:, 2] > out_boxes[:, 0]).all() and (out_boxes[:, 3] > out_boxes[:, 1]).all()
    assert set(out_labels.tolist()) <= set(labels)
