"""Export a trained detector (a model file or a training checkpoint) to ONNX.

    python scripts/export_onnx.py --checkpoint runs/distill/best.pt --output student.onnx
    python scripts/export_onnx.py --checkpoint runs/distill/best.pt --output student_nms.onnx --with-postprocess

The graph takes ``images``: (batch, 3, S, S) float32 RGB pixels 0-255 (the model's preprocessing is in
the graph; S is the model's input size, e.g. 300; the batch size is dynamic). Outputs:

- default: ``boxes`` (batch, P, 4) x1,y1,x2,y2 relative to the image and ``scores`` (batch, P, C) class
  probabilities (column 0 = background); run your own NMS on them.
- ``--with-postprocess``: the final detections, ``boxes`` (K, 4), ``scores`` (K,), ``labels`` (K,) int64
  (1 = the first class) and ``image_index`` (K,) int64, per image in decreasing score order, after the
  score threshold, per-class top-k, NMS and the per-image cap given here.

Only the detector is exported: distillation adapters and the teacher in a training checkpoint are left
out. Class names, the input size and the post-processing settings are in the file's metadata. Unless
``--no-check``, onnxruntime runs the network on random images and it is compared with PyTorch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from odkd.checkpoint import load_model
from odkd.export import DeployedDetector, export_onnx
from odkd.models import SSD


def check(path: Path, model: SSD, settings: dict, batch: int = 2) -> str:
    """onnxruntime against PyTorch on random images: the network's boxes and scores exactly (through a raw
    export next to ``path`` when ``path`` holds the post-processing), and with post-processing, how many
    detections agree (equal scores, common in untrained models, can make the two keep different boxes)."""
    import onnxruntime

    def run(onnx_path: Path) -> list[np.ndarray]:
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        return session.run(None, {"images": images.numpy()})

    size = model.image_size
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255
    with tempfile.TemporaryDirectory() as folder:
        raw = path if not settings else export_onnx(model, Path(folder) / "raw.onnx")
        got = run(raw)
    with torch.no_grad():
        expected = [t.numpy() for t in DeployedDetector(model)(images)]
    difference = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
    report = f"network boxes and scores differ by at most {difference:.2e}"
    if settings:
        got = run(path)
        with torch.no_grad():
            expected = [t.numpy() for t in DeployedDetector(model, True, **settings)(images)]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="odkd model file or training checkpoint")
    parser.add_argument("--output", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--with-postprocess", action="store_true", help="threshold, top-k and NMS in the graph")
    parser.add_argument("--score-threshold", type=float, default=0.01)
    parser.add_argument("--nms-threshold", type=float, default=0.45)
    parser.add_argument("--top-k", type=int, default=200, help="candidates per class and image before NMS")
    parser.add_argument("--max-detections", type=int, default=200, help="per image")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    args = parser.parse_args()
    settings = {}
    if args.with_postprocess:
        settings = {
            "score_threshold": args.score_threshold,
            "nms_threshold": args.nms_threshold,
            "top_k": args.top_k,
            "max_detections": args.max_detections,
        }
    try:
        model = load_model(args.checkpoint)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        sys.exit(f"error: {err}")
    path = export_onnx(model, args.output, args.with_postprocess, args.opset, **settings)
    outputs = "boxes, scores, labels, image_index" if args.with_postprocess else "boxes, scores"
    print(
        f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {model.arch}, input images (batch, 3, "
        f"{model.image_size}, {model.image_size}) RGB 0-255, outputs {outputs}"
    )
    names = json.dumps(list(model.class_names)) if model.class_names else "none stored in the model file"
    print(f"classes (labels 1..{model.num_classes - 1}): {names}")
    if not args.no_check:
        print(f"onnxruntime vs PyTorch on random images: {check(path, model, settings)}")


if __name__ == "__main__":
    main()
