"""PASCAL VOC-format datasets: the real devkit layout, any year, any class list.

Layout under ``root`` (the folder that contains ``VOC<year>/``)::

    VOC2007/JPEGImages/<id>.jpg
    VOC2007/Annotations/<id>.xml
    VOC2007/ImageSets/Main/<set>.txt

Image sets are written ``<year>_<set>`` and joined with ``+``: ``"2007_trainval+2012_trainval"``,
``"2007_test"``. Annotation XML is parsed once and cached (``.odkd_cache/`` under ``root``, or a
folder of your choice); the cache is keyed by every XML file's size and modification time, so it is
rebuilt when any annotation changes.

Training on a subset of the classes (e.g. ``class_names=("bus", "car", "cat")`` on full VOC): objects of
the names in ``ignore_classes`` are left out, so they count as background; by default these are the VOC
classes outside the class list. Per-class AP of the listed classes is the same as on the full class list
(the devkit scores each class against its own objects only). Any other name is an unknown class.

Bad data (a missing, truncated or corrupt image, one of another size than its annotation, malformed XML,
an unknown class, a box with ``xmin >= xmax`` or outside the image, a ``<difficult>`` other than 0, 1,
false or true, an image listed again in the image sets) raises :class:`DatasetError` naming the file and
the problem; every image's header is read at start for it. With ``skip_invalid=True`` such images (of an
image listed again, the repeats) are left out instead, with one warning each and a count at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from odkd.class_names import VOC_CLASSES
from odkd.data.dataset import Annotation, DatasetError, DetectionDataset, ImageFiles, OpenImages, read_image
from odkd.files import atomic_write

__all__ = [
    "Annotation",
    "DatasetError",
    "VOCDataset",
    "ignored_classes",
    "load_annotations",
    "parse_annotation",
    "parse_image_sets",
    "read_image",
]

CACHE_VERSION = 3  # 2: non-finite numbers are errors; 3: <difficult> true/false, other values are errors
_FLAGS = {"0": False, "false": False, "1": True, "true": True}  # <difficult> values, case aside


def _text(node: ET.Element, tag: str, path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise DatasetError(f"{path}: malformed annotation, <{tag}> is missing")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path) -> float:
    text = _text(node, tag, path)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # "nan" passes every comparison check after this
        raise DatasetError(f"{path}: malformed annotation, <{tag}> is {text!r}, not a finite number")
    return value


def ignored_classes(class_names: Sequence[str], ignore_classes: Collection[str] | None = None) -> frozenset[str]:
    """The object names to leave out: ``ignore_classes``, or with None the VOC classes outside
    ``class_names``; ValueError if a name is both trained on and ignored."""
    if ignore_classes is None:
        return frozenset(VOC_CLASSES) - set(class_names)
    if both := sorted(set(ignore_classes) & set(class_names)):
        raise ValueError(f"classes {both} are both in the class list and in ignore_classes")
    return frozenset(ignore_classes)


def parse_annotation(
    path: str | os.PathLike, class_names: Sequence[str], ignore_classes: Collection[str] | None = None
) -> Annotation:
    """Parse one VOC XML file; class ``class_names[i]`` gets label ``i + 1``; objects of the names
    :func:`ignored_classes` gives are left out.

    Raises :class:`DatasetError` for malformed XML, unknown classes, and boxes that are empty,
    inverted or outside the image (VOC coordinates are 1-based: 1 <= xmin < xmax <= width).
    """
    path = Path(path)
    ignored = ignored_classes(class_names, ignore_classes)
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
        if name in ignored:
            continue
        if name not in index:
            raise DatasetError(
                f"{path}: unknown class {name!r}; the class list is {list(class_names)} "
                f"(to leave such objects out as background, list the name in ignore_classes)"
            )
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DatasetError(f"{path}: malformed annotation, object {name!r} has no <bndbox>")
        box = [_number(bndbox, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax")]
        if box[0] >= box[2] or box[1] >= box[3]:
            raise DatasetError(f"{path}: {name} box {box} is empty or inverted (needs xmin < xmax, ymin < ymax)")
        if box[0] < 0 or box[1] < 0 or box[2] > width + 1 or box[3] > height + 1:
            raise DatasetError(f"{path}: {name} box {box} lies outside the {width}x{height} image")
        flag = obj.find("difficult")  # absent: not difficult
        value = "0" if flag is None else (flag.text or "").strip()
        if value.lower() not in _FLAGS:
            raise DatasetError(f"{path}: {name} has <difficult> {value!r}; use 0 or 1 (or false, true)")
        boxes.append(box)
        labels.append(index[name])
        difficult.append(_FLAGS[value.lower()])
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


def _image_ids(root: Path, year: str, name: str) -> tuple[Path, list[str]]:
    """The image set list file of ``year``/``name`` and the ids it lists, line by line (blank lines as "")."""
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
    return listing, [line.split()[0] if line.strip() else "" for line in listing.read_text().splitlines()]


def _listed_items(root: Path, image_sets: str) -> tuple[list[tuple[str, str]], dict[int, DatasetError]]:
    """The (year, image id) items of ``image_sets`` in order, and for the position of each item listed again
    (in one list or in two of a union) the error that names where: an image listed twice would be trained
    on twice as often."""
    items: list[tuple[str, str]] = []
    repeats: dict[int, DatasetError] = {}
    first: dict[tuple[str, str], str] = {}
    for year, name in parse_image_sets(image_sets):
        listing, ids = _image_ids(root, year, name)
        for line, image_id in enumerate(ids, start=1):
            if not image_id:
                continue
            where = f"{listing}: line {line}"
            if (year, image_id) in first:
                repeats[len(items)] = DatasetError(
                    f"{where}: image {image_id} is listed again (first at {first[year, image_id]})"
                )
            else:
                first[year, image_id] = where
            items.append((year, image_id))
    return items, repeats


def load_annotations(
    root: str | os.PathLike,
    image_sets: str,
    class_names: Sequence[str] = VOC_CLASSES,
    cache_dir: str | os.PathLike | None = None,
    ignore_classes: Collection[str] | None = None,
) -> tuple[list[tuple[str, str]], list[Annotation | DatasetError]]:
    """The (year, image id) items of ``image_sets`` and their parsed annotations (or the error each
    raised, or for an image listed again the error that says where), through the cache."""
    root = Path(root)
    ignored = ignored_classes(class_names, ignore_classes)
    items, repeats = _listed_items(root, image_sets)
    annotations = _cached_annotations(root, items, class_names, ignored, cache_dir)
    return items, [repeats.get(position, ann) for position, ann in enumerate(annotations)]


def _cached_annotations(
    root: Path,
    items: list[tuple[str, str]],
    class_names: Sequence[str],
    ignored: frozenset[str],
    cache_dir: str | os.PathLike | None,
) -> list[Annotation | DatasetError]:
    """The parsed annotation of each item (or the error it raised), from the cache when it is up to date."""
    xml_paths = [root / f"VOC{year}" / "Annotations" / f"{i}.xml" for year, i in items]

    # The key covers the class lists and every file's identity, size and mtime: any edit rebuilds the cache.
    digest = hashlib.sha1(json.dumps([CACHE_VERSION, list(class_names), sorted(ignored)]).encode())
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
            return [Annotation.from_json(a) if "error" not in a else DatasetError(a["error"]) for a in cached]
        except (ValueError, KeyError):
            pass  # a damaged cache is rebuilt below

    annotations: list[Annotation | DatasetError] = []
    for p in xml_paths:
        try:
            annotations.append(parse_annotation(p, class_names, ignored))
        except DatasetError as err:
            annotations.append(err)
    records = [a.to_json() if isinstance(a, Annotation) else {"error": str(a)} for a in annotations]
    try:
        atomic_write(cache_file, lambda f: f.write(json.dumps(records).encode()))
    except OSError as err:  # a read-only dataset folder still works, just without the cache
        warnings.warn(f"could not write the annotation cache {cache_file}: {err}", stacklevel=3)
    return annotations


class VOCDataset(DetectionDataset):
    """VOC-format detection dataset (items as :class:`DetectionDataset`).

    Args:
        root: folder containing ``VOC<year>/``.
        image_sets: e.g. ``"2007_trainval+2012_trainval"``.
        class_names: the class list (default: the 20 VOC classes); label i+1 is class_names[i].
        ignore_classes: object names left out as background (default: the VOC classes not in the list).
        transform: callable ``(image, boxes_pixels, labels) -> (image, boxes_relative, labels)``.
        keep_difficult: keep difficult objects in the training targets (default: drop them).
        skip_invalid: leave out images with bad data (one warning each) instead of raising.
        check_images: decode every image once at start-up (~3 ms each) to find unreadable files.
        cache_dir: where the annotation cache goes (default ``root/.odkd_cache``).
        check_headers: read every image's header at start-up (~0.2 ms each; :func:`check_image`): missing
            or truncated files and sizes other than the annotation's are found now, not mid-run (False:
            the annotations alone, e.g. to score result files without the images).
        open_images: how items read the kept images (:data:`~odkd.data.dataset.OpenImages`): decoded from
            their files (default), or e.g. from a decoded-image cache.
    """

    pixel_offset = (1.0, 1.0, 0.0, 0.0)  # the devkit counts pixels from 1: xmin = 1 is the left edge

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
        ignore_classes: Collection[str] | None = None,
        check_headers: bool = True,
        open_images: OpenImages = ImageFiles,
    ) -> None:
        super().__init__(class_names, transform, keep_difficult)
        self.root = Path(root)
        items, annotations = load_annotations(self.root, image_sets, self.class_names, cache_dir, ignore_classes)
        paths = [self.root / f"VOC{year}" / "JPEGImages" / f"{image_id}.jpg" for year, image_id in items]
        what = f"{self.root}: image set {image_sets}"
        self._keep(zip(paths, annotations, strict=True), skip_invalid, check_images, what, open_images, check_headers)
