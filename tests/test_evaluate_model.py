"""scripts/evaluate.py in model mode: run a model (PyTorch or an exported ONNX file), write devkit or COCO
result files, score them, draw pictures."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from odkd.checkpoint import save_model
from odkd.class_names import SYNTHETIC_CLASSES
from odkd.data import VOCDataset, read_image
from odkd.data.synthetic import _annotation_xml, make_synthetic_coco, make_synthetic_voc
from odkd.eval import group_by_class
from odkd.export import export_onnx
from odkd.inference import Predictor, detect_dataset
from odkd.models import build_model
from odkd.postprocess_settings import PostprocessSettings


def test_model_mode_writes_results_scores_and_pictures(tmp_path, run_script):
    make_synthetic_voc(tmp_path / "voc", {"test": 6}, seed=7)
    torch.manual_seed(0)
    save_model(build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.5), tmp_path / "m.pt")
    out = tmp_path / "out"
    done = run_script(
        "evaluate.py", "--checkpoint", tmp_path / "m.pt", "--voc-root", tmp_path / "voc", "--year", "SYN",
        "--image-set", "test", "--classes", ",".join(SYNTHETIC_CLASSES), "--detections", out,
        "--output-json", out / "ap.json", "--pr-curves", out / "pr.png", "--draw", 4, "--workers", 0,
        "--device", "cpu",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.glob("comp4_det_test_*.txt")) == sorted(
        f"comp4_det_test_{name}.txt" for name in SYNTHETIC_CLASSES
    )
    result = json.loads((out / "ap.json").read_text())
    assert set(result["ap"]) == set(SYNTHETIC_CLASSES) and 0.0 <= result["mAP"] <= 1.0
    assert cv2.imread(str(out / "pr.png")) is not None
    grid = cv2.imread(str(out / "detections.jpg"))
    assert grid is not None and grid.shape[1] == 4 * 320

    # The same through a config, and a class list that does not fit the model is refused clearly.
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data: {{voc_root: {tmp_path / 'voc'}, test_sets: SYN_test, classes: synthetic}}\n")
    done = run_script("evaluate.py", "--config", config, "--checkpoint", tmp_path / "m.pt", "--workers", 0, "--found")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "results_m" / "comp4_det_test_disc.txt").is_file()
    found_table = done.stdout.split("Found: ")[1].splitlines()
    assert found_table[1].split() == ["class", "GT", "found", "%", "median", "score", "AP", "%"]
    assert [line.split()[0] for line in found_table[2:]] == list(SYNTHETIC_CLASSES)
    six = ",".join([*SYNTHETIC_CLASSES, "extra"])
    done = run_script("evaluate.py", "--config", config, "--checkpoint", tmp_path / "m.pt", "--classes", six)
    assert done.returncode == 1 and "predicts 5 classes but the class list has 6" in done.stderr


def random_detector() -> torch.nn.Module:
    """A random x0.5 student with BatchNorm statistics of random images: with the initial statistics every
    activation vanishes after a few blocks and every score is ~1/6, ties everywhere."""
    torch.manual_seed(0)
    model = build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.5)
    model.class_names = SYNTHETIC_CLASSES
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average of the batches
    with torch.no_grad():
        for seed in range(2):
            model(model.normalize(torch.rand(4, 3, 300, 300, generator=torch.Generator().manual_seed(seed)) * 255))
    return model.eval()


def annotate_with_own_detections(model, voc: Path, coco: Path, settings: dict) -> None:
    """Make each test image's objects its two best detections by ``model`` (rounded to whole pixels), in
    the VOC and the COCO copy of the set: a random model then has an AP between 0 and 1, with true and
    false positives interleaved in its ranking."""
    predictor = Predictor(model, torch.device("cpu"), PostprocessSettings(**settings))
    data = json.loads(coco.read_text())
    category = {c["name"]: c["id"] for c in data["categories"]}
    data["annotations"] = []
    for image_id in (voc / "ImageSets" / "Main" / "test.txt").read_text().split():
        image = read_image(voc / "JPEGImages" / f"{image_id}.jpg")
        det = predictor(image)
        objects = [
            (SYNTHETIC_CLASSES[int(label) - 1], tuple(int(v) for v in box.round()), False)
            for box, label in zip(det.boxes[:2], det.labels[:2], strict=True)
        ]
        height, width = image.shape[:2]
        (voc / "Annotations" / f"{image_id}.xml").write_bytes(_annotation_xml(image_id, width, height, objects))
        for name, (x1, y1, x2, y2), _ in objects:
            data["annotations"].append(
                {"id": len(data["annotations"]) + 1, "image_id": int(image_id) + 1, "category_id": category[name],
                 "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            )  # fmt: skip
    coco.write_text(json.dumps(data))


@pytest.mark.parametrize("postprocess", [False, True], ids=["voc-odkd-nms", "coco-nms-in-graph"])
def test_onnx_export_scores_what_the_pytorch_model_scores(tmp_path, run_scripts, postprocess):
    """evaluate.py --onnx on the float export gives the AP of evaluate.py --checkpoint, with odkd's NMS
    after the file (VOC data, devkit AP) and with NMS in the file (COCO data, pycocotools AP).

    The file computes the network to float32 rounding (1e-5, test_export.py), NMS is exact on both sides
    and the AP code is shared, so the APs are equal when no two detections of a class score within 2e-5
    of each other (checked here: a swap could reorder the ranking) and no IoU lies within rounding of a
    threshold (not checked: probability ~1e-5 per pair)."""
    make_synthetic_voc(tmp_path / "voc", {"test": 3}, seed=7, min_size=100, max_size=160)
    make_synthetic_coco(tmp_path / "coco", {"test": 3}, seed=7, min_size=100, max_size=160)  # the same images
    model = random_detector()
    save_model(model, tmp_path / "m.pt")
    settings = {"score_threshold": 0.2, "top_k": 10, "max_detections": 10}
    coco_json = tmp_path / "coco/annotations/instances_test.json"
    annotate_with_own_detections(model, tmp_path / "voc" / "VOCSYN", coco_json, settings)
    dataset = VOCDataset(tmp_path / "voc", "SYN_test", SYNTHETIC_CLASSES)
    detections = detect_dataset(model, dataset, num_workers=0, progress=False, settings=PostprocessSettings(**settings))
    for name, of_class in group_by_class(detections, dataset).items():
        assert len(of_class.scores) == 0 or (np.diff(np.sort(of_class.scores)) > 2e-5).all(), name
    if postprocess:
        annotations, images = str(coco_json), str(tmp_path / "coco/images")
        files = {"train_json": annotations, "train_images": images, "test_json": annotations, "test_images": images}
        data = {"format": "coco", "classes": "synthetic", "coco": files}
    else:
        data = {"voc_root": str(tmp_path / "voc"), "test_sets": "SYN_test", "classes": "synthetic"}
    config = tmp_path / "config.yaml"  # YAML reads JSON
    config.write_text(json.dumps({"data": data, "eval": {**settings, "metric": "coco" if postprocess else "voc07"}}))

    onnx_path = export_onnx(model, tmp_path / "m.onnx", PostprocessSettings(**settings) if postprocess else None)
    models = {"--checkpoint": tmp_path / "m.pt", "--onnx": onnx_path}
    outs = {flag: tmp_path / flag[2:] for flag in models}
    written = "r.json" if postprocess else "r"
    runs = run_scripts(
        *(
            ("evaluate.py", "--config", config, flag, path, "--detections", outs[flag] / written,
             "--output-json", outs[flag] / "ap.json", "--workers", 0)
            for flag, path in models.items()
        )
    )  # fmt: skip
    for done in runs:
        assert done.returncode == 0, done.stderr
    results = {flag: json.loads((out / "ap.json").read_text()) for flag, out in outs.items()}
    printed = "".join(done.stdout for done in runs)
    assert "onnxruntime on the CPU; post-processing " + ("in the graph" if postprocess else "odkd's") in printed
    assert results["--onnx"] == results["--checkpoint"]
    assert 0 < results["--onnx"]["mAP"] < 1  # true and false positives


def test_bad_model_arguments_are_refused(tmp_path, run_scripts):
    """Two models, --device with an ONNX file, a file that is not there, --found without a model: refused with a
    message."""
    make_synthetic_voc(tmp_path / "voc", {"test": 1}, seed=7, min_size=100, max_size=160)
    config = tmp_path / "voc.yaml"
    data = {"voc_root": str(tmp_path / "voc"), "test_sets": "SYN_test", "classes": "synthetic"}
    config.write_text(json.dumps({"data": data}))
    cases = (
        (["--checkpoint", "m.pt", "--onnx", "m.onnx"], "give one model"),
        (["--onnx", "m.onnx", "--device", "cpu"], "--device is for --checkpoint"),
        (["--onnx", tmp_path / "nowhere.onnx"], "nowhere.onnx does not exist"),
        (["--detections", tmp_path, "--found"], "--found needs a model"),
    )
    refused = run_scripts(*(("evaluate.py", "--config", config, *argv) for argv, _ in cases))
    for (argv, message), done in zip(cases, refused, strict=True):
        assert done.returncode != 0 and message in done.stderr, (argv, done.stderr)
