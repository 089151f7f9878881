"""The parts of a run around the step (:class:`odkd.engine.trainer.HookBase`), in the order a run uses them.

| hook | does |
|---|---|
| :class:`RunFolderHook` | the run's folder: config.yaml, metrics.jsonl of this run only, train_examples.jpg |
| :class:`CalibrationHook` | step-0 calibration of a distillation task (term table, warnings, auto-balance) |
| :class:`EMAHook` | an exponential moving average of the weights, evaluated and exported instead of them |
| :class:`MetricsHook` | training records every ``log_every`` steps; every record to metrics.jsonl and TensorBoard |
| :class:`ProgressHook` | the tqdm bar |
| :class:`EvalHook` | evaluation every ``eval_every`` steps and at the end; best.pt |
| :class:`CheckpointHook` | atomic training checkpoints (the last ``keep_last``), at a stop, and model_final.pt |
| :class:`SignalHook` | SIGINT/SIGTERM: a checkpoint after the current step and a clean end |

Evaluation runs before the checkpoint of the same iteration, so a checkpoint always holds the best score
so far (a run stopped during an evaluation resumes from the checkpoint before and evaluates again).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from odkd.checkpoint import atomic_save, save_model
from odkd.config import Config, EvalConfig, config_to_dict, save_config
from odkd.data import DetectionDataset
from odkd.engine.distributed import all_reduce_sum, barrier, broadcast_buffers, gather_to_main
from odkd.engine.ema import ModelEMA
from odkd.engine.trainer import HookBase, TrainingError, read_metrics
from odkd.files import json_line
from odkd.visualize import write_image

__all__ = [
    "CalibrationHook",
    "CheckpointHook",
    "EMAHook",
    "EvalHook",
    "MetricsHook",
    "ProgressHook",
    "RunFolderHook",
    "SignalHook",
]

log = logging.getLogger("odkd")


class RunFolderHook(HookBase):
    """The run's folder ``out``: the resolved config, metrics.jsonl holding this run's records only (a fresh
    run starts it anew, a resumed one keeps the records up to its checkpoint), and on a fresh run
    ``examples()`` (the first training images as the model gets them) as train_examples.jpg."""

    def __init__(self, out: Path, config: Config, examples: Callable[[], np.ndarray] | None = None) -> None:
        self.out, self.config, self.examples = Path(out), config, examples

    def before_train(self) -> None:
        if not self.trainer.info.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.out / "config.yaml")
        path = self.out / "metrics.jsonl"
        kept = [r for r in read_metrics(self.out) if r["iter"] <= self.trainer.iteration]
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(json_line(record) + "\n" for record in kept))
        partial.replace(path)
        if self.trainer.iteration == 0 and self.examples is not None:
            write_image(self.out / "train_examples.jpg", self.examples())


class CalibrationHook(HookBase):
    """Before the first step of a fresh run, the task's step-0 calibration on the first batch (a
    distillation task's term table, :mod:`odkd.distill.calibration`): logged, warned about, recorded."""

    def before_step(self) -> None:
        trainer = self.trainer
        if trainer.iteration != 0 or not hasattr(trainer.task, "calibrate"):
            return
        world = trainer.info.world_size
        with trainer.autocast():
            calibration = trainer.task.calibrate(*trainer.batch, lambda t: all_reduce_sum(t, trainer.info) / world)
        log.info(
            "step-0 calibration on the first batch (gradient norms w.r.t. the student's weights):\n%s",
            calibration.table(),
        )
        for warning in calibration.warnings():
            log.warning(warning)
        trainer.log({"iter": 0, "calibration": calibration.to_json()})


