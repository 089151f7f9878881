"""What every detection dataset shares: annotations in memory, images read on demand, the item format.

A dataset (VOC- or COCO-format) fills ``image_paths``, ``annotations`` (one :class:`Annotation` per
image, pixel boxes in the format's own convention) and ``class_names``; this class turns them into
training/evaluation items. ``pixel_offset`` is what the format adds to 0-based pixel coordinates (the
VOC devkit counts pixels from 1: ``(1, 1, 0, 0)``; COCO from 0), so boxes become relative to the
image here and detections go back to the format's pixels with the same offset.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from odkd.class_names import class_name_problems

__all__ = [
    "Annotation",
    "DatasetError",
    "DetectionDataset",
    "ImageDetections",
    "ImageFiles",
    "ImageSource",
    "OpenImages",
    "check_image",
    "read_image",
]

# What torch's DataLoader makes of an exception raised in a worker: the worker's whole traceback as text.
_WORKER_TRACEBACK = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


class DatasetError(ValueError):
    """A problem with a dataset file; the message names the file, in one line.

    A DataLoader raises a worker's exception again in the main process as its class built from the
    worker's traceback text: that text is cut back to the original message, so that an image that fails
    mid-run is reported in the same one line as at start.
    """

    def __init__(self, message: str = "") -> None:
        if _WORKER_TRACEBACK.match(message):  # its last line: "odkd.data.dataset.DatasetError: <message>"
            message = message.rstrip().splitlines()[-1].partition(": ")[2]
        super().__init__(message)


@dataclass
class Annotation:
    """One image's objects in the pixel coordinates of its format."""

    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) float32 xmin, ymin, xmax, ymax
    labels: np.ndarray  # (n,) int64 class index, 1..C (0 is background)
    difficult: np.ndarray  # (n,) bool: VOC "difficult", COCO "iscrowd": not trained on, ignored by evaluation

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


class ImageDetections(NamedTuple):
    """What a detector found in one image, in the pixel coordinates of its format (as :class:`Annotation`
    holds what is there), by decreasing score."""

    boxes: np.ndarray  # (k, 4) float64 xmin, ymin, xmax, ymax
    scores: np.ndarray  # (k,) float32 class probability
    labels: np.ndarray  # (k,) int64 class index, 1..C


# The bytes a complete file of these formats ends with (a JPEG's end-of-image marker, a PNG's IEND chunk).
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
_QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that swap width and height (OpenCV applies them)


def _truncated_jpeg(data: bytes) -> bool:
    """Whether JPEG ``data`` ends before the end-of-image marker after its image data: libjpeg decodes such a
    file with a grey bottom and only a warning without the file name ("Premature end of JPEG file").

    The marker segments before the first scan are skipped by their lengths (an EXIF thumbnail's own end
    marker lies in one); in the scans, FF bytes are escaped, so FFD9 there is the end marker. Trailing bytes
    after it, which some cameras write, are harmless.
    """
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:  # headers out of step: corrupt, not truncated; left to the decoder
            return False
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte before a marker
            position += 1
        elif marker == 0xDA:  # start of scan
            return data.find(_END_MARKERS["JPEG"], position) < 0
        else:
            position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return True  # the file ends in its headers


