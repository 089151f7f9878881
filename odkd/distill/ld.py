"""Localization distillation (LD, Zheng et al., CVPR 2022) for SSD models with distribution box heads.

With a DFL head (``model.dfl_bins``) every box edge is a distribution over ``n + 1`` bins
(:mod:`odkd.box_distribution`); LD distils the teacher's edge distributions into the student's, as
classification KD distils class distributions. Per prior:

    ld(p) = T^2 * (1/4) * sum_edges KL(softmax(z_t / T) || softmax(z_s / T)) / (n + 1)

(the KL divided by the number of bins, as LD's reference implementation averages over bins, so its
published weights carry over: T = 10, weight 0.25), and with N = positive priors:

- ``main`` = ``weight * (1/N) * sum`` over the main distillation region (the positive priors);
- ``vlr`` = ``vlr_weight * (1/N) * sum`` over the valuable localization region: priors that matching
  left as background but whose best DIoU with a GT box is at least ``vlr_threshold``.

Both models need distribution heads with the same bins and the same priors (the distributions are
relative to the prior they belong to).
"""

from __future__ import annotations

import torch
from torchvision.ops import distance_box_iou

from odkd.boxes import cxcywh_to_xyxy
from odkd.distill.base import BOX_DISTRIBUTIONS, DistillBatch, Distiller
from odkd.losses.soft_targets import kl_divergence
from odkd.models import SSD

__all__ = ["LocalizationDistillation", "best_gt_diou", "edge_distribution_kl"]


def best_gt_diou(gt_boxes: torch.Tensor, gt_valid: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """``(B, P)`` the highest DIoU of each prior (``(P, 4)`` cx,cy,w,h) with the valid GT boxes of its image
    (``(B, N, 4)`` x1,y1,x2,y2, ``gt_valid`` ``(B, N)``); -1 (the DIoU minimum) for an image without GT."""
    batch, num_gt = gt_valid.shape
    if num_gt == 0:
        return priors.new_full((batch, priors.shape[0]), -1.0)
    diou = distance_box_iou(gt_boxes.reshape(-1, 4).float(), cxcywh_to_xyxy(priors).float())
    diou = diou.view(batch, num_gt, -1).masked_fill(~gt_valid.unsqueeze(-1), -1.0)
    return diou.max(dim=1).values


def edge_distribution_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``ld(p)`` above: edge bin logits ``(B, P, 4, n + 1)`` -> ``(B, P)``, the KL per bin averaged over
    the four edges, times T^2."""
    kl = kl_divergence(student, teacher, temperature)  # (B, P, 4)
    return temperature * temperature * kl.mean(-1) / student.shape[-1]


class LocalizationDistillation(Distiller):
    """Returns ``main`` and ``vlr``."""

    needs = frozenset({BOX_DISTRIBUTIONS})

    def __init__(
        self, temperature: float = 10.0, weight: float = 0.25, vlr_weight: float = 0.25, vlr_threshold: float = 0.25
    ) -> None:
        super().__init__()
        self.temperature, self.weight = temperature, weight
        self.vlr_weight, self.vlr_threshold = vlr_weight, vlr_threshold

    @classmethod
    def from_models(cls, student: SSD, teacher: SSD, **settings) -> LocalizationDistillation:
        if not student.dfl_bins or student.dfl_bins != teacher.dfl_bins:
            raise ValueError(
                f"ld distils box distributions: student and teacher need distribution heads with the same bins, "
                f"got student dfl_bins={student.dfl_bins}, teacher dfl_bins={teacher.dfl_bins}. Train the teacher "
                "with model.dfl_bins=16 (python scripts/train_teacher.py ... model.dfl_bins=16) and give the "
                "student the same model.dfl_bins"
            )
        return cls(**settings)

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        per_prior = edge_distribution_kl(batch.student.loc_dist, batch.teacher.loc_dist, self.temperature)
        vlr = (best_gt_diou(batch.gt_boxes, batch.gt_valid, batch.priors) >= self.vlr_threshold) & ~batch.positive
        return {
            "main": self.weight * per_prior.where(batch.positive, 0.0).sum() / batch.num_pos,
            "vlr": self.vlr_weight * per_prior.where(vlr, 0.0).sum() / batch.num_pos,
        }
