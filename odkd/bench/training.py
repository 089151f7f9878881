"""Training and distillation throughput: the trainer's own loop end to end on synthetic JPEGs, then,
continuing the same run, its step split into phases (the device synchronised after each)."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from odkd.bench.gpu_busy import GpuBusySampler
from odkd.bench.synthetic import benchmark_classes, write_benchmark_images
from odkd.bench.timing import device_name
from odkd.config import Config, load_config
from odkd.engine import read_metrics
from odkd.engine.build import build_trainer
from odkd.engine.distributed import barrier, setup_distributed
from odkd.engine.trainer import HookBase
from odkd.models import SSD, build_model

__all__ = ["TrainingSetup", "TrainingThroughput", "measure_training"]


@dataclass(frozen=True)
class TrainingSetup:
    """What is trained, how, on what: ``images`` synthetic 375-500 px JPEGs under ``root``, ``warmup`` +
    ``iters`` timed iterations of ``batch`` images per process; a distillation from a randomly initialised
    ``teacher_model`` with ``methods`` when a teacher is named (speed does not depend on the weights)."""

    model: str
    width: float
    batch: int
    iters: int
    warmup: int
    workers: int
    images: int
    root: str
    device: str | None  # None: CUDA when available
    amp: bool
    channels_last: bool
    compile: bool
    compile_mode: str
    gt_padding: str
    cache: bool  # read decoded images from root/cache
    teacher_model: str | None = None
    methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainingThroughput:
    """The run's numbers and what it ran as. ``images_per_s``: the trainer's loop after warm-up, all
    processes together; ``wall_s``: all ``iterations`` with start-up. CUDA only: peak memory (GiB) and
    the GPU busy share (:meth:`GpuBusySampler.summary`). ``phases_s``: median seconds per iteration of
    each phase of the step (None under DDP: the phases are timed outside its wrapper, on one process)."""

    world_size: int
    image_size: int
    precision: str
    fixed_gt_slots: bool
    device: str  # its name (:func:`odkd.bench.timing.device_name`)
    images_per_s: float
    wall_s: float
    iterations: int
    peak_memory_gib: float | None
    gpu_busy: str | None
    phases_s: dict[str, float] | None


def _train_config(setup: TrainingSetup, output_dir: str, max_iters: int, log_every: int) -> Config:
    """The benchmark's run config: the model at the batch size, the synthetic JPEGs, AMP / channels_last /
    compile as asked, no evaluation, a checkpoint only at the end."""
    overrides = [
        f"model.name={setup.model}", f"model.width_mult={setup.width}", f"data.voc_root={setup.root}",
        "data.train_sets=SYN_trainval", "data.test_sets=''", f"data.classes=[{', '.join(benchmark_classes())}]",
        f"data.batch_size={setup.batch}", f"data.num_workers={setup.workers}", f"optim.max_iters={max_iters}",
        # Speed does not depend on the lr, but a run that diverges stops: at the default lr with no warm-up
        # the from-scratch VGG16-SSD300 (no BatchNorm) gave NaN losses from iteration 46 (H200, bf16, batch 64).
        "optim.lr=1e-4", "optim.warmup_iters=100",
        f"train.output_dir={output_dir}", f"train.amp={setup.amp}", f"train.channels_last={setup.channels_last}",
        f"train.compile={setup.compile}", f"train.compile_mode={setup.compile_mode}",
        f"data.gt_padding={setup.gt_padding}",
        f"train.log_every={log_every}", f"train.eval_every={10 * max_iters}",
        f"train.checkpoint_every={max_iters}", "train.keep_last=1",
    ]  # fmt: skip
    if setup.cache:
        overrides.append(f"data.cache_dir={Path(setup.root) / 'cache'}")
    if setup.teacher_model:
        overrides.append(f"distill.methods=[{', '.join(setup.methods)}]")
    return load_config(None, overrides)


def _teacher(setup: TrainingSetup, cfg: Config) -> SSD | None:
    """A distillation's frozen teacher (random weights: speed does not depend on them); None to train alone."""
    if not setup.teacher_model:
        return None
    teacher = build_model(setup.teacher_model, num_classes=cfg.num_classes, dfl_bins=cfg.model.dfl_bins)
    return teacher.eval().requires_grad_(False)


class _TimePhasesFrom(HookBase):
    """From iteration ``start`` on, the trainer splits its step into phases (the device synchronised after
    each) and records their times: the throughput is measured before, the breakdown after (``on_start``
    is called when it begins)."""

    def __init__(self, start: int, on_start: Callable[[], None]) -> None:
        self.start, self.on_start = start, on_start

    def before_step(self) -> None:
        if self.trainer.iteration == self.start:
            self.on_start()
            self.trainer.time_phases = True


def measure_training(setup: TrainingSetup) -> TrainingThroughput | None:
    """Train as ``setup`` says: ``warmup + iters`` iterations for the throughput (and the GPU busy share),
    then, on one process, ``iters`` more with the step split into phases. Under torchrun every process
    trains, one writes the data; None on all but the main process."""
    info = setup_distributed(setup.device)  # under torchrun: one process writes the data, the others wait
    if info.is_main:
        write_benchmark_images(setup.root, "trainval", setup.images)
    barrier(info)
    timed = setup.warmup + setup.iters  # iterations of the throughput part; as many again for the phases
    with tempfile.TemporaryDirectory() as folder:
        cfg = _train_config(setup, folder, timed + (0 if info.distributed else setup.iters), setup.warmup)
        trainer = build_trainer(cfg, setup.device, progress=False, teacher=_teacher(setup, cfg))
        busy = GpuBusySampler(trainer.device)
        trainer.register(_TimePhasesFrom(timed, on_start=busy.stop))
        cuda = trainer.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(trainer.device)
        start = time.perf_counter()
        with busy:
            trainer.fit()
        wall = time.perf_counter() - start
        records = read_metrics(folder)
    if not trainer.info.is_main:
        return None
    steady = [r["images_per_s"] for r in records if "images_per_s" in r and r["iter"] <= timed][1:]  # after warm-up
    phases = None
    if not trainer.info.distributed:
        phases = {phase: statistics.median(times[-setup.iters :]) for phase, times in trainer.phase_times.items()}
    return TrainingThroughput(
        world_size=trainer.info.world_size,
        image_size=trainer.model.image_size,
        precision=str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "float32",
        fixed_gt_slots=trainer.fixed_gt_slots,
        device=device_name(trainer.device),
        images_per_s=statistics.mean(steady),
        wall_s=wall,
        iterations=trainer.iteration,
        peak_memory_gib=torch.cuda.max_memory_allocated(trainer.device) / 2**30 if cuda else None,
        gpu_busy=busy.summary() if cuda else None,
        phases_s=phases,
    )
