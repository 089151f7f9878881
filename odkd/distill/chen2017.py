"""Chen et al. 2017 object distillation for SSD (docs/DESIGN.md §4), as a :class:`Distiller`.

``L = mu * hard_cls + soft_cls + lam * loc + bound + hint`` with, N = positive priors in the batch:

- ``hard_cls`` and ``loc`` are the detection loss (CE over positives + hard-mined negatives, Smooth-L1
  over positives, / N); this method scales them by ``mu`` and ``lam`` (:meth:`detection_weights`);
- ``soft_cls = (1 - mu) * T^2 * (1/N) * sum_p -sum_c w_c * P_t^c * log P_s^c``, ``P = softmax(logits / T)``,
  ``w_background = 1.5``, ``w_object = 1``, over the same priors as the hard CE;
- ``bound = lam * nu * (1/N) * sum ||R_s - y||^2`` over the positives where
  ``||R_s - y||^2 + m > ||R_t - y||^2`` (per box: a box whose student already beats the teacher by the
  margin costs nothing);
- ``hint = gamma * sum_k sum (adapt_k(V_k) - Z_k)^2 / sum_k numel(Z_k)``: one mean over every element of
  every level (as the original ODKD code takes it over the concatenated head outputs; a sum of per-level
  means would weigh the 1x1 level as much as the 19x19 one). V/Z are the student's/teacher's conf-head
  output maps; ``adapt_k`` a learned 1x1 conv (it also maps channel counts). A teacher map of another
  size is resized to the student's (bilinear), as happens when a teacher of another prior layout is
  re-mapped.

``mu`` can follow a linear schedule from ``mu`` to ``mu_end`` over ``mu_ramp_iters`` training iterations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from odkd.config import NOT_NEGATIVE, POSITIVE, PROBABILITY, Range
from odkd.distill.base import (
    BOXES,
    CONF_MAPS,
    LOGITS,
    DistillBatch,
    Distiller,
    level_adapters,
    register_distiller,
    resize_to,
)
from odkd.losses.soft_targets import soft_cross_entropy
from odkd.models import SSD

__all__ = ["ObjectDistillationLoss"]


@register_distiller("chen2017")
class ObjectDistillationLoss(Distiller):
    """Returns ``soft_cls``, ``bound`` and ``hint``; scales the detection ``conf`` by mu and ``loc`` by lam.

    Args:
        student_channels / teacher_channels: per level, the channels of the conf-head output maps
            (priors per cell x classes) the hint adapters map between.
        temperature: T of the soft targets; the soft term is multiplied by T^2.
        w_background / w_object: class weights of the soft cross-entropy.
        mu / mu_end / mu_ramp_iters: weight of the hard loss (``1 - mu`` for the soft one), optionally
            ramped linearly from ``mu`` to ``mu_end`` over the first ``mu_ramp_iters`` iterations.
        nu, margin: weight and margin of the teacher-bounded regression term.
        lam, gamma: weights of the regression terms and of the hint.
    """

    needs = frozenset({LOGITS, BOXES, CONF_MAPS})
    weight_keys: ClassVar[dict[str, str]] = {"soft_cls": "mu", "bound": "nu", "hint": "gamma"}
    ranges: ClassVar[dict[str, Range]] = {
        "temperature": POSITIVE,
        **dict.fromkeys(("w_background", "w_object", "nu", "margin", "lam", "gamma", "mu_ramp_iters"), NOT_NEGATIVE),
        "mu": PROBABILITY,
        "mu_end": PROBABILITY,
    }

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        *,
        temperature: float = 1.0,
        w_background: float = 1.5,
        w_object: float = 1.0,
        mu: float = 0.8,
        mu_end: float | None = None,
        mu_ramp_iters: int = 0,
        nu: float = 0.5,
        margin: float = 0.0,
        lam: float = 1.0,
        gamma: float = 0.5,
    ) -> None:
        super().__init__()
        _, self.adapters = level_adapters(student_channels, teacher_channels, "the hint")
        if (mu_end is None) != (mu_ramp_iters <= 0):
            raise ValueError("a mu schedule needs both mu_end and mu_ramp_iters > 0")
        self.temperature, self.w_background, self.w_object = temperature, w_background, w_object
        self.mu_start, self.mu_end, self.mu_ramp_iters = mu, mu_end, mu_ramp_iters
        self.nu, self.margin, self.lam, self.gamma = nu, margin, lam, gamma

    @classmethod
    def from_models(cls, student: SSD, teacher: SSD, **settings) -> ObjectDistillationLoss:
        return cls(
            [head.predictor.out_channels for head in student.conf_heads],
            [head.predictor.out_channels for head in teacher.conf_heads],
            **settings,
        )

    def mu_at(self, iteration: int | torch.Tensor) -> float | torch.Tensor:
        """The hard-loss weight at ``iteration``: linear from ``mu`` to ``mu_end`` over the ramp. The
        iteration is the task's 0-dim counter tensor during training (compiled graphs stay valid)."""
        if self.mu_end is None:
            return self.mu_start
        t = (torch.as_tensor(iteration) / self.mu_ramp_iters).clamp(max=1.0)
        return self.mu_start + (self.mu_end - self.mu_start) * t

    def detection_weights(self, iteration: int | torch.Tensor) -> dict[str, float | torch.Tensor]:
        return {"conf": self.mu_at(iteration), "loc": self.lam}

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        weights = batch.student.conf.new_full((batch.student.conf.shape[-1],), self.w_object, dtype=torch.float32)
        weights[:1] = self.w_background  # a slice fill: `weights[0] = x` copies a host scalar and waits for the GPU
        T = self.temperature
        soft = soft_cross_entropy(batch.student.conf, batch.teacher_conf, T, weights)

        # Teacher-bounded regression, decided per positive box.
        loc_s, targets = batch.student.loc.float(), batch.loc_targets.float()
        student_err = (loc_s - targets).pow(2).sum(-1)
        teacher_err = (batch.teacher_loc.detach().float() - targets).pow(2).sum(-1)
        bounded = batch.positive & (student_err + self.margin > teacher_err)

        squared = [
            (adapter(v.float()) - resize_to(z.detach().float(), v.shape[-2:])).pow(2)
            for adapter, v, z in zip(self.adapters, batch.student.conf_maps, batch.teacher.conf_maps, strict=True)
        ]
        hint = sum(s.sum() for s in squared) / sum(s.numel() for s in squared)
        mu = self.mu_at(batch.iteration)
        return {
            "soft_cls": (1 - mu) * T * T * soft.where(batch.sampled, 0.0).sum() / batch.num_pos,
            "bound": self.lam * self.nu * student_err.where(bounded, 0.0).sum() / batch.num_pos,
            "hint": self.gamma * hint,
        }
