"""How raw head outputs become detections, as settings: the one home of their defaults (the eval config,
the Predictor, the ONNX export and runtime take theirs from here). Plain Python: a config imports it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["DEFAULT_VARIANCES", "PostprocessSettings"]

DEFAULT_VARIANCES = (0.1, 0.2)  # SSD's box coder: centre offsets / 0.1, log sizes / 0.2 (odkd.boxes)


@dataclass(frozen=True)
class PostprocessSettings:
    """How raw outputs become detections: the one home of these defaults (the eval config, the Predictor,
    the ONNX export and runtime take theirs from here)."""

    score_threshold: float = 0.01  # keep (prior, class) pairs whose probability is strictly above it
    # at most this many candidates per class and image enter NMS; of equal scores the lower prior index first
    # (here, in NMS and for the cap: what ONNX Runtime does in an export)
    top_k: int = 200
    nms_threshold: float = 0.45  # IoU above which a lower-scoring box of the same class and image is dropped
    max_detections: int = 200  # per image, the highest scores
    variances: tuple[float, float] = DEFAULT_VARIANCES  # the box coder's (what training encoded with)
    clip: bool = True  # clip boxes to the image before NMS

    def to_json(self) -> dict:
        """The settings as JSON values (what an exported file's metadata holds)."""
        return {**dataclasses.asdict(self), "variances": list(self.variances)}

    @classmethod
    def from_json(cls, values: dict) -> PostprocessSettings:
        """The inverse of :meth:`to_json`."""
        return cls(**{key: tuple(v) if isinstance(v, list) else v for key, v in values.items()})
