"""VOC-format datasets, bad-data errors, the annotation cache, synthetic data, batching."""

import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from _bad_images import noisy_jpeg, undecodable_png
from PIL import Image

from odkd.class_names import SYNTHETIC_CLASSES
from odkd.data import VOCDataset, build_loader, build_transform, collate, load_annotations, prefetch_to_device
from odkd.data.dataset import ImageFiles, check_image, read_image
from odkd.data.image_cache import ImageCache
from odkd.data.synthetic import (
    _STYLE,
    SyntheticLayout,
    _covered,
    _draw,
    _make_image,
    make_synthetic_coco,
    make_synthetic_voc,
)
from odkd.data.voc import DatasetError, parse_image_sets
from odkd.losses import MultiBoxLoss
from odkd.matching import match
from odkd.priors import build_priors

CLASSES = ("cat", "dog")


def voc_xml(width, height, objects):
    parts = [f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, box, difficult in objects:
        coords = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True))
        parts.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>{coords}</bndbox></object>")
    return "".join(parts) + "</annotation>"


def write_voc(root, items, year="2007", split="trainval"):
    """items: image_id -> (width, height, objects) or (width, height, objects, xml_text_override)."""
    folder = root / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (width, height, objects, *override) in items.items():
        image = np.full((height, width, 3), 128, dtype=np.uint8)
        cv2.imwrite(str(folder / "JPEGImages" / f"{image_id}.jpg"), image)
        text = override[0] if override else voc_xml(width, height, objects)
        (folder / "Annotations" / f"{image_id}.xml").write_text(text)
    (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(items) + "\n")
    return folder


def test_boxes_labels_and_difficult(tmp_path):
    write_voc(tmp_path, {"a": (200, 100, [("dog", (1, 11, 100, 60), 0), ("cat", (51, 1, 200, 100), 1)])})
    item = VOCDataset(tmp_path, "2007_trainval", CLASSES)[0]
    # 1-based inclusive pixels: xmin=1 is the left edge (0), xmax=100 the right edge of column 100.
    torch.testing.assert_close(item["boxes"], torch.tensor([[0.0, 0.1, 0.5, 0.6]]))
    assert item["labels"].tolist() == [2]  # difficult cat dropped; dog is class 2
    assert item["image"].shape == (100, 200, 3) and item["image"].dtype == np.uint8
    kept = VOCDataset(tmp_path, "2007_trainval", CLASSES, keep_difficult=True)[0]
    assert kept["labels"].tolist() == [2, 1]
    torch.testing.assert_close(kept["boxes"][1], torch.tensor([0.25, 0.0, 1.0, 1.0]))
    ann = VOCDataset(tmp_path, "2007_trainval", CLASSES).annotations[0]
    assert ann.difficult.tolist() == [False, True]  # evaluation still sees difficult objects


def test_max_objects_counts_what_items_hold(tmp_path):
    cat, hard_dog = ("cat", (1, 1, 5, 5), 0), ("dog", (2, 2, 9, 9), 1)
    write_voc(tmp_path, {"a": (10, 10, [cat, cat]), "b": (10, 10, [cat, hard_dog, hard_dog]), "c": (10, 10, [])})
    assert VOCDataset(tmp_path, "2007_trainval", CLASSES).max_objects == 2  # b's two difficult dogs are dropped
    assert VOCDataset(tmp_path, "2007_trainval", CLASSES, keep_difficult=True).max_objects == 3


def test_image_set_unions(tmp_path):
    write_voc(tmp_path, {"a": (10, 10, [("cat", (1, 1, 5, 5), 0)])}, year="2007")
    write_voc(tmp_path, {"b": (10, 10, []), "c": (10, 10, [])}, year="2012", split="trainval")
    dataset = VOCDataset(tmp_path, "2007_trainval+2012_trainval", CLASSES)
    assert [a.image_id for a in dataset.annotations] == ["a", "b", "c"]
    assert dataset[1]["boxes"].shape == (0, 4)
    assert parse_image_sets("2007_trainval+MY-DATA_val") == [("2007", "trainval"), ("MY-DATA", "val")]
    with pytest.raises(ValueError, match="<year>_<set>"):
        parse_image_sets("trainval")


