"""Export a trained detector (a model file or a training checkpoint) to ONNX.

    python scripts/export_onnx.py --checkpoint runs/distill/best.pt --output student.onnx
    python scripts/export_onnx.py --checkpoint runs/distill/best.pt --output student_nms.onnx --with-postprocess
    python scripts/export_onnx.py --checkpoint runs/distill/best.pt --output student_int8.onnx --int8 \
        --calibration-config configs/distill_vgg16_lite300_to_mbv2.yaml [--calibration 300]

The graph takes ``images``: (batch, 3, S, S) float32 RGB pixels 0-255 (the model's preprocessing is in
the graph; S is the model's input size, e.g. 300; the batch size is dynamic). Outputs:

- default: ``boxes`` (batch, P, 4) x1,y1,x2,y2 relative to the image and ``scores`` (batch, P, C) class
  probabilities (column 0 = background); run your own NMS on them.
- ``--with-postprocess``: the final detections, ``boxes`` (K, 4), ``scores`` (K,), ``labels`` (K,) int64
  (1 = the first class) and ``image_index`` (K,) int64, per image in decreasing score order, after the
  score threshold, per-class top-k, NMS and the per-image cap given here.

``--int8``: onnxruntime's static quantisation (QDQ; weights int8 per output channel, activations uint8),
calibrated on N images (``--calibration``, default 300) of a config's training set (``--calibration-config``,
without augmentation) or of a folder (``--calibration-images``), resized to S x S as the evaluation does.
The inputs and outputs are the float export's; the box decoding, softmax and NMS stay float
(:mod:`odkd.quantize`).

Only the detector is exported: distillation adapters and the teacher in a training checkpoint are left
out. Class names, the input size, the precision (and for INT8 how it was calibrated) and the
post-processing settings are in the file's metadata. Unless ``--no-check``, onnxruntime runs the float
network on random images and it is compared with PyTorch; an INT8 file's detections on calibration images
are compared with PyTorch's float ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from odkd.postprocess_settings import PostprocessSettings

if TYPE_CHECKING:  # the rest after the arguments are read: --help answers without loading torch
    from odkd.models import SSD
    from odkd.quantize import CalibrationImages


def check(path: Path, model: SSD, settings: PostprocessSettings | None, batch: int = 2) -> str:
    """onnxruntime against PyTorch on random images: the network's boxes and scores exactly (through a raw
    export next to ``path`` when ``path`` holds the post-processing ``settings``), and then how many
    detections agree: all of them, equal scores included (both take the lower prior index first), unless
    an IoU lies within float32 rounding of the NMS threshold (:func:`odkd.postprocess.nms_rows`)."""
    import onnxruntime
    import torch

    from odkd.export import DeployedDetector, export_onnx

    def run(onnx_path: Path) -> list[np.ndarray]:
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        return session.run(None, {"images": images.numpy()})

    size = model.image_size
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255
    with tempfile.TemporaryDirectory() as folder:
        raw = path if settings is None else export_onnx(model, Path(folder) / "raw.onnx")
        got = run(raw)
    with torch.no_grad():
        expected = [t.numpy() for t in DeployedDetector(model)(images)]
    difference = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
    report = f"network boxes and scores differ by at most {difference:.2e}"
    if settings is not None:
        got = run(path)
        with torch.no_grad():
            expected = [t.numpy() for t in DeployedDetector(model, settings)(images)]
        same = _same_detections(got, expected)
        report += f"; {same} of {len(expected[1])} PyTorch detections identical in onnxruntime ({len(got[1])})"
    return report


def _same_detections(got: list[np.ndarray], expected: list[np.ndarray]) -> int:
    """PyTorch detections (boxes, scores, labels, image_index) that onnxruntime also returns, matched one
    to one (several detections of an image and class can share a score)."""
    unmatched: dict[tuple[int, int], list[tuple[float, np.ndarray]]] = {}
    for box, score, label, image in zip(*got, strict=True):
        unmatched.setdefault((int(image), int(label)), []).append((float(score), box))
    same = 0
    for box, score, label, image in zip(*expected, strict=True):
        candidates = unmatched.get((int(image), int(label)), [])
        for j, (other_score, other_box) in enumerate(candidates):
            if abs(other_score - float(score)) < 1e-5 and np.abs(other_box - box).max() < 1e-4:
                del candidates[j]
                same += 1
                break
    return same


def check_int8(
    path: Path, model: SSD, calibration: CalibrationImages, settings: PostprocessSettings | None, count: int = 8
) -> str:
    """The INT8 file's detections against PyTorch's float ones on the first ``count`` calibration images:
    how many confident float detections (score >= 0.5) the file also finds (same class, IoU >= 0.5), both
    post-processed with ``settings`` (default: :class:`PostprocessSettings`)."""
    import torch

    from odkd.inference import Predictor
    from odkd.quantize import matched_detections
    from odkd.runtime import OnnxDetector

    images = torch.stack([calibration[i] for i in range(min(count, len(calibration)))])
    settings = settings or PostprocessSettings()
    expected = Predictor(model, torch.device("cpu"), settings).detect_batch(images, on_cpu=True)
    got = OnnxDetector(path, settings=settings).detect_batch(images)
    found, total = matched_detections(expected, got, min_score=0.5, min_iou=0.5)
    return f"{found} of {total} float detections with score >= 0.5 on {len(images)} calibration images found"


def calibration_images(args: argparse.Namespace, image_size: int) -> CalibrationImages:
    from odkd.quantize import CalibrationImages

    if args.calibration_config is not None:
        return CalibrationImages.from_config(args.calibration_config, args.calibration, image_size)
    return CalibrationImages.from_folder(args.calibration_images, args.calibration, image_size)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="odkd model file or training checkpoint")
    parser.add_argument("--output", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--with-postprocess", action="store_true", help="threshold, top-k and NMS in the graph")
    defaults = PostprocessSettings()
    parser.add_argument("--score-threshold", type=float, default=defaults.score_threshold)
    parser.add_argument("--nms-threshold", type=float, default=defaults.nms_threshold)
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="candidates per class and image before NMS")
    parser.add_argument("--max-detections", type=int, default=defaults.max_detections, help="per image")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    parser.add_argument("--int8", action="store_true", help="INT8 static quantisation (onnxruntime, QDQ)")
    parser.add_argument("--calibration", type=int, help="--int8: images used (default: 300)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--calibration-config", type=Path, help="--int8: calibrate on this config's training set")
    source.add_argument("--calibration-images", type=Path, help="--int8: calibrate on the images in this folder")
    parser.add_argument(
        "--float-heads",
        action=argparse.BooleanOptionalAction,
        help="--int8: keep the heads' last convolutions (box regressions, class logits) float (default: no)",
    )
    args = parser.parse_args(argv)

    from odkd.checkpoint import load_model
    from odkd.export import export_onnx
    from odkd.files import check_output_path
    from odkd.quantize import DEFAULT_CALIBRATION_IMAGES, DEFAULT_FLOAT_HEADS, export_int8

    args.calibration = DEFAULT_CALIBRATION_IMAGES if args.calibration is None else args.calibration
    args.float_heads = DEFAULT_FLOAT_HEADS if args.float_heads is None else args.float_heads
    calibrating = args.calibration_config is not None or args.calibration_images is not None
    if args.int8 and not calibrating:
        parser.error("--int8 needs calibration images: --calibration-config CONFIG or --calibration-images FOLDER")
    if calibrating and not args.int8:
        parser.error("--calibration-config / --calibration-images calibrate an --int8 export")
    if args.calibration < 1:
        parser.error(f"--calibration must be at least 1 image, got {args.calibration}")
    settings = None  # no post-processing in the graph
    if args.with_postprocess:
        settings = PostprocessSettings(
            score_threshold=args.score_threshold,
            nms_threshold=args.nms_threshold,
            top_k=args.top_k,
            max_detections=args.max_detections,
        )
    try:
        check_output_path(args.output, "--output")
        model = load_model(args.checkpoint)
        if args.int8:
            calibration = calibration_images(args, model.image_size)
            print(f"calibrating on {calibration.description}")
            path = export_int8(model, args.output, calibration, settings, args.opset, args.float_heads)
        else:
            path = export_onnx(model, args.output, settings, args.opset)
    except (OSError, ValueError, RuntimeError) as err:  # DatasetError and ConfigError are ValueErrors
        sys.exit(f"error: {err}")
    outputs = "boxes, scores, labels, image_index" if args.with_postprocess else "boxes, scores"
    print(
        f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {'int8' if args.int8 else 'float32'}): {model.arch}, "
        f"input images (batch, 3, {model.image_size}, {model.image_size}) RGB 0-255, outputs {outputs}"
    )
    names = json.dumps(list(model.class_names)) if model.class_names else "none stored in the model file"
    print(f"classes (labels 1..{model.num_classes - 1}): {names}")
    if args.no_check:
        return
    if args.int8:
        print(f"INT8 (onnxruntime) vs float (PyTorch): {check_int8(path, model, calibration, settings)}")
    else:
        print(f"onnxruntime vs PyTorch on random images: {check(path, model, settings)}")


if __name__ == "__main__":
    main()
