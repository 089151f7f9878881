"""Learning-rate schedule: linear warm-up, then multistep decay or cosine annealing (per iteration)."""

from __future__ import annotations

import math

import torch

from odkd.config import OptimConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor"]


def lr_factor(iteration: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based).

    Warm-up: linear from ``warmup_factor`` at iteration 0 to 1 at ``warmup_iters``. Then ``multistep``:
    ``gamma ** (number of milestones <= iteration)``; or ``cosine``: ``0.5 * (1 + cos(pi * t))`` with
    ``t`` the fraction of ``max_iters`` done.
    """
    if cfg.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(iteration, cfg.max_iters) / cfg.max_iters))
    else:
        factor = cfg.gamma ** sum(iteration >= m for m in cfg.milestones)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """``cfg.name``: SGD with momentum and weight decay (the SSD recipes), or AdamW (decoupled weight
    decay, ``momentum`` as beta1), all weights updated at once: the fused kernel on CUDA (one launch; it
    also takes the AMP loss scale itself), the multi-tensor (foreach) kernels elsewhere. Both give the
    same update as the per-weight loop up to float rounding, and the same state_dict."""
    fused = all(p.is_cuda for p in params)
    kernels = {"foreach": not fused, "fused": fused}
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay, **kernels)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **kernels)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
