"""The iteration-based training loop shared by train_teacher.py and distill.py.

Per iteration: uint8 batch -> device (copied one batch ahead on a side stream) -> normalise (model
preprocessing) -> task forward under autocast (bf16, or fp16 + GradScaler) -> losses -> backward -> clip
-> SGD step -> lr schedule -> EMA, with no host synchronisation but one read of the NaN/stop flags after
the backward pass is queued. Around it:
periodic evaluation (best checkpoint by mAP), atomic checkpoints (last K kept) that resume exactly,
NaN/inf steps skipped (stop after K in a row), SIGINT/SIGTERM -> checkpoint and clean exit, tqdm,
a JSONL metrics log and TensorBoard when installed. Runs on CPU, one GPU, or many under torchrun.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from odkd.checkpoint import atomic_save, save_model
from odkd.config import Config, config_to_dict, save_config, scaled_lr
from odkd.data import DetectionDataset, build_loader, prefetch_to_device
from odkd.engine.distributed import DistInfo, all_reduce_sum, barrier, setup_distributed
from odkd.engine.ema import ModelEMA
from odkd.engine.schedule import build_optimizer, build_scheduler
from odkd.files import json_line
from odkd.inference import autocast_dtype, detect_dataset
from odkd.visualize import training_examples, write_image

__all__ = [
    "TRAIN_FORMAT",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "begin_compiled_step",
    "latest_checkpoint",
    "train_gt_slots",
]

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs

log = logging.getLogger("odkd")
TRAIN_FORMAT = "odkd-train"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed NaN/inf); the message says why and what to do."""


@dataclass
class TrainResult:
    iteration: int  # iterations completed
    best_map: float | None
    last_map: float | None
    checkpoint: Path | None  # the last training checkpoint (resume from it)
    best_model: Path | None  # model file of the best evaluation
    final_model: Path | None  # model file at the end of training
    interrupted: bool  # stopped by SIGINT/SIGTERM


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl`` in ``output_dir`` (training windows and evaluations, one dict per
    line, keyed by ``"iter"``); an empty list if there is none."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The training checkpoint of the highest iteration in ``output_dir`` (None if there is none)."""
    found = sorted(Path(output_dir).glob("checkpoint_*.pt"))
    return found[-1] if found else None


def train_gt_slots(cfg: Config, train_set: DetectionDataset, device: torch.device) -> int:
    """GT slots per image of the training batches (``data.gt_padding``): 0 = each batch's most crowded
    image (the least matching work), else the train set's most crowded image (one shape for every batch)."""
    padding = cfg.data.gt_padding
    if padding == "auto":
        graphs = device.type == "cuda" and cfg.train.compile and cfg.train.compile_mode in CUDA_GRAPH_MODES
        padding = "dataset" if graphs else "batch"
    return train_set.max_objects if padding == "dataset" else 0