@pytest.mark.parametrize(
    ("xml", "problem"),
    [
        ("<annotation><size><width>10</width>", "malformed XML"),
        (voc_xml(10, 10, [("hrose", (1, 1, 5, 5), 0)]), "unknown class 'hrose'"),
        (voc_xml(10, 10, [("cat", (5, 1, 5, 5), 0)]), "empty or inverted"),
        (voc_xml(10, 10, [("cat", (6, 1, 4, 5), 0)]), "empty or inverted"),
        (voc_xml(10, 10, [("cat", (1, 1, 30, 5), 0)]), "outside the 10x10 image"),
        (voc_xml(10, 10, [("cat", (1, 1, "five", 5), 0)]), "<xmax> is 'five', not a finite number"),
        (voc_xml(10, 10, [("cat", ("nan", 1, 5, 5), 0)]), "<xmin> is 'nan', not a finite number"),
        (voc_xml("inf", 10, []), "<width> is 'inf', not a finite number"),
        ("<annotation><object><name>cat</name></object></annotation>", "<size> is missing"),
    ],
)
def test_bad_annotations_name_the_file(tmp_path, xml, problem):
    write_voc(tmp_path, {"good": (10, 10, []), "bad": (10, 10, [], xml)})
    with pytest.raises(DatasetError) as err:
        VOCDataset(tmp_path, "2007_trainval", CLASSES)
    assert "bad.xml" in str(err.value) and problem in str(err.value)
    with pytest.warns(UserWarning) as warned:
        dataset = VOCDataset(tmp_path, "2007_trainval", CLASSES, skip_invalid=True)
    assert [a.image_id for a in dataset.annotations] == ["good"]
    messages = [str(w.message) for w in warned]  # one per skipped file, naming it, then the count
    assert len(messages) == 2 and "bad.xml" in messages[0] and problem in messages[0]
    assert "skipped 1 of 2 images" in messages[1]


def test_difficult_flags_read_as_written(tmp_path):
    objects = [("cat", (1, 1, 5, 5), flag) for flag in ("1", "0", "true", "False", " TRUE ")]
    no_flag = voc_xml(10, 10, [("dog", (1, 1, 5, 5), 0)]).replace("<difficult>0</difficult>", "")
    write_voc(tmp_path, {"a": (10, 10, objects), "b": (10, 10, [], no_flag)})
    annotations = VOCDataset(tmp_path, "2007_trainval", CLASSES).annotations
    assert annotations[0].difficult.tolist() == [True, False, True, False, True]  # "true" was read as False
    assert annotations[1].difficult.tolist() == [False]
    folder = write_voc(tmp_path, {"c": (10, 10, [("cat", (1, 1, 5, 5), "yes")])})
    with pytest.raises(DatasetError) as err:
        VOCDataset(tmp_path, "2007_trainval", CLASSES)
    assert (
        str(err.value) == f"{folder / 'Annotations' / 'c.xml'}: cat has <difficult> 'yes'; use 0 or 1 (or false, true)"
    )


def test_an_image_listed_twice_is_named_with_its_lines(tmp_path):
    """Listed twice, an image would be trained on twice as often: an error naming the list, the line and the
    image; skip_invalid keeps the first listing."""
    folder = write_voc(tmp_path, {"a": (10, 10, []), "b": (10, 10, [])})
    listing = folder / "ImageSets" / "Main" / "trainval.txt"
    listing.write_text("a\nb\n\na\n")
    problem = f"{listing}: line 4: image a is listed again (first at {listing}: line 1)"
    with pytest.raises(DatasetError) as err:
        VOCDataset(tmp_path, "2007_trainval", CLASSES)
    assert str(err.value) == problem
    with pytest.warns(UserWarning) as warned:
        dataset = VOCDataset(tmp_path, "2007_trainval", CLASSES, skip_invalid=True)
    assert [a.image_id for a in dataset.annotations] == ["a", "b"]
    assert str(warned[0].message) == f"skipping a: {problem}"
    listing.write_text("a\nb\n")
    with pytest.raises(DatasetError, match=r"line 1: image a is listed again \(first at .*trainval\.txt: line 1\)"):
        VOCDataset(tmp_path, "2007_trainval+2007_trainval", CLASSES)


def test_class_subsets_leave_other_objects_out(tmp_path):
    horse, cat, dog = ("horse", (1, 1, 9, 9), 0), ("cat", (2, 2, 6, 6), 0), ("dog", (3, 3, 8, 8), 0)
    write_voc(tmp_path, {"a": (10, 10, [horse, cat, horse, dog]), "b": (10, 10, [horse])})
    dataset = VOCDataset(tmp_path, "2007_trainval", CLASSES)  # horse: a VOC class outside the list
    assert [a.labels.tolist() for a in dataset.annotations] == [[1, 2], []]
    torch.testing.assert_close(dataset[0]["boxes"], torch.tensor([[0.1, 0.1, 0.6, 0.6], [0.2, 0.2, 0.8, 0.8]]))
    assert dataset[1]["boxes"].shape == (0, 4)  # an image of only left-out objects teaches background
    # A name outside VOC is an error unless listed; listing ignore_classes replaces the VOC default.
    write_voc(tmp_path, {"c": (10, 10, [("gnu", (1, 1, 5, 5), 0), cat])})
    with pytest.raises(DatasetError, match=r"c\.xml: unknown class 'gnu'.*ignore_classes"):
        VOCDataset(tmp_path, "2007_trainval", CLASSES)
    assert VOCDataset(tmp_path, "2007_trainval", CLASSES, ignore_classes=["gnu"]).annotations[0].labels.tolist() == [1]
    write_voc(tmp_path, {"a": (10, 10, [horse, cat])})
    with pytest.raises(DatasetError, match="unknown class 'horse'"):  # the cache is keyed by the ignored names
        VOCDataset(tmp_path, "2007_trainval", CLASSES, ignore_classes=["gnu"])
    with pytest.raises(ValueError, match=r"\['cat'\] are both in the class list and in ignore_classes"):
        VOCDataset(tmp_path, "2007_trainval", CLASSES, ignore_classes=["cat"])


