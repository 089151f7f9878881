"""Box coder and batched matching against hand-built cases and an independent per-image reference."""

import math

import numpy as np
import pytest
import torch

from odkd.boxes import paired_giou
from odkd.matching import cxcywh_to_xyxy, decode, encode, match, xyxy_to_cxcywh
from odkd.priors import build_priors

# Four priors tiling the image in quadrants: xyxy (0,0,.5,.5), (.5,0,1,.5), (0,.5,.5,1), (.5,.5,1,1).
QUADRANTS = torch.tensor(
    [[0.25, 0.25, 0.5, 0.5], [0.75, 0.25, 0.5, 0.5], [0.25, 0.75, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]
)


def reference_iou(boxes, priors):
    """(n, P) IoU in float64 of xyxy ``boxes`` with cxcywh ``priors``."""
    p = np.concatenate([priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2], axis=1)
    iw = np.clip(np.minimum(boxes[:, None, 2], p[None, :, 2]) - np.maximum(boxes[:, None, 0], p[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(boxes[:, None, 3], p[None, :, 3]) - np.maximum(boxes[:, None, 1], p[None, :, 1]), 0, None)
    inter = iw * ih
    area_g = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_p = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
    return inter / (area_g[:, None] + area_p[None, :] - inter)


def without_near_ties(boxes, labels, priors, eps=1e-4):
    """Drop GTs whose matching would hinge on an IoU difference float32 cannot resolve.

    Exact ties are common (a small box inside two same-sized neighbouring priors) and float32
    rounding of the prior corners then decides, so the comparison with a float64 reference is only
    meaningful on boxes with a clear best prior, clear best GT per prior and no IoU at the threshold.
    """
    while len(boxes):
        iou = reference_iou(boxes.numpy().astype(np.float64), priors.numpy().astype(np.float64))
        top2_prior = np.sort(iou, axis=1)[:, -2:]
        ambiguous = top2_prior[:, 1] - top2_prior[:, 0] < eps
        ambiguous |= (np.abs(iou - 0.5) < eps).any(axis=1)
        if len(boxes) > 1:
            top2_gt = np.sort(iou, axis=0)[-2:]
            close = (top2_gt[1] - top2_gt[0] < eps) & (top2_gt[1] > 0.5 - eps)
            ambiguous |= (iou[:, close] > 0.5 - eps).any(axis=1)
        if not ambiguous.any():
            break
        keep = torch.from_numpy(~ambiguous)
        boxes, labels = boxes[keep], labels[keep]
    return boxes, labels


def reference_match(boxes, labels, priors, threshold=0.5, variances=(0.1, 0.2)):
    """Straightforward per-image matching in float64 NumPy (the ssd.pytorch algorithm, loops and all)."""
    boxes, labels, priors = (np.asarray(x, dtype=np.float64) for x in (boxes, labels, priors))
    num_priors = len(priors)
    loc = np.zeros((num_priors, 4))
    conf = np.zeros(num_priors, dtype=np.int64)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (labels > 0)
    boxes, labels = boxes[keep], labels[keep]
    if len(boxes) == 0:
        return loc, conf
    iou = reference_iou(boxes, priors)
    best_truth_overlap, best_truth_idx = iou.max(0), iou.argmax(0)
    best_prior_idx = iou.argmax(1)
    for j, prior in enumerate(best_prior_idx):
        best_truth_overlap[prior] = 2.0
        best_truth_idx[prior] = j
    for i in range(num_priors):
        if best_truth_overlap[i] < threshold:
            continue
        g = boxes[best_truth_idx[i]]
        gc, gwh = (g[:2] + g[2:]) / 2, g[2:] - g[:2]
        loc[i, :2] = (gc - priors[i, :2]) / (variances[0] * priors[i, 2:])
        loc[i, 2:] = np.log(gwh / priors[i, 2:]) / variances[1]
        conf[i] = labels[best_truth_idx[i]]
    return loc, conf


def random_gt(generator, n):
    centre = torch.rand(n, 2, generator=generator) * 0.8 + 0.1
    size = torch.rand(n, 2, generator=generator) * 0.5 + 0.02
    boxes = torch.cat((centre - size / 2, centre + size / 2), dim=1).clamp(0, 1)
    return boxes, torch.randint(1, 21, (n,), generator=generator)


def test_conversions_by_hand():
    xyxy = torch.tensor([[0.1, 0.2, 0.5, 0.8]])
    cxcywh = torch.tensor([[0.3, 0.5, 0.4, 0.6]])
    torch.testing.assert_close(xyxy_to_cxcywh(xyxy), cxcywh)
    torch.testing.assert_close(cxcywh_to_xyxy(cxcywh), xyxy)


def test_encode_by_hand():
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    gt = torch.tensor([[0.35, 0.45, 0.75, 0.55]])  # cxcywh (0.55, 0.5, 0.4, 0.1)
    # t_x = 0.05 / (0.1*0.2) = 2.5; t_y = 0; t_w = log(2)/0.2; t_h = log(0.5)/0.2.
    expected = torch.tensor([[2.5, 0.0, math.log(2) / 0.2, math.log(0.5) / 0.2]])
    torch.testing.assert_close(encode(gt, prior), expected)
    torch.testing.assert_close(decode(expected, prior), gt)


def test_encode_decode_round_trip():
    g = torch.Generator().manual_seed(1)
    priors = build_priors("lite300")
    boxes, _ = random_gt(g, priors.shape[0])
    torch.testing.assert_close(decode(encode(boxes, priors), priors), boxes, atol=1e-5, rtol=0)
    loc = torch.randn(2, priors.shape[0], 4, generator=g)
    torch.testing.assert_close(encode(decode(loc, priors), priors), loc, atol=1e-3, rtol=1e-4)


def test_decode_never_returns_inf():
    boxes = decode(torch.tensor([[[0.0, 0.0, 1e4, -1e4]]]), QUADRANTS[:1])
    assert torch.isfinite(boxes).all()


def test_paired_giou_by_hand_and_against_torchvision():
    from torchvision.ops import generalized_box_iou, generalized_box_iou_loss

    a = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0], [0.1, 0.2, 0.5, 0.9]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0], [1.0, 1.0, 3.0, 3.0], [0.1, 0.2, 0.5, 0.9]])
    # disjoint: IoU 0, union 2, hull 3 -> -1/3; overlapping: IoU 1/7, union 7, hull 9 -> 1/7 - 2/9; equal: 1
    torch.testing.assert_close(paired_giou(a, b), torch.tensor([-1 / 3, 1 / 7 - 2 / 9, 1.0]))
    g = torch.Generator().manual_seed(0)
    low, size = torch.rand(2, 5, 7, 2, generator=g), torch.rand(2, 5, 7, 2, generator=g) + 0.01
    boxes1, boxes2 = torch.cat((low[0], low[0] + size[0]), -1), torch.cat((low[1], low[1] + size[1]), -1)
    expected = generalized_box_iou(boxes1.view(-1, 4), boxes2.view(-1, 4)).diagonal().view(5, 7)
    torch.testing.assert_close(paired_giou(boxes1, boxes2), expected)
    # The same float operations as torchvision's loss, forward and backward (CrossKD's results did not move).
    boxes1.requires_grad_()
    ours, theirs = 1 - paired_giou(boxes1, boxes2), generalized_box_iou_loss(boxes1, boxes2)
    assert torch.equal(ours, theirs)
    assert torch.equal(*(torch.autograd.grad(loss.sum(), boxes1)[0] for loss in (ours, theirs)))