class Trainer:
    """Train ``task`` (a module mapping (images, boxes, labels) to named losses; ``task.model`` is the SSD)."""

    def __init__(
        self,
        cfg: Config,
        task: nn.Module,
        train_set: DetectionDataset,
        test_set: DetectionDataset | None = None,
        info: DistInfo | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.info = info or setup_distributed()
        self.device = self.info.device
        self.task = task.to(self.device)
        self.model = task.model
        self.train_set, self.test_set = train_set, test_set
        self.gt_slots = train_gt_slots(cfg, train_set, self.device)
        self.progress = progress and self.info.is_main
        self.out = Path(cfg.train.output_dir)
        self.amp_dtype = autocast_dtype(self.device) if cfg.train.amp else None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if cfg.train.channels_last:  # NHWC kernels: cuDNN on CUDA, oneDNN on the CPU (~1.4x for MobileNetV2 there)
            self.task.to(memory_format=torch.channels_last)  # conv outputs follow the weights' format

        self.params = [p for p in self.task.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.optim, scaled_lr(cfg, self.info.world_size))
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = ModelEMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        step_module: nn.Module = self.task
        if self.info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            step_module = DistributedDataParallel(self.task, device_ids=ids)
        self.step_module = torch.compile(step_module, mode=cfg.train.compile_mode) if cfg.train.compile else step_module

        self.iteration = 0
        self.best_map: float | None = None
        self.last_map: float | None = None
        self._stop_signal: int | None = None
        self._writer = None

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":  # this device's alone: the run may resume on a machine with fewer GPUs
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": TRAIN_FORMAT,
            "version": 1,
            "iteration": self.iteration,
            "spec": dict(self.model.spec),
            "preprocessing": self.model.preprocessing.to_dict(),
            "class_names": list(self.model.class_names) if self.model.class_names else None,
            "task": self.task.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "best_map": self.best_map,
            "config": config_to_dict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        self.task.load_state_dict(state["task"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # this machine's kernels, not those of the one that saved
            group.update(fused=self.optimizer.defaults["fused"], foreach=self.optimizer.defaults["foreach"])
        match_state_layout(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved without fp16 (bf16, CPU); a fresh scale then
            self.scaler.load_state_dict(state["scaler"])
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        cuda_rng = state["rng"].get("cuda")
        if cuda_rng is not None and self.device.type == "cuda":
            if isinstance(cuda_rng, list):  # checkpoints before 2026-11-24 hold every visible GPU's state
                cuda_rng = cuda_rng[self.device.index if self.device.index < len(cuda_rng) else 0]
            torch.cuda.set_rng_state(cuda_rng, self.device)
        self.iteration = state["iteration"]
        self.best_map = state["best_map"]

    def resume(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)  # RNG states must stay on the CPU
        if not isinstance(state, dict) or state.get("format") != TRAIN_FORMAT:
            raise ValueError(f"{path} is not an odkd training checkpoint (use model.init_checkpoint for weights)")
        if state["spec"] != self.model.spec:
            raise ValueError(f"{path} holds a {state['spec']} model, this run trains {self.model.spec}")
        self.load_state_dict(state)
        log.info("resumed from %s at iteration %d", path, self.iteration)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint_<iteration>.pt`` atomically and keep the last ``keep_last``."""
        path = self.out / f"checkpoint_{self.iteration:07d}.pt"
        atomic_save(self.state_dict(), path)
        for old in sorted(self.out.glob("checkpoint_*.pt"))[: -self.cfg.train.keep_last]:
            old.unlink()
        return path

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> float | None:
        """mAP of the model (its EMA when enabled) on the test set; main process only."""
        if self.test_set is None or not self.info.is_main:
            return None
        from odkd.eval import evaluate_dataset, format_result

        model = self.ema.module if self.ema is not None else self.model
        cfg = self.cfg.eval
        detections = detect_dataset(
            model,
            self.test_set,
            self.device,
            batch_size=cfg.batch_size,
            num_workers=self.cfg.data.num_workers,
            progress=self.progress,
            score_threshold=cfg.score_threshold,
            nms_threshold=cfg.nms_threshold,
            top_k=cfg.top_k,
            max_detections=cfg.max_detections,
        )
        result = evaluate_dataset(detections, self.test_set, cfg.metric)
        self.model.train()
        log.info("iteration %d, %s mAP %.4f\n%s", self.iteration, cfg.metric, result.mAP, format_result(result))
        self._log({"iter": self.iteration, **result.to_json()})
        self.last_map = result.mAP
        if self.best_map is None or result.mAP > self.best_map:
            self.best_map = result.mAP
            save_model(model, self.out / "best.pt")
        return result.mAP

    # ------------------------------------------------------------------------------------ main loop
    def fit(self, resume: str | Path | None = None) -> TrainResult:
        cfg = self.cfg
        if resume is not None:
            self.resume(resume)
        records: list[dict] = []
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            records = self._trim_metrics()
            self._writer = _tensorboard(self.out)
        if resume is not None:
            self.last_map = next((r["mAP"] for r in reversed(records) if "mAP" in r), None)
            self._evaluate_if_lost(records)
        loader = build_loader(
            self.train_set,
            cfg.data.batch_size,
            train=True,
            num_workers=cfg.data.num_workers,
            max_iters=cfg.optim.max_iters,
            start_iter=self.iteration,
            seed=cfg.train.seed,
            rank=self.info.rank,
            world_size=self.info.world_size,
            gt_slots=self.gt_slots,
        )
        if self.info.is_main and self.iteration == 0:  # a fresh run: show what the first batch looks like
            keys = itertools.islice(loader.sampler, 16)  # the sampler is a pure function of (seed, iteration)
            examples = training_examples(self.train_set, keys, self.model.label_names)
            write_image(self.out / "train_examples.jpg", examples)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        checkpoint = None
        try:
            checkpoint = self._loop(loader)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self._writer is not None:
                self._writer.close()
        final = None
        if self._stop_signal is None and self.info.is_main:
            final = self.out / "model_final.pt"
            save_model(self.ema.module if self.ema is not None else self.model, final)
        best = self.out / "best.pt"
        return TrainResult(
            self.iteration,
            self.best_map,
            self.last_map,
            checkpoint,
            best if best.is_file() else None,
            final,
            self._stop_signal is not None,
        )

    def _loop(self, loader) -> Path | None:
        cfg = self.cfg.train
        max_iters = self.cfg.optim.max_iters
        self.task.train()
        bar = tqdm(total=max_iters, initial=self.iteration, desc="train", unit="it", disable=not self.progress)
        bad_in_a_row, window_images, window_start = 0, 0, time.perf_counter()
        checkpoint = None
        for images, boxes, labels in prefetch_to_device(loader, self.device):
            if self.iteration == 0 and hasattr(self.task, "calibrate"):
                self._calibrate(images, boxes, labels)
            if cfg.compile:
                begin_compiled_step(boxes, labels, fixed_gt_slots=self.gt_slots > 0)
            with self.autocast():
                losses = self.step_module(images, boxes, labels)
            loss = sum(losses.values())
            # One small all-reduce: every process skips the step, or stops, together. The host reads the
            # flags only after queuing the backward pass, so the GPU works through it while the host waits
            # for the forward's flags (reading them first would leave the GPU idle until the backward's
            # kernels arrive). A skipped step's gradients are thrown away.
            not_finite = (~torch.isfinite(loss.detach())).float()
            stop_flag = torch.full_like(not_finite, float(self._stop_signal is not None))
            flags = _start_copy_to_host(all_reduce_sum(torch.stack([not_finite, stop_flag]), self.info))
            self.backward(loss)
            bad, stop = flags().tolist()
            if bad:
                bad_in_a_row += 1
                log.warning(
                    "iteration %d: loss is %s, step skipped (%d in a row)", self.iteration, loss.item(), bad_in_a_row
                )
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise TrainingError(
                        f"the loss was NaN/inf for {bad_in_a_row} iterations in a row (last at iteration "
                        f"{self.iteration}). Lower optim.lr or lengthen optim.warmup_iters, and check the data "
                        f"for bad boxes; resume from {latest_checkpoint(self.out)} once fixed."
                    )
                self.optimizer.zero_grad(set_to_none=True)
            else:
                bad_in_a_row = 0
                self.optimizer_step()
            self.scheduler.step()
            self.iteration += 1
            window_images += images.shape[0] * self.info.world_size
            bar.update(1)

            if self.iteration % cfg.log_every == 0 or self.iteration == max_iters:
                elapsed = time.perf_counter() - window_start
                record = {
                    "iter": self.iteration,
                    "loss": loss.item(),
                    **{k: v.item() for k, v in losses.items()},
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "images_per_s": window_images / elapsed,
                }
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_s']:.1f}"
                )
                self._log(record)
                window_images, window_start = 0, time.perf_counter()
            done = self.iteration == max_iters
            if stop or done or self.iteration % cfg.checkpoint_every == 0:
                checkpoint = self.save_checkpoint() if self.info.is_main else None
            if stop:
                log.warning("stopped by signal at iteration %d; resume with --resume %s", self.iteration, checkpoint)
                break
            if done or self.iteration % cfg.eval_every == 0:
                self.evaluate()
                barrier(self.info)
        bar.close()
        return checkpoint

    # ------------------------------------------------------------------- one step, piece by piece
    def autocast(self) -> torch.autocast:
        """The mixed-precision context of the forward pass and the losses (disabled without AMP)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def optimizer_step(self) -> None:
        """Clip (if configured), SGD step, loss-scale update, EMA update."""
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)

    def _calibrate(self, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> None:
        """Before the first step of a fresh run: the task's step-0 calibration on the first batch (a
        distillation task's term table, :mod:`odkd.distill.calibration`), logged and kept in metrics.jsonl."""
        world = self.info.world_size
        with self.autocast():
            calibration = self.task.calibrate(images, boxes, labels, lambda t: all_reduce_sum(t, self.info) / world)
        log.info(
            "step-0 calibration on the first batch (gradient norms w.r.t. the student's weights):\n%s",
            calibration.table(),
        )
        for warning in calibration.warnings():
            log.warning(warning)
        self._log({"iter": 0, "calibration": calibration.to_json()})

    # ------------------------------------------------------------------------------------ plumbing
    def _on_signal(self, signum: int, frame) -> None:
        if self._stop_signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum
        log.warning("signal %d: saving a checkpoint after this iteration (again to stop at once)", signum)

    def _trim_metrics(self) -> list[dict]:
        """``metrics.jsonl`` holds this run's records only: a fresh run in a used folder starts it anew, a
        resumed run keeps the records up to its checkpoint's iteration (it writes the later ones again).
        Returns the records kept."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return []
        kept = [record for record in read_metrics(self.out) if record["iter"] <= self.iteration]
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(json.dumps(record) + "\n" for record in kept))
        partial.replace(path)
        return kept

    def _evaluate_if_lost(self, records: list[dict]) -> None:
        """The checkpoint of an evaluation iteration is written before the evaluation: a run stopped in
        between (a signal, a crash while evaluating) evaluates that iteration first when it resumes, as the
        uninterrupted run did. ``records``: the kept ``metrics.jsonl`` records (main process)."""
        it = self.iteration
        if it == 0 or (it % self.cfg.train.eval_every and it != self.cfg.optim.max_iters):
            return  # the same decision in every process: they meet at the barrier
        lost = self.test_set is not None and not any(r["iter"] == it and "mAP" in r for r in records)
        if self.info.is_main and lost:
            log.info("iteration %d was not evaluated before the run stopped: evaluating it now", it)
            self.evaluate()
        barrier(self.info)

    def _log(self, record: dict) -> None:
        if not self.info.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json_line(record) + "\n")  # strict JSON: null for a NaN/inf value
        if self._writer is not None:
            for key, value in record.items():
                if key != "iter" and isinstance(value, float) and math.isfinite(value):
                    self._writer.add_scalar(key, value, record["iter"])


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each optimizer state tensor the memory layout of its parameter. Loaded states keep the layout
    they were saved with (contiguous from a CPU run, channels_last from a CUDA one), and the fused CUDA
    SGD kernel refuses parameters, gradients and momenta of different strides."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def begin_compiled_step(*targets: torch.Tensor, fixed_gt_slots: bool = False) -> None:
    """Before a torch.compile'd step: unless the targets are padded to fixed GT slots, tell it that the
    padded GT count (dim 1 of boxes and labels) changes from batch to batch, so the step is compiled once
    for any count rather than again when the count first changes; and mark a new step, so that with CUDA
    graphs (compile_mode reduce-overhead) its replay may reuse the previous step's output memory."""
    if not fixed_gt_slots:
        for tensor in targets:
            torch._dynamo.maybe_mark_dynamic(tensor, 1)
    torch.compiler.cudagraph_mark_step_begin()


def _start_copy_to_host(values: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start copying ``values`` to the host without waiting; the returned function waits for this copy
    alone (not for work queued on the device after it) and gives the host tensor."""
    if values.device.type != "cuda":
        return lambda: values
    host = values.to("cpu", non_blocking=True)  # into pinned memory: the copy is queued, not waited for
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> torch.Tensor:
        copied.synchronize()
        return host

    return wait


def _tensorboard(out: Path):
    """A TensorBoard writer when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))
