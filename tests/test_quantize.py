"""INT8 export: the quantised network stays within the error its quantisation steps allow, its detections
overlap the float model's by a derived bound, only the network is quantised, calibration sources."""

import json
from collections import Counter

import cv2
import numpy as np
import onnx
import pytest
import torch
from _tiny_ssd import conv_ssd, tiny_ssd
from onnx import numpy_helper
from torchvision.ops import box_iou

from odkd.boxes import cxcywh_to_xyxy, decode
from odkd.data import DatasetError
from odkd.data.synthetic import make_synthetic_voc
from odkd.export import DeployedDetector, export_onnx
from odkd.losses import MultiBoxLoss
from odkd.matching import match
from odkd.postprocess import Detections
from odkd.postprocess_settings import PostprocessSettings
from odkd.quantize import (
    CalibrationImages,
    export_int8,
    head_convs,
    matched_detections,
    network_nodes,
    quantize_onnx,
)
from odkd.runtime import OnnxDetector

U = 2.0**-24  # float32 unit roundoff
# Float rounding between onnxruntime's and PyTorch's float parts (softmax, decode: a few roundings and
# onnxruntime's vectorised exp, accurate to a few units in the last place) on values <= 1: 64 units at 1.0,
# far below any quantisation step here.
FLOAT_SLACK = 64 * U


def coloured_squares(priors: torch.Tensor, count: int, size: int = 16, seed: int = 0):
    """``count`` noisy grey ``size``-pixel images with one 6-pixel square object each, red (class 1) or
    green (class 2), drawn as the pixels whose first prior (6 pixels, centred on the pixel) matches it (IoU
    >= 0.5): what a 1x1 head can learn exactly. uint8 ``(count, 3, S, S)``, boxes ``(count, 1, 4)``
    relative, labels ``(count, 1)``."""
    g = torch.Generator().manual_seed(seed)
    images = (100 + 30 * torch.rand(count, 3, size, size, generator=g)).to(torch.uint8)
    boxes, labels = torch.zeros(count, 1, 4), torch.zeros(count, 1, dtype=torch.int64)
    cells = cxcywh_to_xyxy(priors[::2])  # one per pixel, row by row
    for i in range(count):
        x, y = (int(v) for v in torch.randint(0, size - 6 + 1, (2,), generator=g))
        boxes[i, 0] = torch.tensor([x, y, x + 6, y + 6]) / size
        labels[i, 0] = 1 + i % 2
        drawn = (box_iou(boxes[i], cells)[0] >= 0.5).reshape(size, size)
        images[i][:, drawn] = torch.tensor([230, 40, 40] if i % 2 == 0 else [40, 230, 40], dtype=torch.uint8)[:, None]
    # The extremes of every channel (a corner no object reaches), so the calibrated input range covers
    # any image (see network_bounds).
    images[0, :, 0, 0], images[1, :, 0, 0] = 0, 255
    return images, boxes, labels


@pytest.fixture(scope="module")
def trained():
    """A tiny SSD (1x1 heads on the image, 6-pixel priors) trained for 150 steps to find the squares
    (scores of 0.99 on them), and its images."""
    torch.manual_seed(0)
    model = tiny_ssd(16, num_classes=3, min_size=6.0, max_size=6.0)
    images, boxes, labels = coloured_squares(model.priors, 8)
    loc_t, conf_t = match(boxes, labels, model.priors)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        out = model(model.normalize(images))
        loss = sum(MultiBoxLoss()(out.loc, out.conf, loc_t, conf_t).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), images


def calibrated_on(images: torch.Tensor) -> CalibrationImages:
    return CalibrationImages(lambda i: images[i], len(images), len(images), f"{len(images)} test images")


