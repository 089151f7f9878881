"""Running a detector: over a dataset (batched, with progress) or on single images (:class:`Predictor`).
On CUDA: bf16 autocast and channels_last. Any :class:`BatchDetector` runs over a dataset the same way: a
PyTorch model through :class:`Predictor`, an exported ONNX file through :class:`odkd.runtime.OnnxDetector`."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from odkd.data import DetectionDataset, ImageDetections, build_loader, build_transform
from odkd.models import SSD
from odkd.postprocess import Detections, postprocess
from odkd.postprocess_settings import PostprocessSettings

__all__ = ["BatchDetector", "Predictor", "autocast_dtype", "detect", "detect_dataset"]


class BatchDetector(Protocol):
    """What :func:`detect_dataset` runs: ``image_size`` (S) and ``detect_batch(images (B, 3, S, S) uint8
    RGB, on_cpu) -> one Detections per image`` with boxes x1,y1,x2,y2 relative to the image."""

    image_size: int

    def detect_batch(self, images: torch.Tensor, on_cpu: bool = False) -> list[Detections]: ...


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16; None (no autocast) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def detect(
    detector: BatchDetector, loader: torch.utils.data.DataLoader, progress: bool = True
) -> Iterator[tuple[int, Detections]]:
    """Yield ``(dataset index, detections)`` for every image of ``loader`` (batches from
    :func:`odkd.data.collate` with uint8 images); boxes relative to the image, on the CPU."""
    for batch in tqdm(loader, desc="detect", unit="batch", disable=not progress, leave=False):
        yield from zip(batch["indices"].tolist(), detector.detect_batch(batch["images"], on_cpu=True), strict=True)


def detect_dataset(
    model: SSD | BatchDetector,
    dataset: DetectionDataset,
    device: torch.device | None = None,
    batch_size: int = 32,
    num_workers: int = 4,
    progress: bool = True,
    settings: PostprocessSettings | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> dict[int, ImageDetections]:
    """Dataset index -> :class:`ImageDetections` of ``model`` for every image of ``dataset`` (its transform
    is replaced by the eval resize), in dataset order, boxes in the dataset's pixel coordinates (the VOC
    devkit's for VOC data): what :func:`odkd.eval.evaluate_dataset` scores.

    ``model``: an :class:`SSD`, run by a :class:`Predictor` on ``device`` (default CPU) with ``settings``
    (default :class:`PostprocessSettings`); or any :class:`BatchDetector` (e.g. an exported file), which
    brings its own device and post-processing settings. ``rank``, ``world_size``: only this process's
    share of a sharded evaluation, every ``world_size``-th image from the ``rank``-th."""
    if isinstance(model, SSD):
        model = Predictor(model, device or torch.device("cpu"), settings or PostprocessSettings())
    elif settings is not None or device is not None:
        raise ValueError("device and post-processing settings are an SSD's; a BatchDetector holds its own")
    dataset = copy.copy(dataset)  # same annotations, the eval transform
    dataset.transform = build_transform(False, model.image_size)
    loader = build_loader(dataset, batch_size, train=False, num_workers=num_workers, rank=rank, world_size=world_size)
    return {
        index: ImageDetections(dataset.to_pixels(det.boxes, index), det.scores.numpy(), det.labels.numpy())
        for index, det in detect(model, loader, progress)
    }


class Predictor:
    """``predictor(image (H, W, 3) uint8 RGB) -> Detections`` with boxes in pixels of that image.

    The image goes through the evaluation transform (resize to the model's input), so single images are
    preprocessed exactly as :func:`detect_dataset` preprocesses a test set. ``settings``: score threshold,
    NMS threshold, ... (:class:`odkd.postprocess.PostprocessSettings`). :meth:`detect_batch` runs already
    resized uint8 batches (what :func:`detect` does with a loader's).
    """

    def __init__(self, model: SSD, device: torch.device, settings: PostprocessSettings = PostprocessSettings()) -> None:
        self.model = model.eval().to(device)
        self.image_size = model.image_size
        self.device, self.dtype = device, autocast_dtype(device)
        # channels_last on CUDA through the input alone (cuDNN then runs NHWC kernels): converting the
        # weights would change the layout of a model being trained (the trainer evaluates its own).
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format
        self.transform = build_transform(False, model.image_size)
        self.settings = settings

    def detect_batch(self, images: torch.Tensor, on_cpu: bool = False) -> list[Detections]:
        """``images`` (B, 3, S, S) uint8 RGB at the model's input size -> one Detections per image, boxes
        x1,y1,x2,y2 relative to the image, on the device (or all copied to the CPU at once)."""
        images = self.model.normalize(images.to(self.device, non_blocking=True, memory_format=self.memory_format))
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            out = self.model(images)
            return postprocess(out.loc, out.conf, self.model.priors, self.settings, on_cpu=on_cpu)

    def __call__(self, image: np.ndarray) -> Detections:
        height, width = image.shape[:2]
        tensor, _, _ = self.transform(image, np.zeros((0, 4), dtype=np.float32), np.zeros(0, dtype=np.int64))
        det = self.detect_batch(tensor[None], on_cpu=True)[0]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        return det._replace(boxes=det.boxes * scale)