def test_a_class_list_names_each_class_once(tmp_path):
    write_voc(tmp_path, {"a": (10, 10, [("cat", (1, 1, 5, 5), 0)])})
    with pytest.raises(ValueError, match=r"class names \['cat', 'dog', 'cat'\]: \['cat'\] appear more than once"):
        VOCDataset(tmp_path, "2007_trainval", ("cat", "dog", "cat"))  # label 1 would never be given


def test_bad_images_are_found_at_start_and_name_the_file(tmp_path):
    """Every image's header is read when the dataset is made: a truncated JPEG (which OpenCV decodes
    without an error, grey below the cut), a missing file and one of another size than its annotation
    stop the run there, or are skipped with a warning each; they used to surface mid-run, or never."""
    folder = write_voc(tmp_path, {"a": (80, 60, []), "b": (10, 10, []), "c": (10, 10, []), "d": (10, 10, [])})
    (folder / "JPEGImages" / "a.jpg").write_bytes(noisy_jpeg()[:3000])
    assert cv2.imread(str(folder / "JPEGImages" / "a.jpg")).shape == (60, 80, 3)  # grey below the cut
    (folder / "JPEGImages" / "b.jpg").unlink()
    cv2.imwrite(str(folder / "JPEGImages" / "c.jpg"), np.zeros((12, 10, 3), np.uint8))
    problems = [
        f"{folder / 'JPEGImages' / 'a.jpg'}: truncated JPEG (the file ends before its end-of-image marker): "
        "copy it again",
        f"{folder / 'JPEGImages' / 'b.jpg'}: image file does not exist",
        f"{folder / 'JPEGImages' / 'c.jpg'}: image is 10x12 but its annotation says 10x10",
    ]
    for check_images in (False, True):  # headers (the default), or every image decoded
        with pytest.raises(DatasetError) as err:
            VOCDataset(tmp_path, "2007_trainval", CLASSES, check_images=check_images)
        assert str(err.value) == problems[0]
        with pytest.warns(UserWarning) as warned:
            dataset = VOCDataset(tmp_path, "2007_trainval", CLASSES, check_images=check_images, skip_invalid=True)
        assert [a.image_id for a in dataset.annotations] == ["d"]
        assert [str(w.message) for w in warned] == [
            *(f"skipping {name}: {problem}" for name, problem in zip("abc", problems, strict=True)),
            f"{tmp_path}: image set 2007_trainval: skipped 3 of 4 images with bad data",
        ]
    for path, problem in zip("abc", problems, strict=True):  # and when read later
        with pytest.raises(DatasetError) as err:
            read_image(folder / "JPEGImages" / f"{path}.jpg", (10, 10) if path != "a" else (60, 80))
        assert str(err.value) == problem
    (folder / "JPEGImages" / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DatasetError, match=r"b\.jpg: truncated JPEG"):
        read_image(folder / "JPEGImages" / "b.jpg")
    (folder / "JPEGImages" / "b.jpg").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"b\.jpg: not a readable image"):
        check_image(folder / "JPEGImages" / "b.jpg", (10, 10))


