"""A small synthetic detection dataset written in the real VOC layout.

Five classes that differ in shape, colour and scale, on textured backgrounds, with overlaps and
occlusion; objects that are small or mostly hidden are flagged ``difficult`` as VOC does. The same
seed always gives the same files. Tests, the demo and the benchmarks use it like any VOC data::

    make_synthetic_voc("data/synthetic", splits={"trainval": 400, "test": 100})
    VOCDataset("data/synthetic", "SYN_trainval", class_names=SYNTHETIC_CLASSES)

:class:`SyntheticLayout` says what an image holds: by default 1-4 objects that may hide each other on a
background crossed by random lines, each class in its colour (docs/BENCHMARKS.md, "The CPU regime",
measures a layout of more objects set apart on a background without lines, and one where objects get
random colours, so that only the shape tells the class).
"""

from __future__ import annotations

import itertools
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from odkd.class_names import SYNTHETIC_CLASSES

__all__ = [
    "COCO_CATEGORY_IDS",
    "SyntheticLayout",
    "check_synthetic_settings",
    "make_synthetic_coco",
    "make_synthetic_voc",
]

_MIN_OBJECT_SIZE = 6  # pixels, the smallest side of an object: an image must hold one
# Per class: RGB colour and the range of the object's size as a fraction of the image's shorter side.
_STYLE = {
    "disc": ((220, 60, 50), (0.12, 0.35)),
    "block": ((50, 90, 220), (0.25, 0.6)),
    "triangle": ((60, 190, 70), (0.15, 0.45)),
    "ring": ((235, 200, 40), (0.2, 0.5)),
    "cross": ((200, 60, 200), (0.1, 0.3)),
}
_MARKER = ".odkd_synthetic.json"
_PLACEMENT_TRIES = 10  # positions tried for an object that must not overlap the others; then it is left out


