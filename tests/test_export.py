"""ONNX export: onnxruntime computes what PyTorch computes, for any batch size; the script end to end."""

import json
import re

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from _crowded import IMAGES, crowded_batch
from _tiny_ssd import tiny_ssd
from torch import nn

from odkd.checkpoint import save_model
from odkd.export import DeployedDetector, export_onnx, onnx_program
from odkd.models import build_model
from odkd.postprocess import nms_rows, postprocess_flat
from odkd.postprocess_settings import PostprocessSettings


def run_onnx(path, images: torch.Tensor, **inputs: torch.Tensor) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: t.numpy() for name, t in {"images": images, **inputs}.items() if t is not None})


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
    path = export_onnx(model, tmp_path / "nms.onnx", postprocess=PostprocessSettings(**settings))
    graph = onnx.load(str(path))
    assert [o.name for o in graph.graph.output] == ["boxes", "scores", "labels", "image_index"]
    metadata = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(metadata["class_names"]) == ["a", "b", "c"] and metadata["image_size"] == "16"
    assert metadata["num_classes"] == "4" and metadata["precision"] == "float32"
    # every setting in effect, the defaults included
    assert json.loads(metadata["postprocess"]) == {**settings, "variances": [0.1, 0.2], "clip": True}
    for batch in (1, 4):
        images = torch.rand(batch, 3, 16, 16) * 255
        got = run_onnx(path, images)
        with torch.no_grad():
            expected = [t.numpy() for t in DeployedDetector(model, PostprocessSettings(**settings))(images)]
        assert 0 < len(got[1]) <= 25 * batch
        assert set(got[3].tolist()) == set(range(batch))  # every image has detections
        np.testing.assert_array_equal(got[2], expected[2])  # labels
        np.testing.assert_array_equal(got[3], expected[3])  # image index
        np.testing.assert_allclose(got[0], expected[0], atol=1e-5)
        np.testing.assert_allclose(got[1], expected[1], atol=1e-6)


def float32_rounding_bound(model: nn.Module) -> float:
    """How far two correct float32 evaluations of ``model``'s boxes and probabilities (values in [0, 1]) may
    drift apart: a conv output is a sum of K products, whose rounding is at most K u relative (u = 2^-24,
    Higham's gamma_K), and to first order the layers' errors add up, so u times the sum of K over all convs."""
    convs = [c for c in model.modules() if isinstance(c, nn.Conv2d)]
    return 2.0**-24 * sum(c.in_channels // c.groups * c.kernel_size[0] * c.kernel_size[1] for c in convs)


def test_export_script(tmp_path, run_scripts):
    torch.manual_seed(0)
    model = build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.5)
    model.class_names = ("cat", "dog")
    save_model(model, tmp_path / "student.pt")
    done, missing = run_scripts(
        ("export_onnx.py", "--checkpoint", tmp_path / "student.pt", "--output", tmp_path / "student.onnx",
         "--with-postprocess", "--score-threshold", "0.3"),
        ("export_onnx.py", "--checkpoint", tmp_path / "nowhere.pt", "--output", tmp_path / "x.onnx"),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "outputs boxes, scores, labels, image_index" in done.stdout and '["cat", "dog"]' in done.stdout
    difference = float(re.search(r"network boxes and scores differ by at most (\S+);", done.stdout)[1])
    assert 0 <= difference <= float32_rounding_bound(model)  # exact agreement included
    # An untrained model's scores tie in groups: both runtimes choose among them alike.
    same, total, in_onnx = re.search(
        r"(\d+) of (\d+) PyTorch detections identical in onnxruntime \((\d+)\)", done.stdout
    ).groups()
    assert same == total == in_onnx and int(total) > 0
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_int8_export_script(tmp_path, run_script, run_scripts):
    torch.manual_seed(0)
    save_model(build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.5), tmp_path / "student.pt")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.jpg"), np.random.default_rng(i).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    common = ["--checkpoint", tmp_path / "student.pt", "--output", tmp_path / "int8.onnx"]
    done = run_script("export_onnx.py", *common, "--int8", "--calibration", 2, "--calibration-images", folder)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"calibrating on 2 of the 3 images in {folder}" in done.stdout and "MiB, int8)" in done.stdout
    assert re.search(r"INT8 \(onnxruntime\) vs float \(PyTorch\): \d+ of \d+ float detections", done.stdout)
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "int8.onnx")).metadata_props}
    assert metadata["precision"] == "int8"
    assert json.loads(metadata["quantization"])["calibration"]["images"] == 2

    # Bad arguments (usage error, exit 2) and calibration data (one line "error: ...", exit 1).
    (tmp_path / "empty").mkdir()
    nowhere, empty, config = tmp_path / "nowhere", tmp_path / "empty", tmp_path / "none.yaml"
    cases = [
        (["--int8"], "--int8 needs calibration images"),
        (["--calibration-images", folder], "calibrate an --int8 export"),
        (["--int8", "--calibration", 0, "--calibration-images", folder], "--calibration must be at least 1"),
        (["--int8", "--calibration-images", nowhere], f"error: calibration folder {nowhere} does not exist"),
        (["--int8", "--calibration-images", empty], f"error: calibration folder {empty} holds no images"),
        (["--int8", "--calibration-config", config], f"error: config file {config} does not exist"),
    ]
    refused = run_scripts(*(("export_onnx.py", *common, *args) for args, _ in cases))
    for (args, message), done in zip(cases, refused, strict=True):
        assert done.returncode == (1 if message.startswith("error: ") else 2), (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)


