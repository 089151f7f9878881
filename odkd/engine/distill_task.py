"""The distillation task: a frozen teacher and a student seeing the same augmented batch.

Outputs are paired prior for prior. Identical prior layouts pair directly; a teacher of another
layout (the 8732-prior VGG16-SSD300 for the 3000-prior student) is re-mapped with
``prior_mapping="iou"``: each student prior takes the teacher prior of highest IoU, whose logits are
used as they are and whose decoded box is re-encoded against the student prior.
"""

from __future__ import annotations

import torch
from torch import nn

from odkd.boxes import decode, encode
from odkd.checkpoint import load_model
from odkd.config import Config
from odkd.losses import ObjectDistillationLoss
from odkd.matching import map_priors, match
from odkd.models import SSD

__all__ = ["DistillationTask", "build_distillation_task", "load_teacher"]


def load_teacher(path: str, source: str = "odkd") -> SSD:
    """A frozen teacher in eval mode from an odkd model/training file or a published checkpoint."""
    if source == "odkd":
        teacher = load_model(path)
    else:
        from odkd.convert import import_checkpoint

        teacher = import_checkpoint(torch.load(path, map_location="cpu", weights_only=True), source)
    teacher.eval().requires_grad_(False)
    return teacher


class DistillationTask(nn.Module):
    """``forward(images uint8, boxes, labels)`` -> the terms of :class:`ObjectDistillationLoss`.

    ``model`` is the student (evaluated and exported); ``teacher`` stays frozen in eval mode; the
    loss (with its hint adapters) is trained with the student and saved in training checkpoints only.
    """

    def __init__(
        self,
        student: SSD,
        teacher: SSD,
        criterion: ObjectDistillationLoss,
        iou_threshold: float = 0.5,
        prior_mapping: str = "none",
    ) -> None:
        super().__init__()
        if student.num_classes != teacher.num_classes:
            raise ValueError(f"the teacher has {teacher.num_classes} classes, the student {student.num_classes}")
        same_layout = student.priors.shape == teacher.priors.shape and torch.allclose(student.priors, teacher.priors)
        if not same_layout and prior_mapping != "iou":
            raise ValueError(
                f"the teacher ({teacher.arch}, {teacher.priors.shape[0]} priors) and the student ({student.arch}, "
                f"{student.priors.shape[0]} priors) have different prior layouts, so their outputs cannot be paired. "
                "Either distil from a teacher with the student's layout (vgg16_lite300 for the lite300 students), "
                "or set distill.prior_mapping=iou to re-map each student prior to the teacher prior of highest IoU."
            )
        self.model = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.criterion = criterion
        self.iou_threshold = iou_threshold
        index = None if same_layout else map_priors(student.priors, teacher.priors)
        self.register_buffer("teacher_index", index, persistent=False)

    def train(self, mode: bool = True) -> DistillationTask:
        super().train(mode)
        self.teacher.eval()  # frozen BN statistics, whatever the task's mode
        return self

    def teacher_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Teacher loc and conf on the student's priors, and its conf-head maps (no gradient)."""
        with torch.no_grad():
            out = self.teacher(self.teacher.preprocessing.normalize(images))
            loc, conf = out.loc, out.conf
            if self.teacher_index is not None:
                index = self.teacher_index
                boxes = decode(loc[:, index].float(), self.teacher.priors[index])
                loc, conf = encode(boxes, self.model.priors), conf[:, index]
        return loc, conf, out.conf_maps

    def forward(self, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(self.model.preprocessing.normalize(images))
        teacher_loc, teacher_conf, teacher_maps = self.teacher_outputs(images)
        loc_targets, conf_targets = match(boxes, labels, self.model.priors, self.iou_threshold)
        return self.criterion(
            out.loc, out.conf, out.conf_maps, teacher_loc, teacher_conf, teacher_maps, loc_targets, conf_targets
        )


def build_distillation_task(cfg: Config, student: SSD, teacher: SSD | None = None) -> DistillationTask:
    """The task of ``cfg.distill`` for ``student``; the teacher is loaded from ``cfg.distill.teacher``."""
    d = cfg.distill
    if teacher is None:
        if not d.teacher:
            raise ValueError("no teacher: pass --teacher CKPT or set distill.teacher")
        teacher = load_teacher(d.teacher, d.teacher_source)
    criterion = ObjectDistillationLoss(
        [head.predictor.out_channels for head in student.conf_heads],
        [head.predictor.out_channels for head in teacher.conf_heads],
        cfg.loss.neg_pos_ratio,
        d.temperature,
        d.w_background,
        d.w_object,
        d.mu,
        d.mu_end,
        d.mu_ramp_iters,
        d.nu,
        d.margin,
        d.lam,
        d.gamma,
    )
    return DistillationTask(student, teacher, criterion, cfg.loss.iou_threshold, d.prior_mapping)
