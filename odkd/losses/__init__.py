"""Detection losses and the soft-target losses the distillers share."""

from odkd.losses.multibox import MultiBoxLoss, hard_negative_mask
from odkd.losses.soft_targets import kl_divergence, soft_cross_entropy

__all__ = ["MultiBoxLoss", "hard_negative_mask", "kl_divergence", "soft_cross_entropy"]
