"""From a config to a run: the detector, the datasets, the task (detection or distillation), the trainer and
its hooks."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from odkd.checkpoint import ModelFileError, init_from_checkpoint
from odkd.config import Config, scaled_lr
from odkd.data import DatasetError, DetectionDataset, VOCDataset, build_loader, build_transform
from odkd.data.coco import COCODataset
from odkd.data.dataset import ImageFiles, OpenImages
from odkd.data.image_cache import ImageCache
from odkd.data.synthetic import SyntheticLayout, make_synthetic_coco, make_synthetic_voc
from odkd.device import select_device
from odkd.engine.distributed import DistInfo, barrier, setup_distributed
from odkd.engine.hooks import (
    CalibrationHook,
    CheckpointHook,
    EMAHook,
    EvalHook,
    MetricsHook,
    ProgressHook,
    RunFolderHook,
    SignalHook,
)
from odkd.engine.run_folder import claim_run_folder
from odkd.engine.schedule import build_optimizer, build_scheduler
from odkd.engine.task import DetectionTask
from odkd.engine.trainer import CUDA_GRAPH_MODES, Trainer, TrainingError, TrainResult
from odkd.files import check_output_path
from odkd.inference import autocast_dtype
from odkd.models import SSD, build_model, init_background_prior
from odkd.visualize import training_examples

__all__ = [
    "SCRIPT_ERRORS",
    "build_datasets",
    "build_detector",
    "build_task",
    "build_test_set",
    "build_train_set",
    "build_trainer",
    "run_training",
    "setup_logging",
    "summary",
    "train_gt_slots",
    "write_synthetic_data",
]

log = logging.getLogger("odkd")

# What a script reports in one line (``error: ...``) rather than as a traceback: bad data, a run that cannot
# go on, files that cannot be read or written (FileWriteError), bad settings (ConfigError).
SCRIPT_ERRORS = (DatasetError, TrainingError, OSError, ValueError)


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
    if cfg.model.background_prior is not None:  # before a checkpoint, whose biases then replace these
        init_background_prior(model, cfg.model.background_prior)
    if cfg.model.init_checkpoint:
        copied, left = init_from_checkpoint(model, cfg.model.init_checkpoint, cfg.model.init_source)
        log.info("initialised %d tensors from %s (%d left as they were)", copied, cfg.model.init_checkpoint, left)
    model.class_names = cfg.class_names  # saved with the model files
    return model


def write_synthetic_data(cfg: Config) -> None:
    """Write the synthetic dataset ``cfg.data`` asks for (``data.synthetic``) where it says, if missing."""
    data = cfg.data
    layout = SyntheticLayout(
        object_scale=data.synthetic_scale,
        objects=tuple(data.synthetic_objects),
        max_overlap=data.synthetic_max_overlap,
        lines=data.synthetic_lines,
        class_colours=data.synthetic_class_colours,
    )
    if data.format == "coco":
        make_synthetic_coco(Path(data.coco.train_images).parent, data.synthetic_sizes, layout=layout)
    else:
        make_synthetic_voc(data.voc_root, data.synthetic_sizes, layout=layout)


def _dataset_options(cfg: Config) -> dict:
    """The dataset arguments every set of ``cfg.data`` shares."""
    data = cfg.data
    # Every image's header is read at start; skipping bad images needs them found first: each is decoded once
    # here (~3 ms per VOC photo).
    return {"class_names": cfg.class_names, "skip_invalid": data.skip_invalid, "check_images": data.skip_invalid}


def build_train_set(
    cfg: Config, transform: Callable | None = None, open_images: OpenImages = ImageFiles
) -> DetectionDataset:
    """The training set of ``cfg.data`` (VOC- or COCO-format) with ``transform`` (None: images as they are),
    its images opened by ``open_images`` (default: decoded from their files at every read)."""
    data = cfg.data
    common = {
        **_dataset_options(cfg),
        "transform": transform,
        "keep_difficult": data.keep_difficult,
        "open_images": open_images,
    }
    if data.format == "coco":
        return COCODataset(data.coco.train_json, data.coco.train_images, **common)
    return VOCDataset(data.voc_root, data.train_sets, ignore_classes=data.ignore_classes, **common)


def _decoded_images(cfg: Config, info: DistInfo) -> OpenImages:
    """Opens images through their decoded-image cache in ``data.cache_dir``: one process decodes them, the
    others wait for its file."""
    directory, workers = cfg.data.cache_dir, cfg.data.num_workers

    def open_cache(paths: Sequence[Path], shapes: Sequence[tuple[int, int]]) -> ImageCache:
        cache = ImageCache.for_images(directory, paths, shapes, workers=workers) if info.is_main else None
        barrier(info)
        return cache or ImageCache.for_images(directory, paths, shapes, build=False)

    return open_cache


def build_test_set(cfg: Config, reads_images: bool = True) -> DetectionDataset | None:
    """The test set of ``cfg.data`` (VOC- or COCO-format; None if not set), images as they are.
    ``reads_images=False``: the annotations alone are read and checked (to score result files)."""
    data = cfg.data
    common = _dataset_options(cfg)
    if not reads_images:
        common.update(check_images=False, check_headers=False)
    if data.format == "coco":
        return COCODataset(data.coco.test_json, data.coco.test_images, **common) if data.coco.test_json else None
    if not data.test_sets:
        return None
    return VOCDataset(data.voc_root, data.test_sets, ignore_classes=data.ignore_classes, **common)


def build_datasets(cfg: Config, model: SSD, info: DistInfo) -> tuple[DetectionDataset, DetectionDataset | None]:
    """Train set with SSD augmentation to the model's input size (its images read from the decoded-image
    cache with ``data.cache_dir``), and the test set (None if not set); VOC- or COCO-format as ``data.format``
    says."""
    data = cfg.data
    if data.synthetic:
        if info.is_main:  # one process writes, the others wait for it
            write_synthetic_data(cfg)
        barrier(info)
    mean = model.preprocessing.mean if model.preprocessing.channels == "RGB" else model.preprocessing.mean[::-1]
    transform = build_transform(True, model.image_size, mean=mean, augment=data.augment)
    train_set = build_train_set(cfg, transform, _decoded_images(cfg, info) if data.cache_dir else ImageFiles)
    test_set = build_test_set(cfg)
    return train_set, test_set


def build_task(cfg: Config, model: SSD, *, teacher: SSD | None = None) -> nn.Module:
    """What ``cfg`` trains: the detection task, or with a ``distill`` section the distillation task (its
    teacher loaded from ``distill.teacher`` unless given)."""
    if cfg.distill is None:
        loss = cfg.loss
        return DetectionTask(
            model, neg_pos_ratio=loss.neg_pos_ratio, iou_threshold=loss.iou_threshold, dfl_weight=loss.dfl_weight
        )
    from odkd.engine.distill_task import build_distillation_task

    return build_distillation_task(cfg, model, teacher)


def build_trainer(cfg: Config, device: str | None = None, progress: bool = True, teacher: SSD | None = None) -> Trainer:
    """Processes, logging, model, data, the task (:func:`build_task`), optimizer, schedule and the run's
    hooks for ``cfg``: a :class:`Trainer` ready to ``fit``. ``teacher``: a distillation task's teacher
    (default: loaded from ``distill.teacher``)."""
    info = setup_distributed(device)
    setup_logging(info)
    torch.manual_seed(cfg.train.seed)  # identical initial weights in every process
    model = build_detector(cfg)
    train_set, test_set = build_datasets(cfg, model, info)
    task = build_task(cfg, model, teacher=teacher).to(info.device)
    if cfg.train.channels_last:  # NHWC kernels: cuDNN on CUDA, oneDNN on the CPU (~1.3x for MobileNetV2 there)
        task.to(memory_format=torch.channels_last)  # conv outputs follow the weights' format
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim, scaled_lr(cfg, info.world_size))
    gt_slots = train_gt_slots(cfg, train_set, info.device)
    train = cfg.train

    def batches(start: int):
        return build_loader(
            train_set, cfg.data.batch_size, train=True, num_workers=cfg.data.num_workers,
            max_iters=cfg.optim.max_iters, start_iter=start, seed=train.seed, rank=info.rank,
            world_size=info.world_size, gt_slots=gt_slots,
        )  # fmt: skip

    def examples():  # the first 16 items of the run: the sampler is a pure function of (seed, iteration)
        return training_examples(train_set, itertools.islice(batches(0).sampler, 16), model.label_names)

    out = Path(train.output_dir)
    ema = EMAHook(model, train.ema_decay) if train.ema_decay else None
    evaluated = (lambda: ema.ema.module) if ema is not None else (lambda: model)
    hooks = [
        RunFolderHook(out, cfg, examples),
        CalibrationHook(),
        *([ema] if ema else []),
        MetricsHook(out, train.log_every),
    ]
    if progress and info.is_main:
        hooks.append(ProgressHook())
    if test_set is not None:
        hooks.append(EvalHook(test_set, train.eval_every, cfg.eval, out, evaluated, cfg.data.num_workers, progress))
    hooks += [CheckpointHook(out, train.checkpoint_every, train.keep_last, cfg, evaluated), SignalHook()]
    return Trainer(
        task,
        optimizer,
        build_scheduler(optimizer, cfg.optim),
        batches,
        info,
        cfg.optim.max_iters,
        hooks,
        amp_dtype=autocast_dtype(info.device) if train.amp else None,
        grad_clip=cfg.optim.grad_clip,
        max_bad_steps=train.max_bad_steps,
        compile=train.compile,
        compile_mode=train.compile_mode,
        fixed_gt_slots=gt_slots > 0,
    )


def train_gt_slots(cfg: Config, train_set: DetectionDataset, device: torch.device) -> int:
    """GT slots per image of the training batches (``data.gt_padding``): 0 = each batch's most crowded
    image (the least matching work), else the train set's most crowded image (one shape for every batch)."""
    padding = cfg.data.gt_padding
    if padding == "auto":
        graphs = device.type == "cuda" and cfg.train.compile and cfg.train.compile_mode in CUDA_GRAPH_MODES
        padding = "dataset" if graphs else "batch"
    return train_set.max_objects if padding == "dataset" else 0