def test_gt_below_threshold_gets_its_forced_prior():
    gt = torch.tensor([[0.0, 0.0, 0.2, 0.5]])  # IoU with prior 0 = 0.1 / 0.25 = 0.4 < 0.5
    loc, labels = match([gt], [torch.tensor([3])], QUADRANTS)
    assert labels.tolist() == [[3, 0, 0, 0]]
    # gt cxcywh (0.1, 0.25, 0.2, 0.5) vs prior (0.25, 0.25, 0.5, 0.5)
    expected = torch.tensor([(0.1 - 0.25) / (0.1 * 0.5), 0.0, math.log(0.4) / 0.2, 0.0])
    torch.testing.assert_close(loc[0, 0], expected)
    assert (loc[0, 1:] == 0).all()


def test_later_gt_wins_a_shared_best_prior():
    # Both GTs have prior 0 as their best prior: IoU 0.9 (GT 0) and 0.8 (GT 1). The later one wins,
    # even with the lower IoU (ssd.pytorch's rule), and GT 0 is left without a prior.
    gts = torch.tensor([[0.0, 0.0, 0.45, 0.5], [0.0, 0.0, 0.5, 0.4]])
    _, labels = match([gts], [torch.tensor([7, 9])], QUADRANTS)
    assert labels.tolist() == [[9, 0, 0, 0]]


def test_each_prior_takes_its_highest_iou_gt_and_threshold_is_inclusive():
    gts = torch.tensor(
        [
            [0.0, 0.0, 1.0, 0.5],  # top half: IoU 0.5 with priors 0 and 1; best prior 0 (first max)
            [0.5, 0.0, 1.0, 0.5],  # exactly prior 1: IoU 1
            [0.0, 0.5, 1.0, 1.0],  # bottom half: IoU 0.5 with priors 2 and 3; best prior 2
        ]
    )
    _, labels = match([gts], [torch.tensor([1, 2, 3])], QUADRANTS)
    # prior 1: GT 1 (IoU 1 > 0.5); prior 3: GT 2 by IoU = 0.5, positive because the test is IoU >= 0.5.
    assert labels.tolist() == [[1, 2, 3, 3]]


