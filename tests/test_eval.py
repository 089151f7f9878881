"""PASCAL VOC evaluation: hand-computed cases, vectorised == loop, result files, and real devkit numbers."""

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

from odkd.class_names import VOC_CLASSES
from odkd.data import ImageDetections
from odkd.data.voc import Annotation, load_annotations
from odkd.eval import (
    average_precision,
    evaluate,
    format_ap_table,
    format_found_table,
    found_per_class,
    match_detections,
    match_detections_reference,
    precision_recall,
    read_devkit_results,
    results_path,
    write_devkit_results,
)

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT.parent / "shared" / "reference" / "voc07_val_eval_case"


def flags(scores, boxes, image_index, gt_boxes, gt_difficult, gt_image_index, iou_threshold=0.5):
    """TP and FP flags (as lists, in score order) from both matchers, checked equal."""
    args = (
        np.asarray(scores, dtype=np.float64),
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(image_index, dtype=np.int64),
        np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(gt_difficult, dtype=bool),
        np.asarray(gt_image_index, dtype=np.int64),
        iou_threshold,
    )
    tp, fp = match_detections(*args)
    ref_tp, ref_fp = match_detections_reference(*args)
    np.testing.assert_array_equal(tp, ref_tp)
    np.testing.assert_array_equal(fp, ref_fp)
    return tp.tolist(), fp.tolist()


def annotation(image_id, boxes, labels, difficult=None):
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    difficult = np.zeros(len(boxes), dtype=bool) if difficult is None else np.asarray(difficult, dtype=bool)
    return Annotation(image_id, 500, 400, boxes, np.asarray(labels, dtype=np.int64), difficult)


# --- matching, by hand -----------------------------------------------------------------------------

A = [1, 1, 100, 100]  # 100 x 100 = 10000 pixels
A_TOP = [1, 1, 100, 60]  # 100 x 60 pixels, inside A: IoU(A, A_TOP) = 6000 / 10000 = 0.6
A_RIGHT = [51, 1, 150, 100]  # overlaps A in 50 x 100 pixels: IoU = 5000 / 15000 = 1/3


def test_true_positive_duplicate_and_low_overlap():
    # Scores out of order on purpose: the matcher sorts them.
    tp, fp = flags(
        scores=[0.7, 0.9, 0.8, 0.6],
        boxes=[A_RIGHT, A, A, A],
        image_index=[0, 0, 0, 1],
        gt_boxes=[A],
        gt_difficult=[False],
        gt_image_index=[0],
    )
    # 0.9 on A: TP; 0.8 on A again: duplicate; 0.7 at IoU 1/3: FP; 0.6 in an image without GT: FP.
    assert tp == [True, False, False, False]
    assert fp == [False, True, True, True]


def test_duplicate_does_not_fall_back_to_the_next_best_gt():
    # The second detection overlaps A_TOP at 0.6 but A (taken) more: the devkit calls it a duplicate.
    tp, fp = flags([0.9, 0.8], [A, A], [0, 0], [A, A_TOP], [False, False], [0, 0])
    assert tp == [True, False]
    assert fp == [False, True]


def test_detection_on_difficult_gt_is_ignored():
    # Best overlap is the difficult A (1.0), not A_TOP (0.6): ignored, neither TP nor FP.
    tp, fp = flags([0.9, 0.8], [A, A_TOP], [0, 0], [A, A_TOP], [True, False], [0, 0])
    assert tp == [False, True]
    assert fp == [False, False]
    # Twice on the same difficult GT: still ignored, never a duplicate.
    tp, fp = flags([0.9, 0.8], [A, A], [0, 0], [A], [True], [0])
    assert (tp, fp) == ([False, False], [False, False])


