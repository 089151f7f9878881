"""From raw head outputs to detections: decode, softmax, threshold, top-k, NMS, cap."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torchvision.ops import batched_nms

from odkd.boxes import DEFAULT_VARIANCES, decode

__all__ = ["Detections", "postprocess"]


class Detections(NamedTuple):
    """One image's detections, sorted by decreasing score."""

    boxes: torch.Tensor  # (K, 4) x1,y1,x2,y2 relative to the image
    scores: torch.Tensor  # (K,) class probability
    labels: torch.Tensor  # (K,) int64 class index, 1..C-1


def postprocess(
    loc: torch.Tensor,
    conf: torch.Tensor,
    priors: torch.Tensor,
    *,
    score_threshold: float = 0.01,
    top_k: int = 200,
    nms_threshold: float = 0.45,
    max_detections: int = 200,
    variances: tuple[float, float] = DEFAULT_VARIANCES,
    clip: bool = True,
) -> list[Detections]:
    """Detections of a batch.

    Args:
        loc: ``(B, P, 4)`` box regressions; conf: ``(B, P, C)`` raw logits (class 0 = background);
            priors: ``(P, 4)`` cx,cy,w,h.
        score_threshold: keep (prior, class) pairs whose probability is strictly above it.
        top_k: at most this many candidates per class per image enter NMS.
        nms_threshold: IoU above which a lower-scoring box of the same class and image is dropped.
        max_detections: at most this many detections per image (the highest scores).
        clip: clip boxes to the image before NMS.

    Returns one :class:`Detections` per image. The whole batch is processed at once; the only
    per-image step is splitting the final result.
    """
    batch, num_priors, num_classes = conf.shape
    if num_classes < 2 or loc.shape != (batch, num_priors, 4) or priors.shape != (num_priors, 4):
        raise ValueError(
            f"expected loc (B, P, 4), conf (B, P, C >= 2) and priors (P, 4), got {tuple(loc.shape)}, "
            f"{tuple(conf.shape)} and {tuple(priors.shape)}"
        )
    boxes = decode(loc.float(), priors.to(loc.device), variances)  # (B, P, 4)
    if clip:
        boxes = boxes.clamp(0.0, 1.0)
    scores = conf.float().softmax(dim=-1)[..., 1:].transpose(1, 2)  # (B, C-1, P)

    # Per image and class, the top-k priors by score.
    k = min(top_k, num_priors)
    top_scores, top_prior = scores.topk(k, dim=2)  # (B, C-1, k)
    cand_boxes = boxes.gather(1, top_prior.reshape(batch, -1, 1).expand(-1, -1, 4)).reshape(-1, 4)
    cand_scores = top_scores.reshape(-1)
    class_ids = torch.arange(1, num_classes, device=conf.device)
    cand_labels = class_ids.repeat_interleave(k).repeat(batch)
    cand_images = torch.arange(batch, device=conf.device).repeat_interleave((num_classes - 1) * k)

    keep = cand_scores > score_threshold
    cand_boxes, cand_scores = cand_boxes[keep], cand_scores[keep]
    cand_labels, cand_images = cand_labels[keep], cand_images[keep]
    # One NMS call for the batch: the group id separates images and classes.
    kept = batched_nms(cand_boxes, cand_scores, cand_images * num_classes + cand_labels, nms_threshold)

    # kept is in decreasing score order; a stable sort by image keeps that order within each image.
    kept = kept[cand_images[kept].sort(stable=True).indices]
    images = cand_images[kept]
    counts = torch.bincount(images, minlength=batch)
    first_of_image = counts.cumsum(0) - counts
    rank_in_image = torch.arange(len(kept), device=kept.device) - first_of_image[images]
    kept = kept[rank_in_image < max_detections]

    sizes = counts.clamp(max=max_detections).tolist()
    per_image = (cand_boxes[kept].split(sizes), cand_scores[kept].split(sizes), cand_labels[kept].split(sizes))
    return [Detections(*parts) for parts in zip(*per_image, strict=True)]
