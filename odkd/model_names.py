"""The names of odkd's detector architectures, the ones :func:`odkd.models.build_model` builds (its
``MODELS``), and of its prior layouts (:data:`odkd.priors.LAYOUTS`). Plain Python, so that a config's
``model.name`` and a script's options are checked without loading torch."""

from __future__ import annotations

__all__ = ["MODEL_NAMES", "PRIOR_LAYOUT_NAMES"]

MODEL_NAMES = ("vgg16_ssd300", "vgg16_lite300", "mobilenetv2_ssdlite300", "mobilenetv2_ssdlite320")
PRIOR_LAYOUT_NAMES = ("ssd300", "lite300", "lite320")
