"""SSD's MultiBox loss: Smooth-L1 on positives, cross-entropy on positives + hard-mined negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiBoxLoss", "hard_negative_mask"]


def hard_negative_mask(background_loss: torch.Tensor, labels: torch.Tensor, neg_pos_ratio: float) -> torch.Tensor:
    """The negatives that hard-negative mining keeps.

    Per image, the ``neg_pos_ratio * num_pos`` background priors (at most all of them) with the
    highest ``background_loss`` (``(B, P)``, the CE of predicting background). ``labels`` ``(B, P)``,
    0 = background. Returns ``(B, P)`` bool. An image without positives gets no negatives.
    """
    positive = labels > 0
    num_pos = positive.sum(dim=1, keepdim=True)
    num_neg = (neg_pos_ratio * num_pos).long().clamp(max=labels.shape[1] - num_pos)
    loss = background_loss.detach().float().masked_fill(positive, -float("inf"))
    # Rank of each prior by decreasing loss: one sort, then scatter the positions back.
    order = loss.argsort(dim=1, descending=True)
    positions = torch.arange(loss.shape[1], device=loss.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return (rank < num_neg) & ~positive


class MultiBoxLoss(nn.Module):
    """``forward(loc, conf, loc_targets, labels) -> {"loc": ..., "conf": ...}``.

    - ``loc``: Smooth-L1 (beta 1) summed over the coordinates of positive priors.
    - ``conf``: cross-entropy summed over positives and the hard negatives of
      :func:`hard_negative_mask` (mined per image by background CE, ``neg_pos_ratio`` per positive).

    Both are divided by N = the number of positives in the whole batch (at least 1). The loss is
    computed in float32 whatever the input dtype, so it is safe under bf16/fp16 autocast.
    """

    def __init__(self, neg_pos_ratio: float = 3) -> None:
        super().__init__()
        if neg_pos_ratio < 0:
            raise ValueError(f"neg_pos_ratio must be >= 0, got {neg_pos_ratio}")
        self.neg_pos_ratio = neg_pos_ratio

    def forward(
        self, loc: torch.Tensor, conf: torch.Tensor, loc_targets: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``loc`` (B, P, 4), ``conf`` (B, P, C) raw logits, ``loc_targets`` (B, P, 4), ``labels`` (B, P)."""
        return self.compute(loc, conf, loc_targets, labels)[0]

    def compute(
        self, loc: torch.Tensor, conf: torch.Tensor, loc_targets: torch.Tensor, labels: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`forward`'s losses and the ``(B, P)`` bool mask of the priors the CE covers (positives +
        mined negatives), which distillers reuse instead of mining again."""
        batch, num_priors = labels.shape
        if loc.shape != (batch, num_priors, 4) or loc_targets.shape != loc.shape:
            raise ValueError(
                f"loc and loc_targets must be (B, P, 4) = {(batch, num_priors, 4)}, got "
                f"{tuple(loc.shape)} and {tuple(loc_targets.shape)}"
            )
        if conf.dim() != 3 or conf.shape[:2] != labels.shape:
            raise ValueError(f"conf must be (B, P, C) with (B, P) = {tuple(labels.shape)}, got {tuple(conf.shape)}")

        conf = conf.float()
        positive = labels > 0
        num_pos = positive.sum().clamp(min=1)

        log_z = torch.logsumexp(conf, dim=-1)
        cross_entropy = log_z - conf.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, P)
        sampled = positive | hard_negative_mask(log_z - conf[..., 0], labels, self.neg_pos_ratio)
        conf_loss = cross_entropy.where(sampled, 0.0).sum()

        smooth_l1 = F.smooth_l1_loss(loc.float(), loc_targets.float(), reduction="none").sum(dim=-1)
        loc_loss = smooth_l1.where(positive, 0.0).sum()
        # Masked sums instead of boolean indexing: no host sync, static shapes for CUDA graphs.
        return {"loc": loc_loss / num_pos, "conf": conf_loss / num_pos}, sampled