def test_what_a_complete_jpeg_may_hold(tmp_path):
    """Bytes after the end marker (some cameras write them) are harmless; an EXIF thumbnail's own end
    marker does not make a cut file complete; an EXIF rotation is applied by the decoder, so the header
    check compares the turned size."""
    data = noisy_jpeg()
    (tmp_path / "trailing.jpg").write_bytes(data + b"\0" * 64)
    thumbnail = noisy_jpeg(8, 8)
    payload = b"Exif\0\0" + thumbnail
    with_thumbnail = data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]
    (tmp_path / "thumbnail.jpg").write_bytes(with_thumbnail)
    (tmp_path / "cut.jpg").write_bytes(with_thumbnail[: len(with_thumbnail) - 300])
    for name in ("trailing", "thumbnail"):
        check_image(tmp_path / f"{name}.jpg", (60, 80))
        assert read_image(tmp_path / f"{name}.jpg").shape == (60, 80, 3)
    with pytest.raises(DatasetError, match=r"cut\.jpg: truncated JPEG"):
        check_image(tmp_path / "cut.jpg", (60, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn a quarter
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(tmp_path / "turned.jpg", exif=exif)
    check_image(tmp_path / "turned.jpg", (80, 60))
    assert read_image(tmp_path / "turned.jpg").shape == (80, 60, 3)
    with pytest.raises(DatasetError, match=r"turned\.jpg: image is 60x80 but its annotation says 80x60"):
        check_image(tmp_path / "turned.jpg", (60, 80))


def test_an_image_that_fails_in_a_loader_worker_is_one_line(tmp_path):
    """A file whose header and end are intact but whose image data is damaged passes the start-up check;
    reading it in a loader worker gives the error of the main process: one line naming the file, not the
    worker's traceback (the DataLoader re-raises it as its type made from that text)."""
    make_synthetic_voc(tmp_path, {"trainval": 4}, min_size=60, max_size=80)
    dataset = VOCDataset(tmp_path, "SYN_trainval", SYNTHETIC_CLASSES, transform=build_transform(True, 64))
    broken, ann = dataset.image_paths[2], dataset.annotations[2]
    broken.write_bytes(undecodable_png(ann.height, ann.width))
    check_image(broken, (ann.height, ann.width))
    with pytest.raises(DatasetError) as err:
        list(build_loader(dataset, 2, train=True, num_workers=1, max_iters=4))
    assert str(err.value) == f"{broken}: not a readable image (corrupt or truncated JPEG?)"


def test_missing_dataset_says_how_to_get_voc(tmp_path):
    with pytest.raises(DatasetError, match="download PASCAL VOC"):
        VOCDataset(tmp_path, "2007_test", CLASSES)
    (tmp_path / "VOC2007").mkdir()
    with pytest.raises(DatasetError, match=r"ImageSets.Main.test\.txt: image set list does not exist"):
        VOCDataset(tmp_path, "2007_test", CLASSES)


def test_annotation_cache_follows_file_changes(tmp_path):
    folder = write_voc(tmp_path, {"a": (10, 10, [("cat", (1, 1, 5, 5), 0)])})
    cache = tmp_path / "cache"
    _, first = load_annotations(tmp_path, "2007_trainval", CLASSES, cache)
    assert len(list(cache.iterdir())) == 1
    _, again = load_annotations(tmp_path, "2007_trainval", CLASSES, cache)
    assert again[0].labels.tolist() == first[0].labels.tolist() == [1]
    xml = folder / "Annotations" / "a.xml"
    xml.write_text(voc_xml(10, 10, [("dog", (1, 1, 5, 5), 0), ("cat", (2, 2, 6, 6), 1)]))
    os.utime(xml, ns=(time.time_ns() + 10**9,) * 2)  # a new mtime even on coarse clocks
    _, changed = load_annotations(tmp_path, "2007_trainval", CLASSES, cache)
    assert changed[0].labels.tolist() == [2, 1] and changed[0].difficult.tolist() == [False, True]
    # A different class list must not reuse the cache either.
    _, other = load_annotations(tmp_path, "2007_trainval", ("dog", "cat"), cache)
    assert other[0].labels.tolist() == [1, 2]


def test_synthetic_dataset_is_voc_and_deterministic(tmp_path):
    a = make_synthetic_voc(tmp_path / "a", {"trainval": 12, "test": 4}, seed=5)
    b = make_synthetic_voc(tmp_path / "b", {"trainval": 12, "test": 4}, seed=5)
    for sub in ("Annotations/000003.xml", "ImageSets/Main/test.txt", "JPEGImages/000015.jpg"):
        assert (a / sub).read_bytes() == (b / sub).read_bytes()
    dataset = VOCDataset(tmp_path / "a", "SYN_trainval+SYN_test", SYNTHETIC_CLASSES, keep_difficult=True)
    assert len(dataset) == 16
    labels = np.concatenate([ann.labels for ann in dataset.annotations])
    assert len(labels) >= 16 and len(set(labels.tolist())) >= 4
    sizes = {(ann.width, ann.height) for ann in dataset.annotations}
    assert len(sizes) > 1
    c = make_synthetic_voc(tmp_path / "c", {"trainval": 12}, seed=6)
    assert (a / "Annotations/000003.xml").read_bytes() != (c / "Annotations/000003.xml").read_bytes()


# Settings that make no dataset, and why.
REFUSED_SETTINGS = [
    ({"splits": {"trainval": -3, "test": 2}}, "split 'trainval' needs at least 1 image, got -3"),
    ({"min_size": 400, "max_size": 100}, "min_size 400 is above max_size 100"),
    ({"min_size": 2, "max_size": 100}, r"min_size must be at least 6 pixels \(an object's side\), got 2"),
    ({"year": "MY_DATA"}, "year 'MY_DATA' must be a non-empty name without _"),
]


@pytest.mark.parametrize(("settings", "message"), REFUSED_SETTINGS)
def test_synthetic_settings_that_make_no_dataset_are_refused(tmp_path, settings, message):
    for make in (make_synthetic_voc,) if "year" in settings else (make_synthetic_voc, make_synthetic_coco):
        with pytest.raises(ValueError, match=message):
            make(tmp_path, **{"splits": {"trainval": 2}, **settings})
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_synthetic_data_script_refuses_them_as_usage_errors(tmp_path, run_scripts):
    calls = []
    for settings, _ in REFUSED_SETTINGS:
        trainval = settings.get("splits", {}).get("trainval", 2)
        sizes = settings.get("min_size", 240), settings.get("max_size", 360)
        calls.append(("make_synthetic_voc.py", "--root", tmp_path, "--trainval", trainval, "--min-size", sizes[0],
                      "--max-size", sizes[1], "--year", settings.get("year", "SYN")))  # fmt: skip
    for (_, message), done in zip(REFUSED_SETTINGS, run_scripts(*calls), strict=True):
        assert done.returncode == 2 and re.search(f"\\.py: error: .*{message}", done.stderr), done.stderr
    assert not any(tmp_path.iterdir())


def test_an_interrupted_synthetic_rewrite_is_redone(tmp_path):
    sizes = {"min_size": 60, "max_size": 80}
    fresh = make_synthetic_voc(tmp_path / "fresh", {"trainval": 4, "test": 2}, seed=0, **sizes)
    folder = make_synthetic_voc(tmp_path / "used", {"trainval": 4, "test": 2}, seed=0, **sizes)
    blocker = folder / "Annotations" / "000003.xml"
    blocker.unlink()
    blocker.mkdir()  # writing it fails half-way through a rewrite with other settings
    with pytest.raises(IsADirectoryError):
        make_synthetic_voc(tmp_path / "used", {"trainval": 5}, seed=1, **sizes)
    blocker.rmdir()
    make_synthetic_voc(tmp_path / "used", {"trainval": 4, "test": 2}, seed=0, **sizes)  # not taken as up to date
    files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert all((fresh / f).read_bytes() == (folder / f).read_bytes() for f in files)


def _drawn_boxes_per_image(folder) -> list[list[tuple[int, int, int, int]]]:
    """The boxes as drawn (0-based, x2 exclusive): VOC's 1-based inclusive pixels give x1 - 1, x2 unchanged."""
    dataset = VOCDataset(folder.parent, "SYN_trainval", SYNTHETIC_CLASSES, keep_difficult=True)
    return [
        [(int(x1) - 1, int(y1) - 1, int(x2), int(y2)) for x1, y1, x2, y2 in ann.boxes] for ann in dataset.annotations
    ]


def test_covered_share_by_hand():
    """(0, 0, 10, 10) and (5, 0, 20, 10) share a 5 x 10 strip: half of the first, 50 / 150 of the second."""
    assert _covered((0, 0, 10, 10), (5, 0, 20, 10)) == 0.5
    assert _covered((5, 0, 20, 10), (0, 0, 10, 10)) == 50 / 150
    assert _covered((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # x2 is exclusive: touching boxes share nothing


def test_synthetic_layout_draws_more_objects_apart(tmp_path):
    """The layout tried for the CPU regime (3-6 objects, none covering another by a quarter, no lines): every image
    holds at most 6 objects, no box covers another by 0.25 or more (the default layout's do: objects hide
    each other there), and there are more objects per image than by default. The default layout's marker
    records no layout, so datasets written before the setting existed are reused."""
    sizes = {"trainval": 40}
    apart = make_synthetic_voc(tmp_path / "apart", sizes, layout=SyntheticLayout(1.3, (3, 6), 0.25, lines=False))
    default = make_synthetic_voc(tmp_path / "default", sizes)
    drawn, default_drawn = _drawn_boxes_per_image(apart), _drawn_boxes_per_image(default)
    assert max(map(len, drawn)) <= 6
    assert all(_covered(a, b) < 0.25 for image in drawn for a in image for b in image if a is not b)
    assert any(_covered(a, b) >= 0.25 for image in default_drawn for a in image for b in image if a is not b)
    assert sum(map(len, drawn)) > sum(map(len, default_drawn))
    marker = json.loads((default / ".odkd_synthetic.json").read_text())
    assert not {"object_scale", "objects", "max_overlap", "lines", "class_colours"} & marker.keys()
    assert json.loads((apart / ".odkd_synthetic.json").read_text())["objects"] == [3, 6]


def _centre_colours(layout: SyntheticLayout, images: int) -> dict[str, list[np.ndarray]]:
    """Per class, the colour drawn at the centre of each image's one object (rings left out: their centre
    is background), read from the image before it is written as JPEG."""
    rng, colours = np.random.default_rng(0), {}
    for _ in range(images):
        image, _, _, objects = _make_image(rng, 240, 360, layout)
        for name, (x1, y1, x2, y2), _ in objects:
            if name != "ring":
                colours.setdefault(name, []).append(image[y1 + (y2 - y1) // 2, x1 + (x2 - x1) // 2].astype(int))
    return colours


def test_synthetic_layout_without_class_colours_leaves_the_shape_alone():
    """By default each class has its colour, jittered by at most 25 per channel; without class colours an
    object's colour is drawn from all of RGB, where a colour within 25 of the class's in every channel has
    probability (51 / 256)^3 < 1%: more than 90% of the objects are further than that."""
    layout = SyntheticLayout(objects=(1, 1))
    for name, colours in _centre_colours(layout, 60).items():
        assert all(np.abs(c - _STYLE[name][0]).max() <= 25 for c in colours), name
    shapes_only = _centre_colours(SyntheticLayout(objects=(1, 1), class_colours=False), 60)
    assert set(shapes_only) == {"disc", "block", "triangle", "cross"}
    for name, colours in shapes_only.items():
        assert np.mean([np.abs(c - _STYLE[name][0]).max() > 25 for c in colours]) > 0.9, name


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (SyntheticLayout(objects=(0, 3)), r"objects must be \(min, max\) with 1 <= min <= max, got \(0, 3\)"),
        (SyntheticLayout(objects=(5, 3)), r"objects must be \(min, max\) with 1 <= min <= max, got \(5, 3\)"),
        (SyntheticLayout(max_overlap=0.0), r"max_overlap must be in \(0, 1\], got 0.0"),
        (SyntheticLayout(object_scale=0.0), "object_scale must be positive, got 0.0"),
    ],
)
def test_synthetic_layouts_that_make_no_dataset_are_refused(tmp_path, layout, message):
    for make in (make_synthetic_voc, make_synthetic_coco):
        with pytest.raises(ValueError, match=message):
            make(tmp_path, {"trainval": 2}, layout=layout)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", SYNTHETIC_CLASSES)
def test_synthetic_objects_fill_their_boxes(name):
    """The annotation is the drawn object's extent (a ring's stroke once stuck out of its box by up to 17 px)."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        w, h = int(rng.integers(6, 200)), int(rng.integers(6, 200))
        box = (5, 9, 5 + w, 9 + h)  # x1, y1, x2, y2 exclusive
        mask = np.zeros((240, 240), dtype=np.uint8)
        _draw(np.zeros((240, 240, 3), dtype=np.uint8), mask, name, box, (255, 0, 0))
        ys, xs = np.nonzero(mask)
        extent = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert max(abs(a - b) for a, b in zip(extent, box, strict=True)) <= 2, (name, box, extent)


def test_collate_pads_targets():
    batch = [
        {
            "image": torch.zeros(3, 4, 4),
            "boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5]]),
            "labels": torch.tensor([3]),
            "index": 7,
        },
        {
            "image": torch.ones(3, 4, 4),
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.long),
            "index": 2,
        },
    ]
    out = collate(batch)
    assert out["images"].shape == (2, 3, 4, 4)
    assert out["boxes"].shape == (2, 1, 4) and out["labels"].tolist() == [[3], [-1]]
    assert out["indices"].tolist() == [7, 2]
    # Fixed slots: at least gt_slots per image, padding as before; never fewer than an item holds.
    out = collate(batch, gt_slots=3)
    assert out["labels"].tolist() == [[3, -1, -1], [-1, -1, -1]]
    torch.testing.assert_close(out["boxes"][0], torch.tensor([[0.1, 0.1, 0.5, 0.5], [0, 0, 0, 0], [0, 0, 0, 0]]))
    assert collate(batch[:1], gt_slots=0)["labels"].shape == (1, 1)


def test_loader_batches_feed_a_finite_loss(tmp_path):
    make_synthetic_voc(tmp_path, {"trainval": 16}, seed=1)
    dataset = VOCDataset(tmp_path, "SYN_trainval", SYNTHETIC_CLASSES, transform=build_transform(True, 300))
    loader = build_loader(dataset, batch_size=4, train=True, num_workers=2, max_iters=6)
    priors = build_priors("lite300")
    criterion = MultiBoxLoss()
    batches = 0
    for batch in loader:
        assert batch["images"].shape == (4, 3, 300, 300) and batch["images"].dtype == torch.uint8
        loc_t, labels = match(batch["boxes"], batch["labels"], priors)
        losses = criterion(torch.zeros(4, 3000, 4), torch.zeros(4, 3000, 6), loc_t, labels)
        assert all(torch.isfinite(v) for v in losses.values())
        batches += 1
    assert batches == 6  # 6 iterations run over the 16 images for 1.5 epochs


def test_training_stream_is_the_same_whatever_the_workers_and_resumable(tmp_path):
    make_synthetic_voc(tmp_path, {"trainval": 10}, seed=2)
    dataset = VOCDataset(tmp_path, "SYN_trainval", SYNTHETIC_CLASSES, transform=build_transform(True, 96))

    def stream(workers, start=0):
        loader = build_loader(dataset, 3, train=True, num_workers=workers, max_iters=7, start_iter=start, seed=5)
        return [(b["indices"].tolist(), b["images"]) for b in loader]

    straight = stream(0)
    assert len(straight) == 7
    for (ia, xa), (ib, xb) in zip(straight, stream(2), strict=True):
        assert ia == ib and torch.equal(xa, xb)
    for (ia, xa), (ib, xb) in zip(straight[4:], stream(0, start=4), strict=True):
        assert ia == ib and torch.equal(xa, xb)
    # Every epoch visits every image once (10 images: epoch 0 = positions 0-9).
    first_epoch = [i for indices, _ in straight for i in indices][:10]
    assert sorted(first_epoch) == list(range(10))


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
        ),
    ],
)
def test_prefetch_to_device_gives_every_batch_in_order(device):
    g = torch.Generator().manual_seed(0)
    batches = [collate([{"image": torch.randint(0, 255, (3, 8, 8), generator=g, dtype=torch.uint8),
                         "boxes": torch.rand(n, 4, generator=g), "labels": torch.arange(n), "index": i}])
               for i, n in enumerate([1, 3, 0, 2])]  # fmt: skip
    if device == "cuda":
        batches = [{k: v.pin_memory() for k, v in batch.items()} for batch in batches]
    expected = [{k: v.clone() for k, v in batch.items()} for batch in batches]
    got = []
    for images, boxes, labels in prefetch_to_device(batches, torch.device(device)):
        assert images.device.type == device
        images.add_(1)  # the compute stream uses (and here changes) a batch while the next one is copied
        got.append((images.cpu(), boxes.cpu(), labels.cpu()))
    assert len(got) == 4
    for (images, boxes, labels), batch in zip(got, expected, strict=True):
        assert torch.equal(images, batch["images"] + 1) and torch.equal(boxes, batch["boxes"])
        assert torch.equal(labels, batch["labels"])
    assert list(prefetch_to_device([], torch.device(device))) == []


def test_iteration_sampler_shards_between_processes():
    from odkd.data import IterationSampler

    ranks = [list(IterationSampler(10, 2, max_iters=2, seed=1, rank=r, world_size=3)) for r in range(3)]
    indices = [i for shard in ranks for i, _ in shard]
    assert all(len(shard) == 4 for shard in ranks)
    assert len(set(indices)) == 9  # one epoch of 10 // 3 * 3 = 9 distinct images, none shared
    with pytest.raises(ValueError, match="cannot feed"):
        IterationSampler(2, 1, 1, world_size=3)


def test_distributed_eval_loaders_share_the_set_without_repeats(tmp_path):
    make_synthetic_voc(tmp_path, {"trainval": 5}, seed=1)
    dataset = VOCDataset(tmp_path, "SYN_trainval", SYNTHETIC_CLASSES, transform=build_transform(False, 300))
    shares = [
        [
            i
            for b in build_loader(dataset, 2, train=False, num_workers=0, rank=r, world_size=2)
            for i in b["indices"].tolist()
        ]
        for r in range(2)
    ]
    assert shares == [[0, 2, 4], [1, 3]]  # no padding: a repeated image would be scored twice once gathered


def cache_of(dataset: VOCDataset, directory: Path, **options) -> ImageCache:
    return ImageCache.for_images(directory, dataset.image_paths, dataset.image_shapes, **options)


def test_decoded_image_cache_gives_the_same_items_and_follows_changes(tmp_path):
    make_synthetic_voc(tmp_path, {"trainval": 6}, seed=3, min_size=40, max_size=60)
    dataset = VOCDataset(tmp_path, "SYN_trainval", SYNTHETIC_CLASSES, transform=build_transform(True, 64))
    assert isinstance(dataset.images, ImageFiles)

    def loader_stream(dataset):
        return [b["images"] for b in build_loader(dataset, 2, train=True, num_workers=2, max_iters=4)]

    from_files = [dataset[(i, i)]["image"] for i in range(6)], loader_stream(dataset)
    open_cache = functools.partial(ImageCache.for_images, tmp_path / "cache", workers=2, progress=False)
    cached = VOCDataset(
        tmp_path, "SYN_trainval", SYNTHETIC_CLASSES, transform=build_transform(True, 64), open_images=open_cache
    )
    cache = cached.images
    assert isinstance(cache, ImageCache)
    sizes = [a.width * a.height * 3 for a in dataset.annotations]
    assert cache.path.stat().st_size == sum(sizes)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [cache.path.stem + ".lock", cache.path.name]
    for i in range(6):  # the exact pixels read_image gives, so the same augmented items
        assert np.array_equal(cache[i], read_image(dataset.image_paths[i]))
        assert torch.equal(cached[(i, i)]["image"], from_files[0][i])
    assert all(torch.equal(a, b) for a, b in zip(loader_stream(cached), from_files[1], strict=True))
    # Built once: a second call reuses the file; a changed image gets a new one.
    again = cache_of(dataset, tmp_path / "cache", workers=0, progress=False)
    assert again.path == cache.path and again.path.stat().st_mtime_ns == cache.path.stat().st_mtime_ns
    first = dataset.image_paths[0]
    cv2.imwrite(str(first), np.zeros((dataset.annotations[0].height, dataset.annotations[0].width, 3), np.uint8))
    os.utime(first, ns=(time.time_ns() + 10**9,) * 2)
    changed = cache_of(dataset, tmp_path / "cache", workers=0, progress=False)
    assert changed.path != cache.path and not changed[0].any()


def test_decoded_image_cache_errors_name_the_file(tmp_path):
    folder = write_voc(tmp_path, {"a": (10, 10, []), "b": (10, 10, [])})
    dataset = VOCDataset(tmp_path, "2007_trainval", CLASSES)
    (folder / "JPEGImages" / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DatasetError, match=r"b\.jpg: truncated JPEG"):
        cache_of(dataset, tmp_path / "cache", workers=2, progress=False)
    cv2.imwrite(str(folder / "JPEGImages" / "b.jpg"), np.zeros((12, 10, 3), np.uint8))
    for read in (
        lambda: dataset[1],
        lambda: cache_of(dataset, tmp_path / "cache", workers=0),
        lambda: VOCDataset(tmp_path, "2007_trainval", CLASSES, check_images=True),
    ):
        with pytest.raises(DatasetError, match=r"b\.jpg: image is 10x12 but its annotation says 10x10"):
            read()
    assert {p.suffix for p in (tmp_path / "cache").iterdir()} == {".lock"}  # no half-written file left to be read
    with pytest.raises(DatasetError, match="missing or incomplete decoded-image cache"):
        cache_of(dataset, tmp_path / "cache", build=False)
    (folder / "JPEGImages" / "a.jpg").unlink()
    with pytest.raises(DatasetError, match=r"a\.jpg: image file does not exist"):
        cache_of(dataset, tmp_path / "cache", workers=0)


def test_decoded_image_cache_built_by_two_runs_at_once(tmp_path):
    """Two trainings on one machine with the same data.cache_dir: one decodes, the other waits for it
    (they used to write the same temporary file, and could rename a half-emptied one into place)."""
    make_synthetic_voc(tmp_path, {"trainval": 40}, seed=5, min_size=80, max_size=120)
    code = (
        "import sys; from odkd.data import VOCDataset; from odkd.data.image_cache import ImageCache; "
        "from odkd.class_names import SYNTHETIC_CLASSES as C; "
        "d = VOCDataset(sys.argv[1], 'SYN_trainval', C); "
        "ImageCache.for_images(sys.argv[2], d.image_paths, d.image_shapes, workers=0, progress=False)"
    )
    runs = [subprocess.Popen([sys.executable, "-c", code, tmp_path, tmp_path / "cache"]) for _ in range(2)]
    assert [run.wait(timeout=300) for run in runs] == [0, 0]
    dataset = VOCDataset(tmp_path, "SYN_trainval", SYNTHETIC_CLASSES)
    cache = cache_of(dataset, tmp_path / "cache", build=False)
    assert all(np.array_equal(cache[i], read_image(dataset.image_paths[i])) for i in range(len(dataset)))
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".lock", ".rgb"]


def test_the_config_layout_writes_the_synthetic_data(tmp_path):
    """``data.synthetic_*`` reach the generator: the dataset the config writes is the one the layout makes."""
    from odkd.config import load_config
    from odkd.engine.build import write_synthetic_data

    keys = ["data.synthetic_scale=1.3", "data.synthetic_objects=[3, 6]", "data.synthetic_max_overlap=0.25",
            "data.synthetic_lines=false", "data.synthetic_class_colours=false",
            "data.synthetic_sizes={trainval: 3, test: 1}"]  # fmt: skip
    write_synthetic_data(load_config(None, [f"data.voc_root={tmp_path / 'config'}", *keys]))
    layout = SyntheticLayout(1.3, (3, 6), 0.25, lines=False, class_colours=False)
    direct = make_synthetic_voc(tmp_path / "direct", {"trainval": 3, "test": 1}, layout=layout)
    for sub in (".odkd_synthetic.json", "Annotations/000002.xml", "JPEGImages/000003.jpg"):
        assert (tmp_path / "config" / "VOCSYN" / sub).read_bytes() == (direct / sub).read_bytes()
