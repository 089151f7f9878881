"""OnnxDetector: an exported file gives the PyTorch path's detections, with and without NMS in the graph;
files it cannot use are refused by name."""

import onnx
import pytest
import torch
from _tiny_ssd import tiny_ssd

from odkd.export import export_onnx
from odkd.inference import Predictor
from odkd.postprocess_settings import PostprocessSettings
from odkd.runtime import OnnxDetector


@pytest.mark.parametrize("in_graph", [False, True])
def test_onnx_detector_gives_the_pytorch_detections(tmp_path, in_graph):
    # Heads affine in the pixels: every score is distinct, so NMS has exactly one answer.
    torch.manual_seed(0)
    model = tiny_ssd(16, num_classes=4).eval()
    model.class_names = ("a", "b", "c")
    settings = PostprocessSettings(score_threshold=0.2, top_k=30, nms_threshold=0.45, max_detections=25)
    path = export_onnx(model, tmp_path / "m.onnx", postprocess=settings if in_graph else None)
    # A file with NMS in the graph keeps its own settings whatever it is given.
    given = PostprocessSettings(score_threshold=0.9) if in_graph else settings
    detector = OnnxDetector(path, threads=1, settings=given)
    assert (detector.image_size, detector.num_classes, detector.class_names) == (16, 4, ("a", "b", "c"))
    assert detector.precision == "float32" and detector.in_graph == in_graph
    assert detector.settings == settings
    images = (torch.rand(3, 3, 16, 16) * 255).to(torch.uint8)
    got = detector.detect_batch(images)
    expected = Predictor(model, torch.device("cpu"), settings).detect_batch(images, on_cpu=True)
    assert len(got) == 3
    for g, e in zip(got, expected, strict=True):
        assert len(e.scores) > 0
        torch.testing.assert_close(g.labels, e.labels, rtol=0, atol=0)
        # float32 through two runtimes: the network agrees to 1e-5 (test_export.py)
        torch.testing.assert_close(g.scores, e.scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(g.boxes, e.boxes, rtol=0, atol=1e-5)


def test_files_that_are_not_odkd_exports_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.onnx does not exist"):
        OnnxDetector(tmp_path / "nowhere.onnx")
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(ValueError, match=r"text\.onnx: not an ONNX model onnxruntime can load"):
        OnnxDetector(tmp_path / "text.onnx")
    # An ONNX model with other inputs and outputs, and one with the right ones but no metadata.
    for name, inputs, outputs in (("other.onnx", "x", ["y"]), ("bare.onnx", "images", ["boxes", "scores"])):
        nodes = [onnx.helper.make_node("Identity", [inputs], [o]) for o in outputs]
        graph = onnx.helper.make_graph(
            nodes,
            "g",
            [onnx.helper.make_tensor_value_info(inputs, onnx.TensorProto.FLOAT, [1, 3, 2, 2])],
            [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, [1, 3, 2, 2]) for o in outputs],
        )
        onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), tmp_path / name)
    with pytest.raises(ValueError, match=r"other\.onnx: inputs \['x'\] and outputs \['y'\] are not an odkd export's"):
        OnnxDetector(tmp_path / "other.onnx")
    with pytest.raises(ValueError, match=r"bare\.onnx: no image_size in the metadata"):
        OnnxDetector(tmp_path / "bare.onnx")
