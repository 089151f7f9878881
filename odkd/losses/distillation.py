"""Chen et al. 2017 object distillation for SSD (DESIGN.md §4).

``L = hard_cls + soft_cls + loc + bound + hint`` with, N = positive priors in the batch:

- ``hard_cls = mu * (1/N) * sum CE(s, y)`` over positives + hard-mined negatives (as MultiBoxLoss);
- ``soft_cls = (1 - mu) * T^2 * (1/N) * sum_p -sum_c w_c * P_t^c * log P_s^c``, ``P = softmax(logits / T)``,
  ``w_background = 1.5``, ``w_object = 1``, over the same priors;
- ``loc = lambda * (1/N) * sum SmoothL1(R_s, y)`` over positives;
- ``bound = lambda * nu * (1/N) * sum ||R_s - y||^2`` over the positives where
  ``||R_s - y||^2 + m > ||R_t - y||^2`` (per box: a box whose student already beats the teacher by the
  margin costs nothing);
- ``hint = gamma * sum_levels mean((adapt_k(V_k) - Z_k)^2)``: V/Z are the student's/teacher's conf-head
  output maps; ``adapt_k`` a learned 1x1 conv (it also maps channel counts). A teacher map of another
  size is resized to the student's (bilinear), as happens when a teacher of another prior layout is
  re-mapped.

``mu`` can follow a linear schedule from ``mu`` to ``mu_end`` over ``mu_ramp_iters`` training
iterations (counted by the loss itself, saved with the task).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from odkd.losses.multibox import hard_negative_mask

__all__ = ["ObjectDistillationLoss"]


class ObjectDistillationLoss(nn.Module):
    """Returns every term separately: ``hard_cls``, ``soft_cls``, ``loc``, ``bound``, ``hint`` (sum = loss).

    Args:
        student_channels / teacher_channels: per level, the channels of the conf-head output maps
            (priors per cell x classes) the hint adapters map between.
        neg_pos_ratio: hard-negative mining ratio (negatives ranked by the student's background CE).
        temperature: T of the soft targets; the soft term is multiplied by T^2.
        w_background / w_object: class weights of the soft cross-entropy.
        mu / mu_end / mu_ramp_iters: weight of the hard loss (``1 - mu`` for the soft one), optionally
            ramped linearly from ``mu`` to ``mu_end`` over the first ``mu_ramp_iters`` iterations.
        nu, margin: weight and margin of the teacher-bounded regression term.
        lam, gamma: weights of the regression terms and of the hint.
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        neg_pos_ratio: float = 3.0,
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
        if len(student_channels) != len(teacher_channels):
            raise ValueError(
                f"the hint pairs levels one to one: the student has {len(student_channels)} levels, "
                f"the teacher {len(teacher_channels)}"
            )
        self.adapters = nn.ModuleList(
            nn.Conv2d(s, t, 1) for s, t in zip(student_channels, teacher_channels, strict=True)
        )
        for adapter in self.adapters:
            if adapter.in_channels == adapter.out_channels:
                # Same layout and classes: start as the identity, so the hint starts as plain logit
                # matching instead of matching a random projection of the student's maps.
                nn.init.eye_(adapter.weight.view(adapter.out_channels, adapter.in_channels))
                nn.init.zeros_(adapter.bias)
        self.neg_pos_ratio, self.temperature = neg_pos_ratio, temperature
        self.w_background, self.w_object = w_background, w_object
        if (mu_end is None) != (mu_ramp_iters <= 0):
            raise ValueError("a mu schedule needs both mu_end and mu_ramp_iters > 0")
        self.mu_start, self.mu_end, self.mu_ramp_iters = mu, mu_end, mu_ramp_iters
        self.nu, self.margin, self.lam, self.gamma = nu, margin, lam, gamma
        self.iteration = 0  # training forwards so far; saved with the state dict (extra state)

    def get_extra_state(self) -> dict:
        return {"iteration": self.iteration}

    def set_extra_state(self, state: dict) -> None:
        self.iteration = state["iteration"]

    def mu_at(self, iteration: int) -> float:
        """The hard-loss weight at ``iteration``: linear from ``mu`` to ``mu_end`` over the ramp."""
        if self.mu_end is None:
            return self.mu_start
        t = min(iteration / self.mu_ramp_iters, 1.0)
        return self.mu_start + (self.mu_end - self.mu_start) * t

    def forward(
        self,
        student_loc: torch.Tensor,
        student_conf: torch.Tensor,
        student_maps: Sequence[torch.Tensor],
        teacher_loc: torch.Tensor,
        teacher_conf: torch.Tensor,
        teacher_maps: Sequence[torch.Tensor],
        loc_targets: torch.Tensor,
        labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Student and teacher ``loc`` (B, P, 4) and ``conf`` (B, P, C) on the same priors (a teacher of
        another layout already re-mapped), conf-head maps per level, targets from matching."""
        positive = labels > 0
        num_pos = positive.sum().clamp(min=1)
        # The teacher's outputs are targets: never a gradient through them.
        conf_s, conf_t = student_conf.float(), teacher_conf.detach().float()

        # Classification: hard CE and class-weighted soft CE over positives + mined negatives.
        log_z = torch.logsumexp(conf_s, dim=-1)
        cross_entropy = log_z - conf_s.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        chosen = positive | hard_negative_mask(log_z - conf_s[..., 0], labels, self.neg_pos_ratio)
        T = self.temperature
        weights = torch.full((conf_s.shape[-1],), self.w_object, device=conf_s.device)
        weights[0] = self.w_background
        soft = -(weights * conf_t.div(T).softmax(-1) * conf_s.div(T).log_softmax(-1)).sum(-1)
        mu = self.mu_at(self.iteration)
        if self.training:
            self.iteration += 1

        # Regression: Smooth-L1 to the GT plus the teacher-bounded L2 term, per positive box.
        loc_s, loc_t, targets = student_loc.float(), teacher_loc.detach().float(), loc_targets.float()
        smooth_l1 = F.smooth_l1_loss(loc_s, targets, reduction="none").sum(-1)
        student_err = (loc_s - targets).pow(2).sum(-1)
        teacher_err = (loc_t - targets).pow(2).sum(-1)
        bounded = positive & (student_err + self.margin > teacher_err)

        hint = sum(
            F.mse_loss(adapter(v.float()), _resize(z.detach().float(), v.shape[-2:]))
            for adapter, v, z in zip(self.adapters, student_maps, teacher_maps, strict=True)
        )
        return {
            "hard_cls": mu * cross_entropy.where(chosen, 0.0).sum() / num_pos,
            "soft_cls": (1 - mu) * T * T * soft.where(chosen, 0.0).sum() / num_pos,
            "loc": self.lam * smooth_l1.where(positive, 0.0).sum() / num_pos,
            "bound": self.lam * self.nu * student_err.where(bounded, 0.0).sum() / num_pos,
            "hint": self.gamma * hint,
        }


def _resize(teacher_map: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """The teacher's map at the student's spatial size (unchanged when they agree)."""
    if teacher_map.shape[-2:] == size:
        return teacher_map
    return F.interpolate(teacher_map, size=tuple(size), mode="bilinear", align_corners=False)
