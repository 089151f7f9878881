"""From raw head outputs to detections: decode, softmax, threshold, top-k, NMS, cap (their settings:
:class:`odkd.postprocess_settings.PostprocessSettings`)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torchvision.ops import batched_nms

from odkd.boxes import decode
from odkd.postprocess_settings import PostprocessSettings

__all__ = [
    "Detections",
    "FlatDetections",
    "nms_rows",
    "postprocess",
    "postprocess_flat",
    "select_detections",
    "split_by_image",
]


class Detections(NamedTuple):
    """One image's detections, sorted by decreasing score."""

    boxes: torch.Tensor  # (K, 4) x1,y1,x2,y2 relative to the image
    scores: torch.Tensor  # (K,) class probability
    labels: torch.Tensor  # (K,) int64 class index, 1..C-1


class FlatDetections(NamedTuple):
    """A batch's detections in one set of tensors (what an exported graph returns), ordered by image,
    then by decreasing score within an image."""

    boxes: torch.Tensor  # (K, 4) x1,y1,x2,y2 relative to the image
    scores: torch.Tensor  # (K,) class probability
    labels: torch.Tensor  # (K,) int64 class index, 1..C-1
    image_index: torch.Tensor  # (K,) int64 position of the image in the batch


def postprocess_flat(
    loc: torch.Tensor,
    conf: torch.Tensor,
    priors: torch.Tensor,
    settings: PostprocessSettings = PostprocessSettings(),
) -> FlatDetections:
    """The detections of a batch as :class:`FlatDetections` (arguments as :func:`postprocess`): decode and
    softmax, then :func:`select_detections`.

    Tensor operations only (no host round trip), so the same code runs inside an exported ONNX graph.
    """
    batch, num_priors, num_classes = conf.shape
    if num_classes < 2 or loc.shape != (batch, num_priors, 4) or priors.shape != (num_priors, 4):
        raise ValueError(
            f"expected loc (B, P, 4), conf (B, P, C >= 2) and priors (P, 4), got {tuple(loc.shape)}, "
            f"{tuple(conf.shape)} and {tuple(priors.shape)}"
        )
    boxes = decode(loc.float(), priors.to(loc.device), settings.variances)  # (B, P, 4)
    if settings.clip:
        boxes = boxes.clamp(0.0, 1.0)
    return select_detections(boxes, conf.float().softmax(dim=-1), settings)


def select_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    settings: PostprocessSettings = PostprocessSettings(),
) -> FlatDetections:
    """Score threshold, per-class top-k, NMS and the per-image cap of ``settings`` (its box coding is not
    used) on decoded ``boxes`` ``(B, P, 4)`` x1,y1,x2,y2 and class probabilities ``scores`` ``(B, P, C)``
    (column 0 = background, ignored): what an exported model without post-processing returns."""
    batch, num_priors, num_classes = scores.shape
    scores = scores[..., 1:].transpose(1, 2)  # (B, C-1, P)

    # Per image and class, the top-k priors by score: one row of candidates per (image, class). Equal
    # scores (common in untrained models) go by prior index, lower first: a stable sort, where topk leaves
    # their order, and so which of them make the cut, unspecified; ONNX's TopK breaks ties this way.
    k = min(settings.top_k, num_priors)
    top_scores, top_prior = (t[..., :k] for t in scores.sort(dim=2, descending=True, stable=True))  # (B, C-1, k)
    cand_boxes = boxes.gather(1, top_prior.reshape(batch, -1, 1).expand(-1, -1, 4)).reshape(-1, 4)
    cand_scores = top_scores.reshape(-1)
    class_ids = torch.arange(1, num_classes, device=scores.device)
    cand_labels = class_ids.repeat_interleave(k).repeat(batch)
    cand_images = torch.arange(batch, device=scores.device).repeat_interleave((num_classes - 1) * k)
    kept = nms_rows(
        cand_boxes.reshape(-1, k, 4), top_scores.reshape(-1, k), settings.nms_threshold, settings.score_threshold
    )

    # By decreasing score, equal scores in candidate order (class, then rank: which ones the cap keeps),
    # then by (image, position): grouped by image, by decreasing score within each. Sorting the candidate
    # indices first makes the order independent of the order NMS returns them in; the last keys are unique.
    kept = kept.sort().values
    kept = kept[cand_scores[kept].sort(descending=True, stable=True).indices]
    position = torch.arange(len(kept), device=kept.device)
    kept = kept[(cand_images[kept] * len(kept) + position).sort().indices]
    images = cand_images[kept]
    counts = images.new_zeros(batch).scatter_add(0, images, torch.ones_like(images))  # bincount, exportable
    first_of_image = counts.cumsum(0) - counts
    rank_in_image = position - first_of_image[images]
    kept = kept[rank_in_image < settings.max_detections]
    return FlatDetections(cand_boxes[kept], cand_scores[kept], cand_labels[kept], cand_images[kept])