def test_inclusive_pixel_iou():
    # Devkit areas count pixels: [1,1,10,10] is 10 x 10 = 100, [1,1,10,20] is 10 x 20 = 200, overlap 100:
    # IoU = 100 / 200 = 0.5 exactly, a match at threshold 0.5 (continuous areas would give 81/171 = 0.47).
    assert flags([0.9], [[1, 1, 10, 10]], [0], [[1, 1, 10, 20]], [False], [0]) == ([True], [False])
    # Boxes sharing the column x = 10 overlap by 10 pixels: IoU = 10 / (100 + 100 - 10).
    touching = ([0.9], [[1, 1, 10, 10]], [0], [[10, 1, 19, 10]], [False], [0])
    assert flags(*touching, iou_threshold=10 / 190) == ([True], [False])
    assert flags(*touching, iou_threshold=np.nextafter(10 / 190, 1)) == ([False], [True])


def test_equal_scores_keep_file_order():
    gt = [annotation("a", [A], [1]), annotation("b", [], [])]
    miss = (["b"], [0.9], [A])  # a detection in an image without GT
    hit = (["a"], [0.9], [A])
    for first, second, expected_ap in ((miss, hit, 0.5), (hit, miss, 1.0)):
        ids, scores, boxes = (first[i] + second[i] for i in range(3))
        result = evaluate({"cat": (ids, scores, boxes)}, gt, ["cat"], metric="area")
        assert result.ap["cat"] == expected_ap


# --- precision, recall, AP, by hand -----------------------------------------------------------------


def test_precision_recall_and_ap_by_hand():
    # TP, FP, TP, FP, TP against 4 GT.
    recall, precision = precision_recall(np.array([1, 0, 1, 0, 1], bool), np.array([0, 1, 0, 1, 0], bool), npos=4)
    np.testing.assert_allclose(recall, [0.25, 0.25, 0.5, 0.5, 0.75])
    np.testing.assert_allclose(precision, [1, 0.5, 2 / 3, 0.5, 0.6])
    # 11-point: t = 0, .1, .2 -> 1; t = .3, .4, .5 -> 2/3; t = .6, .7 -> 0.6; t = .8, .9, 1 -> 0.
    assert average_precision(recall, precision, "voc07") == pytest.approx((3 * 1 + 3 * 2 / 3 + 2 * 0.6) / 11)
    # Area: precision made non-increasing is 1 up to recall .25, 2/3 up to .5, 0.6 up to .75, 0 after.
    assert average_precision(recall, precision, "area") == pytest.approx(0.25 * (1 + 2 / 3 + 0.6))


def test_voc07_thresholds_are_numpy_arange():
    # Recall exactly 3/10 = 0.3 falls short of np.arange's fourth threshold, 0.30000000000000004.
    assert average_precision(np.array([0.3]), np.array([1.0]), "voc07") == pytest.approx(3 / 11)


def test_no_detections_and_unknown_metric():
    assert average_precision(np.zeros(0), np.zeros(0), "voc07") == 0.0
    assert average_precision(np.zeros(0), np.zeros(0), "area") == 0.0
    with pytest.raises(ValueError, match="unknown metric"):
        average_precision(np.zeros(0), np.zeros(0), "voc12")


def test_class_without_gt_is_left_out_of_the_map():
    gt = [annotation("a", [A, A_RIGHT, [200, 200, 300, 300]], [1, 2, 3], difficult=[False, True, False])]
    detections = {"cat": (["a"], [0.9], [A]), "dog": (["a"], [0.9], [A_RIGHT])}
    result = evaluate(detections, gt, ["cat", "dog", "cow"])
    assert result.ap["cat"] == pytest.approx(1.0)  # 11 x (1/11) in floating point
    assert math.isnan(result.ap["dog"])  # its only GT is difficult
    assert result.ap["cow"] == 0.0  # GT, but no detections
    assert result.mAP == pytest.approx(0.5)
    assert result.npos == {"cat": 1, "dog": 0, "cow": 1}
    assert result.to_json() == {
        "metric": "voc07",
        "mAP": result.mAP,
        "ap": {"cat": result.ap["cat"], "dog": None, "cow": 0.0},
    }
    table = format_ap_table(result)
    assert "100.00" in table and "n/a" in table and table.splitlines()[-2].split() == ["mAP", "50.00"]