def conv_quantisation(path) -> dict[str, dict]:
    """Per quantised Conv node of a QDQ file, by its float weight's name: the scales of its input
    (``s_x``), weights (``s_w``, one per output channel) and output (``s_y``, None when float), the weights'
    zero points, and the dequantised weights ``w`` and bias ``b``."""
    graph = onnx.load(str(path)).graph
    constants = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def scale(name: str) -> float:
        """The step of the (per-tensor) DequantizeLinear that makes activation ``name``."""
        assert producer[name].op_type == "DequantizeLinear"
        return float(constants[producer[name].input[1]])

    def dequantise(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values, scale, zero point) of the DequantizeLinear that makes constant ``name``."""
        node = producer[name]
        assert node.op_type == "DequantizeLinear"
        q, scale = constants[node.input[0]], constants[node.input[1]]
        zero = constants[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros_like(scale)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        if scale.ndim:  # per channel along the axis
            shape[axis] = -1
        return (q - zero.reshape(shape)) * scale.reshape(shape), scale, zero

    found = {}
    for conv in (n for n in graph.node if n.op_type == "Conv" and n.input[1] not in constants):
        w, s_w, zero_w = dequantise(conv.input[1])
        out = [n for n in graph.node if conv.output[0] in n.input and n.op_type == "QuantizeLinear"]
        found[producer[conv.input[1]].input[0].removesuffix("_quantized")] = {
            "s_x": scale(conv.input[0]),
            "s_w": s_w,
            "zero_w": zero_w,
            "w": w,
            "b": dequantise(conv.input[2])[0],
            "s_y": float(constants[out[0].input[1]]) if out else None,
        }
    return found


def network_bounds(model, images: torch.Tensor, path) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, prior and class the largest difference the INT8 file at ``path`` (calibrated on
    ``images``) may show from the float model on ``images``: ``(B, P, C)`` for the scores and ``(B, P, 4)``
    for the box corners.

    The heads of :func:`tiny_ssd` are 1x1 convolutions of the normalised image x. With quantised input
    x^ (step s_x: |x^ - x| <= s_x / 2, x inside its calibrated range since the calibration images are
    these), weights w^ and bias b^ read back from the file, and the output rounded to its step s_y
    (<= s_y / 2 more, whether or not it is clipped to its calibrated range, which holds every float output):

        |y^ - y| <= sum_i |w^_i - w_i| |x_i| + sum_i |w^_i| s_x / 2 + |b^ - b| + s_y / 2

    plus float rounding of the sums (16 u of their magnitudes). Softmax: logits each moved by at most
    e_k move p_k by a factor within exp(+-(e_k + max_j e_j)), so |p^_k - p_k| <= p_k (exp(e_k + max e) - 1).
    Decode: cx moves by at most 0.1 w_prior e_cx; the width is w_prior exp(0.2 l_w), so w moves by at
    most w (exp(0.2 e_w) - 1); a corner cx -+ w / 2 by the first plus half the second; the clamp to
    [0, 1] moves nothing further apart.
    """
    x = model.normalize(images).double()  # (B, 3, S, S)
    quantised = conv_quantisation(path)
    errors = {}
    for kind, head in (("conf", model.conf_heads[0].predictor), ("loc", model.loc_heads[0].predictor)):
        q = quantised[f"model.{kind}_heads.0.predictor.weight"]
        w, b = head.weight.detach().double()[:, :, 0, 0], head.bias.detach().double()  # (O, 3), (O,)
        w_q, b_q = torch.from_numpy(q["w"])[:, :, 0, 0], torch.from_numpy(q["b"])
        weight_part = torch.einsum("oi,bihw->bohw", (w_q - w).abs(), x.abs())
        input_part = (w_q.abs().sum(1) * q["s_x"] / 2).view(1, -1, 1, 1)
        magnitude = torch.einsum("oi,bihw->bohw", w.abs(), x.abs()) + b.abs().view(1, -1, 1, 1)
        error = weight_part + input_part + (b_q - b).abs().view(1, -1, 1, 1) + q["s_y"] / 2 + 16 * U * magnitude
        errors[kind] = error.permute(0, 2, 3, 1).reshape(len(images), -1, 4 if kind == "loc" else model.num_classes)
    with torch.no_grad():
        out = model(model.normalize(images))
        probs = out.conf.double().softmax(-1)
        widths = (
            decode(out.loc.double(), model.priors.double())[..., 2:]
            - decode(out.loc.double(), model.priors.double())[..., :2]
        )
    conf_error = errors["conf"]
    score_bound = probs * torch.expm1(conf_error + conf_error.amax(-1, keepdim=True))
    prior_wh = model.priors[:, 2:].double()
    centre = 0.1 * prior_wh * errors["loc"][..., :2]  # (B, P, 2) x, y
    size = widths * torch.expm1(0.2 * errors["loc"][..., 2:]) / 2
    corner = (centre + size).repeat(1, 1, 2)  # x1, y1, x2, y2
    return score_bound, corner


