"""Localization distillation (LD, Zheng et al., CVPR 2022) for SSD models with distribution box heads.

With a DFL head (``model.dfl_bins``) every box edge is a distribution over ``n + 1`` bins
(:mod:`odkd.box_distribution`); LD distils the teacher's edge distributions into the student's, as
classification KD distils class distributions. With B images in the batch, N positive priors,
``KL_e(p)`` the KL(teacher || student) of edge e's bin distributions of prior p at temperature T::

    ld(p) = T^2 * (1/4) * sum_e KL_e(p) / (n + 1)          (the KL averaged over the n + 1 bins)

- ``main`` = ``weight * (2 / B) * sum_{p positive} q_p * ld(p)``, ``q_p`` the IoU of the student's decoded
  box with its GT box (no gradient);
- ``vlr`` = ``vlr_weight * (2 / B) * sum_{p in VLR} iou_p * ld(p) / 4`` over the valuable localization
  region: priors matching left as background for which some GT box has
  ``vlr_factor * t <= D(p, g) < t`` (``t`` the matching's positive IoU threshold), ``iou_p`` the IoU of
  the prior with the highest-IoU such GT, and ``D(p, g) = inter / area(p) - rho^2 / c^2`` (``rho`` the
  distance of the centres, ``c`` the diagonal of the enclosing box);
- ``kd`` = ``kd_weight * T_kd^2 * (1/N) * sum_{p positive} KL(P_t || P_s) / C`` on the class logits
  (C of them, background included), ``P = softmax(logits / T_kd)``.

How this maps to the official LD head (HikariTJU/LD ``LDHead``, GFL with the ATSS assigner):

- ``KnowledgeDistillationKLDivLoss`` is the KL per edge *averaged over the bins*, times T^2 (``ld``).
  ``loss_ld`` (weight 0.25, T 10) sums it over the positives' 4 edges weighted by the student's
  quality score and divides by 4: a sum over the positives, not a mean. GFL's quality score is its
  joint class score, trained towards the IoU of the decoded box with its GT; SSD's softmax score is not,
  so ``q_p`` is that IoU itself. The official sum runs over the positives of its per-GPU batch of 2
  images (``samples_per_gpu=2``): ``2 / B`` gives that scale at any batch size B, so the published
  weights carry over.
- ``loss_ld_vlr`` (0.25, T 10): the same KL on the VLR, weighted by IoU, with average factor 16
  (hence ``/ 4`` beside main's). The official region is ``0.25 t <= D < t`` with ``t`` the ATSS
  positive threshold of the GT; SSD's threshold is fixed (``loss.iou_threshold``, 0.5). ``D`` is the
  official "DIoU", whose first term divides the intersection by the prior's area, not the union
  (kept here: it is what the published weights were tuned with). The official code does not leave out
  positives explicitly; here the VLR excludes them, as the paper defines it.
- ``loss_kd`` (weight 10, T 2): the positives' class scores, KL averaged over the classes, mean over the
  positives. The official head takes that mean per pyramid level and sums the levels; here it is one
  mean over all positives (as for Chen 2017's hint, a sparse level would otherwise weigh as much as a
  dense one). GFL's 80 sigmoid classes become SSD's C softmax logits.

Both models need distribution heads with the same bins and the same priors (the distributions are
relative to the prior they belong to).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from odkd.boxes import cxcywh_to_xyxy, decode, paired_iou
from odkd.config import FRACTION, NOT_NEGATIVE, POSITIVE, Range
from odkd.distill.base import BOX_DISTRIBUTIONS, LOGITS, DistillBatch, Distiller, register_distiller
from odkd.losses.soft_targets import kl_divergence
from odkd.models import SSD

__all__ = ["OFFICIAL_IMAGES_PER_GPU", "LocalizationDistillation", "valuable_region_iou"]

# The official LD configs train 2 images per GPU, and the official LD terms are sums over that batch.
OFFICIAL_IMAGES_PER_GPU = 2


def valuable_region_iou(
    gt_boxes: torch.Tensor, gt_valid: torch.Tensor, priors: torch.Tensor, positive_iou: float, factor: float
) -> torch.Tensor:
    """``(B, P)`` the VLR weight of each prior: the IoU with the GT box of highest IoU among those with
    ``factor * positive_iou <= D < positive_iou`` (``D`` the official LD "DIoU", see the module docstring),
    0 where there is none. ``gt_boxes`` ``(B, N, 4)`` x1,y1,x2,y2, ``gt_valid`` ``(B, N)``, ``priors``
    ``(P, 4)`` cx,cy,w,h."""
    if gt_boxes.shape[1] == 0:
        return priors.new_zeros(gt_boxes.shape[0], priors.shape[0])
    gt = gt_boxes.float().unsqueeze(2)  # (B, N, 1, 4)
    prior = cxcywh_to_xyxy(priors.float())  # (P, 4), broadcast as (1, 1, P, 4)
    size = (torch.min(gt[..., 2:], prior[..., 2:]) - torch.max(gt[..., :2], prior[..., :2])).clamp(min=0)
    inter = size[..., 0] * size[..., 1]  # (B, N, P)
    prior_area = (prior[..., 2] - prior[..., 0]) * (prior[..., 3] - prior[..., 1])
    gt_area = (gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1])
    iou = inter / (prior_area + gt_area - inter).clamp(min=1e-6)
    centre_gap = ((gt[..., :2] + gt[..., 2:]) - (prior[..., :2] + prior[..., 2:])).pow(2).sum(-1) / 4
    hull = torch.max(gt[..., 2:], prior[..., 2:]) - torch.min(gt[..., :2], prior[..., :2])
    diou = inter / prior_area.clamp(min=1e-6) - centre_gap / hull.pow(2).sum(-1).clamp(min=1e-6)
    inside = (diou >= factor * positive_iou) & (diou < positive_iou) & gt_valid.unsqueeze(-1)
    return iou.where(inside, 0.0).amax(dim=1)


@register_distiller("ld")
class LocalizationDistillation(Distiller):
    """Returns ``main``, ``vlr`` and ``kd`` (see the module docstring; defaults: the official settings)."""

    needs = frozenset({BOX_DISTRIBUTIONS, LOGITS})
    weight_keys: ClassVar[dict[str, str]] = {"main": "weight", "vlr": "vlr_weight", "kd": "kd_weight"}
    ranges: ClassVar[dict[str, Range]] = {
        "temperature": POSITIVE,
        "kd_temperature": POSITIVE,
        **dict.fromkeys(("weight", "vlr_weight", "kd_weight"), NOT_NEGATIVE),
        "vlr_factor": FRACTION,
    }

    def __init__(
        self,
        *,
        temperature: float = 10.0,
        weight: float = 0.25,
        vlr_weight: float = 0.25,
        vlr_factor: float = 0.25,
        kd_weight: float = 10.0,
        kd_temperature: float = 2.0,
    ) -> None:
        super().__init__()
        if temperature <= 0 or kd_temperature <= 0 or not 0 <= vlr_factor < 1:
            raise ValueError(
                f"ld: temperatures must be > 0 and vlr_factor in [0, 1), got temperature={temperature}, "
                f"kd_temperature={kd_temperature}, vlr_factor={vlr_factor}"
            )
        self.temperature, self.weight = temperature, weight
        self.vlr_weight, self.vlr_factor = vlr_weight, vlr_factor
        self.kd_weight, self.kd_temperature = kd_weight, kd_temperature

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
        T, student_dist = self.temperature, batch.student.loc_dist
        bins = student_dist.shape[-1]
        per_prior = T * T * kl_divergence(student_dist, batch.teacher.loc_dist, T).mean(-1) / bins  # (B, P)
        with torch.no_grad():
            quality = paired_iou(
                decode(batch.student.loc.float(), batch.priors), decode(batch.loc_targets, batch.priors)
            )
            region = valuable_region_iou(
                batch.gt_boxes, batch.gt_valid, batch.priors, batch.iou_threshold, self.vlr_factor
            ).where(~batch.positive, 0.0)
        per_image = OFFICIAL_IMAGES_PER_GPU / batch.labels.shape[0]
        T_kd = self.kd_temperature
        kd = kl_divergence(batch.student.conf, batch.teacher_conf, T_kd) / batch.student.conf.shape[-1]
        return {
            "main": self.weight * per_image * (quality * per_prior).where(batch.positive, 0.0).sum(),
            "vlr": self.vlr_weight * per_image * (region * per_prior).sum() / 4,
            "kd": self.kd_weight * T_kd * T_kd * kd.where(batch.positive, 0.0).sum() / batch.num_pos,
        }