def test_bad_inputs_are_named():
    gt = [annotation("a", [A], [1])]
    with pytest.raises(ValueError, match="'nowhere'"):
        evaluate({"cat": (["a", "nowhere"], [0.9, 0.8], [A, A])}, gt, ["cat"])
    with pytest.raises(ValueError, match="unknown classes"):
        evaluate({"dog": (["a"], [0.9], [A])}, gt, ["cat"])
    with pytest.raises(ValueError, match="'a' more than once"):
        evaluate({}, gt + gt, ["cat"])
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):  # at 0 a box touching nothing would match
        evaluate({}, gt, ["cat"], iou_threshold=0.0)


# --- vectorised == loop ----------------------------------------------------------------------------


def random_case(seed: int, num_images: int = 300):
    """One class's GT and detections with duplicate GT boxes (IoU ties), difficult flags and score ties."""
    rng = np.random.default_rng(seed)
    gt_image_index = np.repeat(np.arange(num_images), rng.integers(0, 7, num_images))
    num_gt = len(gt_image_index)
    # Half the GT are one of four 80 x 80 boxes, so that an image often holds the same box twice.
    grid = rng.random((num_gt, 1)) < 0.5
    xy = np.where(grid, rng.integers(0, 2, (num_gt, 2)) * 40 + 1, rng.integers(1, 300, (num_gt, 2)))
    gt_boxes = np.concatenate([xy, xy + np.where(grid, 80, rng.integers(10, 120, (num_gt, 2)))], axis=1).astype(float)
    gt_difficult = rng.random(num_gt) < 0.2
    # Jittered copies of GT (several per GT: duplicates) and random boxes in random images.
    near = rng.integers(0, num_gt, 3 * num_gt)
    jittered = gt_boxes[near] + rng.integers(-15, 16, (len(near), 4))
    xy = rng.integers(1, 300, (num_gt, 2))
    scattered = np.concatenate([xy, xy + rng.integers(10, 120, (num_gt, 2))], axis=1)
    boxes = np.concatenate([jittered, scattered]).astype(np.float64)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    image_index = np.concatenate([gt_image_index[near], rng.integers(0, num_images, num_gt)])
    scores = rng.integers(0, 20, len(boxes)) / 20  # many ties
    return scores, boxes, image_index, gt_boxes, gt_difficult, gt_image_index


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("iou_threshold", [0.5, 0.7])
def test_vectorised_equals_reference_loop(seed, iou_threshold):
    case = random_case(seed)
    tp, fp = flags(*case, iou_threshold=iou_threshold)
    assert sum(tp) > 0 and sum(fp) > 0 and sum(tp) + sum(fp) < len(tp)  # TPs, FPs and ignored ones


def test_vectorised_memory_chunks_agree(monkeypatch):
    case = random_case(0)
    whole = match_detections(*case)
    monkeypatch.setattr("odkd.eval.voc._CHUNK_PAIRS", 16)
    chunked = match_detections(*case)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])


# --- devkit result files ---------------------------------------------------------------------------


