"""ONNX export: onnxruntime computes what PyTorch computes, for any batch size; the script end to end."""

import json
import re

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from _tiny_ssd import tiny_ssd

from odkd.checkpoint import save_model
from odkd.export import DeployedDetector, export_onnx
from odkd.models import build_model


def run_onnx(path, images: torch.Tensor) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})


def test_network_export_matches_pytorch_for_any_batch(tmp_path):
    torch.manual_seed(0)
    model = build_model("mobilenetv2_ssdlite300", num_classes=4, width_mult=0.5, dfl_bins=4).eval()
    path = export_onnx(model, tmp_path / "raw.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["boxes", "scores"]
    for batch in (1, 3):
        images = torch.rand(batch, 3, 300, 300) * 255
        boxes, scores = run_onnx(path, images)
        with torch.no_grad():
            expected_boxes, expected_scores = DeployedDetector(model)(images)
        assert boxes.shape == (batch, 3000, 4) and scores.shape == (batch, 3000, 4)
        np.testing.assert_allclose(boxes, expected_boxes.numpy(), atol=1e-5)
        np.testing.assert_allclose(scores, expected_scores.numpy(), atol=1e-5)
        np.testing.assert_allclose(scores.sum(-1), 1.0, atol=1e-5)  # probabilities, background included


def test_post_processing_export_matches_pytorch_detection_for_detection(tmp_path):
    # Heads affine in the pixels: every score is distinct, so NMS has exactly one answer.
    torch.manual_seed(0)
    model = tiny_ssd(16, num_classes=4).eval()
    model.class_names = ("a", "b", "c")
    settings = {"score_threshold": 0.2, "top_k": 30, "nms_threshold": 0.45, "max_detections": 25}
    path = export_onnx(model, tmp_path / "nms.onnx", postprocess=True, **settings)
    graph = onnx.load(str(path))
    assert [o.name for o in graph.graph.output] == ["boxes", "scores", "labels", "image_index"]
    metadata = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(metadata["class_names"]) == ["a", "b", "c"] and metadata["image_size"] == "16"
    assert json.loads(metadata["postprocess"]) == settings
    for batch in (1, 4):
        images = torch.rand(batch, 3, 16, 16) * 255
        got = run_onnx(path, images)
        with torch.no_grad():
            expected = [t.numpy() for t in DeployedDetector(model, postprocess=True, **settings)(images)]
        assert 0 < len(got[1]) <= 25 * batch
        assert set(got[3].tolist()) == set(range(batch))  # every image has detections
        np.testing.assert_array_equal(got[2], expected[2])  # labels
        np.testing.assert_array_equal(got[3], expected[3])  # image index
        np.testing.assert_allclose(got[0], expected[0], atol=1e-5)
        np.testing.assert_allclose(got[1], expected[1], atol=1e-6)


def test_export_script(tmp_path, run_script):
    torch.manual_seed(0)
    model = build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.5)
    model.class_names = ("cat", "dog")
    save_model(model, tmp_path / "student.pt")
    done = run_script(
        "export_onnx.py", "--checkpoint", tmp_path / "student.pt", "--output", tmp_path / "student.onnx",
        "--with-postprocess", "--score-threshold", "0.3",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "outputs boxes, scores, labels, image_index" in done.stdout and '["cat", "dog"]' in done.stdout
    assert re.search(r"network boxes and scores differ by at most \d\.\d\de-0[5-9]", done.stdout)
    assert re.search(r"\d+ of \d+ PyTorch detections identical in onnxruntime", done.stdout)
    missing = run_script("export_onnx.py", "--checkpoint", tmp_path / "nowhere.pt", "--output", tmp_path / "x.onnx")
    assert missing.returncode == 1 and "does not exist" in missing.stderr


@pytest.mark.parametrize("name", ["vgg16_ssd300", "mobilenetv2_ssdlite320"])
def test_other_architectures_export(tmp_path, name):
    model = build_model(name, num_classes=3).eval()
    path = export_onnx(model, tmp_path / f"{name}.onnx")
    size = model.image_size
    boxes, _ = run_onnx(path, torch.rand(1, 3, size, size) * 255)
    assert boxes.shape == (1, model.priors.shape[0], 4)
