"""Training: the task abstraction, the loop, schedules, distributed set-up."""

from odkd.engine.distributed import DistInfo, setup_distributed
from odkd.engine.schedule import lr_factor
from odkd.engine.task import DetectionTask
from odkd.engine.trainer import Trainer, TrainingError, TrainResult, latest_checkpoint, read_metrics

__all__ = [
    "DetectionTask",
    "DistInfo",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "latest_checkpoint",
    "lr_factor",
    "read_metrics",
    "setup_distributed",
]
