"""scripts/evaluate.py in model mode: run a model (PyTorch or an exported ONNX file), write devkit or COCO
result files, score them, draw pictures."""

import json

import cv2
import pytest
import torch

from odkd.checkpoint import save_model
from odkd.data.synthetic import SYNTHETIC_CLASSES, make_synthetic_coco, make_synthetic_voc
from odkd.export import export_onnx
from odkd.models import build_model
from tests.conftest import load_script


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
    done = run_script("evaluate.py", "--config", config, "--checkpoint", tmp_path / "m.pt", "--workers", 0)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "results_m" / "comp4_det_test_disc.txt").is_file()
    six = ",".join([*SYNTHETIC_CLASSES, "extra"])
    done = run_script("evaluate.py", "--config", config, "--checkpoint", tmp_path / "m.pt", "--classes", six)
    assert done.returncode == 1 and "predicts 5 classes but the class list has 6" in done.stderr


def test_onnx_export_scores_what_the_pytorch_model_scores(tmp_path, capsys):
    """evaluate.py --onnx on the float export gives the AP of evaluate.py --checkpoint, with odkd's NMS
    after the file (VOC data) and with NMS in the file (COCO data). The file computes the network to
    float32 rounding (1e-5 in test_export.py), NMS is the same algorithm on both sides, and the AP code is
    shared: the per-class APs are equal unless a rounding-sized difference reorders two scores or moves an
    IoU across 0.5, which it does not on this seeded set."""
    make_synthetic_voc(tmp_path / "voc", {"test": 3}, seed=7, min_size=100, max_size=160)
    make_synthetic_coco(tmp_path / "coco", {"test": 3}, seed=7, min_size=100, max_size=160)
    torch.manual_seed(0)
    model = build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.5)
    model.class_names = SYNTHETIC_CLASSES
    save_model(model, tmp_path / "m.pt")
    names = ",".join(SYNTHETIC_CLASSES)
    voc = ["--voc-root", tmp_path / "voc", "--year", "SYN", "--image-set", "test", "--classes", names]
    evaluate = load_script("evaluate")
    coco = ["--coco-json", tmp_path / "coco/annotations/instances_test.json", "--coco-images", tmp_path / "coco/images"]
    for data, postprocess in ((voc, False), (coco, True)):
        onnx_path = export_onnx(model, tmp_path / f"m_{postprocess}.onnx", postprocess=postprocess)
        results = {}
        for flag, path in (("--checkpoint", tmp_path / "m.pt"), ("--onnx", onnx_path)):
            out = tmp_path / f"{flag[2:]}_{postprocess}"
            evaluate.main(
                [flag, str(path), *map(str, data), "--detections", str(out / ("r.json" if postprocess else "r")),
                 "--output-json", str(out / "ap.json"), "--workers", "0"]
            )  # fmt: skip
            results[flag] = json.loads((out / "ap.json").read_text())
        assert "onnxruntime on the CPU; post-processing " + ("in the graph" if postprocess else "odkd's") in (
            capsys.readouterr().out
        )
        assert results["--onnx"] == results["--checkpoint"]
        assert results["--onnx"]["mAP"] > 0  # something was detected and matched

    # Bad arguments: two models, --device with an ONNX file, a file that is not there.
    for argv, message in (
        (["--checkpoint", "m.pt", "--onnx", "m.onnx", *voc], "give one model"),
        (["--onnx", "m.onnx", "--device", "cpu", *voc], "--device is for --checkpoint"),
        (["--onnx", tmp_path / "nowhere.onnx", *voc], "nowhere.onnx does not exist"),
    ):
        with pytest.raises(SystemExit):
            evaluate.main([str(a) for a in argv])
        assert message in capsys.readouterr().err
