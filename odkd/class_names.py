"""Class lists: the names a detector's labels 1..C stand for.

The named lists a config's ``data.classes`` may give instead of its own names (:data:`CLASS_LISTS`), and
what a usable list is (:func:`class_name_problems`). Plain Python, so that a config is checked without
loading torch.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CLASS_LISTS", "COCO_CLASSES", "SYNTHETIC_CLASSES", "VOC_CLASSES", "class_name_problems"]

# The 20 PASCAL VOC classes in the devkit's order.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# The 80 categories of COCO 2014/2017 in increasing category-id order.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip

# The shapes of the synthetic dataset (odkd.data.synthetic).
SYNTHETIC_CLASSES = ("disc", "block", "triangle", "ring", "cross")

# The lists data.classes may name.
CLASS_LISTS = {"voc": VOC_CLASSES, "coco": COCO_CLASSES, "synthetic": SYNTHETIC_CLASSES}


def class_name_problems(names: Sequence[str]) -> list[str]:
    """What is wrong with a list of class names (empty if nothing): each name is one output of the head."""
    problems = []
    if not names:
        problems.append("the list is empty: name at least one class")
    if blank := [name for name in names if not name.strip()]:
        problems.append(f"{blank} are blank names")
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        problems.append(f"{repeated} appear more than once")
    return problems
