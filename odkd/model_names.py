"""The names of odkd's detector architectures, the ones :func:`odkd.models.build_model` builds (its
``MODELS``). Plain Python, so that a config's ``model.name`` is checked without loading torch."""

from __future__ import annotations

__all__ = ["MODEL_NAMES"]

MODEL_NAMES = ("vgg16_ssd300", "vgg16_lite300", "mobilenetv2_ssdlite300", "mobilenetv2_ssdlite320")
