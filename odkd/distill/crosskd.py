"""CrossKD (Wang et al., 2023) for SSD: distil cross-head predictions (docs/DESIGN.md §5).

The student's head intermediates (:class:`odkd.models.PredictionHead`: the depthwise conv + BN of an SSDLite
head, before its activation) go through the frozen teacher's activation and last head conv; those
cross-head predictions are distilled against the teacher's own predictions on the same priors. The
detection loss stays on the student's own head, so the student's predictors (its heads' last convs)
learn from the ground truth only; the distillation gradient reaches the rest of the student's heads and
its backbone through the teacher's frozen predictors. How a student map enters the teacher's head
(``align``):

- ``"standardize"`` (default, the official form): per level, the student's pre-activation map is
  standardised per channel over (batch, height, width) and given the teacher's pre-activation
  per-channel mean and standard deviation, then the teacher's activation; no parameters. Where the
  channel counts differ a learned 1x1 conv maps the student's channels to the teacher's first (then
  standardised, so its scale does not matter).
- ``"adapter"``: a learned 1x1 conv on the student's post-activation map (the identity at the start
  where the channel counts agree), no standardisation.

With N positives, ``w_p`` the teacher's highest object-class probability at prior p (no gradient):

- ``cls`` = ``cls_weight * T^2 * (1/N) * sum KL(P_t || P_cross)`` over the priors of the hard
  classification loss (positives + hard-mined negatives, SSD's region for classification);
- ``reg``, every prior weighted by ``w_p``: plain box heads ``reg_weight * sum_p w_p (1 - GIoU(cross box,
  teacher box)) / N``; distribution (DFL) heads ``reg_weight * sum_p w_p sum_edges T^2 KL(edge bins) /
  sum_p w_p`` (the KL summed over the bins and the four edges).

How this maps to the official code (jbwang1997/CrossKD, ``CrossKDGFL`` and ``CrossKDRetinaNet``):
``align_scale`` is the standardisation above; the regression terms are ``KnowledgeDistillationKLDivLoss``
with ``class_reduction='sum'``, T 1, weight 4 and average factor 4 (per anchor the KL summed over bins
and edges), divided by the sum of the weights (GFL), and ``GIoULoss`` weight 1 divided by the number of
positives (RetinaNet); both weight every anchor with a label weight by the sigmoid of the teacher's
highest class logit, SSD's softmax analogue being the highest object-class probability. The official
classification term is a quality focal loss on sigmoid scores over all anchors; SSD's softmax scores
take the KL on the priors of the hard loss instead.

Teacher and student must share the prior layout: the cross-head predictions are laid out on the
student's maps and compared with the teacher's prior for prior.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import nn

from odkd.boxes import decode, paired_giou
from odkd.config import NOT_NEGATIVE, POSITIVE, Range
from odkd.distill.base import (
    BOXES,
    HEAD_INTERMEDIATES,
    LOGITS,
    DistillBatch,
    Distiller,
    adapter_1x1,
    register_distiller,
)
from odkd.losses.soft_targets import kl_divergence
from odkd.models import SSD

__all__ = ["ALIGNMENTS", "CrossKD", "match_channel_statistics"]

ALIGNMENTS = ("standardize", "adapter")


def match_channel_statistics(x: torch.Tensor, reference: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x`` ``(B, C, H, W)`` standardised per channel over (B, H, W), then given ``reference``'s per-channel
    mean and standard deviation (both the unbiased estimates, as the official code; no gradient into
    ``reference``)."""
    dims = (0, 2, 3)
    correction = 1 if x.numel() > x.shape[1] else 0  # one value per channel has no unbiased spread
    x, reference = x.float(), reference.detach().float()
    std, mean = torch.std_mean(x, dim=dims, correction=correction, keepdim=True)
    ref_std, ref_mean = torch.std_mean(reference, dim=dims, correction=correction, keepdim=True)
    return (x - mean) / (std + eps) * ref_std + ref_mean