def test_int8_network_within_the_bound_its_quantisation_steps_allow(trained, tmp_path):
    """Every score and box corner of every prior of the INT8 export (the default: everything in the
    network quantised, weights per channel on 7 bits) is within the derived bound of the float model's."""
    model, images = trained
    path = export_int8(model, tmp_path / "int8.onnx", calibrated_on(images))
    for name, q in conv_quantisation(path).items():
        # Symmetric (zero point 0) per output channel on -64..64 (reduce_range): step max|w_o| / 64 (the
        # float32 scale rounds it by u), so each weight is off by at most half a step.
        w = dict(model.named_parameters())[name.removeprefix("model.")].detach().double().numpy()
        max_abs = np.abs(w).reshape(len(w), -1).max(1)
        assert not q["zero_w"].any()
        np.testing.assert_allclose(q["s_w"], max_abs / 64, rtol=2 * U)
        assert (np.abs(q["w"] - w).reshape(len(w), -1).max(1) <= q["s_w"] / 2 * (1 + 4 * U)).all()
    boxes, scores = OnnxDetector(path).run(images.float().numpy())
    with torch.no_grad():
        float_boxes, float_scores = (t.double() for t in DeployedDetector(model)(images.float()))
    score_bound, corner_bound = network_bounds(model, images, path)
    score_error = (torch.from_numpy(scores).double() - float_scores).abs()
    box_error = (torch.from_numpy(boxes).double() - float_boxes).abs()
    assert (score_error <= score_bound + FLOAT_SLACK).all(), (score_error - score_bound).max()
    assert (box_error <= corner_bound + FLOAT_SLACK).all(), (box_error - corner_bound).max()
    assert float(score_error.max()) > 0  # it was quantised: the float model's outputs are not reproduced


def iou_lower_bound(box: torch.Tensor, e: float, t: float) -> float:
    """Least IoU with ``box`` (x1, y1, x2, y2, sides w, h) of any box B whose IoU with some box A' is >= t,
    every corner of A' within ``e`` of ``box``'s (A' = ``box`` itself when t = 1 and e = 0).

    A' lies between ``box`` shrunk and grown by e, so A' and ``box`` differ in at most
    D = (w + 2e)(h + 2e) - (w - 2e)(h - 2e) = 4 e (w + h); B's intersection with ``box`` is then at least
    I' - D and the union at most U' + D, so IoU >= (t U' - D) / (U' + D), increasing in U' >= |A'| >=
    a = (w - 2e)(h - 2e): IoU >= (t a - D) / (a + D)."""
    w, h = float(box[2] - box[0]), float(box[3] - box[1])
    a, d = max(w - 2 * e, 0.0) * max(h - 2 * e, 0.0), 4 * e * (w + h)
    return (t * a - d) / (a + d) if a > 0 else -1.0


