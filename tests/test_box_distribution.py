"""Distribution (DFL) box heads: edge coding, the DFL loss, the model head, its detection term, model files."""

import math

import pytest
import torch

from odkd.box_distribution import (
    distribution_focal_loss,
    edge_targets,
    edges_to_loc,
    expected_edges,
    loc_to_edges,
)
from odkd.boxes import decode
from odkd.checkpoint import init_from_checkpoint, load_model, save_model
from odkd.engine import DetectionTask
from odkd.matching import match
from odkd.models import build_model
from odkd.postprocess import postprocess


def test_edges_and_offsets_by_hand():
    # loc 0 is the prior itself: every edge half the prior size.
    torch.testing.assert_close(loc_to_edges(torch.zeros(4)), torch.full((4,), 0.5))
    # t_x = 1 moves the centre by 0.1 prior widths: l = 0.5 - 0.1, r = 0.5 + 0.1; t_h = ln 2 / 0.2 doubles
    # the height: t = b = 1.
    loc = torch.tensor([1.0, 0.0, 0.0, math.log(2) / 0.2])
    torch.testing.assert_close(loc_to_edges(loc), torch.tensor([0.4, 1.0, 0.6, 1.0]))
    torch.testing.assert_close(edges_to_loc(torch.tensor([0.4, 1.0, 0.6, 1.0])), loc)
    # The same box through the prior-based decoder: edges = distances from the prior centre / prior size.
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    box = decode(loc.view(1, 4), prior)[0]
    edges = torch.tensor([(0.5 - box[0]) / 0.2, (0.5 - box[1]) / 0.4, (box[2] - 0.5) / 0.2, (box[3] - 0.5) / 0.4])
    torch.testing.assert_close(loc_to_edges(loc), edges)
    random = torch.randn(100, 4)
    torch.testing.assert_close(edges_to_loc(loc_to_edges(random)), random, atol=1e-5, rtol=0)
    assert torch.isfinite(edges_to_loc(torch.zeros(4))).all()  # a collapsed box stays finite


def test_expected_edges_by_hand():
    logits = torch.tensor([[0.0, math.log(3), 0.0], [0.0, 0.0, 0.0], [-50.0, -50.0, 50.0], [0.0, 0.0, 0.0]])
    # Bins 0, 1, 2 (max 2 over 2 intervals): (1/5, 3/5, 1/5) -> 1; uniform -> 1; all on the last bin -> 2.
    torch.testing.assert_close(expected_edges(logits, max_edge=2.0), torch.tensor([1.0, 1.0, 2.0, 1.0]))
    torch.testing.assert_close(expected_edges(logits[:1], max_edge=4.0), torch.tensor([2.0]))
    # Under bf16 autocast (training, evaluation on CUDA) the expectation still comes out in float32:
    # a matmul would be autocast to bf16 (relative error ~4e-3, ~0.07 on the encoded box centre).
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 4, 17, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = expected_edges(logits, max_edge=16.0)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, expected_edges(logits, max_edge=16.0), rtol=1e-6, atol=1e-6)


def test_distribution_focal_loss_by_hand():
    logits = torch.zeros(3, 3)  # uniform over 3 bins: every log-probability is -ln 3
    target = torch.tensor([0.5, 2.0, 0.0])
    torch.testing.assert_close(distribution_focal_loss(logits, target), torch.full((3,), math.log(3)))
    # Target 0.25 between bins 0 and 1 of P = (1/2, 1/4, 1/4): -(0.75 ln 1/2 + 0.25 ln 1/4)
    logits = torch.tensor([[math.log(2), 0.0, 0.0]])
    expected = -(0.75 * math.log(0.5) + 0.25 * math.log(0.25))
    assert distribution_focal_loss(logits, torch.tensor([0.25])).item() == pytest.approx(expected, abs=1e-6)
    # Out-of-range targets are clamped to the last (or first) bin.
    assert distribution_focal_loss(logits, torch.tensor([7.0])).item() == pytest.approx(math.log(4), abs=1e-6)


