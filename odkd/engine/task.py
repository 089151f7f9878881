"""What is trained: a module whose forward maps a batch to named losses.

The trainer only sees a task. It hands the task uint8 image batches on the device, and each model
normalises them with its own preprocessing (a teacher may expect other input than its student).
:class:`DetectionTask` trains an SSD on ground truth; the distillation task adds a frozen teacher and
the distillers and returns more terms. ``task.model`` is always the detector that is evaluated and
exported; everything else in the task (adaptation layers) is saved in training checkpoints only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from odkd.box_distribution import distribution_focal_loss, edge_targets
from odkd.losses import MultiBoxLoss
from odkd.matching import match
from odkd.models import SSD, SSDOutput

__all__ = ["DetectionTask", "MatchedTargets"]


class MatchedTargets(NamedTuple):
    loc: torch.Tensor  # (B, P, 4) encoded GT boxes (0 for background)
    labels: torch.Tensor  # (B, P) classes, 0 = background
    sampled: torch.Tensor  # (B, P) bool: the priors of the classification loss (positives + mined negatives)


class DetectionTask(nn.Module):
    """SSD training: batched matching on the device, then MultiBoxLoss (``loc``, ``conf``), plus the
    distribution focal loss (``dfl``, on the positives' edges, / N) for a distribution box head."""

    def __init__(
        self, model: SSD, *, neg_pos_ratio: float = 3.0, iou_threshold: float = 0.5, dfl_weight: float = 0.25
    ) -> None:
        super().__init__()
        self.model = model
        self.criterion = MultiBoxLoss(neg_pos_ratio)
        self.iou_threshold, self.dfl_weight = iou_threshold, dfl_weight

    def detection_losses(
        self, out: SSDOutput, boxes: torch.Tensor, labels: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], MatchedTargets]:
        """The detection terms of the model's output ``out`` and the matched targets they were computed on."""
        loc_targets, conf_targets = match(boxes, labels, self.model.priors, self.iou_threshold)
        losses, sampled = self.criterion.compute(out.loc, out.conf, loc_targets, conf_targets)
        if out.loc_dist is not None:
            positive = conf_targets > 0
            target = edge_targets(loc_targets, self.model.dfl_bins, self.model.dfl_max_edge)
            dfl = distribution_focal_loss(out.loc_dist, target).mean(-1)  # (B, P): the mean over 4 edges
            losses["dfl"] = self.dfl_weight * dfl.where(positive, 0.0).sum() / positive.sum().clamp(min=1)
        return losses, MatchedTargets(loc_targets, conf_targets, sampled)

    def predict(self, images: torch.Tensor) -> SSDOutput:
        """The networks' pass: ``images`` (B, 3, S, S) uint8 RGB on the device -> the model's output."""
        return self.model(self.model.normalize(images))

    def losses(self, outputs: SSDOutput, boxes: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Matching and the loss terms of :meth:`predict`'s ``outputs``."""
        return self.detection_losses(outputs, boxes, labels)[0]

    def forward(self, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images`` (B, 3, S, S) uint8 RGB on the device; ``boxes`` (B, N, 4) / ``labels`` (B, N) padded with -1.
        The same as ``losses(predict(images), boxes, labels)`` (split so benchmarks can time the two)."""
        return self.losses(self.predict(images), boxes, labels)