def read_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB; :class:`DatasetError` if the file is missing, truncated or not a readable
    image, or if it is not ``size`` ``(height, width)`` (what its annotation says) when that is given."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file does not exist") from None
    except OSError as err:
        raise DatasetError(f"{path}: image file cannot be read ({err.strerror})") from None
    if data.startswith(b"\xff\xd8") and _truncated_jpeg(data):
        raise DatasetError(f"{path}: truncated JPEG (the file ends before its end-of-image marker): copy it again")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"{path}: not a readable image (corrupt or truncated JPEG?)")
    if size is not None and image.shape[:2] != tuple(size):
        raise DatasetError(
            f"{path}: image is {image.shape[1]}x{image.shape[0]} but its annotation says {size[1]}x{size[0]}"
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def check_image(path: str | os.PathLike, size: tuple[int, int]) -> None:
    """Raise the :class:`DatasetError` :func:`read_image` would for ``path`` and ``size``, reading the header
    where it can tell (0.2 ms against a decode's 3 ms, 300-500 px JPEGs): an image file whose header says
    ``size`` ``(height, width)`` and that ends as a complete JPEG or PNG does passes; anything else is
    decoded to decide. A file that is damaged inside its image data (with a complete end) still passes."""
    with contextlib.suppress(Exception), open(path, "rb") as f, Image.open(f) as image:  # PIL raises many types
        width, height = image.size
        # 0x0112: the EXIF orientation tag; only EXIF the header held (getexif may decode a PNG to find it)
        if "exif" in image.info and image.getexif().get(0x0112) in _QUARTER_TURNS:
            width, height = height, width
        end = _END_MARKERS.get(image.format, b"")
        f.seek(-len(end), os.SEEK_END)
        if (height, width) == tuple(size) and f.read(len(end)) == end:
            return
    read_image(path, size)


class ImageSource(Protocol):
    """Where a dataset's items get their pixels: ``source[i]`` is image ``i`` as ``(H, W, 3)`` uint8 RGB, of
    its annotated size."""

    def __getitem__(self, index: int) -> np.ndarray: ...


class ImageFiles:
    """The plain image source: image ``i`` decoded from its file at every read (:func:`read_image`, which
    checks it against its annotated ``(height, width)``)."""

    def __init__(self, paths: Sequence[Path], shapes: Sequence[tuple[int, int]]) -> None:
        self.paths, self.shapes = paths, shapes

    def __getitem__(self, index: int) -> np.ndarray:
        return read_image(self.paths[index], self.shapes[index])


# How a dataset opens its images once it knows which it keeps, given their paths and annotated (height, width):
# ImageFiles, or a decoded-image cache (odkd.data.image_cache.ImageCache.for_images, bound to its folder).
OpenImages = Callable[[Sequence[Path], Sequence[tuple[int, int]]], ImageSource]


class DetectionDataset(Dataset):
    """Items are dicts: ``image`` (whatever ``transform`` returns; without a transform ``(H, W, 3)`` uint8
    RGB), ``boxes`` ``(n, 4)`` float32 x1,y1,x2,y2 relative to the (transformed) image, ``labels``
    ``(n,)`` int64 in 1..C, and ``index`` (the item's position, to look up its annotation).

    Subclasses call :meth:`_keep` with their images and annotations (or the error each raised) and how to
    open the kept images (:data:`OpenImages`), which gives :attr:`images`, the source items read.
    """

    pixel_offset: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def __init__(self, class_names: Sequence[str], transform: Callable | None, keep_difficult: bool) -> None:
        if problems := class_name_problems(class_names):
            raise ValueError(f"class names {list(class_names)}: {'; '.join(problems)}")
        self.class_names = tuple(class_names)
        self.transform = transform
        self.keep_difficult = keep_difficult
        self.image_paths: list[Path] = []
        self.annotations: list[Annotation] = []

    def _keep(
        self,
        found: Iterable[tuple[Path, Annotation | DatasetError]],
        skip_invalid: bool,
        check_images: bool,
        what: str,
        open_images: OpenImages,
        check_headers: bool = True,
    ) -> None:
        """Keep the images whose annotation parsed and whose file passes :func:`check_image` (with
        ``check_headers``) or reads (with ``check_images``); a problem raises, or with ``skip_invalid``
        leaves the image out with a warning and a count. Then ``open_images`` opens the kept ones."""
        check = read_image if check_images else check_image if check_headers else None
        skipped = total = 0
        for path, ann in found:
            total += 1
            problem = ann if isinstance(ann, DatasetError) else None
            if problem is None and check is not None:
                try:
                    check(path, (ann.height, ann.width))
                except DatasetError as err:
                    problem = err
            if problem is not None:
                if not skip_invalid:
                    raise problem
                warnings.warn(f"skipping {path.stem}: {problem}", stacklevel=3)
                skipped += 1
                continue
            self.image_paths.append(path)
            self.annotations.append(ann)
        if skipped:
            warnings.warn(f"{what}: skipped {skipped} of {total} images with bad data", stacklevel=3)
        if not self.annotations:
            raise DatasetError(f"{what} holds no usable images")
        self.images: ImageSource = open_images(self.image_paths, self.image_shapes)

    def __len__(self) -> int:
        return len(self.annotations)

    def image_path(self, index: int) -> Path:
        return self.image_paths[index]

    @property
    def image_shapes(self) -> list[tuple[int, int]]:
        """The annotated ``(height, width)`` of each image."""
        return [(ann.height, ann.width) for ann in self.annotations]

    def _trained_on(self, ann: Annotation) -> np.ndarray:
        """``(n,)`` bool: the objects of ``ann`` an item holds (difficult ones only if kept)."""
        return np.ones(len(ann.labels), dtype=bool) if self.keep_difficult else ~ann.difficult

    @property
    def max_objects(self) -> int:
        """The most objects an item can hold; the augmentation only ever drops boxes."""
        return max(int(self._trained_on(a).sum()) for a in self.annotations)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``key``: an index, or ``(index, seed)`` to seed the augmentation of this item (what
        :class:`odkd.data.IterationSampler` yields, so training is reproducible and resumable)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None and self.transform is not None:
            self.transform.set_seed(seed)
        ann = self.annotations[index]
        image = self.images[index]
        keep = self._trained_on(ann)
        boxes = ann.boxes[keep] - np.array(self.pixel_offset, dtype=np.float32)  # 0-based pixels
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

    def to_pixels(self, boxes: torch.Tensor, index: int) -> np.ndarray:
        """``(K, 4)`` x1,y1,x2,y2 relative to image ``index`` -> float64 pixels of this format (the inverse
        of how items are made)."""
        ann = self.annotations[index]
        scale = torch.tensor([ann.width, ann.height] * 2, dtype=torch.float64)
        return (boxes.double().cpu() * scale + torch.tensor(self.pixel_offset, dtype=torch.float64)).numpy()
