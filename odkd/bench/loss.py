"""Speed of target matching and MultiBoxLoss on random targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from odkd.bench.timing import time_ms
from odkd.losses import MultiBoxLoss
from odkd.matching import match

__all__ = ["LossTiming", "time_loss"]


@dataclass(frozen=True)
class LossTiming:
    """One device's numbers: the targets' positives per image and the losses (a sanity check of the inputs),
    and median milliseconds of matching, the loss forward, forward + backward, and all three together."""

    device: torch.device
    positives_per_image: float
    loc_loss: float
    conf_loss: float
    match_ms: float
    forward_ms: float
    backward_ms: float
    total_ms: float


def time_loss(
    device: torch.device,
    priors: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    iters: int,
    warmup: int,
) -> LossTiming:
    """Time matching ``(B, G, 4)`` xyxy ``boxes`` and ``(B, G)`` ``labels`` to ``(P, 4)`` cxcywh ``priors``
    and MultiBoxLoss on random ``(B, P, 4)`` / ``(B, P, num_classes)`` predictions, on ``device``."""
    priors, boxes, labels = priors.to(device), boxes.to(device), labels.to(device)
    batch, num_priors = boxes.shape[0], priors.shape[0]
    loc = torch.randn(batch, num_priors, 4, device=device, requires_grad=True)
    conf = torch.randn(batch, num_priors, num_classes, device=device, requires_grad=True)
    criterion = MultiBoxLoss(neg_pos_ratio=3)
    loc_t, conf_t = match(boxes, labels, priors)
    losses = criterion(loc, conf, loc_t, conf_t)

    def loss_backward(loc_t: torch.Tensor, conf_t: torch.Tensor) -> None:
        out = criterion(loc, conf, loc_t, conf_t)
        (out["loc"] + out["conf"]).backward()

    return LossTiming(
        device=device,
        positives_per_image=(conf_t > 0).sum(1).float().mean().item(),
        loc_loss=losses["loc"].item(),
        conf_loss=losses["conf"].item(),
        match_ms=time_ms(lambda: match(boxes, labels, priors), device, iters, warmup),
        forward_ms=time_ms(lambda: criterion(loc, conf, loc_t, conf_t), device, iters, warmup),
        backward_ms=time_ms(lambda: loss_backward(loc_t, conf_t), device, iters, warmup),
        total_ms=time_ms(lambda: loss_backward(*match(boxes, labels, priors)), device, iters, warmup),
    )
