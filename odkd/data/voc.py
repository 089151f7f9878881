"""PASCAL VOC-format datasets: the real devkit layout, any year, any class list.

Layout under ``root`` (the folder that contains ``VOC<year>/``)::

    VOC2007/JPEGImages/<id>.jpg
    VOC2007/Annotations/<id>.xml
    VOC2007/ImageSets/Main/<set>.txt

Image sets are written ``<year>_<set>`` and joined with ``+``: ``"2007_trainval+2012_trainval"``,
``"2007_test"``. Annotation XML is parsed once and cached (``.odkd_cache/`` under ``root``, or a
folder of your choice); the cache is keyed by every XML file's size and modification time, so it is
rebuilt when any annotation changes.

Bad data (a missing or corrupt image, malformed XML, an unknown class, a box with ``xmin >= xmax``
or outside the image) raises :class:`DatasetError` naming the file and the problem. With
``skip_invalid=True`` such images are left out instead, with one warning each and a count at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "VOC_CLASSES",
    "Annotation",
    "DatasetError",
    "VOCDataset",
    "load_annotations",
    "parse_annotation",
    "parse_image_sets",
    "read_image",
]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

CACHE_VERSION = 1


class DatasetError(ValueError):
    """A problem with a dataset file; the message names the file."""


@dataclass
class Annotation:
    """One image's objects as the XML gives them (pixel coordinates, 1-based as in the devkit)."""

    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) float32 xmin, ymin, xmax, ymax
    labels: np.ndarray  # (n,) int64 class index, 1..C (0 is background)
    difficult: np.ndarray  # (n,) bool

    def to_json(self) -> dict:
        return {
            "image_id": self.image_id,
            "width": self.width,
            "height": self.height,
            "boxes": self.boxes.tolist(),
            "labels": self.labels.tolist(),
            "difficult": self.difficult.tolist(),
        }

    @classmethod
    def from_json(cls, d: dict) -> Annotation:
        return cls(
            d["image_id"],
            d["width"],
            d["height"],
            np.asarray(d["boxes"], dtype=np.float32).reshape(-1, 4),
            np.asarray(d["labels"], dtype=np.int64),
            np.asarray(d["difficult"], dtype=bool),
        )


def _text(node: ET.Element, tag: str, path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise DatasetError(f"{path}: malformed annotation, <{tag}> is missing")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path) -> float:
    text = _text(node, tag, path)
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{path}: malformed annotation, <{tag}> is {text!r}, not a number") from None