def test_int8_detections_overlap_the_float_models_by_the_derived_bound(trained, tmp_path):
    """With NMS in the graph: every float (PyTorch) detection A of prior p whose score s is above the
    threshold by more than the score bound d of (p, its class) has an INT8 detection B of its image and
    class with score >= s - d and IoU(B, A) >= :func:`iou_lower_bound` (A's corners within the bound e of
    p, t = the NMS threshold).

    Why: p's INT8 score is >= s - d > threshold, so p is a candidate (top-k and the cap cut nothing
    here); greedy NMS keeps it (B = p's INT8 box, corners within e of A) or drops it for a kept box B
    scoring at least as high whose IoU with p's INT8 box is above t."""
    model, images = trained
    settings = PostprocessSettings(score_threshold=0.2, nms_threshold=0.45, top_k=512, max_detections=1024)
    path = export_int8(model, tmp_path / "int8_nms.onnx", calibrated_on(images), postprocess=settings)
    got = OnnxDetector(path).detect_batch(images)
    with torch.no_grad():
        expected = DeployedDetector(model, postprocess=settings)(images.float())
        raw_boxes, _ = DeployedDetector(model)(images.float())
    score_bound, corner_bound = network_bounds(model, images, path)
    checked = 0
    for box, score, label, image in zip(*expected, strict=True):
        priors = (raw_boxes[image] == box).all(1).nonzero()[:, 0]  # the prior(s) with exactly this box
        d = float(score_bound[image, priors, label].max()) + FLOAT_SLACK
        e = float(corner_bound[image, priors].max()) + FLOAT_SLACK
        if score - d <= settings.score_threshold:
            continue
        mine = got[image].labels == label
        ious = box_iou(box[None].double(), got[image].boxes[mine].double())[0]
        ok = (got[image].scores[mine] >= score - d) & (ious >= iou_lower_bound(box, e, settings.nms_threshold))
        assert ok.any(), (int(image), int(label), float(score), d, e)
        checked += 1
    assert checked >= len(images)  # at least one confident float detection per image was checked

    # Only the network is quantised: after the heads' convolutions, their outputs' own QuantizeLinear ->
    # DequantizeLinear pair and nothing else of the kind (decode, softmax, NMS are float).
    graph = onnx.load(str(path)).graph
    below = descendants(graph, head_convs(graph))
    kinds = Counter(n.op_type for n in below)
    assert kinds["QuantizeLinear"] == kinds["DequantizeLinear"] == 2  # one pair per head output
    pairs = [n for n in below if n.op_type == "QuantizeLinear"]
    assert all(producer_of(graph, n.input[0]).op_type == "Conv" for n in pairs)
    assert {"Softmax", "NonMaxSuppression"} <= set(kinds)


def producer_of(graph, name: str):
    return next(n for n in graph.node if name in n.output)


def descendants(graph, names: set[str]) -> list:
    """The nodes that depend on the outputs of the nodes called ``names`` (not those nodes)."""
    tensors = {o for n in graph.node if n.name in names for o in n.output}
    found = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.name not in names and tensors & set(node.input):
            found.append(node)
            tensors |= set(node.output)
    return found


def test_only_the_convolutional_network_is_quantised(tmp_path):
    """:func:`network_nodes` and :func:`head_convs` on a graph whose answer is known by hand, and the
    quantised file with and without float heads."""
    torch.manual_seed(0)
    model = conv_ssd(16, num_classes=3).eval()
    float_path = export_onnx(model, tmp_path / "float.onnx")
    graph = onnx.load(str(float_path)).graph
    network = network_nodes(graph)
    # Normalisation (Sub, Div), backbone 2 x (conv, ReLU6 = Clip; BatchNorm folded by the exporter),
    # heads 2 x (depthwise conv, ReLU6, 1x1 conv); the 1x1 convs are the heads' last.
    assert Counter(n.op_type for n in graph.node if n.name in network) == {"Conv": 6, "Clip": 4, "Sub": 1, "Div": 1}
    heads = {"model.conf_heads.0.predictor.weight", "model.loc_heads.0.predictor.weight"}  # the 1x1 convs
    assert {n.input[1] for n in graph.node if n.name in head_convs(graph)} == heads

    images = (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8)
    for float_heads in (False, True):
        path = quantize_onnx(float_path, tmp_path / f"int8_{float_heads}.onnx", calibrated_on(images), float_heads)
        convs = conv_quantisation(path)  # per channel: one scale per output channel
        assert all(q["s_w"].shape == (q["w"].shape[0],) for q in convs.values())
        weights = {n.input[1] for n in graph.node if n.op_type == "Conv"}
        assert set(convs) == (weights - heads if float_heads else weights)
        quantised = onnx.load(str(path))
        below = Counter(n.op_type for n in descendants(quantised.graph, head_convs(quantised.graph)))
        assert below["QuantizeLinear"] == (0 if float_heads else 2)  # the heads' outputs, if int8
        metadata = {p.key: p.value for p in quantised.metadata_props}
        assert metadata["precision"] == "int8"
        info = json.loads(metadata["quantization"])
        assert info["format"] == "QDQ" and info["calibration"] == {
            "method": "MinMax",
            "images": 4,
            "source": "4 test images",
            "preprocessing": "resize to 16 x 16, RGB 0-255",
        }
        assert ("heads' last convolutions" in info["float"]) == float_heads
    with pytest.raises(ValueError, match="not a float odkd export"):  # quantised twice
        quantize_onnx(path, tmp_path / "again.onnx", calibrated_on(images))