def split_by_image(flat: FlatDetections, batch: int) -> list[Detections]:
    """A batch's :class:`FlatDetections` -> one :class:`Detections` per image (``batch`` of them, empty
    ones included)."""
    sizes = torch.bincount(flat.image_index, minlength=batch).tolist()
    per_image = (flat.boxes.split(sizes), flat.scores.split(sizes), flat.labels.split(sizes))
    return [Detections(*parts) for parts in zip(*per_image, strict=True)]


@torch.library.custom_op("odkd::nms_rows", mutates_args=())
def nms_rows(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, score_threshold: float) -> torch.Tensor:
    """NMS within each row: ``boxes`` ``(R, N, 4)`` x1,y1,x2,y2, ``scores`` ``(R, N)`` -> ``(K,)`` int64
    flat indices ``r * N + n`` of the boxes kept, in no particular order. A box is a candidate when its
    score is above ``score_threshold`` and is dropped when its IoU with a kept box of its row that comes
    earlier is above ``iou_threshold``; boxes come by decreasing score, equal scores by increasing ``n``
    (ONNX Runtime's order).

    One op so that an export can say what it is: ONNX's NonMaxSuppression with each row as one of its
    batches, exact per row (``odkd.export``). Eager: one torchvision ``batched_nms`` call in float64,
    whose coordinate-offset form shifts row r by about 2 r (~2,700 for 64 images x 21 classes), where
    float32 would round coordinates to 2.4e-4 and change which small boxes survive: an image's detections
    would then depend on its place in the batch. The one difference left: ONNX Runtime computes an IoU in
    float32, so an IoU within float32 rounding (~1e-7) of the threshold can be decided the other way.
    """
    n = scores.shape[1]
    flat_scores = scores.reshape(-1)
    candidates = (flat_scores > score_threshold).nonzero().squeeze(1)
    # batched_nms does not document its order for equal scores: it gets each candidate's place in the
    # order above (a stable sort of the increasing indices) as a score of its own.
    candidates = candidates[flat_scores[candidates].sort(descending=True, stable=True).indices]
    priority = -torch.arange(len(candidates), device=scores.device, dtype=torch.float64)
    groups = torch.div(candidates, n, rounding_mode="floor")
    return candidates[batched_nms(boxes.reshape(-1, 4)[candidates].double(), priority, groups, iou_threshold)]


@nms_rows.register_fake
def _(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, score_threshold: float) -> torch.Tensor:
    return scores.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)


def postprocess(
    loc: torch.Tensor,
    conf: torch.Tensor,
    priors: torch.Tensor,
    settings: PostprocessSettings = PostprocessSettings(),
    on_cpu: bool = False,
) -> list[Detections]:
    """Detections of a batch, one :class:`Detections` per image.

    Args:
        loc: ``(B, P, 4)`` box regressions; conf: ``(B, P, C)`` raw logits (class 0 = background);
            priors: ``(P, 4)`` cx,cy,w,h.
        settings: thresholds, top-k, cap and box coding (:class:`PostprocessSettings`).
        on_cpu: return the detections on the CPU (three copies per batch rather than three per image).

    The whole batch is processed at once (:func:`postprocess_flat`); the only per-image step is
    splitting the final result.
    """
    flat = postprocess_flat(loc, conf, priors, settings)
    if on_cpu:
        flat = FlatDetections(*(t.cpu() for t in flat))
    return split_by_image(flat, conf.shape[0])
