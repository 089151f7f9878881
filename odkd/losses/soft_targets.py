"""Losses between a student's and a teacher's logits over the last dimension, at a temperature.

Both are computed in float32 and never propagate into the teacher (its logits are detached).
"""

from __future__ import annotations

import torch

__all__ = ["kl_divergence", "soft_cross_entropy"]


def soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``-sum_c w_c P_t^c log P_s^c`` with ``P = softmax(logits / T)``: ``(..., C)`` -> ``(...)``.

    ``class_weights`` ``(C,)`` (all 1 when None), e.g. Chen et al.'s 1.5 for the background.
    """
    log_p_s = (student_logits.float() / temperature).log_softmax(dim=-1)
    p_t = (teacher_logits.detach().float() / temperature).softmax(dim=-1)
    terms = p_t * log_p_s
    if class_weights is not None:
        terms = terms * class_weights.to(terms)
    return -terms.sum(dim=-1)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(P_t || P_s) = sum_c P_t^c (log P_t^c - log P_s^c)`` at temperature ``T``: ``(..., C)`` -> ``(...)``.

    Zero where the student matches the teacher; its gradient is the soft cross-entropy's.
    """
    log_p_s = (student_logits.float() / temperature).log_softmax(dim=-1)
    log_p_t = (teacher_logits.detach().float() / temperature).log_softmax(dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
