"""Detection and distillation losses."""

from odkd.losses.multibox import MultiBoxLoss, hard_negative_mask

__all__ = ["MultiBoxLoss", "hard_negative_mask"]
