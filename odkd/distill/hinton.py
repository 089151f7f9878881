"""Hinton et al.'s knowledge distillation on the class logits (docs/DESIGN.md §5).

``kd = alpha * T^2 * (1/N) * sum_p KL(P_t || P_s)``, ``P = softmax(logits / T)``, over the priors of the
hard classification loss (positives + hard-mined negatives: SSD's answer to the background imbalance),
N = positive priors; the detection ``conf`` term is scaled by ``1 - alpha``. T^2 keeps the soft
gradients at the scale of the hard ones.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from odkd.config import POSITIVE, PROBABILITY, Range
from odkd.distill.base import LOGITS, DistillBatch, Distiller, register_distiller
from odkd.losses.soft_targets import kl_divergence

__all__ = ["HintonKD"]


@register_distiller("hinton")
class HintonKD(Distiller):
    """Returns ``kd``; scales the detection ``conf`` by ``1 - alpha``."""

    needs = frozenset({LOGITS})
    weight_keys: ClassVar[dict[str, str]] = {"kd": "alpha"}
    ranges: ClassVar[dict[str, Range]] = {"temperature": POSITIVE, "alpha": PROBABILITY}

    def __init__(self, *, temperature: float = 2.0, alpha: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0 or temperature <= 0:
            raise ValueError(f"hinton: alpha must be in [0, 1] and temperature > 0, got {alpha}, {temperature}")
        self.temperature, self.alpha = temperature, alpha

    def detection_weights(self, iteration: int | torch.Tensor) -> dict[str, float | torch.Tensor]:
        return {"conf": 1.0 - self.alpha}

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        T = self.temperature
        kl = kl_divergence(batch.student.conf, batch.teacher_conf, T)
        return {"kd": self.alpha * T * T * kl.where(batch.sampled, 0.0).sum() / batch.num_pos}