def test_edge_targets_in_bin_units():
    loc = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, math.log(2) / 0.2]])
    # 16 intervals over 2 prior sizes: 8 bins per prior size.
    # Edges (0.5, 0.5, 0.5, 0.5) -> 4 each; (0.4, 1, 0.6, 1) -> (3.2, 8, 4.8, 8).
    expected = torch.tensor([[4.0, 4.0, 4.0, 4.0], [3.2, 8.0, 4.8, 8.0]])
    torch.testing.assert_close(edge_targets(loc, bins=16, max_edge=2.0), expected)
    assert edge_targets(torch.tensor([[0.0, 0.0, 20.0, 20.0]]), bins=16).max() == 16  # clamped


def test_distribution_head_outputs_and_post_processing():
    torch.manual_seed(0)
    model = build_model("mobilenetv2_ssdlite300", num_classes=4, width_mult=0.5, dfl_bins=8).eval()
    assert model.spec == {"name": "mobilenetv2_ssdlite300", "width_mult": 0.5, "num_classes": 4, "dfl_bins": 8}
    with torch.no_grad():
        out = model(torch.randn(2, 3, 300, 300))
    assert out.loc_dist.shape == (2, 3000, 4, 9) and out.loc_maps[0].shape == (2, 6 * 4 * 9, 19, 19)
    torch.testing.assert_close(out.loc, edges_to_loc(expected_edges(out.loc_dist, model.dfl_max_edge)))
    # A new head starts at the priors, as a plain head does (loc ~ 0).
    assert out.loc.abs().max() < 0.2
    detections = postprocess(out.loc, out.conf, model.priors)
    assert len(detections) == 2 and all(torch.isfinite(d.boxes).all() for d in detections)
    plain = build_model("mobilenetv2_ssdlite300", num_classes=4, width_mult=0.5)
    assert plain.spec == {"name": "mobilenetv2_ssdlite300", "width_mult": 0.5, "num_classes": 4}
    assert plain(torch.randn(2, 3, 300, 300)).loc_dist is None
    with pytest.raises(ValueError, match="dfl_bins"):
        build_model("vgg16_lite300", num_classes=4, dfl_bins=1)


def test_detection_task_adds_the_dfl_term():
    torch.manual_seed(0)
    model = build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.5, dfl_bins=4)
    task = DetectionTask(model, dfl_weight=0.5).train()
    images = torch.randint(0, 255, (2, 3, 300, 300), dtype=torch.uint8)
    boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.7]], [[0.3, 0.2, 0.9, 0.5]]])
    labels = torch.tensor([[1], [2]])
    out = model(model.normalize(images))
    losses, targets = task.detection_losses(out, boxes, labels)
    assert set(losses) == {"loc", "conf", "dfl"}
    # Independently: the positives' edges in bin units (4 intervals over 2 prior sizes), DFL averaged over
    # the four edges, summed over positives, / N, times the weight.
    loc_t, labels_t = match(boxes, labels, model.priors)
    positive = labels_t > 0
    target = (loc_to_edges(loc_t[positive]) * 2).clamp(0, 4)
    expected = 0.5 * distribution_focal_loss(out.loc_dist[positive], target).mean(-1).sum() / positive.sum()
    torch.testing.assert_close(losses["dfl"], expected)
    assert torch.equal(targets.labels, labels_t)
    sum(losses.values()).backward()
    assert sum(head.predictor.weight.grad.abs().sum() for head in model.loc_heads) > 0


def test_model_files_and_fine_tuning_with_distribution_heads(tmp_path):
    torch.manual_seed(0)
    model = build_model("vgg16_lite300", num_classes=3, dfl_bins=16).eval()
    save_model(model, tmp_path / "dfl.pt")
    loaded = load_model(tmp_path / "dfl.pt").eval()
    assert loaded.dfl_bins == 16
    images = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).loc, model(images).loc)
    # Plain weights into a distribution head: everything but the loc predictors is copied.
    save_model(build_model("vgg16_lite300", num_classes=3), tmp_path / "plain.pt")
    copied, left = init_from_checkpoint(model, tmp_path / "plain.pt")
    assert left == 2 * len(model.loc_heads)  # the predictors' weights and biases
    assert copied == len(model.state_dict()) - left