class EMAHook(HookBase):
    """An EMA of ``model``'s weights (``decay``), updated after every step that updated the weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.ema = ModelEMA(model, decay)

    def after_step(self) -> None:
        if not self.trainer.step_output.skipped:
            self.ema.update(self.trainer.model)

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])


class MetricsHook(HookBase):
    """Every ``log_every`` steps (and the last) a training record: the loss, each term, the lr and images/s
    of the window; every record of the run (:meth:`Trainer.log`) goes to ``out/metrics.jsonl`` (non-finite
    numbers as null) and, when tensorboard is installed, to ``out/tensorboard`` (main process)."""

    def __init__(self, out: Path, log_every: int) -> None:
        self.out, self.log_every = Path(out), log_every
        self.writer = None

    def before_train(self) -> None:
        self.window_images, self.window_start = 0, time.perf_counter()
        if self.trainer.info.is_main:
            self.writer = _tensorboard(self.out)

    def after_step(self) -> None:
        trainer, step = self.trainer, self.trainer.step_output
        self.window_images += step.images
        if trainer.iteration % self.log_every and trainer.iteration != trainer.max_iters:
            return
        elapsed = time.perf_counter() - self.window_start
        trainer.log(
            {
                "iter": trainer.iteration,
                "loss": step.loss.item(),
                **{k: v.item() for k, v in step.losses.items()},
                "lr": trainer.optimizer.param_groups[0]["lr"],
                "images_per_s": self.window_images / elapsed,
            }
        )
        self.window_images, self.window_start = 0, time.perf_counter()

    def log(self, record: dict) -> None:
        if not self.trainer.info.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json_line(record) + "\n")  # strict JSON: null for a NaN/inf value
        if self.writer is not None:
            for key, value in record.items():
                if key != "iter" and isinstance(value, float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["iter"])

    def after_train(self) -> None:
        if self.writer is not None:
            self.writer.close()


class ProgressHook(HookBase):
    """A tqdm bar over the iterations, showing the last record's loss, lr and images/s (main process)."""

    def before_train(self) -> None:
        trainer = self.trainer
        self.bar = tqdm(total=trainer.max_iters, initial=trainer.iteration, desc="train", unit="it")

    def after_step(self) -> None:
        self.bar.update(1)

    def log(self, record: dict) -> None:
        if "loss" in record and hasattr(self, "bar"):
            self.bar.set_postfix(
                loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_s']:.1f}"
            )

    def after_train(self) -> None:
        self.bar.close()


class EvalHook(HookBase):
    """mAP of ``model()`` (the EMA weights when there are some) on ``test_set`` every ``every`` iterations
    and at the last; the best is saved as ``out/best.pt``. Sharded: every process detects on its share of
    the images, one gather brings the detections to the main process, which scores them (the same score as
    one process's, images being scored in dataset order) while the others wait."""

    def __init__(
        self,
        test_set: DetectionDataset,
        every: int,
        settings: EvalConfig,
        out: Path,
        model: Callable[[], nn.Module],
        num_workers: int = 4,
        progress: bool = False,
    ) -> None:
        self.test_set, self.every, self.settings, self.out = test_set, every, settings, Path(out)
        self.model, self.num_workers, self.progress = model, num_workers, progress
        self.best_map: float | None = None
        self.last_map: float | None = None

    def before_train(self) -> None:
        if self.trainer.iteration and self.trainer.info.is_main:  # resumed: the last score logged before
            records = read_metrics(self.out)
            self.last_map = next((r["mAP"] for r in reversed(records) if r.get("mAP") is not None), None)

    def after_step(self) -> None:
        trainer = self.trainer
        if trainer.iteration % self.every == 0 or trainer.iteration == trainer.max_iters:
            self.evaluate()
            barrier(trainer.info)

    def evaluate(self) -> float | None:
        from odkd.eval import evaluate_dataset, format_result
        from odkd.inference import detect_dataset

        trainer, info = self.trainer, self.trainer.info
        model, cfg = self.model(), self.settings
        broadcast_buffers(model, info)  # every process scores the main process's model
        mine = detect_dataset(
            model,
            self.test_set,
            trainer.device,
            batch_size=cfg.batch_size,
            num_workers=self.num_workers,
            progress=self.progress and info.is_main,
            settings=cfg.postprocess,
            rank=info.rank,
            world_size=info.world_size,
        )
        trainer.model.train()
        shards = gather_to_main(mine, info)
        if shards is None:
            return None
        detections = {index: found for shard in shards for index, found in shard.items()}
        result = evaluate_dataset(detections, self.test_set, cfg.metric)
        log.info("iteration %d, %s mAP %.4f\n%s", trainer.iteration, cfg.metric, result.mAP, format_result(result))
        trainer.log({"iter": trainer.iteration, **result.to_json()})
        self.last_map = result.mAP
        if self.best_map is None or result.mAP > self.best_map:
            self.best_map = result.mAP
            save_model(model, self.out / "best.pt")
        return result.mAP

    def state_dict(self) -> dict:
        return {"best_map": self.best_map}

    def result(self) -> dict:
        best = self.out / "best.pt"
        return {"best_map": self.best_map, "last_map": self.last_map, "best_model": best if best.is_file() else None}

    def load_state_dict(self, state: dict) -> None:
        self.best_map = state.get("best_map")


