"""FGD, Focal and Global Distillation (Yang et al., CVPR 2022) on the source feature maps (docs/DESIGN.md §5).

Per distilled level, with the student map adapted to the teacher's channels (``f``, a 1x1 conv) and the
teacher map resized to the student's size, F_t / F_s of shape (C, H, W) per image:

- masks: ``M = 1`` on the cells a GT box covers (rows ``floor(y1 H) .. ceil(y2 H) - 1``, columns alike);
  scale ``S = 1 / (H_r W_r)`` inside box r (cells of the box; the smallest box wins where boxes overlap),
  ``1 / N_bg`` outside (N_bg = background cells of the image);
- teacher attention: spatial ``A^S = H W softmax(mean_c |F| / T)`` over the H W cells, channel
  ``A^C = C softmax(mean_hw |F| / T)`` over the C channels;
- ``focal = sum_{c,h,w} (alpha M + beta (1 - M)) S A^S_t A^C_t (F_t - f(F_s))^2``;
- ``attention = gamma (|A^S_t - A^S_s|_1 + |A^C_t - A^C_s|_1)`` (student attention from ``f(F_s)``);
- ``global = lam sum (GC_t(F_t) - GC_s(f(F_s)))^2``, GC a GCNet context block (one for each side, both
  learned with the adapters; their last conv starts at zero, so ``global`` starts as a plain MSE).

Every sum is divided by the batch size and summed over the levels. The official RetinaNet settings:
T = 0.5, alpha = 1e-3, beta = 5e-4, gamma = 5e-4, lam = 5e-6. FGD's reference code counts a box's cells
up to ``ceil(x2 W)`` inclusive; here a box covers exactly the cells it overlaps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from odkd.config import NOT_NEGATIVE, POSITIVE, Range
from odkd.distill.base import FEATURES, DistillBatch, Distiller, level_adapters, register_distiller, resize_to
from odkd.models import SSD

__all__ = ["FGD", "GlobalContext", "feature_attention", "focal_masks"]


def focal_masks(
    gt_boxes: torch.Tensor, gt_valid: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground mask ``M`` and scale ``S`` on an ``height x width`` grid, both ``(B, H, W)`` float.

    ``gt_boxes`` ``(B, N, 4)`` x1,y1,x2,y2 in [0, 1], ``gt_valid`` ``(B, N)`` bool.
    """
    batch, device = gt_boxes.shape[0], gt_boxes.device
    fg_scale = torch.zeros(batch, height, width, device=device)
    if gt_boxes.shape[1]:
        rows = torch.arange(height, device=device, dtype=torch.float32)
        cols = torch.arange(width, device=device, dtype=torch.float32)
        boxes = gt_boxes.float()
        # Cell i is covered when (i, i + 1) meets the box's (y1 H, y2 H).
        in_rows = (rows + 1 > boxes[..., 1:2] * height) & (rows < boxes[..., 3:4] * height)  # (B, N, H)
        in_rows &= gt_valid.unsqueeze(-1)
        in_cols = (cols + 1 > boxes[..., 0:1] * width) & (cols < boxes[..., 2:3] * width)  # (B, N, W)
        cells = in_rows.sum(-1) * in_cols.sum(-1)  # (B, N): H_r * W_r
        covered = in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)  # (B, N, H, W)
        fg_scale = (covered / cells.clamp(min=1)[..., None, None]).amax(dim=1)
    foreground = (fg_scale > 0).float()
    bg_scale = (1 - foreground) / (1 - foreground).sum(dim=(1, 2), keepdim=True).clamp(min=1)
    return foreground, fg_scale + bg_scale


def feature_attention(features: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial ``(B, H, W)`` and channel ``(B, C)`` attention of ``(B, C, H, W)`` maps (see above)."""
    batch, channels, height, width = features.shape
    magnitude = features.abs()
    spatial = (magnitude.mean(dim=1).view(batch, -1) / temperature).softmax(dim=1) * (height * width)
    channel = (magnitude.mean(dim=(2, 3)) / temperature).softmax(dim=1) * channels
    return spatial.view(batch, height, width), channel


class GlobalContext(nn.Module):
    """GCNet's context block as FGD uses it: ``x + transform(sum_hw softmax(mask(x)) * x)``."""

    def __init__(self, channels: int, ratio: float = 0.5) -> None:
        super().__init__()
        hidden = max(1, int(channels * ratio))
        self.mask = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )
        nn.init.kaiming_normal_(self.mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.mask.bias)
        nn.init.zeros_(self.transform[-1].weight)  # starts as the identity map
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        weights = self.mask(x).view(batch, 1, -1).softmax(dim=-1)  # (B, 1, HW)
        context = (x.view(batch, channels, -1) * weights).sum(dim=-1).view(batch, channels, 1, 1)
        return x + self.transform(context)


@register_distiller("fgd")
class FGD(Distiller):
    """Returns ``focal``, ``attention`` and ``global``.

    Args:
        student_channels / teacher_channels: per level, the channels of the source feature maps.
        levels: the level indices distilled (default all).
    """

    needs = frozenset({FEATURES})
    weight_keys: ClassVar[dict[str, str]] = {"focal": "alpha", "attention": "gamma", "global": "lam"}
    ranges: ClassVar[dict[str, Range]] = {
        "temperature": POSITIVE,
        **dict.fromkeys(("alpha", "beta", "gamma", "lam", "levels"), NOT_NEGATIVE),
    }

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        *,
        temperature: float = 0.5,
        alpha: float = 1e-3,
        beta: float = 5e-4,
        gamma: float = 5e-4,
        lam: float = 5e-6,
        levels: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.levels, self.adapters = level_adapters(student_channels, teacher_channels, "fgd", levels)
        teacher = [teacher_channels[k] for k in self.levels]
        self.student_context = nn.ModuleList(GlobalContext(t) for t in teacher)
        self.teacher_context = nn.ModuleList(GlobalContext(t) for t in teacher)
        self.temperature = temperature
        self.alpha, self.beta, self.gamma, self.lam = alpha, beta, gamma, lam

    @classmethod
    def from_models(cls, student: SSD, teacher: SSD, **settings) -> FGD:
        return cls(student.feature_channels, teacher.feature_channels, **settings)

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        focal = attention = global_ = 0.0
        for i, k in enumerate(self.levels):
            student = self.adapters[i](batch.student.features[k]).float()
            teacher = resize_to(batch.teacher.features[k].detach().float(), student.shape[-2:])
            foreground, scale = focal_masks(batch.gt_boxes, batch.gt_valid, *student.shape[-2:])
            spatial_t, channel_t = feature_attention(teacher, self.temperature)
            spatial_s, channel_s = feature_attention(student, self.temperature)

            weight = (self.alpha * foreground + self.beta * (1 - foreground)) * scale * spatial_t  # (B, H, W)
            weight = weight.unsqueeze(1) * channel_t[..., None, None]  # (B, C, H, W)
            focal = focal + (weight * (teacher - student).pow(2)).sum()
            attention = attention + (spatial_t - spatial_s).abs().sum() + (channel_t - channel_s).abs().sum()
            context_gap = self.teacher_context[i](teacher).float() - self.student_context[i](student).float()
            global_ = global_ + context_gap.pow(2).sum()
        batch_size = batch.labels.shape[0]
        return {
            "focal": focal / batch_size,
            "attention": self.gamma * attention / batch_size,
            "global": self.lam * global_ / batch_size,
        }
