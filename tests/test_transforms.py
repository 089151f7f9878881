"""SSD augmentation: the crop's IoU rule, expand and flip geometry, and valid boxes whatever happens."""

import random

import albumentations as A
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from odkd.data.transforms import DetectionTransform, Expand, MinIoURandomCrop, build_transform, sample_min_iou_crop
from odkd.models import IMAGENET


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


def test_crop_keeps_boxes_whose_centre_is_inside_and_clips_them():
    crop = MinIoURandomCrop()
    # Normalised to a 100x100 image, label in the last column; crop (20, 20)-(70, 70).
    boxes = np.array([[0.1, 0.1, 0.4, 0.4, 1], [0.6, 0.6, 0.95, 0.95, 2], [0.3, 0.3, 0.5, 0.5, 3]])
    out = crop.apply_to_bboxes(boxes, crop=(20, 20, 70, 70), shape=(100, 100, 3))
    # centres: (25, 25) inside -> clipped to (20, 20, 40, 40); (77.5, 77.5) outside; (40, 40) inside.
    np.testing.assert_allclose(out, [[0.0, 0.0, 0.4, 0.4, 1], [0.2, 0.2, 0.6, 0.6, 3]])


def test_expand_keeps_objects_on_the_same_pixels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    boxes = np.array([[10, 5, 30, 25], [40, 20, 60, 40]], dtype=np.float32)
    compose = A.Compose(
        [Expand(max_ratio=3.0, fill=(1, 2, 3), p=1.0)],
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"]),
        seed=3,
    )
    out = compose(image=image, bboxes=boxes, labels=np.array([1, 2]))
    big = out["image"]
    assert big.shape[0] >= 40 and big.shape[1] >= 60 and big.shape[0] * 60 == pytest.approx(big.shape[1] * 40, rel=0.05)
    after = np.round(out["bboxes"]).astype(int)
    left, top = after[0, 0] - 10, after[0, 1] - 5  # where the image was pasted
    for b, a in zip(boxes.astype(int), after, strict=True):
        np.testing.assert_array_equal(a, b + np.array([left, top, left, top]))  # same size, same offset
    np.testing.assert_array_equal(big[top : top + 40, left : left + 60], image)
    outside = np.ones(big.shape[:2], dtype=bool)
    outside[top : top + 40, left : left + 60] = False
    assert (big[outside] == [1, 2, 3]).all()


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
