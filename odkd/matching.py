"""Assigning ground-truth boxes to priors (SSD matching), batched over images.

Rule (docs/DESIGN.md §2, as in the SSD paper and ssd.pytorch):

1. IoU of every GT with every prior; each prior takes the GT of highest IoU.
2. Each GT also claims its own best prior, which becomes positive whatever its IoU; when several
   GTs claim the same prior, the later GT (higher index) wins.
3. Priors whose IoU is below ``iou_threshold`` (and that were not claimed) are background (label 0).

Everything is one batch of tensor operations on the device of the inputs: no Python loop over
images or boxes. GT boxes of zero or negative width/height, or with non-finite coordinates, are
ignored here (treated like padding) so they can never produce inf/NaN targets; the dataset rejects
such boxes with a clear message before they get this far.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_iou

from odkd.boxes import cxcywh_to_xyxy, decode, encode, xyxy_to_cxcywh
from odkd.postprocess_settings import DEFAULT_VARIANCES

__all__ = [
    "box_iou",
    "cxcywh_to_xyxy",
    "decode",
    "encode",
    "map_priors",
    "match",
    "pad_targets",
    "valid_gt_mask",
    "xyxy_to_cxcywh",
]


def pad_targets(
    gt_boxes: Sequence[torch.Tensor], gt_labels: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-image targets into ``(B, max_n, 4)`` boxes and ``(B, max_n)`` labels padded with -1."""
    if len(gt_boxes) != len(gt_labels):
        raise ValueError(f"gt_boxes has {len(gt_boxes)} images but gt_labels has {len(gt_labels)}")
    for i, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels, strict=True)):
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
            raise ValueError(
                f"image {i}: gt boxes must be (n, 4) and labels (n,), got {tuple(boxes.shape)} and "
                f"{tuple(labels.shape)}"
            )
    boxes = pad_sequence(list(gt_boxes), batch_first=True, padding_value=0.0)
    labels = pad_sequence([lab.long() for lab in gt_labels], batch_first=True, padding_value=-1)
    return boxes, labels


def valid_gt_mask(gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` bool: a real object (label >= 1) with finite coordinates and positive width/height."""
    finite = torch.isfinite(gt_boxes).all(dim=-1)
    positive_size = (gt_boxes[..., 2] > gt_boxes[..., 0]) & (gt_boxes[..., 3] > gt_boxes[..., 1])
    return (gt_labels > 0) & finite & positive_size


def match(
    gt_boxes: torch.Tensor | Sequence[torch.Tensor],
    gt_labels: torch.Tensor | Sequence[torch.Tensor],
    priors: torch.Tensor,
    iou_threshold: float = 0.5,
    variances: tuple[float, float] = DEFAULT_VARIANCES,
    gt_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression targets and class labels of every prior of every image.

    Args:
        gt_boxes: a list of ``(n_i, 4)`` tensors, or padded ``(B, max_n, 4)``; x1,y1,x2,y2 in [0, 1].
        gt_labels: a list of ``(n_i,)`` int64 tensors, or padded ``(B, max_n)``; classes 1..C-1.
            In the padded form, entries with label < 1 (use -1) are padding.
        priors: ``(P, 4)`` cx,cy,w,h in [0, 1].
        iou_threshold: priors with IoU below it (and not claimed by a GT) are background.
        variances: the box coder's variances.
        gt_mask: optional ``(B, max_n)`` bool, False for padding (padded form only).

    Returns:
        ``loc_targets`` ``(B, P, 4)`` float (zero for background priors) and ``labels`` ``(B, P)``
        int64 (0 = background).
    """
    if isinstance(gt_boxes, torch.Tensor) != isinstance(gt_labels, torch.Tensor):
        raise TypeError("gt_boxes and gt_labels must both be lists or both be padded tensors")
    if not isinstance(gt_boxes, torch.Tensor):
        if gt_mask is not None:
            raise ValueError("gt_mask goes with the padded form; lists need no mask")
        gt_boxes, gt_labels = pad_targets(gt_boxes, gt_labels)
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4 or gt_labels.shape != gt_boxes.shape[:2]:
        raise ValueError(
            f"padded targets must be (B, max_n, 4) boxes and (B, max_n) labels, got "
            f"{tuple(gt_boxes.shape)} and {tuple(gt_labels.shape)}"
        )
    if priors.dim() != 2 or priors.shape[-1] != 4:
        raise ValueError(f"priors must be (P, 4), got {tuple(priors.shape)}")

    device = gt_boxes.device
    priors = priors.to(device)
    gt_boxes = gt_boxes.to(priors.dtype)
    gt_labels = gt_labels.long()
    batch, num_gt = gt_labels.shape
    num_priors = priors.shape[0]
    if num_gt == 0:
        return priors.new_zeros(batch, num_priors, 4), gt_labels.new_zeros(batch, num_priors)

    valid = valid_gt_mask(gt_boxes, gt_labels)
    if gt_mask is not None:
        valid &= gt_mask.to(device=device, dtype=torch.bool)

    priors_xyxy = cxcywh_to_xyxy(priors)
    iou = box_iou(gt_boxes.reshape(-1, 4), priors_xyxy).view(batch, num_gt, num_priors)
    iou = iou.masked_fill(~valid.unsqueeze(-1), -1.0)  # ignored GTs never win a prior

    best_gt_iou, best_gt = iou.max(dim=1)  # (B, P): each prior's best GT
    best_prior = iou.argmax(dim=2)  # (B, N): each GT's best prior

    # Each valid GT claims its best prior; scatter with "amax" over GT indices makes the later GT win.
    gt_index = torch.arange(num_gt, device=device).expand(batch, num_gt).masked_fill(~valid, -1)
    claimed_by = torch.full((batch, num_priors), -1, dtype=torch.long, device=device)
    claimed_by.scatter_reduce_(1, best_prior, gt_index, reduce="amax")
    claimed = claimed_by >= 0
    best_gt = torch.where(claimed, claimed_by, best_gt)
    best_gt_iou = best_gt_iou.masked_fill(claimed, 2.0)

    positive = best_gt_iou >= iou_threshold
    labels = torch.where(positive, gt_labels.gather(1, best_gt), 0)
    matched = gt_boxes.gather(1, best_gt.unsqueeze(-1).expand(batch, num_priors, 4))
    # Background priors are encoded against themselves: the target is exactly 0 and no log(0) occurs.
    matched = torch.where(positive.unsqueeze(-1), matched, priors_xyxy)
    loc_targets = torch.where(positive.unsqueeze(-1), encode(matched, priors, variances), 0.0)
    return loc_targets, labels


def map_priors(priors: torch.Tensor, other_priors: torch.Tensor) -> torch.Tensor:
    """For each of ``priors`` (P, 4) the index of the prior of ``other_priors`` (Q, 4) with the highest IoU
    (both cx,cy,w,h): ``(P,)`` int64. Pairs the outputs of detectors with different prior layouts."""
    return box_iou(cxcywh_to_xyxy(priors), cxcywh_to_xyxy(other_priors.to(priors))).argmax(dim=1)
