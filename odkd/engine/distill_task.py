"""The distillation task: a frozen teacher and a student seeing the same augmented batch.

One step: student forward, teacher forward (no gradient), matching and the detection loss once, then
every configured distiller (:mod:`odkd.distill`) reads the same :class:`~odkd.distill.DistillBatch`.
Loss terms are named ``<term>`` for the detection loss (each scaled by the distillers'
``detection_weights``) and ``<method>/<term>`` for the distillers.

Outputs are paired prior for prior. Identical prior layouts pair directly; a teacher of another
layout (the 8732-prior VGG16-SSD300 for the 3000-prior student) is re-mapped for the output-level
methods with ``prior_mapping="iou"``: each student prior takes the teacher prior of highest IoU, whose
logits are used as they are and whose decoded box is re-encoded against the student prior.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from odkd.boxes import decode, encode
from odkd.checkpoint import load_model
from odkd.config import Config
from odkd.distill import (
    BOX_DISTRIBUTIONS,
    BOXES,
    HEAD_INTERMEDIATES,
    LOGITS,
    DistillBatch,
    Distiller,
    build_distillers,
)
from odkd.distill.calibration import Calibration, gradient_norm
from odkd.engine.task import DetectionTask
from odkd.matching import map_priors, valid_gt_mask
from odkd.models import SSD, SSDOutput

__all__ = ["DistillationTask", "build_distillation_task", "load_teacher"]


def load_teacher(path: str, source: str = "odkd") -> SSD:
    """A frozen teacher in eval mode from an odkd model/training file or a published checkpoint."""
    return load_model(path, source).eval().requires_grad_(False)


class DistillationTask(DetectionTask):
    """``forward(images uint8, boxes, labels)`` -> the detection terms and every distiller's terms.

    ``model`` is the student (evaluated and exported); ``teacher`` stays frozen in eval mode; the
    distillers (with their adaptation layers) train with the student and are saved in training
    checkpoints only. The task counts training iterations (saved with it) for schedules such as mu's.
    """

    def __init__(
        self,
        student: SSD,
        teacher: SSD,
        distillers: Mapping[str, Distiller],
        *,
        neg_pos_ratio: float = 3.0,
        iou_threshold: float = 0.5,
        prior_mapping: str = "none",
        dfl_weight: float = 0.25,
        balance_fraction: float | None = None,
    ) -> None:
        super().__init__(student, neg_pos_ratio=neg_pos_ratio, iou_threshold=iou_threshold, dfl_weight=dfl_weight)
        if student.num_classes != teacher.num_classes:
            raise ValueError(f"the teacher has {teacher.num_classes} classes, the student {student.num_classes}")
        if student.class_names and teacher.class_names and list(student.class_names) != list(teacher.class_names):
            raise ValueError(  # every method compares class k of one with class k of the other
                f"the teacher's classes {list(teacher.class_names)} are not the student's "
                f"{list(student.class_names)} in the same order"
            )
        self.teacher = teacher.eval().requires_grad_(False)
        self.distillers = nn.ModuleDict(distillers)
        same_layout = student.priors.shape == teacher.priors.shape and torch.allclose(student.priors, teacher.priors)
        index = None
        if not same_layout:
            self._check_pairing(student, teacher, prior_mapping)
            index = map_priors(student.priors, teacher.priors)
        self.register_buffer("teacher_index", index, persistent=False)
        # Training forwards so far, on the device: a Python int attribute would be baked into a
        # torch.compile graph and recompile it at every step. Saved as extra state (see below).
        self.register_buffer("iterations", torch.zeros((), dtype=torch.int64), persistent=False)
        # Per method, the factor on its terms: 1 unless step-0 calibration balances them (balance_fraction).
        # On the device for the same reason; saved as extra state, so a resumed run keeps them.
        self.register_buffer("term_scales", torch.ones(len(self.distillers)), persistent=False)
        self.balance_fraction = balance_fraction

    def _check_pairing(self, student: SSD, teacher: SSD, prior_mapping: str) -> None:
        """Teacher and student of different prior layouts: which methods can still be paired, and how."""
        layouts = (
            f"the teacher ({teacher.arch}, {teacher.priors.shape[0]} priors) and the student ({student.arch}, "
            f"{student.priors.shape[0]} priors) have different prior layouts"
        )
        for name, distiller in self.distillers.items():
            if distiller.needs & {BOX_DISTRIBUTIONS, HEAD_INTERMEDIATES}:
                raise ValueError(
                    f"{layouts}, and {name} needs the same priors on both (it compares predictions relative to "
                    "each prior): distil from a teacher with the student's layout (vgg16_lite300 for the lite300 "
                    "students)"
                )
            if distiller.needs & {LOGITS, BOXES} and prior_mapping != "iou":
                raise ValueError(
                    f"{layouts}, so their outputs cannot be paired for {name}. Either distil from a teacher with "
                    "the student's layout (vgg16_lite300 for the lite300 students), or set "
                    "distill.prior_mapping=iou to re-map each student prior to the teacher prior of highest IoU."
                )

    @property
    def iteration(self) -> int:
        """Training forwards so far (reads the device counter: for checkpoints and tests, not per step)."""
        return int(self.iterations)

    def get_extra_state(self) -> dict:
        return {"iteration": self.iteration, "term_scales": self.term_scales.tolist()}

    def set_extra_state(self, state: dict) -> None:
        self.iterations.fill_(state["iteration"])
        self.term_scales.copy_(torch.tensor(state.get("term_scales", [1.0] * len(self.distillers))))

    def train(self, mode: bool = True) -> DistillationTask:
        super().train(mode)
        self.teacher.eval()  # frozen BN statistics, whatever the task's mode
        return self

    def paired_teacher_outputs(self, loc: torch.Tensor, conf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's ``loc`` (B, Q, 4) and ``conf`` (B, Q, C) on the student's P priors."""
        if self.teacher_index is None:
            return loc, conf
        index = self.teacher_index
        boxes = decode(loc[:, index].float(), self.teacher.priors[index])
        return encode(boxes, self.model.priors), conf[:, index]

    def predict(self, images: torch.Tensor) -> tuple[SSDOutput, SSDOutput]:
        """The student's output (with gradient) and the teacher's (without). A teacher of another input
        size (a 300 px teacher of a 320 px student) sees the batch resized to its own."""
        with torch.no_grad():
            teacher_images = self.teacher.normalize(images)
            size = self.teacher.image_size
            if teacher_images.shape[-2:] != (size, size):
                teacher_images = F.interpolate(teacher_images, size=(size, size), mode="bilinear", antialias=True)
            teacher_out = self.teacher(teacher_images)
        return super().predict(images), teacher_out

    def losses(
        self, outputs: tuple[SSDOutput, SSDOutput], boxes: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        out, teacher_out = outputs
        with torch.no_grad():
            teacher_loc, teacher_conf = self.paired_teacher_outputs(teacher_out.loc, teacher_out.conf)
        losses, targets = self.detection_losses(out, boxes, labels)
        batch = DistillBatch(
            student=out,
            teacher=teacher_out,
            teacher_model=self.teacher,
            teacher_loc=teacher_loc,
            teacher_conf=teacher_conf,
            loc_targets=targets.loc,
            labels=targets.labels,
            sampled=targets.sampled,
            gt_boxes=boxes,
            gt_valid=valid_gt_mask(boxes, labels),
            priors=self.model.priors,
            iteration=self.iterations.clone(),  # the value of this step, whatever happens to the counter
            iou_threshold=self.iou_threshold,
        )
        for (name, distiller), scale in zip(self.distillers.items(), self.term_scales, strict=True):
            for term, factor in distiller.detection_weights(batch.iteration).items():
                if term in losses:
                    losses[term] = losses[term] * factor
            losses.update({f"{name}/{term}": value * scale for term, value in distiller(batch).items()})
        if self.training:
            self.iterations.add_(1)
        return losses

    def calibrate(
        self,
        images: torch.Tensor,
        boxes: torch.Tensor,
        labels: torch.Tensor,
        average: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Calibration:
        """Step-0 calibration on one batch (:mod:`odkd.distill.calibration`): each term's value and gradient
        norm w.r.t. the student's weights beside the detection loss's; with ``balance_fraction`` set, first
        the scales that bring each method's gradient norm to that fraction of the detection loss's.
        ``average`` averages the measurements over processes (every process then sets the same scales).
        The task's buffers (BN statistics, the iteration counter) are restored: the run goes on as if
        this had not run, but for the scales."""
        saved = {name: buffer.clone() for name, buffer in self.named_buffers()}
        try:
            losses = self(images, boxes, labels)
            params = [p for p in self.model.parameters() if p.requires_grad]
            terms = {key: value for key, value in losses.items() if "/" in key}
            detection = sum(value for key, value in losses.items() if "/" not in key)
            methods = [sum(v for k, v in terms.items() if k.split("/")[0] == name) for name in self.distillers]
            losses_to_measure = [detection, *terms.values(), *methods]
            stats = torch.stack(
                [torch.stack([loss.detach().float(), gradient_norm(loss, params)]) for loss in losses_to_measure]
            )
            if average is not None:
                stats = average(stats)
        finally:
            for name, buffer in self.named_buffers():
                buffer.copy_(saved[name])
        stats = stats.tolist()
        detection_stats, term_stats, method_stats = stats[0], stats[1 : 1 + len(terms)], stats[1 + len(terms) :]
        factors = dict.fromkeys(self.distillers, 1.0)  # what this calibration multiplies each method's terms by
        if self.balance_fraction is not None:
            for (name, factor), (_, norm) in zip(factors.items(), method_stats, strict=True):
                if norm > 0:  # a method without gradient at step 0 stays as it is
                    factors[name] = factor * self.balance_fraction * detection_stats[1] / norm
            self.term_scales.mul_(torch.tensor(list(factors.values())).to(self.term_scales))
        method_of = {key: key.split("/")[0] for key in terms}
        return Calibration(
            detection=(detection_stats[0], detection_stats[1]),
            terms={
                key: (value * factors[method_of[key]], norm * factors[method_of[key]])
                for key, (value, norm) in zip(terms, term_stats, strict=True)
            },
            scales=dict(zip(self.distillers, self.term_scales.tolist(), strict=True)),
            settings={
                key: f"distill.{method}.{self.distillers[method].weight_keys.get(key.split('/', 1)[1], key)}"
                for key, method in method_of.items()
            },
        )


def build_distillation_task(cfg: Config, student: SSD, teacher: SSD | None = None) -> DistillationTask:
    """The task of ``cfg.distill`` for ``student``; the teacher is loaded from ``cfg.distill.teacher``."""
    d = cfg.distill
    if d is None:
        raise ValueError("the config has no distill section (distill.methods, distill.teacher): nothing to distil")
    if teacher is None:
        if not d.teacher:
            raise ValueError("no teacher: pass --teacher CKPT or set distill.teacher")
        teacher = load_teacher(d.teacher, d.teacher_source)
    return DistillationTask(
        student,
        teacher,
        build_distillers(d, student, teacher),
        neg_pos_ratio=cfg.loss.neg_pos_ratio,
        iou_threshold=cfg.loss.iou_threshold,
        prior_mapping=d.prior_mapping,
        dfl_weight=cfg.loss.dfl_weight,
        balance_fraction=d.balance_fraction if d.auto_balance else None,
    )