class CheckpointHook(HookBase):
    """``out/checkpoint_<iteration>.pt`` every ``every`` iterations, at the last and at a stop (written
    atomically; the last ``keep_last`` kept), and at the end of a finished run ``model()`` as
    ``out/model_final.pt``. The checkpoint holds ``config`` too (main process)."""

    def __init__(self, out: Path, every: int, keep_last: int, config: Config, model: Callable[[], nn.Module]) -> None:
        self.out, self.every, self.keep_last, self.config, self.model = Path(out), every, keep_last, config, model
        self.last: Path | None = None  # the last checkpoint written
        self.final: Path | None = None

    def after_step(self) -> None:
        trainer = self.trainer
        done = trainer.iteration == trainer.max_iters
        if trainer.stopped or done or trainer.iteration % self.every == 0:
            self.save()

    def after_train(self) -> None:
        trainer = self.trainer
        if trainer.stopped and self.last != self.path():  # stopped between steps (the loader ended first)
            self.save()
        if trainer.info.is_main and trainer.iteration == trainer.max_iters and not trainer.stopped:
            self.final = self.out / "model_final.pt"
            save_model(self.model(), self.final)

    def path(self) -> Path:
        """The checkpoint of the trainer's iteration."""
        return self.out / f"checkpoint_{self.trainer.iteration:07d}.pt"

    def save(self) -> None:
        """Write the checkpoint of this iteration (main process; never of weights that are not finite) and
        keep the last ``keep_last``."""
        trainer = self.trainer
        if trainer.info.is_main:
            state = trainer.state_dict()
            weights = [t for t in state["task"].values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if not all(t.isfinite().all() for t in weights):
                # a checkpoint to resume from must be one that can train on
                raise TrainingError(
                    f"the weights hold NaN/inf at iteration {trainer.iteration}, so no checkpoint is written; "
                    f"resume from the last good one ({self.last or 'none yet'}) with a lower optim.lr or with "
                    "optim.grad_clip"
                )
            self.last = self.path()
            atomic_save(state, self.last)
            for old in sorted(self.out.glob("checkpoint_*.pt"))[: -self.keep_last]:
                old.unlink()
        if trainer.stopped:
            log.warning("stopped by signal at iteration %d; resume with --resume %s", trainer.iteration, self.last)

    def state_dict(self) -> dict:
        return {"config": config_to_dict(self.config)}

    def result(self) -> dict:
        return {"checkpoint": self.last, "final_model": self.final}


class SignalHook(HookBase):
    """SIGINT/SIGTERM ask the run to stop after the current step (with a checkpoint); a second one stops it
    at once."""

    def before_train(self) -> None:
        self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(self, signum: int, frame) -> None:
        if self.trainer.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.trainer.stop_requested = True
        log.warning("signal %d: saving a checkpoint after this iteration (again to stop at once)", signum)

    def after_train(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _tensorboard(out: Path):
    """A TensorBoard writer when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))
