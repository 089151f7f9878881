"""Pictures: ground-truth boxes drawn, the training-examples grid, writing images."""

import cv2
import numpy as np
import pytest

from odkd.class_names import SYNTHETIC_CLASSES
from odkd.data import VOCDataset, build_transform
from odkd.data.synthetic import make_synthetic_voc
from odkd.visualize import _colour, draw_detections, training_examples, write_image


def test_ground_truth_is_drawn_whatever_the_threshold():
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    drawn = draw_detections(image, np.array([[10, 40, 60, 90]]), [2], None, ["a", "b"], min_score=0.99)
    assert tuple(drawn[60, 10]) == _colour(2) and tuple(drawn[90, 35]) == _colour(2)  # left and bottom edges
    assert not drawn[70:85, 20:55].any()  # inside the box: untouched
    assert (image == 0).all()  # a copy is drawn on
    low = draw_detections(image, np.array([[10, 40, 60, 90]]), [2], [0.2], ["a", "b"], min_score=0.3)
    assert not low.any()  # a detection below the threshold is not


def test_training_examples_show_the_augmented_items_with_their_boxes(tmp_path):
    make_synthetic_voc(tmp_path, {"trainval": 4}, seed=3, min_size=120, max_size=200)
    dataset = VOCDataset(tmp_path, "SYN_trainval", SYNTHETIC_CLASSES, transform=build_transform(True, 96))
    keys = [(0, 11), (1, 12), (2, 13), (3, 14), (0, 15)]
    grid = training_examples(dataset, keys, SYNTHETIC_CLASSES)
    assert grid.shape == (2 * 320, 4 * 320, 3) and grid.dtype == np.uint8  # 5 tiles, 4 per row
    for tile, key in enumerate(keys):
        item = dataset[key]
        row, column = divmod(tile, 4)
        cell = cv2.resize(grid[row * 320 : row * 320 + 320, column * 320 : column * 320 + 320], (96, 96))
        picture = item["image"].permute(1, 2, 0).numpy()
        box_edges = np.zeros((96, 96), dtype=bool)
        for x1, y1, x2, y2 in np.round(item["boxes"].numpy() * 96).astype(int).clip(0, 95):
            box_edges[y1 : y2 + 1, [x1, x2]] = box_edges[[y1, y2], x1 : x2 + 1] = True
        near_edges = cv2.dilate(box_edges.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
        near_edges[:20] = True  # the class name labels sit above the boxes
        # Away from the drawn boxes and labels the tile is the augmented image itself.
        difference = np.abs(cell.astype(int) - picture.astype(int)).max(axis=-1)
        assert np.median(difference[~near_edges]) <= 8, tile
        if len(item["labels"]):
            assert difference[box_edges].mean() > difference[~near_edges].mean() + 10, tile  # boxes drawn


def test_write_image_writes_rgb_and_names_a_bad_suffix(tmp_path):
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    image[..., 0] = 200  # red
    write_image(tmp_path / "deep" / "red.png", image)
    assert (cv2.imread(str(tmp_path / "deep" / "red.png"))[..., 2] == 200).all()  # OpenCV reads BGR
    with pytest.raises(OSError, match=r"could not write .*red\.txt"):
        write_image(tmp_path / "red.txt", image)