def test_images_without_gt_are_background():
    gt = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    loc, labels = match([torch.zeros(0, 4), gt], [torch.zeros(0, dtype=torch.long), torch.tensor([4])], QUADRANTS)
    assert labels.tolist() == [[0, 0, 0, 0], [0, 0, 0, 4]]
    assert (loc[0] == 0).all()
    loc, labels = match([torch.zeros(0, 4)] * 3, [torch.zeros(0, dtype=torch.long)] * 3, QUADRANTS)
    assert loc.shape == (3, 4, 4) and labels.shape == (3, 4)
    assert (labels == 0).all() and (loc == 0).all()


@pytest.mark.parametrize(
    "bad_box",
    [[0.3, 0.3, 0.3, 0.6], [0.6, 0.6, 0.2, 0.9], [0.1, 0.1, 0.4, 0.1], [float("nan"), 0.1, 0.4, 0.4]],
    ids=["zero-width", "inverted", "zero-height", "nan"],
)
def test_degenerate_gt_is_ignored(bad_box):
    good = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    with_bad = torch.cat((torch.tensor([bad_box]), good))
    loc, labels = match([with_bad], [torch.tensor([5, 4])], QUADRANTS)
    loc_ref, labels_ref = match([good], [torch.tensor([4])], QUADRANTS)
    assert torch.isfinite(loc).all()
    assert torch.equal(labels, labels_ref)
    torch.testing.assert_close(loc, loc_ref)


def test_padded_form_with_mask_or_minus_one_labels_equals_list_form():
    g = torch.Generator().manual_seed(2)
    priors = build_priors("ssd300")
    counts = [3, 0, 7, 1]
    targets = [random_gt(g, n) for n in counts]
    loc_list, labels_list = match([b for b, _ in targets], [lab for _, lab in targets], priors)

    boxes = torch.rand(len(counts), max(counts), 4, generator=g)  # junk in the padding on purpose
    labels = torch.full((len(counts), max(counts)), -1, dtype=torch.long)
    mask = torch.zeros(len(counts), max(counts), dtype=torch.bool)
    for i, (b, lab) in enumerate(targets):
        boxes[i, : len(b)], labels[i, : len(b)], mask[i, : len(b)] = b, lab, True
    loc_pad, labels_pad = match(boxes, labels, priors)
    assert torch.equal(labels_pad, labels_list)
    torch.testing.assert_close(loc_pad, loc_list)

    loc_mask, labels_mask = match(boxes, labels.clamp(min=1), priors, gt_mask=mask)
    assert torch.equal(labels_mask, labels_list)
    torch.testing.assert_close(loc_mask, loc_list)


def test_batched_match_equals_per_image_reference():
    g = torch.Generator().manual_seed(3)
    priors = build_priors("ssd300")
    targets = [without_near_ties(*random_gt(g, n), priors) for n in (10, 1, 0, 25, 10, 4)]
    assert sum(len(b) for b, _ in targets) > 30
    loc, labels = match([b for b, _ in targets], [lab for _, lab in targets], priors)
    assert (labels > 0).sum() > 100
    for i, (b, lab) in enumerate(targets):
        loc_ref, labels_ref = reference_match(b.numpy(), lab.numpy(), priors.numpy())
        np.testing.assert_array_equal(labels[i].numpy(), labels_ref)
        np.testing.assert_allclose(loc[i].numpy(), loc_ref, atol=2e-4, rtol=1e-4)


def test_bad_shapes_are_reported():
    with pytest.raises(ValueError, match="image 1"):
        match([torch.zeros(1, 4), torch.zeros(2, 4)], [torch.ones(1), torch.ones(3)], QUADRANTS)
    with pytest.raises(ValueError, match="priors must be"):
        match([torch.zeros(1, 4)], [torch.ones(1)], QUADRANTS[:, :2])
    with pytest.raises(TypeError):
        match(torch.zeros(1, 1, 4), [torch.ones(1)], QUADRANTS)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(4)
    priors = build_priors("ssd300")
    targets = [random_gt(g, n) for n in (10, 3, 0, 12)]
    boxes = [b for b, _ in targets]
    labels = [lab for _, lab in targets]
    loc_cpu, labels_cpu = match(boxes, labels, priors)
    loc_gpu, labels_gpu = match([b.cuda() for b in boxes], [lab.cuda() for lab in labels], priors.cuda())
    assert loc_gpu.device.type == "cuda"
    assert torch.equal(labels_gpu.cpu(), labels_cpu)
    torch.testing.assert_close(loc_gpu.cpu(), loc_cpu, atol=1e-5, rtol=1e-5)
