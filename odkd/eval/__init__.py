"""Detection evaluation: PASCAL VOC AP exactly as the official devkit computes it (see odkd.eval.voc)."""

from odkd.eval import voc
from odkd.eval.voc import *  # noqa: F403  (the public API of odkd.eval.voc, listed in its __all__)

__all__ = voc.__all__
