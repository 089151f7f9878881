"""What is trained: a module whose forward maps a batch to named losses.

The trainer only sees a task. It hands the task uint8 image batches on the device, and each model
normalises them with its own preprocessing (a teacher may expect other input than its student).
:class:`DetectionTask` trains an SSD on ground truth; the distillation task adds a frozen teacher and
adaptation layers and returns more terms. ``task.model`` is always the detector that is evaluated and
exported; everything else in the task (adaptation layers) is saved in training checkpoints only.
"""

from __future__ import annotations

import torch
from torch import nn

from odkd.losses import MultiBoxLoss
from odkd.matching import match
from odkd.models import SSD

__all__ = ["DetectionTask"]


class DetectionTask(nn.Module):
    """SSD training: batched matching on the device, then MultiBoxLoss."""

    def __init__(self, model: SSD, neg_pos_ratio: float = 3.0, iou_threshold: float = 0.5) -> None:
        super().__init__()
        self.model = model
        self.criterion = MultiBoxLoss(neg_pos_ratio)
        self.iou_threshold = iou_threshold

    def forward(self, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images`` (B, 3, S, S) uint8 RGB on the device; ``boxes`` (B, N, 4) / ``labels`` (B, N) padded with -1."""
        out = self.model(self.model.preprocessing.normalize(images))
        loc_targets, conf_targets = match(boxes, labels, self.model.priors, self.iou_threshold)
        return self.criterion(out.loc, out.conf, loc_targets, conf_targets)