@register_distiller("crosskd")
class CrossKD(Distiller):
    """Returns ``cls`` and ``reg``.

    Args:
        conf_channels / loc_channels: per level, (student, teacher) channels of the conf / loc heads'
            intermediates; where they differ a learned 1x1 conv maps the first to the second.
        align: how a student map enters the teacher's head, ``"standardize"`` or ``"adapter"`` (above).
    """

    needs = frozenset({HEAD_INTERMEDIATES, LOGITS, BOXES})
    weight_keys: ClassVar[dict[str, str]] = {"cls": "cls_weight", "reg": "reg_weight"}
    ranges: ClassVar[dict[str, Range]] = {
        "temperature": POSITIVE,
        "cls_weight": NOT_NEGATIVE,
        "reg_weight": NOT_NEGATIVE,
    }

    def __init__(
        self,
        conf_channels: Sequence[tuple[int, int]],
        loc_channels: Sequence[tuple[int, int]],
        *,
        temperature: float = 1.0,
        cls_weight: float = 1.0,
        reg_weight: float = 1.0,
        align: Literal["standardize", "adapter"] = "standardize",
    ) -> None:
        super().__init__()
        if align not in ALIGNMENTS:
            raise ValueError(f"crosskd align must be one of {list(ALIGNMENTS)}, got {align!r}")
        self.align = align
        self.conf_adapters = nn.ModuleList(self._adapter(s, t) for s, t in conf_channels)
        self.loc_adapters = nn.ModuleList(self._adapter(s, t) for s, t in loc_channels)
        self.temperature, self.cls_weight, self.reg_weight = temperature, cls_weight, reg_weight

    def _adapter(self, student_channels: int, teacher_channels: int) -> nn.Module:
        if self.align == "standardize" and student_channels == teacher_channels:
            return nn.Identity()
        return adapter_1x1(student_channels, teacher_channels)

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

    def _cross_maps(
        self,
        teacher_heads: nn.ModuleList,
        adapters: nn.ModuleList,
        student_mids: Sequence[torch.Tensor],
        teacher_mids: Sequence[torch.Tensor],
    ) -> list[torch.Tensor]:
        """Per level: the teacher head's output on the student's intermediate (aligned as ``align`` says)."""
        maps = []
        for head, adapter, mid, teacher_mid in zip(teacher_heads, adapters, student_mids, teacher_mids, strict=True):
            if self.align == "standardize":
                x = head.activation(match_channel_statistics(adapter(mid), teacher_mid))
            else:  # both models' heads use the same activation on a level (ReLU6 or none)
                x = adapter(head.activation(mid))
            maps.append(head.predictor(x))
        return maps

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        teacher, student_out, teacher_out = batch.teacher_model, batch.student, batch.teacher
        conf_maps = self._cross_maps(
            teacher.conf_heads, self.conf_adapters, student_out.conf_intermediates, teacher_out.conf_intermediates
        )
        loc_maps = self._cross_maps(
            teacher.loc_heads, self.loc_adapters, student_out.loc_intermediates, teacher_out.loc_intermediates
        )
        loc, conf, loc_dist = teacher.predictions(conf_maps, loc_maps)

        T = self.temperature
        cls_kl = kl_divergence(conf, batch.teacher_conf, T)
        weights = batch.teacher_conf.detach().float().softmax(dim=-1)[..., 1:].amax(dim=-1)  # (B, P)
        if loc_dist is not None:
            edges_kl = T * T * kl_divergence(loc_dist, teacher_out.loc_dist, T).sum(dim=-1)  # (B, P)
            reg = (weights * edges_kl).sum() / weights.sum().clamp(min=1e-6)
        else:
            boxes = decode(loc.float(), batch.priors)
            teacher_boxes = decode(batch.teacher_loc.detach().float(), batch.priors)
            reg = (weights * (1 - paired_giou(boxes, teacher_boxes))).sum() / batch.num_pos
        return {
            "cls": self.cls_weight * T * T * cls_kl.where(batch.sampled, 0.0).sum() / batch.num_pos,
            "reg": self.reg_weight * reg,
        }