def test_matched_detections_by_hand():
    # Reference: class 1 at 0.9 and 0.6 (two boxes), class 2 at 0.4 (below min_score: not counted).
    # Other: class 1 box overlapping the first by IoU 0.5 exactly (kept: >=), class 2 on the second box.
    a, b = [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]
    reference = [Detections(torch.tensor([a, b, a]), torch.tensor([0.9, 0.6, 0.4]), torch.tensor([1, 1, 2]))]
    half = [0.0, 0.0, 0.5, 0.25]  # inside a, half its area: IoU 0.5 exactly (binary fractions)
    other = [Detections(torch.tensor([half, b]), torch.tensor([0.1, 0.8]), torch.tensor([1, 2]))]
    assert matched_detections(reference, other) == (1, 2)
    assert matched_detections(reference, other, min_iou=0.51) == (0, 2)
    assert matched_detections(reference, other, min_score=0.3) == (1, 3)  # the class-2 box at a: none there
    # One other detection serves one reference detection only.
    twice = [Detections(torch.tensor([a, a]), torch.tensor([0.9, 0.8]), torch.tensor([1, 1]))]
    assert matched_detections(twice, [Detections(torch.tensor([a]), torch.tensor([0.5]), torch.tensor([1]))]) == (1, 2)


def write_images(folder, colours: list[int], size: tuple[int, int] = (30, 20)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, value in enumerate(colours):
        image = np.full((*size, 3), value, dtype=np.uint8)
        image[:, :, 2] = 255 - value  # blue in RGB: the file is BGR, so channel 0 there
        suffix = "PNG" if i == 1 else "png"  # lossless; any case
        cv2.imwrite(str(folder / f"img{i}.{suffix}"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def test_calibration_images_from_a_folder(tmp_path):
    write_images(tmp_path / "images", [0, 50, 100, 150, 200])
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    images = CalibrationImages.from_folder(tmp_path / "images", 2, 16)
    # Evenly through the five (name order): image i * 5 // 2, i.e. img0 and img2.
    assert len(images) == 2 and images.description == f"2 of the 5 images in {tmp_path / 'images'}"
    first, second = images[0], images[1]
    assert first.shape == (3, 16, 16) and first.dtype == torch.uint8
    assert int(second[0, 8, 8]) == 100 and int(second[2, 8, 8]) == 155  # RGB: red 100, blue 255 - 100
    # The evaluation resize, i.e. OpenCV's bilinear resize of the RGB image.
    rgb = cv2.cvtColor(cv2.imread(str(tmp_path / "images" / "img0.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(
        first.numpy(), cv2.resize(rgb, (16, 16), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
    )
    batches = list(images.batches(batch_size=1))
    assert [b.shape for b in batches] == [(1, 3, 16, 16)] * 2 and batches[0].dtype == np.float32
    assert len(CalibrationImages.from_folder(tmp_path / "images", 300, 16)) == 5  # all when fewer

    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        CalibrationImages.from_folder(tmp_path / "nowhere", 2, 16)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="empty holds no images"):
        CalibrationImages.from_folder(tmp_path / "empty", 2, 16)
    with pytest.raises(ValueError, match="at least 1, got 0"):
        CalibrationImages.from_folder(tmp_path / "images", 0, 16)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cut.jpg").write_bytes(b"\xff\xd8 not a whole JPEG")
    with pytest.raises(DatasetError, match=r"cut\.jpg: not a readable image"):  # named when it is read
        CalibrationImages.from_folder(tmp_path / "broken", 1, 16)[0]


def test_calibration_images_from_a_config(tmp_path):
    make_synthetic_voc(tmp_path / "voc", {"trainval": 6, "test": 3}, min_size=100, max_size=160)
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data: {{voc_root: {tmp_path / 'voc'}, train_sets: SYN_trainval, classes: synthetic}}\n")
    images = CalibrationImages.from_config(config, 3, 32)
    assert len(images) == 3 and "3 of the 6 images of the training set of" in images.description
    ids = (tmp_path / "voc" / "VOCSYN" / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    for i, index in enumerate((0, 2, 4)):  # image i * 6 // 3, without augmentation
        path = tmp_path / "voc" / "VOCSYN" / "JPEGImages" / f"{ids[index]}.jpg"
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        expected = cv2.resize(rgb, (32, 32), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
        np.testing.assert_array_equal(images[i].numpy(), expected)
