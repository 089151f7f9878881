"""Running a model over a dataset: devkit coordinates, per-image detections grouped by class for the
evaluator, and sharded detection."""

import numpy as np
import pytest
import torch

from odkd.class_names import SYNTHETIC_CLASSES
from odkd.data import VOCDataset
from odkd.data.synthetic import make_synthetic_voc
from odkd.eval import evaluate_dataset, group_by_class
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


def test_detect_dataset_gives_each_images_detections_and_the_evaluator_groups_them(tmp_path):
    make_synthetic_voc(tmp_path, {"test": 5}, seed=4)
    dataset = VOCDataset(tmp_path, "SYN_test", SYNTHETIC_CLASSES)
    torch.manual_seed(0)
    model = build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.5)
    detections = detect_dataset(model, dataset, torch.device("cpu"), batch_size=2, num_workers=0, progress=False)
    assert list(detections) == list(range(5))  # dataset order
    for index, (boxes, scores, labels) in detections.items():
        width, height = dataset.annotations[index].width, dataset.annotations[index].height
        assert boxes.shape == (len(scores), 4) and labels.shape == scores.shape and len(scores) <= 200
        assert (scores > 0.01).all() and (np.diff(scores) <= 0).all()  # above the threshold, best first
        assert ((labels >= 1) & (labels <= len(SYNTHETIC_CLASSES))).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, :2] >= 1).all()  # devkit pixels count from 1
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert dataset.transform is None  # the caller's dataset is left as it was

    per_class = group_by_class(detections, dataset)
    assert list(per_class) == list(SYNTHETIC_CLASSES)
    for label, (name, (ids, scores, boxes)) in enumerate(per_class.items(), start=1):
        expected = [
            (dataset.annotations[index].image_id, score, box)
            for index, found in detections.items()
            for box, score, found_label in zip(found.boxes, found.scores, found.labels, strict=True)
            if found_label == label
        ]
        assert ids.tolist() == [image_id for image_id, _, _ in expected], name
        np.testing.assert_array_equal(scores, [score for _, score, _ in expected])
        np.testing.assert_array_equal(boxes, np.array([box for _, _, box in expected]).reshape(-1, 4))
    # Images are grouped in dataset order whatever order they come in (AP ranks equal scores in that order).
    backwards = group_by_class(dict(reversed(detections.items())), dataset)
    for name, grouped in per_class.items():
        assert all(np.array_equal(a, b) for a, b in zip(grouped, backwards[name], strict=True)), name


def test_sharded_detection_scores_what_one_process_scores(tmp_path):
    """Each process of a sharded evaluation detects every world_size-th image; gathered in rank order (not
    dataset order), the detections give the single process's result exactly."""
    make_synthetic_voc(tmp_path, {"test": 5}, seed=4)
    dataset = VOCDataset(tmp_path, "SYN_test", SYNTHETIC_CLASSES)
    torch.manual_seed(0)
    model = build_model("mobilenetv2_ssdlite300", num_classes=6, width_mult=0.5)
    options = {"batch_size": 1, "num_workers": 0, "progress": False}  # batch 1: the same forward pass per image
    whole = detect_dataset(model, dataset, **options)
    shards = [detect_dataset(model, dataset, **options, rank=rank, world_size=2) for rank in range(2)]
    assert [list(shard) for shard in shards] == [[0, 2, 4], [1, 3]]
    gathered = {index: found for shard in shards for index, found in shard.items()}
    expected = evaluate_dataset(whole, dataset)
    result = evaluate_dataset(gathered, dataset)
    assert result.to_json() == expected.to_json() and result.mAP > 0
    for name in SYNTHETIC_CLASSES:
        np.testing.assert_array_equal(result.precision[name], expected.precision[name])


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
