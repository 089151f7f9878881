"""Boxes as distributions over their edges: the DFL box head of GFL, which LD distils.

Against its prior, a box is four edge distances from the prior centre in units of the prior's size:
``l = (p_cx - x1) / p_w``, ``t = (p_cy - y1) / p_h``, ``r = (x2 - p_cx) / p_w``, ``b = (y2 - p_cy) / p_h``.
A distribution head predicts, per edge, logits over ``n + 1`` bins ``0, d, 2d, ..., n d = max_edge``
(``d = max_edge / n``); the edge is the expectation of their softmax (GFL's "integral").

Edges in prior units map to SSD's encoded offsets without the prior itself
(``t_x = (r - l) / (2 v0)``, ``t_w = log(l + r) / v1``), so a distribution head still outputs the
usual ``loc`` and everything downstream (post-processing, export, prior re-mapping) is unchanged.
"""

from __future__ import annotations

import torch

from odkd.postprocess_settings import DEFAULT_VARIANCES

__all__ = [
    "DEFAULT_MAX_EDGE",
    "distribution_focal_loss",
    "edge_targets",
    "edges_to_loc",
    "expected_edges",
    "loc_to_edges",
]

# Positives overlap their prior by IoU >= 0.5, so their edges lie well inside 2 prior sizes.
DEFAULT_MAX_EDGE = 2.0
_MIN_WIDTH = 1e-6  # l + r (or t + b) floor before the log: a collapsed box stays finite


def loc_to_edges(loc: torch.Tensor, variances: tuple[float, float] = DEFAULT_VARIANCES) -> torch.Tensor:
    """``(..., 4)`` encoded offsets ``(t_x, t_y, t_w, t_h)`` -> edges ``(l, t, r, b)`` in prior units."""
    offset = loc[..., :2] * variances[0]  # (g_cxcy - p_cxcy) / p_wh
    half = torch.exp(loc[..., 2:] * variances[1]) / 2  # g_wh / (2 p_wh)
    return torch.cat((half - offset, half + offset), dim=-1)


def edges_to_loc(edges: torch.Tensor, variances: tuple[float, float] = DEFAULT_VARIANCES) -> torch.Tensor:
    """Inverse of :func:`loc_to_edges`: ``(..., 4)`` edges ``(l, t, r, b)`` -> encoded offsets."""
    low, high = edges[..., :2], edges[..., 2:]
    t_xy = (high - low) / (2 * variances[0])
    t_wh = torch.log((low + high).clamp(min=_MIN_WIDTH)) / variances[1]
    return torch.cat((t_xy, t_wh), dim=-1)


def expected_edges(logits: torch.Tensor, max_edge: float = DEFAULT_MAX_EDGE) -> torch.Tensor:
    """``(..., 4, n + 1)`` bin logits -> ``(..., 4)`` expected edges ``sum_i softmax_i * i * max_edge / n``."""
    bins = logits.shape[-1] - 1
    values = torch.linspace(0.0, max_edge, bins + 1, device=logits.device, dtype=torch.float32)
    # Multiply-and-sum, not a matmul: autocast would run a matmul in bf16, and the edges' differences
    # (the box centre) lose most of their precision to that rounding.
    return (logits.float().softmax(dim=-1) * values).sum(dim=-1)


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GFL's DFL: ``-((i + 1 - y) log S_i + (y - i) log S_{i+1})`` with ``i = floor(y)``.

    ``logits`` ``(..., n + 1)``; ``target`` ``(...)`` in bin units, clamped to ``[0, n]``. Returns ``(...)``:
    the cross-entropy towards the two bins around the target, weighted by closeness.
    """
    bins = logits.shape[-1] - 1
    target = target.float().clamp(0, bins)
    left = target.floor().long().clamp(max=bins - 1)
    right_weight = target - left
    log_p = logits.float().log_softmax(dim=-1)
    left_log_p = log_p.gather(-1, left.unsqueeze(-1)).squeeze(-1)
    right_log_p = log_p.gather(-1, (left + 1).unsqueeze(-1)).squeeze(-1)
    return -((1 - right_weight) * left_log_p + right_weight * right_log_p)


def edge_targets(loc_targets: torch.Tensor, bins: int, max_edge: float = DEFAULT_MAX_EDGE) -> torch.Tensor:
    """Encoded regression targets ``(..., 4)`` -> DFL targets in bin units, clamped to ``[0, bins]``."""
    return (loc_to_edges(loc_targets.float()) * (bins / max_edge)).clamp(0, bins)
