"""Pure box arithmetic: format conversions and the SSD box coder.

Boxes are relative to the image (``[0, 1]``). Two formats: ``xyxy`` = ``(x1, y1, x2, y2)`` and
``cxcywh`` = ``(cx, cy, w, h)``. All functions broadcast over leading dimensions.
"""

from __future__ import annotations

import math

import torch

from odkd.postprocess_settings import DEFAULT_VARIANCES

__all__ = ["cxcywh_to_xyxy", "decode", "encode", "paired_giou", "paired_iou", "xyxy_to_cxcywh"]


# Largest log-scale a decoded box may have relative to its prior (about 62x), so that wild
# predictions early in training give huge boxes instead of inf (same bound as torchvision).
_MAX_LOG_SCALE = math.log(1000.0 / 16)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` cx,cy,w,h -> ``(..., 4)`` x1,y1,x2,y2."""
    centre, size = boxes[..., :2], boxes[..., 2:]
    return torch.cat((centre - size / 2, centre + size / 2), dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` x1,y1,x2,y2 -> ``(..., 4)`` cx,cy,w,h."""
    low, high = boxes[..., :2], boxes[..., 2:]
    return torch.cat(((low + high) / 2, high - low), dim=-1)


def encode(
    boxes: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float] = DEFAULT_VARIANCES
) -> torch.Tensor:
    """Regression targets of ``boxes`` (``(..., P, 4)`` xyxy) against ``priors`` (``(P, 4)`` cxcywh).

    ``t_xy = (g_cxcy - p_cxcy) / (v0 * p_wh)``, ``t_wh = log(g_wh / p_wh) / v1``. Boxes must have
    positive width and height (the log is taken as is).
    """
    g = xyxy_to_cxcywh(boxes)
    t_xy = (g[..., :2] - priors[..., :2]) / (variances[0] * priors[..., 2:])
    t_wh = torch.log(g[..., 2:] / priors[..., 2:]) / variances[1]
    return torch.cat((t_xy, t_wh), dim=-1)


def decode(loc: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float] = DEFAULT_VARIANCES) -> torch.Tensor:
    """Inverse of :func:`encode`: ``loc`` ``(..., P, 4)`` + ``priors`` ``(P, 4)`` cxcywh -> xyxy boxes.

    The log-scale is clamped at ``log(1000/16)`` so no prediction decodes to an infinite box.
    """
    centre = priors[..., :2] + loc[..., :2] * variances[0] * priors[..., 2:]
    size = priors[..., 2:] * torch.exp((loc[..., 2:] * variances[1]).clamp(max=_MAX_LOG_SCALE))
    return cxcywh_to_xyxy(torch.cat((centre, size), dim=-1))


def _paired_areas(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intersection, union and hull (smallest enclosing box) areas of each box with its partner, ``(...)``.
    Element-wise arithmetic only: no masked indexing and no ``prod`` (whose backward checks for zeros on
    the host), so on a GPU neither pass waits for the device."""

    def area(size: torch.Tensor) -> torch.Tensor:
        return size[..., 0] * size[..., 1]

    low1, high1, low2, high2 = boxes1[..., :2], boxes1[..., 2:], boxes2[..., :2], boxes2[..., 2:]
    inter = area((torch.min(high1, high2) - torch.max(low1, low2)).clamp(min=0))
    union = area(high1 - low1) + area(high2 - low2) - inter
    hull = area(torch.max(high1, high2) - torch.min(low1, low2))
    return inter, union, hull


def paired_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of each box with its partner: ``(..., 4)`` xyxy twice -> ``(...)`` in [0, 1]."""
    inter, union, _ = _paired_areas(boxes1, boxes2)
    return inter / (union + eps)


def paired_giou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Generalised IoU of each box with its partner: ``(..., 4)`` xyxy twice -> ``(...)`` in [-1, 1].

    ``GIoU = IoU - (hull - union) / hull`` with ``hull`` the area of the smallest box enclosing both.
    """
    inter, union, hull = _paired_areas(boxes1, boxes2)
    return inter / (union + eps) - (hull - union) / (hull + eps)