@pytest.mark.parametrize("name", ["vgg16_ssd300", "mobilenetv2_ssdlite320"])
def test_other_architectures_export(tmp_path, name):
    model = build_model(name, num_classes=3).eval()
    path = export_onnx(model, tmp_path / f"{name}.onnx")
    size = model.image_size
    boxes, _ = run_onnx(path, torch.rand(1, 3, size, size) * 255)
    assert boxes.shape == (1, model.priors.shape[0], 4)


class PostProcessing(nn.Module):
    def __init__(self, priors: torch.Tensor, settings: PostprocessSettings = PostprocessSettings()) -> None:
        super().__init__()
        self.register_buffer("priors", priors)
        self.settings = settings

    def forward(self, loc: torch.Tensor, conf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(postprocess_flat(loc, conf, self.priors, self.settings))


def test_exported_nms_does_not_depend_on_an_images_place_in_the_batch(tmp_path):
    """Each (image, class) is its own batch of ONNX's NonMaxSuppression: exact in float32, where one NMS
    call over coordinates shifted per group (what torchvision's batched_nms exports) rounds them: that
    form gave 5 of these 48 images other detections last in the batch than first (seeds 3 to 5)."""
    for seed in range(6):
        loc, conf, priors = crowded_batch(seed)
        program = onnx_program(PostProcessing(priors).eval(), {"loc": loc[:2], "conf": conf[:2]}, ["b", "s", "l", "i"])
        program.save(str(tmp_path / "post.onnx"))
        assert "NonMaxSuppression" in {node.op_type for node in onnx.load(str(tmp_path / "post.onnx")).graph.node}
        boxes, scores, labels, image_index = run_onnx(tmp_path / "post.onnx", None, loc=loc, conf=conf)
        expected = postprocess_flat(loc, conf, priors)
        np.testing.assert_array_equal(image_index, expected.image_index.numpy())
        np.testing.assert_array_equal(labels, expected.labels.numpy())
        np.testing.assert_allclose(boxes, expected.boxes.numpy(), atol=1e-6)
        np.testing.assert_allclose(scores, expected.scores.numpy(), atol=1e-6)
        for i in range(IMAGES):
            first, last = image_index == i, image_index == 63 - i
            assert 10 < first.sum() < 60, (seed, i)
            np.testing.assert_array_equal(boxes[first], boxes[last])


class RowNMS(nn.Module):
    def forward(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return nms_rows(boxes, scores, 0.5, 0.25)


def test_nms_rows_by_hand_in_pytorch_and_onnxruntime(tmp_path):
    # Row 0: B overlaps A by IoU 0.5 exactly (not above: kept); C by 0.75 (dropped); D scores exactly 0.25
    # (not above: no candidate). Row 1: the same boxes, other scores: C first, then A (IoU 0.75, dropped)
    # and B (IoU with C = 0.5 / 0.75 = 0.667, dropped); D is disjoint and kept.
    a, b, c, d = [0, 0, 1, 1], [0, 0, 1, 0.5], [0, 0, 1, 0.75], [2, 2, 3, 3]
    boxes = torch.tensor([[a, b, c, d], [a, b, c, d]], dtype=torch.float32)
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.25], [0.6, 0.5, 0.95, 0.3]])
    expected = [0, 1, 4 + 2, 4 + 3]
    assert sorted(RowNMS()(boxes, scores).tolist()) == expected
    onnx_program(RowNMS().eval(), {"boxes": boxes, "scores": scores}, ["kept"]).save(str(tmp_path / "rows.onnx"))
    (kept,) = run_onnx(tmp_path / "rows.onnx", None, boxes=boxes, scores=scores)
    assert sorted(kept.tolist()) == expected


def test_exported_post_processing_breaks_ties_as_pytorch(tmp_path):
    """Equal scores everywhere, as in an untrained model: the top-k cut, NMS and the per-image cap each
    choose among equal scores. Both take the lower prior index first (topk's own order made 35 of 341
    detections of a random student differ)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(400, 2, generator=g)
    priors = torch.cat((centres, 0.05 + 0.2 * torch.rand(400, 2, generator=g)), 1)
    conf = torch.randint(0, 3, (2, 400, 3), generator=g).float()  # three logit values: scores tie in groups
    loc = torch.zeros(2, 400, 4)
    settings = PostprocessSettings(score_threshold=0.1, top_k=50, nms_threshold=0.45, max_detections=30)
    module = PostProcessing(priors, settings).eval()
    program = onnx_program(module, {"loc": loc, "conf": conf}, ["b", "s", "l", "i"])
    program.save(str(tmp_path / "ties.onnx"))
    got = run_onnx(tmp_path / "ties.onnx", None, loc=loc, conf=conf)
    expected = [t.numpy() for t in module(loc, conf)]
    assert len(expected[1]) == 60  # the cap cuts through equal scores in both images
    for onnx_output, pytorch_output in zip(got, expected, strict=True):
        np.testing.assert_array_equal(onnx_output, pytorch_output)
