"""Datasets, augmentation and loading."""

from odkd.data.dataset import Annotation, DatasetError, DetectionDataset, ImageDetections, read_image
from odkd.data.loader import IterationSampler, build_loader, collate, prefetch_to_device
from odkd.data.transforms import build_transform
from odkd.data.voc import VOCDataset, load_annotations, parse_annotation

__all__ = [
    "Annotation",
    "DatasetError",
    "DetectionDataset",
    "ImageDetections",
    "IterationSampler",
    "VOCDataset",
    "build_loader",
    "build_transform",
    "collate",
    "load_annotations",
    "parse_annotation",
    "prefetch_to_device",
    "read_image",
]
