"""scripts/evaluate.py in model mode: run a model, write devkit files, score them, draw pictures."""

import json

import cv2
import torch

from odkd.checkpoint import save_model
from odkd.data.synthetic import SYNTHETIC_CLASSES, make_synthetic_voc
from odkd.models import build_model


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
