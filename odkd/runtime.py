"""An exported model (:mod:`odkd.export`, float or :mod:`odkd.quantize` INT8) run by onnxruntime.

:class:`OnnxDetector` is a :class:`odkd.inference.BatchDetector`: it yields the same per-image
detections as the PyTorch path, so :func:`odkd.inference.detect_dataset` and the same AP code evaluate
the file that is shipped. Files without NMS in the graph go through the same threshold, top-k and NMS
code as PyTorch (:func:`odkd.postprocess.select_detections`); files with it return their own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from odkd.postprocess import Detections, FlatDetections, select_detections, split_by_image
from odkd.postprocess_settings import PostprocessSettings

__all__ = ["OnnxDetector"]


class OnnxDetector:
    """``detect_batch(images (B, 3, S, S) uint8 RGB) -> one Detections per image`` from an exported file.

    Args:
        path: an ``.onnx`` file written by ``scripts/export_onnx.py``.
        threads: onnxruntime's intra-op threads (None: its default, all cores).
        settings: score threshold, top-k, NMS threshold, per-image cap
            (:func:`odkd.postprocess.select_detections`) for a file without NMS in the graph. A file with
            it applies the settings it was exported with, the ones that ship, and ignores these.

    Attributes: ``image_size`` (S), ``num_classes`` (with background), ``class_names`` (or None),
    ``precision`` ("float32" or "int8"), ``in_graph`` (whether NMS is in the graph), ``settings`` (the
    :class:`~odkd.postprocess.PostprocessSettings` in effect; None for a file with NMS that does not record
    them), ``metadata`` (every metadata key of the file), ``session``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int | None = None,
        settings: PostprocessSettings = PostprocessSettings(),
    ) -> None:
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file {path} does not exist")
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"{path}: not an ONNX model onnxruntime can load ({str(err).splitlines()[0]})") from err
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != ["images"] or outputs not in (["boxes", "scores"], ["boxes", "scores", "labels", "image_index"]):
            raise ValueError(
                f"{path}: inputs {inputs} and outputs {outputs} are not an odkd export's (input images; outputs "
                "boxes, scores or boxes, scores, labels, image_index)"
            )
        if "image_size" not in self.metadata:
            raise ValueError(f"{path}: no image_size in the metadata; export the model with scripts/export_onnx.py")
        self.image_size = int(self.metadata["image_size"])
        names = json.loads(self.metadata.get("class_names", "null"))
        self.class_names = tuple(names) if names else None
        self.num_classes = self._num_classes(path)
        self.precision = self.metadata.get("precision", "float32")  # files from before INT8 were float
        self.in_graph = len(outputs) == 4
        self.settings = settings
        if self.in_graph:
            recorded = json.loads(self.metadata.get("postprocess", "null"))
            self.settings = PostprocessSettings.from_json(recorded) if recorded is not None else None

    def _num_classes(self, path: Path) -> int:
        """Classes with background: the metadata's, else the raw scores' last dimension, else the names'."""
        if "num_classes" in self.metadata:
            return int(self.metadata["num_classes"])
        last = self.session.get_outputs()[1].shape[-1]
        if isinstance(last, int):
            return last
        if self.class_names:
            return len(self.class_names) + 1
        raise ValueError(f"{path}: the number of classes is in neither the metadata nor the outputs")

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for ``images`` (B, 3, S, S) float32 RGB 0-255."""
        return self.session.run(None, {"images": images})

    def detect_batch(self, images: torch.Tensor, on_cpu: bool = True) -> list[Detections]:
        """``images`` (B, 3, S, S) uint8 (or float) RGB at the model's input size -> one Detections per
        image, boxes x1,y1,x2,y2 relative to the image, on the CPU (``on_cpu`` is for the protocol)."""
        outputs = [torch.from_numpy(o) for o in self.run(images.cpu().float().numpy())]
        flat = FlatDetections(*outputs) if self.in_graph else select_detections(*outputs, self.settings)
        return split_by_image(flat, images.shape[0])