@dataclass(frozen=True)
class SyntheticLayout:
    """What each synthetic image holds (the defaults: the original dataset).

    ``object_scale`` multiplies every class's range of sizes (the largest at most 3/4 of the image's
    shorter side); ``objects`` is the (min, max) number drawn per image; ``max_overlap`` is the largest
    share of an object's box another object's box may cover (1: any, so later objects may hide earlier
    ones; below 1 an object that finds no free place in a few tries is left out); ``lines``: random
    coloured lines across the background, which look like the cross's bars; ``class_colours``: each class
    has its colour (jittered), else every object gets a random colour and only its shape tells its class.
    """

    object_scale: float = 1.0
    objects: tuple[int, int] = (1, 4)
    max_overlap: float = 1.0
    lines: bool = True
    class_colours: bool = True

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when nothing is)."""
        problems = []
        if not self.object_scale > 0:
            problems.append(f"object_scale must be positive, got {self.object_scale}")
        if len(self.objects) != 2 or not 1 <= self.objects[0] <= self.objects[1]:
            problems.append(f"objects must be (min, max) with 1 <= min <= max, got {self.objects}")
        if not 0 < self.max_overlap <= 1:
            problems.append(f"max_overlap must be in (0, 1], got {self.max_overlap}")
        return problems

    def changed(self) -> dict:
        """The settings that differ from the defaults (the dataset marker records only those, so a dataset
        written before a setting existed stays valid)."""
        default = asdict(SyntheticLayout())
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v != default[k]}


def _background(rng: np.random.Generator, height: int, width: int, lines: bool = True) -> np.ndarray:
    """Low-frequency colour noise + random lines (``lines``) + pixel noise: texture the detector must ignore."""
    coarse = rng.integers(40, 200, size=(rng.integers(3, 7), rng.integers(3, 7), 3)).astype(np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(rng.integers(3, 10) if lines else 0):
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.line(image, p1, p2, colour, int(rng.integers(1, 4)))
    noise = rng.normal(0, 8, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _draw(image: np.ndarray, mask: np.ndarray, name: str, box: tuple[int, int, int, int], colour) -> None:
    """Draw object ``name`` filling ``box`` (x1, y1, x2, y2 exclusive) on ``image`` and on ``mask``."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    centre, axes = (x1 + w // 2, y1 + h // 2), (max(w // 2, 1), max(h // 2, 1))
    for target, value in ((image, colour), (mask, 1)):
        if name == "disc":
            cv2.ellipse(target, centre, axes, 0, 0, 360, value, -1)
        elif name == "block":
            cv2.rectangle(target, (x1, y1), (x2 - 1, y2 - 1), value, -1)
        elif name == "triangle":
            points = np.array([[x1 + w // 2, y1], [x1, y2 - 1], [x2 - 1, y2 - 1]], dtype=np.int32)
            cv2.fillPoly(target, [points], value)
        elif name == "ring":  # the stroke is centred on the ellipse: half a stroke inside, so it fills the box
            t = max(2, min(w, h) // 6)
            cv2.ellipse(target, centre, (max(axes[0] - t // 2, 1), max(axes[1] - t // 2, 1)), 0, 0, 360, value, t)
        else:  # cross
            t = max(2, min(w, h) // 4)
            cv2.rectangle(target, (x1, centre[1] - t // 2), (x2 - 1, centre[1] + t // 2), value, -1)
            cv2.rectangle(target, (centre[0] - t // 2, y1), (centre[0] + t // 2, y2 - 1), value, -1)


def _annotation_xml(image_id: str, width: int, height: int, objects: list[tuple[str, tuple, bool]]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for name, (x1, y1, x2, y2), difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = str(int(difficult))
        bndbox = ET.SubElement(obj, "bndbox")
        # VOC pixels are 1-based and inclusive: the pixel columns x1..x2-1 are xmin=x1+1 .. xmax=x2.
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bndbox, tag).text = str(value)
    return ET.tostring(root)


def _covered(box: tuple[int, int, int, int], by: tuple[int, int, int, int]) -> float:
    """The share of ``box``'s area (x1, y1, x2, y2) that ``by`` covers."""
    w = min(box[2], by[2]) - max(box[0], by[0])
    h = min(box[3], by[3]) - max(box[1], by[1])
    return max(w, 0) * max(h, 0) / ((box[2] - box[0]) * (box[3] - box[1]))


def _place(
    rng: np.random.Generator, width: int, height: int, lo: float, hi: float, placed: list, max_overlap: float
) -> tuple[int, int, int, int] | None:
    """A box (x1, y1, x2, y2) of a side in [lo, hi] x the image's shorter side, covering no placed box (nor
    covered by one) by ``max_overlap`` or more; None if no try finds one. The first try is always taken
    when ``max_overlap`` is 1, so the default layout draws the same numbers as before the setting existed."""
    side = min(width, height)
    for _ in range(_PLACEMENT_TRIES):
        w = max(_MIN_OBJECT_SIZE, int(side * rng.uniform(lo, hi) * rng.uniform(0.8, 1.25)))
        h = max(_MIN_OBJECT_SIZE, int(side * rng.uniform(lo, hi) * rng.uniform(0.8, 1.25)))
        x1, y1 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        box = (x1, y1, x1 + w, y1 + h)
        if max_overlap >= 1 or all(
            _covered(box, other) < max_overlap and _covered(other, box) < max_overlap for _, other in placed
        ):
            return box
    return None


def _make_image(rng: np.random.Generator, min_size: int, max_size: int, layout: SyntheticLayout):
    width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    image = _background(rng, height, width, layout.lines)
    masks, placed = [], []
    for _ in range(rng.integers(layout.objects[0], layout.objects[1] + 1)):
        name = SYNTHETIC_CLASSES[rng.integers(len(SYNTHETIC_CLASSES))]
        colour, (lo, hi) = _STYLE[name]
        lo, hi = lo * layout.object_scale, min(hi * layout.object_scale, 0.75)  # with the jitter: inside the image
        box = _place(rng, width, height, lo, hi, placed, layout.max_overlap)
        if box is None:
            continue
        if layout.class_colours:
            jitter = rng.integers(-25, 26, 3)
            colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter, strict=True))
        else:
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        mask = np.zeros((height, width), dtype=np.uint8)
        _draw(image, mask, name, box, colour)
        for earlier in masks:  # later objects occlude earlier ones
            earlier[mask > 0] = 0
        masks.append(mask)
        placed.append((name, box))
    objects = []
    for (name, box), mask in zip(placed, masks, strict=True):
        drawn = _draw_area(name, box)
        visible = mask.sum() / max(drawn, 1)
        small = min(box[2] - box[0], box[3] - box[1]) < 16
        if visible < 0.1:
            continue  # hidden almost entirely: not annotated, as in VOC
        objects.append((name, box, bool(small or visible < 0.5)))
    return image, width, height, objects


def _draw_area(name: str, box: tuple[int, int, int, int]) -> int:
    mask = np.zeros((box[3], box[2]), dtype=np.uint8)
    _draw(mask, mask, name, box, 1)
    return int(mask.sum())


def check_synthetic_settings(
    splits: dict[str, int],
    min_size: int,
    max_size: int,
    year: str = "SYN",
    layout: SyntheticLayout = SyntheticLayout(),
) -> None:
    """ValueError naming the setting if these cannot make a dataset: every split needs at least one image,
    image sides are ``min_size <= max_size``, at least an object's (6 pixels), the layout is valid
    (:meth:`SyntheticLayout.problems`), and the year names a VOC<year> folder that image sets
    (``<year>_<set>``) can name."""
    problems = [f"split {name!r} needs at least 1 image, got {count}" for name, count in splits.items() if count < 1]
    if not splits:
        problems.append("no split to write")
    if min_size < _MIN_OBJECT_SIZE:
        problems.append(f"min_size must be at least {_MIN_OBJECT_SIZE} pixels (an object's side), got {min_size}")
    problems += layout.problems()
    if min_size > max_size:
        problems.append(f"min_size {min_size} is above max_size {max_size}")
    if not year or any(c in year for c in "_+/\\"):
        problems.append(f"year {year!r} must be a non-empty name without _, +, / or \\ (image sets are <year>_<set>)")
    if problems:
        raise ValueError("; ".join(problems))


def _synthetic_images(
    splits: dict[str, int], seed: int, min_size: int, max_size: int, layout: SyntheticLayout
) -> Iterator[tuple]:
    """``(split, image id, image RGB, width, height, objects)`` for every image of every split, in order."""
    rng = np.random.default_rng(seed)
    counter = 0
    for split, count in splits.items():
        for _ in range(count):
            image_id = f"{counter:06d}"
            counter += 1
            yield (split, image_id, *_make_image(rng, min_size, max_size, layout))


def _up_to_date(folder: Path, settings: dict) -> bool:
    """Whether ``folder`` already holds a dataset written with exactly these ``settings``."""
    marker = folder / _MARKER
    return marker.is_file() and json.loads(marker.read_text()) == settings


def _start_writing(folder: Path, split_files: str) -> None:
    """Before anything is overwritten: drop the marker (an interrupted rewrite is never taken as complete)
    and the split files (``split_files``, a pattern under ``folder``) of an earlier set of splits."""
    (folder / _MARKER).unlink(missing_ok=True)
    for old in folder.glob(split_files):
        old.unlink()


def make_synthetic_voc(
    root: str | os.PathLike,
    splits: dict[str, int] | None = None,
    year: str = "SYN",
    seed: int = 0,
    min_size: int = 240,
    max_size: int = 360,
    layout: SyntheticLayout = SyntheticLayout(),
) -> Path:
    """Write the dataset under ``root/VOC<year>/`` and return that folder.

    ``splits`` maps image-set names to image counts (default trainval 400, test 100); ``layout`` says what
    an image holds (:class:`SyntheticLayout`).
    If the folder already holds a dataset made with the same arguments, nothing is written again.
    ValueError for settings that make no dataset (:func:`check_synthetic_settings`).
    """
    splits = dict(splits or {"trainval": 400, "test": 100})
    check_synthetic_settings(splits, min_size, max_size, year, layout)
    folder = Path(root) / f"VOC{year}"
    settings = {"splits": splits, "seed": seed, "min_size": min_size, "max_size": max_size, "version": 1}
    settings.update(layout.changed())
    if _up_to_date(folder, settings):
        return folder
    _start_writing(folder, "ImageSets/Main/*.txt")
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    ids: dict[str, list[str]] = {split: [] for split in splits}
    images = _synthetic_images(splits, seed, min_size, max_size, layout)
    for split, image_id, image, width, height, objects in images:
        cv2.imwrite(str(folder / "JPEGImages" / f"{image_id}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        (folder / "Annotations" / f"{image_id}.xml").write_bytes(_annotation_xml(image_id, width, height, objects))
        ids[split].append(image_id)
    for split, split_ids in ids.items():
        (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(split_ids) + "\n")
    (folder / _MARKER).write_text(json.dumps(settings))
    return folder


# COCO category ids of the five classes: not 1..5, so the id -> label mapping is exercised.
COCO_CATEGORY_IDS = (3, 8, 11, 17, 24)


def make_synthetic_coco(
    root: str | os.PathLike,
    splits: dict[str, int] | None = None,
    seed: int = 0,
    min_size: int = 240,
    max_size: int = 360,
    layout: SyntheticLayout = SyntheticLayout(),
) -> Path:
    """The same images as :func:`make_synthetic_voc` in COCO format: ``root/images/<id>.jpg`` and
    ``root/annotations/instances_<split>.json`` (image ids from 1, category ids :data:`COCO_CATEGORY_IDS`;
    VOC's difficult objects are ordinary objects here). Returns ``root``; nothing is written again if it
    already holds this dataset. ValueError as :func:`make_synthetic_voc`."""
    splits = dict(splits or {"trainval": 400, "test": 100})
    check_synthetic_settings(splits, min_size, max_size, layout=layout)
    root = Path(root)
    settings = {"splits": splits, "seed": seed, "min_size": min_size, "max_size": max_size, "format": "coco"}
    settings.update(layout.changed())
    if _up_to_date(root, settings):
        return root
    _start_writing(root, "annotations/instances_*.json")
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    category_of = dict(zip(SYNTHETIC_CLASSES, COCO_CATEGORY_IDS, strict=True))
    categories = [{"id": i, "name": name, "supercategory": "shape"} for name, i in category_of.items()]
    files = {split: {"images": [], "annotations": [], "categories": categories} for split in splits}
    annotation_ids = itertools.count(1)
    for split, image_id, image, width, height, objects in _synthetic_images(splits, seed, min_size, max_size, layout):
        cv2.imwrite(str(root / "images" / f"{image_id}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        coco_id = int(image_id) + 1
        files[split]["images"].append({"id": coco_id, "file_name": f"{image_id}.jpg", "width": width, "height": height})
        for name, (x1, y1, x2, y2), _ in objects:
            files[split]["annotations"].append(
                {
                    "id": next(annotation_ids),
                    "image_id": coco_id,
                    "category_id": category_of[name],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],  # 0-based pixels; x2 is exclusive
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    for split, content in files.items():
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    (root / _MARKER).write_text(json.dumps(settings))
    return root
