"""Running a model over a dataset: devkit coordinates and per-class grouping."""

import numpy as np
import pytest
import torch

from odkd.class_names import SYNTHETIC_CLASSES
from odkd.data import VOCDataset
from odkd.data.synthetic import make_synthetic_voc
from odkd.inference import detect_dataset
from odkd.models import build_model


def test_devkit_pixels_invert_the_dataset_reading(tmp_path):
    make_synthetic_voc(tmp_path, {"test": 6}, seed=3)
    dataset = VOCDataset(tmp_path, "SYN_test", SYNTHETIC_CLASSES, keep_difficult=True)
    for i in range(len(dataset)):
        relative = dataset[i]["boxes"]
        np.testing.assert_allclose(dataset.to_pixels(relative, i), dataset.annotations[i].boxes, atol=1e-4)
    # By hand: on a W x H image, relative (0, 0.1, 0.5, 1) -> xmin 1, ymin 0.1 H + 1, xmax W / 2, ymax H.
    w, h = dataset.annotations[0].width, dataset.annotations[0].height
    expected = [[1, 0.1 * h + 1, w / 2, h]]
    np.testing.assert_allclose(dataset.to_pixels(torch.tensor([[0.0, 0.1, 0.5, 1.0]]), 0), expected, atol=1e-4)


def test_detect_dataset_groups_detections_by_class(tmp_path):
    make_synthetic_voc(tmp_path, {"test": 5}, seed=4)
    dataset = VOCDataset(tmp_path, "SYN_test", SYNTHETIC_CLASSES)
    torch.manual_seed(0)
    model = build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.5)
    detections = detect_dataset(model, dataset, torch.device("cpu"), batch_size=2, num_workers=0, progress=False)
    assert set(detections) == set(SYNTHETIC_CLASSES)
    total = 0
    for ids, scores, boxes in detections.values():
        assert len(ids) == len(scores) == len(boxes)
        assert set(ids) <= {a.image_id for a in dataset.annotations}
        assert (scores > 0.01).all() and (boxes[:, 2] >= boxes[:, 0]).all()
        total += len(ids)
    assert 0 < total <= 5 * 200  # at most 200 detections per image
    assert dataset.transform is None  # the caller's dataset is left as it was


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_detection_leaves_the_models_layout_alone(tmp_path):
    """The trainer evaluates the model it trains: with train.channels_last=false its weights must stay
    contiguous (the fused SGD step refuses gradients and momenta of other strides)."""
    make_synthetic_voc(tmp_path, {"test": 4}, seed=4)
    dataset = VOCDataset(tmp_path, "SYN_test", SYNTHETIC_CLASSES)
    model = build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.5).cuda()
    on_cpu = detect_dataset(model.cpu(), dataset, torch.device("cpu"), batch_size=2, num_workers=0, progress=False)
    model.cuda()
    on_gpu = detect_dataset(model, dataset, torch.device("cuda"), batch_size=2, num_workers=0, progress=False)
    assert all(p.is_contiguous() for p in model.parameters())
    assert abs(sum(len(d.scores) for d in on_gpu.values()) - sum(len(d.scores) for d in on_cpu.values())) < 50
