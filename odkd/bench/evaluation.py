"""Speed of VOC evaluation: the devkit AP alone on synthetic detections (vectorised against the reference
loop), and a detector's whole evaluation as ``scripts/evaluate.py`` runs it."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from odkd.bench.synthetic import benchmark_classes, write_benchmark_images
from odkd.bench.timing import device_name
from odkd.checkpoint import load_model
from odkd.class_names import VOC_CLASSES
from odkd.data import Annotation, VOCDataset
from odkd.device import select_device
from odkd.eval import (
    evaluate,
    evaluate_dataset,
    match_detections_reference,
    read_devkit_results,
    write_devkit_results,
)
from odkd.inference import detect_dataset
from odkd.models import build_model

__all__ = ["ApTiming", "ModelEvaluationTiming", "time_ap", "time_model_evaluation"]


@dataclass(frozen=True)
class ApTiming:
    """Seconds of the vectorised :func:`odkd.eval.evaluate` (median), of the per-detection reference loop
    (one run) and of reading the devkit result files back; whether both gave the same per-class AP, and
    the mAP (a fraction)."""

    vectorised_s: float
    reference_s: float
    reading_s: float
    same_ap: bool
    mAP: float


def time_ap(
    annotations: Sequence[Annotation],
    detections: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    metric: str,
    iters: int,
) -> ApTiming:
    """Time the devkit AP of ``detections`` (per VOC class: image ids, scores, xyxy boxes) on ``annotations``
    (:func:`odkd.bench.synthetic.synthetic_voc_detections`): ``iters`` vectorised runs, one reference run."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fast = evaluate(detections, annotations, VOC_CLASSES, metric)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    loop = evaluate(detections, annotations, VOC_CLASSES, metric, matcher=match_detections_reference)
    reference = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        write_devkit_results(folder, "test", VOC_CLASSES, detections)
        start = time.perf_counter()
        read_devkit_results(folder, "test", VOC_CLASSES)
        reading = time.perf_counter() - start
    return ApTiming(statistics.median(times), reference, reading, fast.ap == loop.ap, fast.mAP)


@dataclass(frozen=True)
class ModelEvaluationTiming:
    """A detector's evaluation: seconds of detection (decoding, resizing, forward, post-processing) and of
    the devkit AP, the detections found and the mAP (a fraction)."""

    arch: str
    images: int
    device: str  # its name (:func:`odkd.bench.timing.device_name`)
    detection_s: float
    ap_s: float
    total_s: float
    detections: int
    mAP: float


def time_model_evaluation(
    root: str | Path,
    images: int,
    model_name: str | None,
    checkpoint: str | None,
    batch: int,
    workers: int,
    device: str | None,
    metric: str,
) -> ModelEvaluationTiming:
    """A detector's whole VOC evaluation, as evaluate.py runs it, on ``images`` synthetic 375-500 px JPEGs
    written under ``root``: JPEG decoding and resizing in ``workers`` loader workers, forward (bf16 +
    channels_last on CUDA), post-processing, devkit AP. The detector: the model file ``checkpoint``, else
    a randomly initialised ``model_name``."""
    write_benchmark_images(root, "test", images)
    classes = benchmark_classes()
    if checkpoint:
        model = load_model(checkpoint)
        classes = classes[: model.num_classes - 1]
    else:
        model = build_model(model_name, num_classes=len(classes) + 1)
    dataset = VOCDataset(root, "SYN_test", classes)
    target = select_device(device)
    with torch.inference_mode():  # CUDA context and kernel selection are start-up, not evaluation
        model.eval().to(target)(torch.zeros(batch, 3, model.image_size, model.image_size, device=target))
    start = time.perf_counter()
    detections = detect_dataset(model, dataset, target, batch, workers, progress=False)
    detected = time.perf_counter()
    result = evaluate_dataset(detections, dataset, metric)
    done = time.perf_counter()
    return ModelEvaluationTiming(
        arch=model.arch,
        images=len(dataset),
        device=device_name(target),
        detection_s=detected - start,
        ap_s=done - detected,
        total_s=done - start,
        detections=sum(len(d.scores) for d in detections.values()),
        mAP=result.mAP,
    )
