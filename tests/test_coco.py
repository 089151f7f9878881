"""COCO-format data: loading, bad-data errors, pycocotools evaluation, evaluate.py and training on it."""

import json
import os
import re
import shutil
import warnings

import numpy as np
import pytest
import torch

from odkd.checkpoint import save_model
from odkd.class_names import SYNTHETIC_CLASSES
from odkd.config import load_config
from odkd.data import DatasetError, VOCDataset
from odkd.data.coco import COCODataset, coco_class_names
from odkd.data.synthetic import COCO_CATEGORY_IDS, make_synthetic_coco, make_synthetic_voc
from odkd.eval import ClassDetections, evaluate_coco, evaluate_results, read_coco_results, write_coco_results
from odkd.models import build_model


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("coco"), {"trainval": 6, "test": 4}, seed=5)


def test_coco_dataset_equals_the_voc_version_of_the_same_images(coco_root, tmp_path):
    make_synthetic_voc(tmp_path, {"trainval": 6, "test": 4}, seed=5)
    voc = VOCDataset(tmp_path, "SYN_test", SYNTHETIC_CLASSES, keep_difficult=True)
    coco = COCODataset(coco_root / "annotations" / "instances_test.json", coco_root / "images")
    assert coco.class_names == SYNTHETIC_CLASSES  # categories in id order
    assert coco.category_ids == list(COCO_CATEGORY_IDS) and coco.coco_ids == [7, 8, 9, 10]
    for i in range(len(coco)):
        # Same objects: COCO 0-based corners = devkit corners - (1, 1, 0, 0); labels 1..5 from ids 3..24.
        np.testing.assert_allclose(coco.annotations[i].boxes, voc.annotations[i].boxes - [1, 1, 0, 0])
        np.testing.assert_array_equal(coco.annotations[i].labels, voc.annotations[i].labels)
        np.testing.assert_allclose(coco[i]["boxes"], voc[i]["boxes"], atol=1e-6)  # the same relative boxes
        np.testing.assert_allclose(coco.to_pixels(coco[i]["boxes"], i), coco.annotations[i].boxes, atol=1e-3)
    subset = COCODataset(coco_root / "annotations" / "instances_test.json", coco_root / "images", ["ring", "disc"])
    assert subset.category_ids == [17, 3]
    for full, part in zip(coco.annotations, subset.annotations, strict=True):
        # rings (label 4 of the full list) become 1, discs (1) become 2, the other shapes are left out
        expected = {4: 1, 1: 2}
        assert part.labels.tolist() == [expected[label] for label in full.labels.tolist() if label in expected]


def write(tmp_path, data) -> str:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def valid():
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 50}],
        "annotations": [{"id": 9, "image_id": 1, "category_id": 4, "bbox": [10, 5, 20, 10]}],
        "categories": [{"id": 4, "name": "cat"}],
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: "{not json", "not valid JSON"),
        (lambda d: d.pop("categories"), "the 'categories' list is missing"),
        (lambda d: d["annotations"][0].update(image_id=2), "refers to no image"),
        (lambda d: d["annotations"][0].update(category_id=5), "annotation 9 has unknown category id 5"),
        (lambda d: d["annotations"][0].update(bbox=[10, 5, -1, 10]), r"box \[10, 5, -1, 10\] is inverted"),
        (lambda d: d["annotations"][0].update(bbox=[10, 5, 1e999, 10]), "is inverted or not finite"),
        (lambda d: d["annotations"][0].update(bbox=[90, 5, 20, 10]), "lies outside the 100x50 image"),
        (lambda d: d["annotations"][0].update(bbox=[10, 5]), r"has bbox \[10, 5\], not \[x, y, w, h\]"),
        (lambda d: d["images"].append(dict(d["images"][0])), "image id 1 appears more than once"),
        (lambda d: d["images"][0].pop("width"), "malformed image entry"),
    ],
)
def test_bad_coco_files_name_the_file_and_the_item(tmp_path, change, message):
    data = valid()
    changed = change(data)
    path = write(tmp_path, changed if isinstance(changed, str) else data)
    with pytest.raises(DatasetError, match=message) as err:
        COCODataset(path, tmp_path)
    assert str(path) in str(err.value)


