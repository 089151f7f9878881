"""CrossKD (Wang et al., 2023) for SSD: distil cross-head predictions (DESIGN.md §5).

The student's head intermediates (the inputs of each head's last conv, :class:`odkd.models.PredictionHead`)
go through 1x1 channel adapters into the frozen teacher's last head convs; those cross-head predictions
are distilled against the teacher's own predictions on the same priors. The detection loss stays on the
student's own head, so its predictors learn from the ground truth only, while the distillation gradient
reaches the student's intermediates and backbone through the teacher's (frozen) predictors. N = positives:

- ``cls`` = ``cls_weight * T^2 * (1/N) * sum KL(P_t || P_cross)`` over the priors of the hard
  classification loss (positives + hard-mined negatives, SSD's region for classification);
- ``reg`` = ``reg_weight * (1/N) * sum (1 - GIoU(cross box, teacher box))`` over the positives; for
  distribution heads the edge distributions' KL at temperature T (LD's per-prior term) instead.

Teacher and student must share the prior layout: the cross-head predictions are laid out on the
student's maps and compared with the teacher's prior for prior.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from odkd.boxes import decode, paired_giou
from odkd.distill.base import BOXES, HEAD_INTERMEDIATES, LOGITS, DistillBatch, Distiller, adapter_1x1
from odkd.distill.ld import edge_distribution_kl
from odkd.losses.soft_targets import kl_divergence
from odkd.models import SSD

__all__ = ["CrossKD"]


class CrossKD(Distiller):
    """Returns ``cls`` and ``reg``.

    Args:
        conf_channels / loc_channels: per level, (student, teacher) channels at the input of the
            conf / loc head's last conv; the adapters map the first to the second.
    """

    needs = frozenset({HEAD_INTERMEDIATES, LOGITS, BOXES})

    def __init__(
        self,
        conf_channels: Sequence[tuple[int, int]],
        loc_channels: Sequence[tuple[int, int]],
        temperature: float = 1.0,
        cls_weight: float = 1.0,
        reg_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.conf_adapters = nn.ModuleList(adapter_1x1(s, t) for s, t in conf_channels)
        self.loc_adapters = nn.ModuleList(adapter_1x1(s, t) for s, t in loc_channels)
        self.temperature, self.cls_weight, self.reg_weight = temperature, cls_weight, reg_weight

    @classmethod
    def from_models(cls, student: SSD, teacher: SSD, **settings) -> CrossKD:
        if len(student.conf_heads) != len(teacher.conf_heads):
            raise ValueError(
                f"crosskd feeds each student level into the teacher's head of that level: the student has "
                f"{len(student.conf_heads)} levels, the teacher {len(teacher.conf_heads)}"
            )
        if student.dfl_bins != teacher.dfl_bins:
            raise ValueError(
                f"crosskd compares cross-head and teacher boxes: the box heads must agree, got student "
                f"dfl_bins={student.dfl_bins}, teacher dfl_bins={teacher.dfl_bins}"
            )

        def channels(student_heads: nn.ModuleList, teacher_heads: nn.ModuleList) -> list[tuple[int, int]]:
            pairs = zip(student_heads, teacher_heads, strict=True)
            return [(s.predictor.in_channels, t.predictor.in_channels) for s, t in pairs]

        return cls(
            channels(student.conf_heads, teacher.conf_heads), channels(student.loc_heads, teacher.loc_heads), **settings
        )

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        teacher = batch.teacher_model
        conf_maps = _cross_maps(teacher.conf_heads, self.conf_adapters, batch.student.conf_intermediates)
        loc_maps = _cross_maps(teacher.loc_heads, self.loc_adapters, batch.student.loc_intermediates)
        loc, conf, loc_dist = teacher.predictions(conf_maps, loc_maps)

        T = self.temperature
        cls_kl = kl_divergence(conf, batch.teacher_conf, T)
        if loc_dist is not None:
            reg = edge_distribution_kl(loc_dist, batch.teacher.loc_dist, T)
        else:
            boxes = decode(loc.float(), batch.priors)
            teacher_boxes = decode(batch.teacher_loc.detach().float(), batch.priors)
            reg = 1 - paired_giou(boxes, teacher_boxes)
        return {
            "cls": self.cls_weight * T * T * cls_kl.where(batch.sampled, 0.0).sum() / batch.num_pos,
            "reg": self.reg_weight * reg.where(batch.positive, 0.0).sum() / batch.num_pos,
        }


def _cross_maps(
    teacher_heads: nn.ModuleList, adapters: nn.ModuleList, intermediates: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Per level: the teacher head's last conv applied to the adapted student intermediate."""
    return [
        head.predictor(adapter(mid)) for head, adapter, mid in zip(teacher_heads, adapters, intermediates, strict=True)
    ]
