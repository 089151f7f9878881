"""Step-0 calibration: every distillation term's value and gradient norm beside the detection loss's.

Distillation weights are published for other detectors, losses, batch sizes and feature scales; on
another pair of models a term can start many times stronger than the detection loss (Chen et al.'s hint
started ~10x it on the synthetic demo and diverged) or far weaker. At the first step of a distillation
run the task measures, on the first batch, the norm of the gradient of the detection loss and of each
term with respect to the student's weights, logs them as a table, warns about any term whose gradient
is more than :data:`WARN_RATIO` times the detection loss's (naming the setting that weighs it), and with
``distill.auto_balance`` scales each method's terms so that their summed gradient norm is
``distill.balance_fraction`` times the detection loss's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["WARN_RATIO", "Calibration", "gradient_norm"]

WARN_RATIO = 10.0


def gradient_norm(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of ``d loss / d params`` over all of ``params`` (0-dim float32; 0 where the loss does not
    reach them). The graph is kept for the next call."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    norms = [g.float().norm() for g in grads if g is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else loss.new_zeros((), dtype=torch.float32)


@dataclass
class Calibration:
    """What step 0 measured; terms as they are trained (after the auto-balance scales: with auto_balance the
    method's summed ratio is ``balance_fraction`` by construction; :meth:`unscaled_ratio` is the one its
    configured weights give)."""

    detection: tuple[float, float]  # (value, gradient norm) of the detection loss (sum of its terms)
    terms: dict[str, tuple[float, float]]  # "<method>/<term>" -> (value, gradient norm)
    scales: dict[str, float]  # method -> the factor on its terms (1 without auto_balance)
    settings: dict[str, str]  # "<method>/<term>" -> the config key that weighs it

    def ratio(self, term: str) -> float:
        """The term's gradient norm over the detection loss's (inf when the latter is 0)."""
        detection = self.detection[1]
        norm = self.terms[term][1]
        return norm / detection if detection > 0 else (0.0 if norm == 0 else float("inf"))

    def unscaled_ratio(self, term: str) -> float:
        """The term's ratio before its method's auto-balance scale: what its configured weights alone give."""
        return self.ratio(term) / self.scales[term.split("/")[0]]

    def table(self) -> str:
        """The log table: one row per term, the detection loss first; the ratio as trained and, beside the
        scale, as the configured weights alone would give it."""
        rows = [("detection loss", *self.detection, "1.00", "", "")]
        for term, (value, norm) in self.terms.items():
            scale = self.scales[term.split("/")[0]]
            unscaled = f"{self.unscaled_ratio(term):.2f}" if scale != 1 else ""
            rows.append((term, value, norm, f"{self.ratio(term):.2f}", f"x{scale:.4g}", unscaled))
        header = f"{'term':<24} {'value':>12} {'grad norm':>12} {'/ detection':>12} {'scale':>8} {'unscaled':>9}"
        lines = [
            f"{name:<24} {value:>12.4g} {norm:>12.4g} {ratio:>12} {scale:>8} {unscaled:>9}"
            for name, value, norm, ratio, scale, unscaled in rows
        ]
        return "\n".join([header, *lines])

    def warnings(self) -> list[str]:
        """One line per term whose gradient norm is more than WARN_RATIO x the detection loss's."""
        return [
            f"{term}: its gradient norm at step 0 is {self.ratio(term):.1f}x the detection loss's; it may swamp "
            f"the detection loss (or diverge). Lower its weight, {self.settings[term]}, or set "
            "distill.auto_balance=true"
            for term in self.terms
            if self.ratio(term) > WARN_RATIO
        ]

    def to_json(self) -> dict:
        return {
            "detection": {"value": self.detection[0], "grad_norm": self.detection[1]},
            "terms": {
                term: {
                    "value": v,
                    "grad_norm": n,
                    "ratio": r if math.isfinite(r := self.ratio(term)) else None,
                    "ratio_unscaled": u if math.isfinite(u := self.unscaled_ratio(term)) else None,
                }
                for term, (v, n) in self.terms.items()
            },
            "scales": dict(self.scales),
        }
