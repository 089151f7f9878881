"""COCO-format detection datasets: one annotation JSON and a folder of images.

The JSON fields read: ``images[].{id, file_name, width, height}``, ``annotations[].{id, image_id,
category_id, bbox, iscrowd}`` (``bbox`` = ``[x, y, w, h]`` in 0-based pixels; ``iscrowd`` optional) and
``categories[].{id, name}``. Category ids can be any integers: with no class list the categories in
increasing id order become labels 1..K; with a class list (e.g. :data:`odkd.class_names.COCO_CLASSES`, or a few names to
train on a subset) categories are matched by name and objects of the other categories are left out (so
they count as background). Crowd boxes are treated like VOC's difficult objects: not trained on by default,
ignored by the evaluation. Images without objects are kept (they teach background).

Boxes of zero width or height (the official train2017 file has two, e.g. annotation 918 of image 200365)
are left out with one warning that counts them: they mark no object and would stop the run otherwise. Bad
data (unreadable JSON, a missing field, an annotation of an unknown image or category, a box of negative
size, not finite or outside its image) raises :class:`DatasetError` naming the file and the item; with
``skip_invalid=True`` images with bad annotations are left out instead (one warning each and a count).
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from odkd.data.dataset import Annotation, DatasetError, DetectionDataset, ImageFiles, OpenImages

__all__ = ["COCODataset", "coco_class_names", "read_coco_json"]

# Box corners may exceed the image by this many pixels (rounding in the published annotations); clipped.
_EDGE_TOLERANCE = 1.0


def read_coco_json(path: str | os.PathLike) -> dict:
    """The parsed annotation file, checked to hold ``images``, ``annotations`` and ``categories`` lists."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: COCO annotation file does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a COCO annotation file is a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: malformed COCO annotations, the {key!r} list is missing")
    return data


