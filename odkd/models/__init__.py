"""SSD models: ``build_model(name, num_classes=21, pretrained_backbone=None, width_mult=1.0)``."""

from odkd.models.ssd import IMAGENET, SSD, PredictionHead, Preprocessing, SSDOutput
from odkd.models.zoo import MODELS, build_model

__all__ = ["IMAGENET", "MODELS", "SSD", "PredictionHead", "Preprocessing", "SSDOutput", "build_model"]
