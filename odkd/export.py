"""The deployed detector and its ONNX export.

:class:`DeployedDetector` is what ``scripts/export_onnx.py`` writes: the detector (without any
distillation adapters) with its preprocessing and box decoding in the graph, so a runtime feeds plain
RGB pixels. Two forms:

- ``postprocess=None``: ``images`` (B, 3, S, S) float RGB 0-255 -> ``boxes`` (B, P, 4) x1,y1,x2,y2 in
  [0, 1] and ``scores`` (B, P, C) class probabilities (column 0 = background); NMS is the runtime's;
- ``postprocess=`` :class:`~odkd.postprocess.PostprocessSettings`: the same input -> the detections of
  :func:`odkd.postprocess.postprocess_flat` with those settings (score threshold, per-class top-k, NMS,
  per-image cap): ``boxes`` (K, 4), ``scores`` (K,), ``labels`` (K,) and ``image_index`` (K,), ordered by
  image then decreasing score.

The batch size is dynamic; the image size is the model's. Class names, the number of classes, the input
size, the precision and the post-processing settings in effect go into the ONNX file's metadata
(:mod:`odkd.quantize` makes the INT8 form of either). NMS is ONNX's NonMaxSuppression with each
(image, class) as one of its batches, so an image's detections do not depend on its place in the batch.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from odkd.boxes import decode
from odkd.files import check_output_path
from odkd.models import SSD
from odkd.postprocess import postprocess_flat
from odkd.postprocess_settings import PostprocessSettings

__all__ = ["DeployedDetector", "export_onnx", "onnx_program"]


class DeployedDetector(nn.Module):
    """``forward(images (B, 3, S, S) float RGB 0-255)`` -> raw boxes and scores, or final detections."""

    def __init__(self, model: SSD, postprocess: PostprocessSettings | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.postprocess = postprocess

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(self.model.normalize(images))
        if self.postprocess is not None:
            return tuple(postprocess_flat(out.loc, out.conf, self.model.priors, self.postprocess))
        return decode(out.loc.float(), self.model.priors).clamp(0.0, 1.0), out.conf.float().softmax(dim=-1)


def export_onnx(
    model: SSD, path: str | os.PathLike, postprocess: PostprocessSettings | None = None, opset: int = 18
) -> Path:
    """Write ``model`` as ONNX at ``path``, with ``postprocess`` in the graph or without post-processing
    (None; see the module docstring); returns the path."""
    try:
        import onnx
    except ImportError as err:
        raise ImportError('ONNX export needs the export extra: pip install -e ".[export]"') from err

    path = Path(path)
    check_output_path(path, "ONNX output")  # before the export's minute of tracing
    path.parent.mkdir(parents=True, exist_ok=True)
    deployed = DeployedDetector(copy.deepcopy(model).cpu().float(), postprocess).eval()
    size = model.image_size
    outputs = ["boxes", "scores", "labels", "image_index"] if postprocess is not None else ["boxes", "scores"]
    program = onnx_program(deployed, {"images": torch.rand(2, 3, size, size) * 255}, outputs, opset)
    program.save(str(path))
    graph = onnx.load(str(path))
    metadata = {
        "producer": "odkd",
        "arch": model.arch,
        "image_size": str(size),
        "input": "images: (batch, 3, H, W) float32 RGB pixels 0-255, H = W = image_size",
        "num_classes": str(model.num_classes),
        "class_names": json.dumps(model.label_names),
        "postprocess": json.dumps(postprocess.to_json() if postprocess is not None else None),
        "precision": "float32",
    }
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))
    return path


def onnx_program(
    module: nn.Module, inputs: dict[str, torch.Tensor], output_names: list[str], opset: int = 18
) -> torch.onnx.ONNXProgram:
    """``module`` traced with ``inputs`` (name -> example; dim 0 of each is the dynamic batch) into an
    ONNX program, :func:`odkd.postprocess.nms_rows` as ONNX NonMaxSuppression and stable sorts as TopK."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    # The exporter prints graph dumps and notes while tracing the data-dependent NMS: keep them, and show
    # them only if the export fails.
    chatter = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stderr(chatter), contextlib.redirect_stdout(chatter):
            return torch.onnx.export(
                module,
                tuple(inputs.values()),
                dynamo=True,
                opset_version=opset,
                input_names=list(inputs),
                output_names=output_names,
                dynamic_shapes=tuple({0: batch} for _ in inputs),
                custom_translation_table={
                    torch.ops.odkd.nms_rows.default: _nms_rows_onnx,
                    torch.ops.aten.sort.stable: _stable_sort_onnx,
                },
                verbose=False,
            )
    except Exception:
        sys.stderr.write(chatter.getvalue())
        raise


def _nms_rows_onnx(boxes, scores, iou_threshold: float, score_threshold: float):
    """:func:`odkd.postprocess.nms_rows` in ONNX: rows are NonMaxSuppression's batches, each of one class;
    it returns (batch, class, box) triples, so the flat index is batch * N + box. Every candidate may
    survive (max_output_boxes_per_class = N). IoU is symmetric in x and y, so x1,y1,x2,y2 serve for the
    op's y1,x1,y2,x2."""
    from onnxscript import opset18 as op

    n = op.Shape(boxes, start=1, end=2)
    selected = op.NonMaxSuppression(
        boxes,
        op.Unsqueeze(scores, op.Constant(value_ints=[1])),
        n,
        op.Constant(value_floats=[iou_threshold]),
        op.Constant(value_floats=[score_threshold]),
    )
    row = op.Gather(selected, op.Constant(value_int=0), axis=1)
    index = op.Gather(selected, op.Constant(value_int=2), axis=1)
    return op.Add(op.Mul(row, n), index)


def _stable_sort_onnx(values, stable: bool | None = None, dim: int = -1, descending: bool = False):
    """``torch.sort(values, stable=True, dim=dim, descending=descending)`` in ONNX (which has no sort of its
    own): TopK over the whole axis, which puts equal values in index order, as a stable sort does."""
    from onnxscript import opset18 as op

    length = op.Gather(op.Shape(values), op.Constant(value_ints=[dim]))
    return op.TopK(values, length, axis=dim, largest=descending, sorted=True)