def run_training(
    cfg: Config,
    resume: str | None = None,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> tuple[TrainResult, DistInfo]:
    """Everything a training script does: claim ``train.output_dir`` (:func:`claim_run_folder`; the main
    process), :func:`build_trainer`, then the run.

    ``resume``: a checkpoint path, ``"auto"`` (the latest in ``train.output_dir`` that loads, else a fresh
    run, each said in the log) or None (a fresh run: the folder must not hold another run's files unless
    ``overwrite``).
    """
    select_device(device)  # "cuda" without a CUDA device: refused before anything is written
    if cfg.distill is not None:  # so are settings a distiller does not take
        from odkd.distill import check_distill_settings

        check_distill_settings(cfg.distill)
    out = Path(cfg.train.output_dir)
    check_output_path(out, "train.output_dir", folder=True)  # before minutes of set-up
    is_main = int(os.environ.get("RANK", "0")) == 0  # the process group does not exist yet
    with claim_run_folder(out, fresh=resume is None, overwrite=overwrite) if is_main else contextlib.nullcontext():
        trainer = build_trainer(cfg, device, progress)
        if resume == "auto":
            resume_latest(trainer, out)
        elif resume is not None:
            trainer.resume(resume)
        return trainer.fit(), trainer.info


def resume_latest(trainer: Trainer, folder: Path) -> None:
    """Resume ``trainer`` from the latest checkpoint in ``folder`` that loads, falling back past ones that do
    not (cut short by a full disk or a copy); with none, the run starts afresh. Each case is logged."""
    checkpoints = sorted(folder.glob("checkpoint_*.pt"), reverse=True)
    if not checkpoints:
        log.warning("--resume auto: %s holds no checkpoint yet, so the run starts from iteration 0", folder)
        return
    for path in checkpoints:
        try:
            trainer.resume(path)
            return
        except ModelFileError as err:
            log.warning("--resume auto: %s; trying the checkpoint before it", err)
    raise TrainingError(f"--resume auto: none of the {len(checkpoints)} checkpoints in {folder} loads (see above)")


def summary(cfg: Config, result: TrainResult, headline: str) -> str:
    """What a training script prints at the end: the mAP and where the files are."""
    data = cfg.data
    train, test = (
        (data.coco.train_json, data.coco.test_json)
        if data.format == "coco"
        else (f"{data.voc_root} {data.train_sets}", data.test_sets)
    )
    lines = [f"\n{headline}: {result.iteration} iterations on {train}"]
    if result.last_map is not None or result.best_map is not None:
        last, best = ("n/a" if v is None else f"{v:.4f}" for v in (result.last_map, result.best_map))
        lines.append(f"{cfg.eval.metric} mAP on {test}: last {last}, best {best}")
    for label, path in (
        ("best model", result.best_model),
        ("final model", result.final_model),
        ("checkpoint (resume)", result.checkpoint),
    ):
        if path is not None:
            lines.append(f"{label}: {path}")
    return "\n".join(lines)