def test_result_files_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.array([f"{i:06d}" for i in rng.integers(0, 1000, 50)])
    boxes = rng.uniform(1, 500, (50, 4))
    detections = {"cat": (ids, rng.random(50), boxes), "dog": (ids[:3], rng.random(3), boxes[:3])}
    paths = write_devkit_results(tmp_path, "test", ["cat", "dog", "cow"], detections)
    assert [p.name for p in paths] == ["comp4_det_test_cat.txt", "comp4_det_test_dog.txt", "comp4_det_test_cow.txt"]
    assert paths[1].read_text().splitlines()[0].split()[1:] == [f"{detections['dog'][1][0]:.6f}"] + [
        f"{x:.1f}" for x in boxes[0]
    ]
    read = read_devkit_results(tmp_path, "test", ["cat", "dog", "cow"])
    for name, (image_ids, scores, boxes) in detections.items():
        assert read[name].image_ids.tolist() == image_ids.tolist()
        np.testing.assert_allclose(read[name].scores, scores, atol=5e-7)
        np.testing.assert_allclose(read[name].boxes, boxes, atol=0.05 + 1e-9)
    assert len(read["cow"].scores) == 0

    paths[2].unlink()
    with pytest.warns(UserWarning, match="no detections for cow"):
        assert len(read_devkit_results(tmp_path, "test", ["cow"])["cow"].scores) == 0


@pytest.mark.parametrize("bad_line", ["000005 0.9 1 2 3", "000005 0.9 1 2 3 4 5", "000005 0.9 1 two 3 4"])
def test_malformed_result_line_names_file_and_line(tmp_path, bad_line):
    path = results_path(tmp_path, "test", "cat")
    path.write_text(f"000001 0.5 1 2 3 4\n\n{bad_line}\n000007 0.1 1 2 3 4\n")
    with pytest.raises(ValueError, match=f"{path}:3: malformed line"):
        read_devkit_results(tmp_path, "test", ["cat"])


def test_missing_results_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="results folder does not exist"):
        read_devkit_results(tmp_path / "nowhere", "test", ["cat"])


# --- the official devkit's numbers on VOC2007 val ----------------------------------------------------


@pytest.fixture(scope="module")
def devkit_case(tmp_path_factory):
    """The extracted case folder (``VOCdevkit/``, ``results/``) and the devkit's expected APs."""
    archive = CASE / "voc_eval_case.tar.gz"
    if not archive.is_file():
        pytest.skip(f"reference case {archive} is not available")
    folder = tmp_path_factory.mktemp("voc_eval_case")
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder, json.loads((CASE / "expected_ap.json").read_text())


def assert_matches_devkit(ap: dict, expected: dict) -> None:
    for name in [*VOC_CLASSES, "mAP"]:
        assert ap[name] == pytest.approx(expected[name], abs=1e-4), name


@pytest.mark.parametrize("metric", ["voc07", "area"])
def test_devkit_numbers_through_the_api(devkit_case, metric):
    folder, expected = devkit_case
    _, annotations = load_annotations(folder / "VOCdevkit", "2007_val", VOC_CLASSES)
    detections = read_devkit_results(folder / "results", "val", VOC_CLASSES)
    result = evaluate(detections, annotations, VOC_CLASSES, metric=metric)
    assert_matches_devkit({**result.ap, "mAP": result.mAP}, expected[metric])


def test_class_subset_keeps_the_devkit_numbers_of_its_classes(devkit_case):
    # Trained on a few VOC classes, the other objects are left out: the devkit scores each class against
    # its own objects only, so the listed classes keep their full-VOC AP.
    folder, expected = devkit_case
    subset = ("bus", "cat", "person", "train")
    _, annotations = load_annotations(folder / "VOCdevkit", "2007_val", subset)
    assert {label for a in annotations for label in a.labels.tolist()} <= {1, 2, 3, 4}
    result = evaluate(read_devkit_results(folder / "results", "val", subset), annotations, subset)
    for name in subset:
        assert result.ap[name] == pytest.approx(expected["voc07"][name], abs=1e-4), name


