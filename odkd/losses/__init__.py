"""Detection and distillation losses."""

from odkd.losses.distillation import ObjectDistillationLoss
from odkd.losses.multibox import MultiBoxLoss, hard_negative_mask

__all__ = ["MultiBoxLoss", "ObjectDistillationLoss", "hard_negative_mask"]