def test_zero_size_boxes_are_left_out_with_a_warning(tmp_path):
    # As in the official instances_train2017.json (annotation 918 of image 200365): height 0, area 0.
    data = valid()
    data["annotations"].append({"id": 918, "image_id": 1, "category_id": 4, "bbox": [29.65, 38.33, 1.03, 0.0]})
    data["annotations"].append({"id": 919, "image_id": 1, "category_id": 4, "bbox": [3, 3, 0, 4]})
    with pytest.warns(
        UserWarning, match=r"bad.json: left out 2 box\(es\) of zero width or height \(annotation ids 918, 919\)"
    ):
        dataset = COCODataset(write(tmp_path, data), tmp_path, check_headers=False)  # annotations only
    np.testing.assert_array_equal(dataset.annotations[0].boxes, [[10, 5, 30, 15]])


def test_class_lists_and_skipping_bad_images(tmp_path):
    data = valid()
    with pytest.raises(DatasetError, match=r"classes \['dog'\] are not among its categories"):
        COCODataset(write(tmp_path, data), tmp_path, ["dog"])
    data["categories"].append({"id": 7, "name": "dog"})
    data["images"].append({"id": 2, "file_name": "b.jpg", "width": 100, "height": 50})
    data["annotations"].append({"id": 10, "image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5], "iscrowd": 1})
    data["images"].append({"id": 3, "file_name": "c.jpg", "width": 100, "height": 50})
    data["annotations"].append({"id": 11, "image_id": 3, "category_id": 4, "bbox": [1, 1, -5, 5]})
    path = write(tmp_path, data)
    with pytest.warns(UserWarning, match="skipped 1 of 3 images"):
        dataset = COCODataset(path, tmp_path, skip_invalid=True, check_headers=False)
    assert dataset.coco_ids == [1, 2] and dataset.annotations[1].difficult.tolist() == [True]  # crowd
    assert coco_class_names(path) == ("cat", "dog")
    cats_only = COCODataset(path, tmp_path, ["cat"], skip_invalid=True, check_headers=False)  # dog objects are left out
    assert [len(a.labels) for a in cats_only.annotations] == [1, 0] and cats_only.category_ids == [4]


def gt_as_detections(dataset, shift: float = 0.0, score: float = 0.9) -> dict[str, ClassDetections]:
    """Every GT box as a detection of its class, moved right by ``shift`` of its width."""
    rows = {name: ([], [], []) for name in dataset.class_names}
    for ann in dataset.annotations:
        for box, label in zip(ann.boxes, ann.labels, strict=True):
            moved = box + shift * (box[2] - box[0]) * np.array([1, 0, 1, 0])
            ids, scores, boxes = rows[dataset.class_names[label - 1]]
            ids.append(ann.image_id), scores.append(score), boxes.append(moved)
    return {
        name: ClassDetections(np.array(ids, dtype=str), np.array(scores), np.array(boxes).reshape(-1, 4))
        for name, (ids, scores, boxes) in rows.items()
    }


@pytest.mark.parametrize(("shift", "ap"), [(0.5, 1.0), (1.5, 0.0)])
def test_voc_metric_on_coco_data_uses_continuous_iou(tmp_path, shift, ap):
    """COCO corners are continuous: a 4 x 4 box and its copy moved by 1.5 px overlap by 10 / 22 = 0.45
    (the devkit's +1 pixel on these corners would say 17.5 / 32.5 = 0.54, a match); by 0.5 px 14 / 18."""
    data = valid()
    data["annotations"][0]["bbox"] = [10, 5, 4, 4]
    dataset = COCODataset(write(tmp_path, data), tmp_path, check_headers=False)
    found = ClassDetections(
        np.array([dataset.annotations[0].image_id]), np.ones(1), np.array([[10 + shift, 5, 14 + shift, 9]])
    )
    result = evaluate_results({"cat": found}, dataset, "voc07")
    assert result.ap["cat"] == pytest.approx(ap)


def test_coco_evaluation_by_hand(coco_root, tmp_path):
    dataset = COCODataset(coco_root / "annotations" / "instances_test.json", coco_root / "images")
    perfect = evaluate_coco(gt_as_detections(dataset), dataset)
    assert perfect.mAP == pytest.approx(1.0) and perfect.stats["AP50"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in perfect.ap.values() if not np.isnan(v))
    # Every box moved right by 0.24 of its width: IoU = 0.76 / 1.24 = 0.613, so each detection is a true
    # positive at the IoU thresholds 0.50, 0.55 and 0.60 and a false positive at 0.65 ... 0.95: precision 1
    # at 3 of the 10 thresholds and 0 at the others, AP@[.5:.95] = 0.3, AP50 = 1, AP75 = 0.
    shifted = evaluate_coco(gt_as_detections(dataset, shift=0.24), dataset)
    assert shifted.mAP == pytest.approx(0.3, abs=1e-6) and shifted.stats["AP50"] == pytest.approx(1.0)
    assert shifted.stats["AP75"] == pytest.approx(0.0)
    empty = {
        name: ClassDetections(np.zeros(0, dtype=str), np.zeros(0), np.zeros((0, 4))) for name in dataset.class_names
    }
    assert evaluate_coco(empty, dataset).mAP == 0.0
    nothing = evaluate_coco(empty, dataset)
    gt_labels = {int(label) for ann in dataset.annotations for label in ann.labels}
    for k, name in enumerate(dataset.class_names, start=1):  # 0 where there is GT to miss, n/a where there is none
        assert nothing.ap[name] == 0.0 if k in gt_labels else np.isnan(nothing.ap[name])
    path = write_coco_results(gt_as_detections(dataset, shift=0.24), dataset, tmp_path / "results.json")
    assert evaluate_coco(read_coco_results(path, dataset), dataset).mAP == pytest.approx(0.3, abs=1e-6)
    # A class list in another order than the category ids: each class still gets its own AP.
    reordered = COCODataset(dataset.annotation_file, coco_root / "images", list(reversed(dataset.class_names)))
    present = [name for k, name in enumerate(dataset.class_names, start=1) if k in gt_labels]
    only_first = {name: (d if name == present[0] else empty[name]) for name, d in gt_as_detections(reordered).items()}
    per_class = evaluate_coco(only_first, reordered).ap
    assert per_class[present[0]] == pytest.approx(1.0) and all(per_class[name] == 0.0 for name in present[1:])
    # Another tool's results file may hold classes outside the evaluated list: they are left out.
    subset = COCODataset(dataset.annotation_file, coco_root / "images", present[:1])
    assert set(read_coco_results(path, subset)) == {present[0]}


def test_coco_ground_truth_is_read_again_when_its_file_changes(coco_root, tmp_path):
    path = tmp_path / "instances.json"
    shutil.copy(coco_root / "annotations" / "instances_test.json", path)
    dataset = COCODataset(path, coco_root / "images")
    detections = gt_as_detections(dataset)
    assert evaluate_coco(detections, dataset).mAP == pytest.approx(1.0)
    assert evaluate_coco(detections, dataset).mAP == pytest.approx(1.0)  # from the index kept in memory
    data = json.loads(path.read_text())
    for ann in data["annotations"]:  # the ground truth moves right by 0.24 of its width: AP 0.3 (see above)
        x, y, w, h = ann["bbox"]
        ann["bbox"] = [x + 0.24 * w, y, w, h]
    path.write_text(json.dumps(data))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert evaluate_coco(detections, dataset).mAP == pytest.approx(0.3, abs=1e-6)


def test_evaluate_script_in_coco_mode(coco_root, tmp_path, run_script):
    dataset = COCODataset(coco_root / "annotations" / "instances_test.json", coco_root / "images")
    results = write_coco_results(gt_as_detections(dataset), dataset, tmp_path / "results.json")
    gt = coco_root / "annotations" / "instances_test.json"
    done = run_script("evaluate.py", "--coco-json", gt, "--detections", results, "--output-json", tmp_path / "ap.json")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "AP 100.00  AP50 100.00  AP75 100.00" in done.stdout
    assert json.loads((tmp_path / "ap.json").read_text())["mAP"] == pytest.approx(1.0)
    torch.manual_seed(0)
    model = build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.5)
    save_model(model, tmp_path / "model.pt")
    done = run_script(
        "evaluate.py", "--checkpoint", tmp_path / "model.pt", "--coco-json", gt, "--coco-images", coco_root / "images",
        "--device", "cpu", "--workers", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "results_model.json").is_file() and re.search(r"AP [\d.]+ +AP50", done.stdout)
    bad = run_script("evaluate.py", "--coco-json", gt, "--detections", tmp_path / "nowhere.json")
    assert bad.returncode == 1 and "results file does not exist" in bad.stderr


def test_training_and_distilling_on_coco_data(tmp_path, run_script):
    root = tmp_path / "coco"
    data = [
        "--config", "configs/demo_coco_synthetic.yaml", "--device", "cpu",
        f"data.coco.train_json={root}/annotations/instances_trainval.json", f"data.coco.train_images={root}/images",
        f"data.coco.test_json={root}/annotations/instances_test.json", f"data.coco.test_images={root}/images",
        "data.synthetic_sizes={trainval: 6, test: 3}", "data.batch_size=2", "data.num_workers=0",
        "optim.max_iters=2", "optim.warmup_iters=1", "train.eval_every=2", "train.checkpoint_every=2",
        "eval.batch_size=3", f"data.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    done = run_script("train_teacher.py", *data, "model.width_mult=0.75", f"train.output_dir={tmp_path / 'teacher'}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"coco mAP on {root}/annotations/instances_test.json" in done.stdout
    assert "best model: " in done.stdout and "checkpoint (resume): " in done.stdout  # where the files are
    records = [json.loads(line) for line in (tmp_path / "teacher" / "metrics.jsonl").read_text().splitlines()]
    evaluation = next(r for r in records if "mAP" in r)
    assert evaluation["metric"] == "coco" and set(evaluation["stats"]) >= {"AP", "AP50", "AP75", "AP_small"}
    done = run_script(
        "distill.py", *data, "model.width_mult=0.5", "--teacher", tmp_path / "teacher" / "best.pt",
        "distill.methods=[crosskd, fgd]", f"train.output_dir={tmp_path / 'student'}",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "(crosskd + fgd)" in done.stdout and "coco mAP on" in done.stdout
    assert len(list((tmp_path / "cache").glob("images-*.rgb"))) == 1  # decoded once, read by both runs
    train_json = f"data.coco.train_json={root}/annotations/instances_trainval.json"
    cfg = load_config("configs/demo_coco_synthetic.yaml", [train_json, "data.classes=dataset"])
    assert cfg.class_names == SYNTHETIC_CLASSES


def test_coco_config_errors():
    with pytest.raises(ValueError, match=r"needs data\.coco\.train_json"):
        load_config(None, ["data.format=coco"])
    with pytest.raises(ValueError, match=r"eval\.metric coco scores against a COCO annotation file"):
        load_config(None, ["eval.metric=coco"])
    with pytest.raises(ValueError, match="classes 'dataset' reads the categories"):
        load_config(None, ["data.classes=dataset"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(None, ["data.classes=coco"]).num_classes == 81