def _categories(data: dict, path: Path) -> dict[int, str]:
    """Category id -> name, checked."""
    categories: dict[int, str] = {}
    for category in data["categories"]:
        try:
            categories[int(category["id"])] = str(category["name"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{path}: malformed category {category!r} (needs an integer id and a name)") from None
    names = list(categories.values())
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"{path}: category names {duplicates} appear more than once")
    return categories


@functools.lru_cache(maxsize=8)
def _class_names(path: str, mtime_ns: int) -> tuple[str, ...]:
    categories = _categories(read_coco_json(path), Path(path))
    return tuple(categories[i] for i in sorted(categories))


def coco_class_names(path: str | os.PathLike) -> tuple[str, ...]:
    """The category names of a COCO annotation file in increasing id order (label 1 is the first)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: COCO annotation file does not exist")
    return _class_names(str(path), path.stat().st_mtime_ns)


class COCODataset(DetectionDataset):
    """COCO-format detection dataset (items as :class:`~odkd.data.dataset.DetectionDataset`).

    Args:
        annotation_file: the JSON file.
        image_dir: the folder the images' ``file_name`` are relative to.
        class_names: the class list (label i+1 is class_names[i], matched to category names); None: the
            file's categories in increasing id order. Objects of categories outside the list are left out.
        transform, keep_difficult (crowd boxes), skip_invalid, check_images, check_headers, open_images: as
            :class:`odkd.data.VOCDataset`.

    ``coco_ids[i]`` is the COCO image id of item ``i`` and ``category_ids[label - 1]`` the category id of a
    label (what the COCO evaluation needs).
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        class_names: Sequence[str] | None = None,
        transform=None,
        keep_difficult: bool = False,
        skip_invalid: bool = False,
        check_images: bool = False,
        check_headers: bool = True,
        open_images: OpenImages = ImageFiles,
    ) -> None:
        self.annotation_file, self.image_dir = Path(annotation_file), Path(image_dir)
        data = read_coco_json(self.annotation_file)
        categories = _categories(data, self.annotation_file)
        if class_names is None:
            class_names = [categories[i] for i in sorted(categories)]
        super().__init__(class_names, transform, keep_difficult)
        by_name = {name: i for i, name in categories.items()}
        missing = [name for name in self.class_names if name not in by_name]
        if missing:
            raise DatasetError(
                f"{self.annotation_file}: classes {missing} are not among its categories {sorted(by_name)}"
            )
        self.category_ids = [by_name[name] for name in self.class_names]
        label_of = {category: label for label, category in enumerate(self.category_ids, start=1)}

        images = self._images(data)
        objects: dict[int, list[dict]] = {image_id: [] for image_id in images}
        for ann in data["annotations"]:
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            if image_id not in objects:
                raise DatasetError(f"{self.annotation_file}: annotation {ann!r} refers to no image of the file")
            objects[image_id].append(ann)
        found, zero_size = [], []
        for image_id, (file_name, width, height) in images.items():
            try:
                ann = self._annotation(image_id, width, height, objects[image_id], label_of, categories, zero_size)
            except DatasetError as err:
                ann = err
            found.append((self.image_dir / file_name, ann))
        if zero_size:
            shown = ", ".join(map(str, zero_size[:5])) + (", ..." if len(zero_size) > 5 else "")
            warnings.warn(
                f"{self.annotation_file}: left out {len(zero_size)} box(es) of zero width or height "
                f"(annotation ids {shown})",
                stacklevel=2,
            )
        self._keep(found, skip_invalid, check_images, f"{self.annotation_file}", open_images, check_headers)
        self.coco_ids = [int(ann.image_id) for ann in self.annotations]

    def _images(self, data: dict) -> dict[int, tuple[str, int, int]]:
        """COCO image id -> (file name, width, height), in the file's order."""
        images = {}
        for image in data["images"]:
            try:
                image_id, width, height = int(image["id"]), int(image["width"]), int(image["height"])
                file_name = str(image["file_name"])
            except (KeyError, TypeError, ValueError):
                raise DatasetError(
                    f"{self.annotation_file}: malformed image entry {image!r} (needs id, file_name, width, height)"
                ) from None
            if width <= 0 or height <= 0:
                raise DatasetError(f"{self.annotation_file}: image {image_id} ({file_name}) is {width}x{height}")
            if image_id in images:
                raise DatasetError(f"{self.annotation_file}: image id {image_id} appears more than once")
            images[image_id] = (file_name, width, height)
        return images

    def _annotation(
        self,
        image_id: int,
        width: int,
        height: int,
        objects: list[dict],
        label_of: dict[int, int],
        categories: dict[int, str],
        zero_size: list,
    ) -> Annotation:
        """One image's objects as an :class:`Annotation` in 0-based pixels (corners within 1 px clipped);
        the ids of boxes of zero width or height are appended to ``zero_size`` instead."""
        where = f"{self.annotation_file}: image {image_id}"
        boxes, labels, crowd = [], [], []
        for obj in objects:
            category = obj.get("category_id")
            if category not in categories:
                raise DatasetError(f"{where}: annotation {obj.get('id')} has unknown category id {category!r}")
            if category not in label_of:
                continue  # a category the class list does not train on
            bbox = obj.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
                raise DatasetError(f"{where}: annotation {obj.get('id')} has bbox {bbox!r}, not [x, y, w, h]")
            x, y, w, h = (float(v) for v in bbox)
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0:
                raise DatasetError(f"{where}: annotation {obj.get('id')} box {bbox} is inverted or not finite")
            if w == 0 or h == 0:
                zero_size.append(obj.get("id"))
                continue
            t = _EDGE_TOLERANCE
            box = [max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)]
            if x < -t or y < -t or x + w > width + t or y + h > height + t or box[0] >= box[2] or box[1] >= box[3]:
                raise DatasetError(
                    f"{where}: annotation {obj.get('id')} box {bbox} lies outside the {width}x{height} image"
                )
            boxes.append(box)
            labels.append(label_of[category])
            crowd.append(bool(obj.get("iscrowd", 0)))
        return Annotation(
            str(image_id),
            width,
            height,
            np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64),
            np.asarray(crowd, dtype=bool),
        )