def test_class_subset_through_the_script(devkit_case, run_script):
    folder, expected = devkit_case
    others = ",".join(name for name in VOC_CLASSES if name not in ("cat", "dog"))
    output = folder / "ap_subset.json"
    args = ["--detections", folder / "results", "--voc-root", folder / "VOCdevkit", "--year", "2007"]
    args += ["--image-set", "val", "--classes", "cat,dog", "--ignore-classes", others, "--output-json", output]
    done = run_script("evaluate.py", *args)
    assert done.returncode == 0, done.stderr
    written = json.loads(output.read_text())["ap"]
    assert written == pytest.approx({name: expected["voc07"][name] for name in ("cat", "dog")}, abs=1e-4)
    bad = run_script("evaluate.py", *args[:-4], "--classes", "cat,dog", "--ignore-classes", "dog")
    assert bad.returncode != 0 and "data.ignore_classes: ['dog'] are also in data.classes" in bad.stderr


@pytest.mark.parametrize("metric", ["voc07", "area"])
def test_devkit_numbers_through_the_script(devkit_case, run_script, metric):
    folder, expected = devkit_case
    output = folder / f"ap_{metric}.json"
    args = ["--detections", folder / "results", "--voc-root", folder / "VOCdevkit", "--year", "2007"]
    done = run_script("evaluate.py", *args, "--image-set", "val", "--metric", metric, "--output-json", output)
    assert done.returncode == 0, done.stderr
    assert "mAP" in done.stdout
    written = json.loads(output.read_text())
    assert written["metric"] == metric
    assert_matches_devkit({**written["ap"], "mAP": written["mAP"]}, expected[metric])


def test_script_reports_bad_input_in_one_line(tmp_path, run_script):
    args = ["--detections", tmp_path, "--voc-root", tmp_path / "nowhere", "--year", "2007", "--image-set", "val"]
    done = run_script("evaluate.py", *args)
    message = done.stderr.strip()
    assert done.returncode == 1
    assert message.startswith(f"error: {tmp_path / 'nowhere' / 'VOC2007'} does not exist") and "\n" not in message


def test_found_per_class_by_hand():
    """Found = the best-scoring detection overlapping the object (devkit IoU >= 0.5, any class) is of its class.

    Image 0: the disc is covered by a block detection (0.9) above a disc detection (0.3): not found; the block is
    found at 0.6. Image 1: a disc detection shifted by 1 pixel (IoU 90/110) at 0.4 finds the disc; a disc
    detection at 0.95 shifted by 5 pixels (IoU 50/150) does not count; the difficult disc is left out.
    Image 2 has no detections: its disc is not found."""

    def annotation(boxes, labels, difficult):
        return Annotation("x", 100, 100, np.array(boxes, np.float32), np.array(labels), np.array(difficult))

    def detections(boxes, scores, labels):
        return ImageDetections(np.array(boxes, np.float64), np.array(scores, np.float32), np.array(labels))

    square = [0, 0, 9, 9]
    annotations = [
        annotation([square, [20, 20, 29, 29]], [1, 2], [False, False]),
        annotation([square, [50, 50, 59, 59]], [1, 1], [False, True]),
        annotation([square], [1], [False]),
    ]
    found = found_per_class(
        {
            0: detections([square, square, [20, 20, 29, 29]], [0.9, 0.3, 0.6], [2, 1, 2]),
            1: detections([[5, 0, 14, 9], [1, 0, 10, 9]], [0.95, 0.4], [1, 1]),
        },
        annotations,
        ("disc", "block", "triangle"),
    )
    assert found["disc"].objects == 3 and found["disc"].found == 1
    assert found["disc"].median_score == pytest.approx(0.4)  # float32: rel. error <= 2**-24 < approx's 1e-6
    assert found["block"] == (1, 1, pytest.approx(0.6))
    triangle = found["triangle"]
    assert triangle.objects == 0 and triangle.found == 0 and math.isnan(triangle.median_score)

    table = format_found_table(found, {"disc": 0.25, "block": 1.0, "triangle": math.nan}).splitlines()
    assert table[1].split() == ["disc", "3", "33.3", "0.40", "25.00"]
    assert table[2].split() == ["block", "1", "100.0", "0.60", "100.00"]
    assert table[3].split() == ["triangle", "0", "-", "-", "-"]
