"""INT8 export: onnxruntime's static post-training quantisation of an exported detector.

The float export (:func:`odkd.export.export_onnx`) goes through ``quant_pre_process`` (shape inference,
BatchNorm folded into the convolutions) and ``quantize_static`` in QDQ form: weights int8 symmetric per
output channel, activations uint8 asymmetric per tensor, their ranges the MinMax of
:class:`CalibrationImages` run through the float graph. Only the convolutional network is quantised:
every Conv and everything that feeds one. What follows the last convolutions (flattening, box decoding,
softmax and, with post-processing in the graph, threshold / top-k / NMS) stays float: scores in uint8
steps would tie many detections, and NMS indices are not values to quantise.

Two choices, both measured on the CPU demo student (docs/BENCHMARKS.md, "INT8"):

- ``reduce_range=True``: weights on 7 bits (-64..64). On x86 CPUs without VNNI (AVX2 only, like the
  machine measured) onnxruntime multiplies uint8 activations by int8 weights with an instruction that
  adds pairs of products in int16 and saturates (255 x 127 x 2 > 32767): full 8-bit weights cost the demo
  student 2.2 mAP there and broke the derived error bound of ``tests/test_quantize.py``; with 7-bit
  weights a pair is at most 255 x 64 x 2 = 32640, exact.
- ``float_heads=False``: the heads' last convolutions are quantised too. Keeping them float was not
  needed for accuracy (both within 0.5 mAP of float) and is slower (:func:`quantize_onnx`).

The file's metadata says ``precision: int8`` and, under ``quantization``, how it was quantised and
calibrated (JSON).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from odkd.data import DetectionDataset, build_transform, read_image
from odkd.export import export_onnx
from odkd.files import check_output_path
from odkd.models import SSD
from odkd.postprocess import Detections
from odkd.postprocess_settings import PostprocessSettings

__all__ = [
    "DEFAULT_CALIBRATION_IMAGES",
    "DEFAULT_FLOAT_HEADS",
    "IMAGE_SUFFIXES",
    "CalibrationImages",
    "export_int8",
    "head_convs",
    "matched_detections",
    "network_nodes",
    "quantize_onnx",
]

DEFAULT_CALIBRATION_IMAGES = 300
DEFAULT_FLOAT_HEADS = False
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class CalibrationImages(Sequence):
    """``count`` images chosen evenly through a source (image ``i * len // count``, all of them when the
    source has fewer), each ``(3, S, S)`` uint8 RGB after the evaluation preprocessing: the plain resize
    to S x S that :func:`odkd.inference.detect_dataset` and the Predictor apply. Loaded when read.

    Build with :meth:`from_folder`, :meth:`from_config` or :meth:`from_dataset`, or directly from
    ``load(i)`` -> source image i, ``available`` source images; ``description`` says which images they are.
    """

    def __init__(self, load: Callable[[int], torch.Tensor], available: int, count: int, description: str) -> None:
        if count < 1:
            raise ValueError(f"the number of calibration images must be at least 1, got {count}")
        self._load = load
        used = min(count, available)  # i * available // used: distinct (available / used >= 1), spread over all
        self._indices = [i * available // used for i in range(used)]
        self.description = description

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, count: int, image_size: int) -> CalibrationImages:
        """The images (``IMAGE_SUFFIXES``, any case) directly in ``folder``, in name order."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"calibration folder {folder} does not exist or is not a folder")
        paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ValueError(f"calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        transform = build_transform(False, image_size)
        no_boxes, no_labels = np.zeros((0, 4), dtype=np.float32), np.zeros(0, dtype=np.int64)

        def load(index: int) -> torch.Tensor:
            return transform(read_image(paths[index]), no_boxes, no_labels)[0]

        return cls(load, len(paths), count, f"{min(count, len(paths))} of the {len(paths)} images in {folder}")

    @classmethod
    def from_config(cls, config: str | os.PathLike, count: int, image_size: int) -> CalibrationImages:
        """The training set of the config file ``config`` (its data section; the synthetic set is written
        first if the config asks for it and it is missing)."""
        from odkd.config import load_config
        from odkd.engine.build import build_train_set, write_synthetic_data

        cfg = load_config(config)
        if cfg.data.synthetic:
            write_synthetic_data(cfg)
        data = cfg.data
        where = data.coco.train_json if data.format == "coco" else f"{data.voc_root} {data.train_sets}"
        return cls.from_dataset(build_train_set(cfg), count, image_size, f"the training set of {config} ({where})")

    @classmethod
    def from_dataset(cls, dataset: DetectionDataset, count: int, image_size: int, name: str) -> CalibrationImages:
        """The images of ``dataset`` (e.g. a config's training set), without its augmentation; ``name``
        says which set it is."""
        dataset = copy.copy(dataset)  # same annotations, the eval transform
        dataset.transform = build_transform(False, image_size)

        def load(index: int) -> torch.Tensor:
            return dataset[index]["image"]

        return cls(load, len(dataset), count, f"{min(count, len(dataset))} of the {len(dataset)} images of {name}")

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._load(self._indices[index])

    def batches(self, batch_size: int = 8) -> Iterator[np.ndarray]:
        """``(b, 3, S, S)`` float32 batches of the images: the exported graph's input."""
        for start in range(0, len(self), batch_size):
            yield torch.stack([self[i] for i in range(start, min(start + batch_size, len(self)))]).float().numpy()


def matched_detections(
    reference: Sequence[Detections], other: Sequence[Detections], min_score: float = 0.5, min_iou: float = 0.5
) -> tuple[int, int]:
    """``(found, total)``: of the ``total`` detections of ``reference`` (one Detections per image) with
    score >= ``min_score``, how many ``other`` also finds: a detection of the same image and class with IoU
    >= ``min_iou``, each used once (reference detections by decreasing score take their best match)."""
    found = total = 0
    for ref, oth in zip(reference, other, strict=True):
        taken = torch.zeros(len(oth.scores), dtype=torch.bool)
        ious = box_iou(ref.boxes.float(), oth.boxes.float())  # (R, O)
        for r in ref.scores.argsort(descending=True).tolist():
            if ref.scores[r] < min_score:
                break
            total += 1
            candidates = (oth.labels == ref.labels[r]) & ~taken & (ious[r] >= min_iou)
            if candidates.any():
                best = torch.where(candidates, ious[r], -1.0).argmax()
                taken[best] = True
                found += 1
    return found, total


def network_nodes(graph) -> set[str]:
    """Names of the nodes of the convolutional network in an ONNX ``graph``: every Conv and every node
    upstream of one. The rest (flattening, decode, softmax, NMS) follows the last convolutions."""
    producer = {output: node for node in graph.node for output in node.output}
    found: set[str] = set()
    stack = [node for node in graph.node if node.op_type == "Conv"]
    while stack:
        node = stack.pop()
        if node.name not in found:
            found.add(node.name)
            stack += [producer[name] for name in node.input if name in producer]
    return found


def head_convs(graph) -> set[str]:
    """Names of the Conv nodes no other Conv depends on: the prediction heads' last convolutions, whose
    outputs are the box regressions and class logits."""
    producer = {output: node for node in graph.node for output in node.output}
    upstream: set[str] = set()  # nodes some Conv depends on
    stack = [producer[name] for node in graph.node if node.op_type == "Conv" for name in node.input if name in producer]
    while stack:
        node = stack.pop()
        if node.name not in upstream:
            upstream.add(node.name)
            stack += [producer[name] for name in node.input if name in producer]
    return {node.name for node in graph.node if node.op_type == "Conv" and node.name not in upstream}


def quantize_onnx(
    float_path: str | os.PathLike,
    output: str | os.PathLike,
    calibration: CalibrationImages,
    float_heads: bool = DEFAULT_FLOAT_HEADS,
    reduce_range: bool = True,
) -> Path:
    """Write the INT8 (QDQ) form of the odkd export ``float_path`` at ``output``; returns the path.

    ``float_heads``: keep the heads' last convolutions (their outputs are the box regressions and the
    class logits) float, so neither is rounded to an 8-bit step of its calibrated range; they then run
    as float convolutions on dequantised inputs.
    """
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = calibration.batches()

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    source = {p.key: p.value for p in onnx.load(str(float_path), load_external_data=False).metadata_props}
    if source.get("producer") != "odkd" or source.get("precision", "float32") != "float32":
        raise ValueError(f"{float_path}: not a float odkd export (scripts/export_onnx.py without --int8)")
    output = Path(output)
    check_output_path(output, "ONNX output")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared))
        model = onnx.load(str(prepared))
        for index, node in enumerate(model.graph.node):  # node names are how nodes are excluded
            node.name = node.name or f"odkd_unnamed_{index}"
        onnx.save(model, str(prepared))
        network = network_nodes(model.graph)
        heads = head_convs(model.graph) if float_heads else set()
        excluded = [node.name for node in model.graph.node if node.name not in network or node.name in heads]
        quantize_static(
            str(prepared),
            str(output),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
        )
    model = onnx.load(str(output))
    metadata = {p.key: p.value for p in model.metadata_props}  # the float file's and onnxruntime's keys
    metadata["precision"] = "int8"
    nms = json.loads(metadata["postprocess"]) is not None
    float_part = "decode, softmax" + (", threshold/top-k/NMS" if nms else "")
    metadata["quantization"] = json.dumps(
        {
            "tool": f"onnxruntime {onnxruntime.__version__} quantize_static (after quant_pre_process)",
            "format": "QDQ",
            "weights": f"int8 symmetric per output channel, {'7-bit (reduce_range)' if reduce_range else '8-bit'}",
            "activations": "uint8 asymmetric per tensor",
            "float": float_part + (", the heads' last convolutions" if float_heads else ""),
            "calibration": {
                "method": "MinMax",
                "images": len(calibration),
                "source": calibration.description,
                "preprocessing": f"resize to {metadata['image_size']} x {metadata['image_size']}, RGB 0-255",
            },
        }
    )
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(output))
    return output


def export_int8(
    model: SSD,
    path: str | os.PathLike,
    calibration: CalibrationImages,
    postprocess: PostprocessSettings | None = None,
    opset: int = 18,
    float_heads: bool = DEFAULT_FLOAT_HEADS,
    reduce_range: bool = True,
) -> Path:
    """:func:`odkd.export.export_onnx` (same arguments, same graph interface) quantised by
    :func:`quantize_onnx`; returns the path."""
    check_output_path(path, "ONNX output")  # before the float export and the calibration
    with tempfile.TemporaryDirectory() as folder:
        float_path = export_onnx(model, Path(folder) / "float.onnx", postprocess, opset)
        return quantize_onnx(float_path, path, calibration, float_heads, reduce_range)