def parse_annotation(path: str | os.PathLike, class_names: Sequence[str]) -> Annotation:
    """Parse one VOC XML file; class ``class_names[i]`` gets label ``i + 1``.

    Raises :class:`DatasetError` for malformed XML, unknown classes, and boxes that are empty,
    inverted or outside the image (VOC coordinates are 1-based: 1 <= xmin < xmax <= width).
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file does not exist") from None
    except ET.ParseError as err:
        raise DatasetError(f"{path}: malformed XML ({err})") from None
    size = root.find("size")
    if size is None:
        raise DatasetError(f"{path}: malformed annotation, <size> is missing")
    width, height = int(_number(size, "width", path)), int(_number(size, "height", path))
    if width <= 0 or height <= 0:
        raise DatasetError(f"{path}: image size {width}x{height} is empty")
    index = {name: i + 1 for i, name in enumerate(class_names)}
    boxes, labels, difficult = [], [], []
    for obj in root.iter("object"):
        name = _text(obj, "name", path)
        if name not in index:
            raise DatasetError(f"{path}: unknown class {name!r}; the class list is {list(class_names)}")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DatasetError(f"{path}: malformed annotation, object {name!r} has no <bndbox>")
        box = [_number(bndbox, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax")]
        if box[0] >= box[2] or box[1] >= box[3]:
            raise DatasetError(f"{path}: {name} box {box} is empty or inverted (needs xmin < xmax, ymin < ymax)")
        if box[0] < 0 or box[1] < 0 or box[2] > width + 1 or box[3] > height + 1:
            raise DatasetError(f"{path}: {name} box {box} lies outside the {width}x{height} image")
        flag = obj.find("difficult")
        boxes.append(box)
        labels.append(index[name])
        difficult.append(flag is not None and (flag.text or "0").strip() == "1")
    return Annotation(
        path.stem,
        width,
        height,
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
        np.asarray(difficult, dtype=bool),
    )


def parse_image_sets(image_sets: str) -> list[tuple[str, str]]:
    """``"2007_trainval+2012_trainval"`` -> ``[("2007", "trainval"), ("2012", "trainval")]``."""
    parts = []
    for item in image_sets.split("+"):
        year, sep, name = item.strip().partition("_")
        if not sep or not year or not name:
            raise ValueError(f"image set {item!r} must be written <year>_<set>, e.g. 2007_trainval")
        parts.append((year, name))
    return parts


def _image_ids(root: Path, year: str, name: str) -> list[str]:
    folder = root / f"VOC{year}"
    if not folder.is_dir():
        raise DatasetError(
            f"{folder} does not exist. The VOC root must contain VOC<year>/ folders; download PASCAL VOC "
            f"(VOCtrainval_06-Nov-2007.tar, VOCtest_06-Nov-2007.tar, VOCtrainval_11-May-2012.tar), extract "
            f"them and pass the VOCdevkit folder as the root"
        )
    listing = folder / "ImageSets" / "Main" / f"{name}.txt"
    if not listing.is_file():
        raise DatasetError(f"{listing}: image set list does not exist")
    return [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]


def load_annotations(
    root: str | os.PathLike,
    image_sets: str,
    class_names: Sequence[str] = VOC_CLASSES,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[list[tuple[str, str]], list[Annotation | DatasetError]]:
    """The (year, image id) items of ``image_sets`` and their parsed annotations (or the error each
    raised), through the cache."""
    root = Path(root)
    items = [(year, i) for year, name in parse_image_sets(image_sets) for i in _image_ids(root, year, name)]
    xml_paths = [root / f"VOC{year}" / "Annotations" / f"{i}.xml" for year, i in items]

    # The key covers the class list and every file's identity, size and mtime: any edit rebuilds the cache.
    digest = hashlib.sha1(json.dumps([CACHE_VERSION, list(class_names)]).encode())
    for p in xml_paths:
        try:
            st = p.stat()
            digest.update(f"{p}:{st.st_size}:{st.st_mtime_ns};".encode())
        except FileNotFoundError:
            digest.update(f"{p}:missing;".encode())
    cache = Path(cache_dir) if cache_dir is not None else root / ".odkd_cache"
    cache_file = cache / f"annotations-{digest.hexdigest()[:16]}.json"
    if cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
            return items, [Annotation.from_json(a) if "error" not in a else DatasetError(a["error"]) for a in cached]
        except (ValueError, KeyError):
            pass  # a damaged cache is rebuilt below

    annotations: list[Annotation | DatasetError] = []
    for p in xml_paths:
        try:
            annotations.append(parse_annotation(p, class_names))
        except DatasetError as err:
            annotations.append(err)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        records = [a.to_json() if isinstance(a, Annotation) else {"error": str(a)} for a in annotations]
        tmp.write_text(json.dumps(records))
        os.replace(tmp, cache_file)
    except OSError as err:  # a read-only dataset folder still works, just without the cache
        warnings.warn(f"could not write the annotation cache {cache_file}: {err}", stacklevel=2)
    return items, annotations


def read_image(path: str | os.PathLike) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB; :class:`DatasetError` if the file is missing or not a readable image."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file does not exist")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"{path}: not a readable image (corrupt or truncated JPEG?)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class VOCDataset(Dataset):
    """VOC-format detection dataset.

    Each item is a dict: ``image`` (whatever ``transform`` returns; without a transform ``(H, W, 3)``
    uint8 RGB), ``boxes`` ``(n, 4)`` float32 x1,y1,x2,y2 relative to the (transformed) image,
    ``labels`` ``(n,)`` int64 in 1..C, and ``index`` (the item's position, to look up its annotation).

    Args:
        root: folder containing ``VOC<year>/``.
        image_sets: e.g. ``"2007_trainval+2012_trainval"``.
        class_names: the class list (default: the 20 VOC classes); label i+1 is class_names[i].
        transform: callable ``(image, boxes_pixels, labels) -> (image, boxes_relative, labels)``.
        keep_difficult: keep difficult objects in the training targets (default: drop them).
        skip_invalid: leave out images with bad data (one warning each) instead of raising.
        check_images: open every image once at start-up (slow on big sets) to find unreadable files.
        cache_dir: where the annotation cache goes (default ``root/.odkd_cache``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_sets: str,
        class_names: Sequence[str] = VOC_CLASSES,
        transform=None,
        keep_difficult: bool = False,
        skip_invalid: bool = False,
        check_images: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.root = Path(root)
        self.class_names = tuple(class_names)
        self.transform = transform
        self.keep_difficult = keep_difficult
        items, annotations = load_annotations(self.root, image_sets, self.class_names, cache_dir)
        self.items: list[tuple[str, str]] = []
        self.annotations: list[Annotation] = []
        skipped = 0
        for (year, image_id), ann in zip(items, annotations, strict=True):
            problem = ann if isinstance(ann, DatasetError) else None
            if problem is None and check_images:
                try:
                    read_image(self._image_path(year, image_id))
                except DatasetError as err:
                    problem = err
            if problem is not None:
                if not skip_invalid:
                    raise problem
                warnings.warn(f"skipping {image_id}: {problem}", stacklevel=2)
                skipped += 1
                continue
            self.items.append((year, image_id))
            self.annotations.append(ann)
        if skipped:
            warnings.warn(f"{image_sets}: skipped {skipped} of {len(items)} images with bad data", stacklevel=2)
        if not self.items:
            raise DatasetError(f"{self.root}: image set {image_sets} holds no usable images")

    def _image_path(self, year: str, image_id: str) -> Path:
        return self.root / f"VOC{year}" / "JPEGImages" / f"{image_id}.jpg"

    def __len__(self) -> int:
        return len(self.items)

    def image_path(self, index: int) -> Path:
        return self._image_path(*self.items[index])

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``key``: an index, or ``(index, seed)`` to seed the augmentation of this item (what
        :class:`odkd.data.IterationSampler` yields, so training is reproducible and resumable)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None and self.transform is not None:
            self.transform.set_seed(seed)
        ann = self.annotations[index]
        image = read_image(self.image_path(index))
        if image.shape[:2] != (ann.height, ann.width):
            raise DatasetError(
                f"{self.image_path(index)}: image is {image.shape[1]}x{image.shape[0]} but its annotation "
                f"says {ann.width}x{ann.height}"
            )
        keep = np.ones(len(ann.labels), dtype=bool) if self.keep_difficult else ~ann.difficult
        # VOC pixels are 1-based and inclusive: xmin=1 is the left edge of the image.
        boxes = ann.boxes[keep] - np.array([1, 1, 0, 0], dtype=np.float32)
        labels = ann.labels[keep]
        if self.transform is not None:
            image, boxes, labels = self.transform(image, boxes, labels)
        else:
            boxes = boxes / np.array([ann.width, ann.height] * 2, dtype=np.float32)
        return {
            "image": image,
            "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels, dtype=torch.int64),
            "index": index,
        }
