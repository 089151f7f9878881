"""From a config to the objects a run needs: the detector and the train/test datasets."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from odkd.checkpoint import init_from_checkpoint
from odkd.config import Config
from odkd.data import DetectionDataset, VOCDataset, build_transform
from odkd.data.coco import COCODataset
from odkd.data.image_cache import ImageCache
from odkd.data.synthetic import make_synthetic_coco, make_synthetic_voc
from odkd.engine.distributed import DistInfo, barrier, setup_distributed
from odkd.engine.task import DetectionTask
from odkd.engine.trainer import Trainer, TrainResult, latest_checkpoint
from odkd.models import SSD, build_model

__all__ = [
    "build_datasets",
    "build_detector",
    "build_train_set",
    "build_trainer",
    "run_training",
    "setup_logging",
    "summary",
    "write_synthetic_data",
]

log = logging.getLogger("odkd")


def setup_logging(info: DistInfo) -> None:
    """Readable log lines on the main process; warnings only on the others."""
    logging.basicConfig(
        level=logging.INFO if info.is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )


def build_detector(cfg: Config) -> SSD:
    """The model of ``cfg.model``, initialised from ImageNet and/or a checkpoint as configured."""
    model = build_model(
        cfg.model.name, cfg.num_classes, cfg.model.pretrained_backbone, cfg.model.width_mult, cfg.model.dfl_bins
    )
    if cfg.model.init_checkpoint:
        copied, left = init_from_checkpoint(model, cfg.model.init_checkpoint, cfg.model.init_source)
        log.info("initialised %d tensors from %s (%d left as they were)", copied, cfg.model.init_checkpoint, left)
    model.class_names = cfg.class_names  # saved with the model files
    return model


def write_synthetic_data(cfg: Config) -> None:
    """Write the synthetic dataset ``cfg.data`` asks for (``data.synthetic``) where it says, if missing."""
    data = cfg.data
    if data.format == "coco":
        make_synthetic_coco(
            Path(data.coco.train_images).parent, data.synthetic_sizes, object_scale=data.synthetic_scale
        )
    else:
        make_synthetic_voc(data.voc_root, data.synthetic_sizes, object_scale=data.synthetic_scale)


def _dataset_options(cfg: Config) -> dict:
    """The dataset arguments every set of ``cfg.data`` shares."""
    data = cfg.data
    # Skipping bad images needs them found first: each is read once here (~1 ms per VOC photo).
    return {"class_names": cfg.class_names, "skip_invalid": data.skip_invalid, "check_images": data.skip_invalid}


def build_train_set(cfg: Config, transform: Callable | None = None) -> DetectionDataset:
    """The training set of ``cfg.data`` (VOC- or COCO-format) with ``transform`` (None: images as they are)."""
    data = cfg.data
    common = {**_dataset_options(cfg), "transform": transform, "keep_difficult": data.keep_difficult}
    if data.format == "coco":
        return COCODataset(data.coco.train_json, data.coco.train_images, **common)
    return VOCDataset(data.voc_root, data.train_sets, ignore_classes=data.ignore_classes, **common)


def build_datasets(cfg: Config, model: SSD, info: DistInfo) -> tuple[DetectionDataset, DetectionDataset | None]:
    """Train set with SSD augmentation to the model's input size, and the test set (None if not set);
    VOC- or COCO-format as ``data.format`` says."""
    data = cfg.data
    if data.synthetic:
        if info.is_main:  # one process writes, the others wait for it
            write_synthetic_data(cfg)
        barrier(info)
    mean = model.preprocessing.mean if model.preprocessing.channels == "RGB" else model.preprocessing.mean[::-1]
    train_set = build_train_set(cfg, build_transform(True, model.image_size, mean=mean, augment=data.augment))
    common = _dataset_options(cfg)
    if data.format == "coco":
        test_set = COCODataset(data.coco.test_json, data.coco.test_images, **common) if data.coco.test_json else None
    else:
        test_set = (
            VOCDataset(data.voc_root, data.test_sets, ignore_classes=data.ignore_classes, **common)
            if data.test_sets
            else None
        )
    if data.cache_dir:  # one process decodes, the others wait for the file
        cache = ImageCache.for_dataset(data.cache_dir, train_set, workers=data.num_workers) if info.is_main else None
        barrier(info)
        train_set.image_cache = cache or ImageCache.for_dataset(data.cache_dir, train_set, build=False)
    return train_set, test_set


def build_trainer(
    cfg: Config,
    device: str | None = None,
    make_task: Callable[[SSD], nn.Module] | None = None,
    progress: bool = True,
) -> Trainer:
    """Processes, logging, model, data and the task of ``cfg``, ready to ``fit``.

    ``make_task``: builds the trained module from the detector (default: :class:`DetectionTask`).
    """
    info = setup_distributed(device)
    setup_logging(info)
    torch.manual_seed(cfg.train.seed)  # identical initial weights in every process
    model = build_detector(cfg)
    train_set, test_set = build_datasets(cfg, model, info)
    if make_task is None:
        task = DetectionTask(model, cfg.loss.neg_pos_ratio, cfg.loss.iou_threshold, cfg.loss.dfl_weight)
    else:
        task = make_task(model)
    return Trainer(cfg, task, train_set, test_set, info, progress=progress)


def run_training(
    cfg: Config,
    resume: str | None = None,
    device: str | None = None,
    make_task: Callable[[SSD], nn.Module] | None = None,
    progress: bool = True,
) -> tuple[TrainResult, DistInfo]:
    """Everything a training script does: :func:`build_trainer`, then the loop.

    ``resume``: a checkpoint path, ``"auto"`` (the latest in ``train.output_dir``) or None.
    """
    trainer = build_trainer(cfg, device, make_task, progress)
    checkpoint = latest_checkpoint(cfg.train.output_dir) if resume == "auto" else resume
    return trainer.fit(checkpoint), trainer.info


def summary(cfg: Config, result: TrainResult, headline: str) -> str:
    """What a training script prints at the end: the mAP and where the files are."""
    data = cfg.data
    train, test = (
        (data.coco.train_json, data.coco.test_json)
        if data.format == "coco"
        else (f"{data.voc_root} {data.train_sets}", data.test_sets)
    )
    lines = [f"\n{headline}: {result.iteration} iterations on {train}"]
    if result.last_map is not None:
        lines.append(f"{cfg.eval.metric} mAP on {test}: last {result.last_map:.4f}, best {result.best_map:.4f}")
    for label, path in (
        ("best model", result.best_model),
        ("final model", result.final_model),
        ("checkpoint (resume)", result.checkpoint),
    ):
        if path is not None:
            lines.append(f"{label}: {path}")
    return "\n".join(lines)
