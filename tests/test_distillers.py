"""Each distiller on tiny hand-computed examples (docs/DESIGN.md §4-5)."""

import math

import pytest
import torch
import torchvision
from _tiny_ssd import tiny_ssd
from torch import nn

from odkd.boxes import decode
from odkd.distill import FGD, CrossKD, DistillBatch, HintonKD, LocalizationDistillation, ObjectDistillationLoss
from odkd.distill.crosskd import match_channel_statistics
from odkd.distill.fgd import GlobalContext, feature_attention, focal_masks
from odkd.distill.ld import valuable_region_iou
from odkd.losses import MultiBoxLoss
from odkd.models import SSD, SSDOutput, build_model

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)
E = math.e


def output(loc=None, conf=None, **fields) -> SSDOutput:
    """An SSDOutput holding only what a test needs."""
    empty = {"features": [], "loc_maps": [], "conf_maps": [], "loc_intermediates": [], "conf_intermediates": []}
    return SSDOutput(loc, conf, **{**empty, **fields})


def make_batch(student, teacher, labels, **given) -> DistillBatch:
    """A DistillBatch from the given fields; the rest zero / empty (teacher outputs on the student's priors
    default to the teacher's own)."""
    batch, priors = labels.shape
    fields = {
        "teacher_model": None,
        "teacher_loc": teacher.loc,
        "teacher_conf": teacher.conf,
        "loc_targets": torch.zeros(batch, priors, 4),
        "sampled": labels > 0,
        "gt_boxes": torch.zeros(batch, 0, 4),
        "gt_valid": torch.zeros(batch, 0, dtype=torch.bool),
        "priors": torch.zeros(priors, 4),
        "iteration": 0,
        **given,
    }
    return DistillBatch(student=student, teacher=teacher, labels=labels, **fields)


# ------------------------------------------------------------------------------------------ Chen 2017
def classification_case():
    """Three priors, classes (background, object):
    prior 0: label 1; student logits (0, 0) -> P_s = (1/2, 1/2); teacher (0, ln3) -> P_t = (1/4, 3/4)
    prior 1: background, hard; student (0, ln3) -> background CE ln 4; teacher (ln3, 0) -> P_t = (3/4, 1/4)
    prior 2: background, easy; student (ln3, 0) -> background CE ln 4/3, not mined at ratio 1
    """
    student = torch.tensor([[[0.0, 0.0], [0.0, LN3], [LN3, 0.0]]])
    teacher = torch.tensor([[[0.0, LN3], [LN3, 0.0], [0.0, 5.0]]])
    labels = torch.tensor([[1, 0, 0]])
    return student, teacher, labels


def chen(**kwargs):
    return ObjectDistillationLoss([2], [2], **kwargs)


def cls_batch(student_conf, teacher_conf, labels, iteration=0):
    """The classification case with the hard loss's own mined priors and empty hint maps."""
    zeros = torch.zeros(*labels.shape, 4)
    losses, sampled = MultiBoxLoss(neg_pos_ratio=1).compute(zeros, student_conf, zeros, labels)
    maps = {"conf_maps": [torch.zeros(1, 2, 1, 1)]}
    student, teacher = output(zeros, student_conf, **maps), output(zeros, teacher_conf, **maps)
    return make_batch(student, teacher, labels, sampled=sampled, iteration=iteration), losses


def test_hard_loss_mines_the_priors_the_soft_loss_uses():
    batch, losses = cls_batch(*classification_case())
    assert batch.sampled.tolist() == [[True, True, False]]
    assert losses["conf"].item() == pytest.approx(LN2 + LN4, abs=1e-6)  # CE of prior 0 and 1, N = 1


def test_weighted_soft_cross_entropy_and_mu_by_hand():
    batch, _ = cls_batch(*classification_case())
    criterion = chen(mu=0.8)
    assert criterion.detection_weights(0) == {"conf": 0.8, "loc": 1.0}  # hard_cls = mu * CE
    out = criterion(batch)
    # soft, prior 0: -(1.5 * 1/4 * ln 1/2 + 1 * 3/4 * ln 1/2) = 1.125 ln 2
    # soft, prior 1: -(1.5 * 3/4 * ln 1/4 + 1 * 1/4 * ln 3/4) = 1.125 ln 4 + 0.25 ln 4/3
    soft = 1.125 * LN2 + 1.125 * LN4 + 0.25 * math.log(4 / 3)
    assert out["soft_cls"].item() == pytest.approx(0.2 * soft, abs=1e-6)
    assert out["bound"].item() == 0 and out["hint"].item() == 0
    # Equal class weights give the plain soft cross-entropy: prior 0 ln 2, prior 1 3/4 ln 4 + 1/4 ln 4/3.
    plain = chen(mu=0.0, w_background=1.0)
    assert plain(batch)["soft_cls"].item() == pytest.approx(LN2 + 0.75 * LN4 + 0.25 * math.log(4 / 3), abs=1e-6)
    assert plain.detection_weights(0)["conf"] == 0


def test_temperature_softens_both_sides_and_scales_by_t_squared():
    batch, _ = cls_batch(*classification_case())
    out = chen(mu=0.0, temperature=2.0)(batch)
    r3 = math.sqrt(3)  # logits / 2: ln 3 -> ln sqrt(3)
    a, b = 1 / (1 + r3), r3 / (1 + r3)  # softmax(0, ln sqrt 3)
    prior0 = -(1.5 * a * math.log(0.5) + 1.0 * b * math.log(0.5))  # P_s = (1/2, 1/2), P_t = (a, b)
    prior1 = -(1.5 * b * math.log(a) + 1.0 * a * math.log(b))  # P_s = (a, b), P_t = (b, a)
    assert out["soft_cls"].item() == pytest.approx(4 * (prior0 + prior1), abs=1e-5)


def test_teacher_bounded_regression_is_decided_per_box():
    labels = torch.tensor([[1, 1, 0]])
    targets = torch.tensor([[[0.2, 0.1, -0.3, 0.4], [1.0, -1.0, 0.5, 0.0], [0.0] * 4]])
    student, teacher = targets.clone(), targets.clone()
    student[0, 0, 0] += 0.1  # box A: student error 0.01 beats the teacher's 0.25 -> no bound term
    teacher[0, 0, 0] += 0.5
    student[0, 1, 0] += 1.0  # box B: student error 1 > teacher error 0 -> nu * 1
    student[0, 2] += 7.0  # a negative: ignored
    conf, maps = torch.zeros(1, 3, 2), {"conf_maps": [torch.zeros(1, 2, 1, 1)]}
    batch = make_batch(output(student, conf, **maps), output(teacher, conf, **maps), labels, loc_targets=targets)
    assert chen()(batch)["bound"].item() == pytest.approx(0.5 * 1.0 / 2, abs=1e-6)  # N = 2
    # A margin of 0.3 makes box A count too: 0.01 + 0.3 > 0.25; lam scales the bound and the detection loc.
    criterion = chen(margin=0.3, lam=2.0)
    assert criterion(batch)["bound"].item() == pytest.approx(2.0 * 0.5 * (0.01 + 1.0) / 2, abs=1e-6)
    assert criterion.detection_weights(0)["loc"] == 2.0


def test_hint_adapters_shapes_values_and_gradients():
    criterion = ObjectDistillationLoss([4, 6], [8, 6], gamma=0.5)
    assert [(a.in_channels, a.out_channels, a.kernel_size) for a in criterion.adapters] == [
        (4, 8, (1, 1)),
        (6, 6, (1, 1)),
    ]
    for adapter in criterion.adapters:
        nn.init.zeros_(adapter.weight)
        nn.init.zeros_(adapter.bias)
    student_maps = [torch.randn(2, 4, 19, 19, requires_grad=True), torch.randn(2, 6, 10, 10, requires_grad=True)]
    # Teacher maps: level 0 at another size (38x38, resized to 19x19), constant 2 and 1.
    teacher_maps = [torch.full((2, 8, 38, 38), 2.0, requires_grad=True), torch.full((2, 6, 10, 10), 1.0)]
    zeros, labels, conf = torch.zeros(2, 5, 4), torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, 3)
    batch = make_batch(output(zeros, conf, conf_maps=student_maps), output(zeros, conf, conf_maps=teacher_maps), labels)
    out = criterion(batch)
    # adapt(V) = 0: one mean over every element of both levels, 2*8*19*19 = 5776 errors of 2^2 and 2*6*10*10 =
    # 1200 of 1^2 (per-level means would give 4 + 1 and weigh the 10x10 level as much as the 19x19 one).
    assert out["hint"].item() == pytest.approx(0.5 * (5776 * 4 + 1200 * 1) / (5776 + 1200), rel=1e-6)
    out["hint"].backward()
    assert criterion.adapters[0].weight.grad is not None
    assert teacher_maps[0].grad is None  # the teacher is a target, never trained through the hint
    # d/d bias_c = gamma * 2 * (0 - 2) * (B*19*19 elements of channel c) / 6976
    torch.testing.assert_close(criterion.adapters[0].bias.grad, torch.full((8,), 0.5 * 2 * -2 * 722 / 6976))


def test_mu_schedule():
    criterion = chen(mu=0.8, mu_end=0.5, mu_ramp_iters=10)
    mu = [float(criterion.detection_weights(i)["conf"]) for i in (0, 5, 10, 20)]
    assert mu == pytest.approx([0.8, 0.65, 0.5, 0.5])
    batch, _ = cls_batch(*classification_case(), iteration=5)
    soft = 1.125 * LN2 + 1.125 * LN4 + 0.25 * math.log(4 / 3)
    assert criterion(batch)["soft_cls"].item() == pytest.approx(0.35 * soft, abs=1e-6)
    with pytest.raises(ValueError, match="mu schedule"):
        chen(mu_end=0.5)
    with pytest.raises(ValueError, match="levels one to one"):
        ObjectDistillationLoss([4, 6], [8])


def test_adapters_start_as_identity_when_channels_match():
    criterion = ObjectDistillationLoss([6, 4], [6, 8], gamma=1.0)
    v, z = torch.randn(1, 6, 5, 5), torch.randn(1, 6, 5, 5)
    torch.testing.assert_close(criterion.adapters[0](v), v)  # 6 -> 6: identity, so the hint is logit matching
    nn.init.zeros_(criterion.adapters[1].weight)
    nn.init.zeros_(criterion.adapters[1].bias)
    zeros, labels, conf = torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, 3)
    student = output(zeros, conf, conf_maps=[v, torch.zeros(1, 4, 2, 2)])
    teacher = output(zeros, conf, conf_maps=[z, torch.zeros(1, 8, 2, 2)])
    out = criterion(make_batch(student, teacher, labels))
    # 150 elements at level 0, 32 zero errors at level 1 (its adapter is zero, the teacher map zero)
    assert out["hint"].item() == pytest.approx(((v - z) ** 2).sum().item() / (150 + 32), rel=1e-5)


# ------------------------------------------------------------------------------------------ Hinton
def test_hinton_kd_by_hand():
    student = torch.zeros(1, 3, 2)
    teacher = torch.tensor([[[0.0, LN3], [LN3, 0.0], [0.0, 7.0]]])
    labels, sampled = torch.tensor([[1, 0, 0]]), torch.tensor([[True, True, False]])
    zeros = torch.zeros(1, 3, 4)
    batch = make_batch(output(zeros, student), output(zeros, teacher), labels, sampled=sampled)
    # T = 1: P_s = (1/2, 1/2); KL of (1/4, 3/4) and of (3/4, 1/4) both = 1/4 ln 1/2 + 3/4 ln 3/2 (prior 2 not sampled)
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    kd = HintonKD(temperature=1.0, alpha=0.5)
    assert kd(batch)["kd"].item() == pytest.approx(0.5 * 2 * kl, abs=1e-6)
    assert kd.detection_weights(0) == {"conf": 0.5}
    # T = 2: P_t = softmax(0, ln sqrt 3) = (a, b); times T^2 = 4
    a = 1 / (1 + math.sqrt(3))
    kl2 = a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a))
    assert HintonKD(temperature=2.0, alpha=0.25)(batch)["kd"].item() == pytest.approx(0.25 * 4 * 2 * kl2, abs=1e-6)
    same = make_batch(output(zeros, teacher), output(zeros, teacher), labels, sampled=sampled)
    assert kd(same)["kd"].item() == pytest.approx(0.0, abs=1e-7)  # KL, not CE: zero when the student matches
    with pytest.raises(ValueError, match="alpha"):
        HintonKD(alpha=1.5)


# ------------------------------------------------------------------------------------------ LD
def ld_case():
    """GT [0, 0, 0.4, 0.4] (a padding entry on [0.7, 0.7, 0.9, 0.9] is ignored) and priors (cx, cy, w, h):
    A = the GT box: D = 1 (positive);
    B = [0.2, 0, 0.6, 0.4]: inter 0.08 over its area 0.16 = 0.5, centre distance^2 0.04, enclosing diagonal^2
        0.52 -> D = 0.5 - 1/13 = 0.423; IoU 0.08 / 0.24 = 1/3;
    C = [0.7, 0.7, 0.9, 0.9]: no overlap, D < 0;
    D = [0.2, 0, 0.4, 0.4], the GT's right half: inter / its area = 1, centre distance^2 0.01, diagonal^2 0.32
        -> D = 0.96875, outside the region; the union-based DIoU (0.5 - 0.03125) would put it inside."""
    priors = torch.tensor([[0.2, 0.2, 0.4, 0.4], [0.4, 0.2, 0.4, 0.4], [0.8, 0.8, 0.2, 0.2], [0.3, 0.2, 0.2, 0.4]])
    gt_boxes = torch.tensor([[[0.0, 0.0, 0.4, 0.4], [0.7, 0.7, 0.9, 0.9]]])
    gt_valid = torch.tensor([[True, False]])
    return priors, gt_boxes, gt_valid


def test_valuable_region_iou_by_hand():
    priors, gt_boxes, gt_valid = ld_case()
    region = valuable_region_iou(gt_boxes, gt_valid, priors, positive_iou=0.5, factor=0.25)  # 0.125 <= D < 0.5
    torch.testing.assert_close(region, torch.tensor([[0.0, 1 / 3, 0.0, 0.0]]))
    assert valuable_region_iou(gt_boxes, gt_valid, priors, 0.5, 0.85).sum() == 0  # 0.425 > D(B)
    assert valuable_region_iou(gt_boxes, gt_valid, priors, 0.42, 0.25).sum() == 0  # D(B) >= 0.42
    no_gt = valuable_region_iou(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool), priors, 0.5, 0.25)
    assert no_gt.shape == (2, 4) and (no_gt == 0).all()


def ld_batch(student_loc):
    """ld_case's priors A, B, C; A positive. Student bins uniform (3 bins); the teacher's (1/4, 1/2, 1/4) on
    every edge; class logits: student (0, 0), teacher (0, ln 3) everywhere."""
    priors, gt_boxes, gt_valid = ld_case()
    priors = priors[:3]
    student_dist = torch.zeros(1, 3, 4, 3)
    teacher_dist = torch.tensor([0.0, LN2, 0.0]).expand(1, 3, 4, 3)
    conf, teacher_conf = torch.zeros(1, 3, 2), torch.tensor([0.0, LN3]).expand(1, 3, 2)
    return make_batch(
        output(student_loc, conf, loc_dist=student_dist),
        output(torch.zeros(1, 3, 4), teacher_conf, loc_dist=teacher_dist),
        torch.tensor([[1, 0, 0]]), gt_boxes=gt_boxes, gt_valid=gt_valid, priors=priors, iou_threshold=0.5,
    )  # fmt: skip


def test_ld_main_valuable_region_and_class_kd_by_hand():
    # The student's box on A moves right by t_x = 1 (0.1 * 0.4 = 0.04): [0.04, 0, 0.44, 0.4] against the GT
    # (A itself, target 0): IoU 0.144 / 0.176 = 9/11, the quality weight of A.
    student_loc = torch.zeros(1, 3, 4)
    student_loc[0, 0, 0] = 1.0
    batch = ld_batch(student_loc)
    kl = 0.5 * math.log(3 / 4) + 0.5 * math.log(3 / 2)  # sum_i P_t ln(P_t / (1/3)), on every edge
    ld = kl / 3  # T = 1: per edge the KL averaged over the 3 bins, averaged over the 4 equal edges
    out = LocalizationDistillation(temperature=1.0, vlr_weight=2.0)(batch)
    # main: weight 0.25 * (2 images / B = 1) * sum over the positives of quality * ld
    assert out["main"].item() == pytest.approx(0.25 * 2 * (9 / 11) * ld, rel=1e-5)
    # vlr: prior B alone (IoU 1/3), weight 2 * (2 / 1) * (1/3) * ld / 4
    assert out["vlr"].item() == pytest.approx(2.0 * 2 * (1 / 3) * ld / 4, rel=1e-5)
    # kd on positive A at T = 2: teacher softmax(0, ln3 / 2) = (a, b) against the uniform student, the KL
    # averaged over the 2 classes, times T^2 = 4 and the weight 10, over N = 1
    a, b = 1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))
    assert out["kd"].item() == pytest.approx(10 * 4 * (a * math.log(2 * a) + b * math.log(2 * b)) / 2, rel=1e-5)
    assert LocalizationDistillation(vlr_factor=0.85)(batch)["vlr"].item() == 0  # B drops out of the region
    # T = 2: P_t = (1, sqrt 2, 1) / (2 + sqrt 2) against the uniform student, times T^2 = 4.
    p = [1 / (2 + math.sqrt(2)), math.sqrt(2) / (2 + math.sqrt(2)), 1 / (2 + math.sqrt(2))]
    ld2 = 4 * sum(q * math.log(3 * q) for q in p) / 3
    main2 = LocalizationDistillation(temperature=2.0, weight=1.0)(batch)["main"].item()
    assert main2 == pytest.approx(2 * (9 / 11) * ld2, rel=1e-5)


def test_ld_matches_the_official_formulas_on_random_tensors():
    """The official loss computed the official way (mmdet's weighted KL with mean over bins, avg_factor 4 and
    16, a 2-image batch) against LocalizationDistillation on the same tensors."""
    torch.manual_seed(0)
    batch_size, priors, bins = 2, 40, 17
    centres = torch.rand(priors, 2) * 0.6 + 0.2
    prior_boxes = torch.cat((centres, torch.rand(priors, 2) * 0.3 + 0.1), dim=1)
    gt_boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.5], [0.5, 0.4, 0.9, 0.95]], [[0.2, 0.3, 0.7, 0.8], [0, 0, 0, 0]]])
    gt_valid = torch.tensor([[True, True], [True, False]])
    labels = (torch.rand(batch_size, priors) < 0.2).long()
    student_dist, teacher_dist = torch.randn(batch_size, priors, 4, bins), torch.randn(batch_size, priors, 4, bins)
    student_conf, teacher_conf = torch.randn(batch_size, priors, 6), torch.randn(batch_size, priors, 6)
    student_loc, targets = torch.randn(batch_size, priors, 4) * 0.3, torch.randn(batch_size, priors, 4) * 0.3
    batch = make_batch(
        output(student_loc, student_conf, loc_dist=student_dist), output(None, teacher_conf, loc_dist=teacher_dist),
        labels, loc_targets=targets, gt_boxes=gt_boxes, gt_valid=gt_valid, priors=prior_boxes, iou_threshold=0.5,
    )  # fmt: skip
    out = LocalizationDistillation()(batch)

    def official_kl(pred, soft, T):  # KnowledgeDistillationKLDivLoss before weighting: mean over the last dim, T^2
        target = torch.softmax(soft / T, dim=1)
        return torch.nn.functional.kl_div(torch.log_softmax(pred / T, dim=1), target, reduction="none").mean(1) * T * T

    positive = labels.view(-1) > 0
    decoded = decode(student_loc, prior_boxes).view(-1, 4)[positive]
    gt = decode(targets, prior_boxes).view(-1, 4)[positive]
    quality = torchvision.ops.box_iou(decoded, gt).diagonal()
    pos_pred, pos_soft = student_dist.view(-1, 4, bins)[positive], teacher_dist.view(-1, 4, bins)[positive]
    edges = official_kl(pos_pred.reshape(-1, bins), pos_soft.reshape(-1, bins), 10.0)
    loss_ld = 0.25 * (edges * quality[:, None].expand(-1, 4).reshape(-1)).sum() / 4.0
    # The VLR by the same rule, per prior and GT in a loop, with mmdet's "diou" (intersection over the prior)
    region = torch.zeros(batch_size * priors)
    prior_xyxy = torchvision.ops.box_convert(prior_boxes, "cxcywh", "xyxy")
    for i in range(batch_size):
        for p in range(priors):
            if labels[i, p] > 0:
                continue
            for g in range(2):
                if not gt_valid[i, g]:
                    continue
                a, b = prior_xyxy[p], gt_boxes[i, g]
                inter = (torch.min(a[2:], b[2:]) - torch.max(a[:2], b[:2])).clamp(min=0).prod()
                rho2 = (((a[:2] + a[2:]) - (b[:2] + b[2:])) ** 2).sum() / 4
                c2 = ((torch.max(a[2:], b[2:]) - torch.min(a[:2], b[:2])) ** 2).sum()
                diou = inter / ((a[2] - a[0]) * (a[3] - a[1])) - rho2 / c2
                if 0.25 * 0.5 <= diou < 0.5:
                    iou = torchvision.ops.box_iou(a[None], b[None])[0, 0]
                    region[i * priors + p] = max(region[i * priors + p], iou)
    remain = region > 0
    vlr_edges = official_kl(
        student_dist.view(-1, 4, bins)[remain].reshape(-1, bins),
        teacher_dist.view(-1, 4, bins)[remain].reshape(-1, bins),
        10.0,
    )
    loss_vlr = 0.25 * (vlr_edges * region[remain][:, None].expand(-1, 4).reshape(-1)).sum() / 16.0
    loss_kd = 10 * official_kl(student_conf.view(-1, 6)[positive], teacher_conf.view(-1, 6)[positive], 2.0).mean()
    assert remain.sum() > 3  # the case exercises the region
    # The official sums run over a 2-image batch, as this one: the scales agree without rescaling.
    torch.testing.assert_close(out["main"], loss_ld)
    torch.testing.assert_close(out["vlr"], loss_vlr)
    torch.testing.assert_close(out["kd"], loss_kd)


def test_ld_needs_distribution_heads_on_both_sides():
    student = build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.5, dfl_bins=8)
    with pytest.raises(ValueError, match=r"model\.dfl_bins=16"):
        LocalizationDistillation.from_models(student, build_model("mobilenetv2_ssdlite300", num_classes=3))
    with pytest.raises(ValueError, match="same bins"):
        LocalizationDistillation.from_models(
            student, build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.5, dfl_bins=16)
        )


# ------------------------------------------------------------------------------------------ FGD
def test_focal_masks_by_hand():
    boxes = torch.tensor(
        [
            [[0.0, 0.0, 0.5, 0.5], [0.3, 0.3, 0.45, 0.45], [0.6, 0.0, 1.0, 0.25], [0.0, 0.5, 1.0, 1.0]],
            [[0.2, 0.2, 0.8, 0.8], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
        ]
    )
    valid = torch.tensor([[True, True, True, False], [False, False, False, False]])
    foreground, scale = focal_masks(boxes, valid, 4, 4)
    # Image 0 on a 4x4 grid: box 0 covers rows/cols 0-1 (4 cells, 1/4); box 1 (1.2-1.8 in cells) covers only
    # cell (1, 1), where its 1/1 beats box 0's 1/4; box 2 covers row 0, cols 2-3 (2 cells, 1/2); box 3 is
    # padding. 6 foreground cells, so the 10 background cells get 1/10.
    b = 0.1
    expected = [[0.25, 0.25, 0.5, 0.5], [0.25, 1.0, b, b], [b, b, b, b], [b, b, b, b]]
    torch.testing.assert_close(scale[0], torch.tensor(expected))
    assert foreground[0].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    # Image 1 has no valid box: all background, 1/16 each.
    assert foreground[1].sum() == 0 and torch.allclose(scale[1], torch.full((4, 4), 1 / 16))
    empty_fg, empty_scale = focal_masks(torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.bool), 2, 3)
    assert empty_fg.sum() == 0 and torch.allclose(empty_scale, torch.full((1, 2, 3), 1 / 6))


def fgd_features():
    """(1, 2, 1, 2): channel 0 = (1, -1), channel 1 = (3, 1). Mean |F| over channels per cell: (2, 1);
    over cells per channel: (1, 2)."""
    return torch.tensor([[[[1.0, -1.0]], [[3.0, 1.0]]]])


def test_feature_attention_by_hand():
    spatial, channel = feature_attention(fgd_features(), temperature=1.0)
    torch.testing.assert_close(spatial, torch.tensor([[[2 * E / (E + 1), 2 / (E + 1)]]]))  # H W softmax(2, 1)
    torch.testing.assert_close(channel, torch.tensor([[2 / (1 + E), 2 * E / (1 + E)]]))  # C softmax(1, 2)
    spatial, _ = feature_attention(fgd_features(), temperature=0.5)  # softmax(4, 2)
    torch.testing.assert_close(spatial, torch.tensor([[[2 * E**2 / (E**2 + 1), 2 / (E**2 + 1)]]]))


def test_fgd_terms_by_hand():
    teacher = fgd_features()
    student = torch.zeros(1, 2, 1, 2)  # adapter 2 -> 2 is the identity, so f(F_s) = 0
    labels = torch.zeros(1, 3, dtype=torch.long)
    gt_boxes, gt_valid = torch.tensor([[[0.0, 0.0, 0.5, 1.0]]]), torch.tensor([[True]])  # covers cell 0
    batch = make_batch(
        output(features=[student]), output(features=[teacher]), labels, gt_boxes=gt_boxes, gt_valid=gt_valid
    )
    alpha, beta, gamma, lam = 1.0, 0.5, 2.0, 0.1
    out = FGD([2], [2], temperature=1.0, alpha=alpha, beta=beta, gamma=gamma, lam=lam)(batch)
    s0, s1 = 2 * E / (E + 1), 2 / (E + 1)  # teacher spatial attention
    a0, a1 = 2 / (1 + E), 2 * E / (1 + E)  # teacher channel attention
    # Cell 0: foreground, S = 1 (one cell); cell 1: background, S = 1/N_bg = 1. (F_t - 0)^2 per channel.
    focal = alpha * s0 * (a0 * 1**2 + a1 * 3**2) + beta * s1 * (a0 * 1**2 + a1 * 1**2)
    assert out["focal"].item() == pytest.approx(focal, rel=1e-6)
    # The student's zero map has uniform attention (1, 1) on both axes.
    attention = abs(s0 - 1) + abs(s1 - 1) + abs(a0 - 1) + abs(a1 - 1)
    assert out["attention"].item() == pytest.approx(gamma * attention, rel=1e-6)
    # Context blocks start as the identity: the global term is lam * sum (F_t - f(F_s))^2 = lam * 12.
    assert out["global"].item() == pytest.approx(lam * 12.0, rel=1e-6)


def test_fgd_adapts_channels_and_resizes_the_teacher():
    fgd = FGD([3, 4], [5, 4], levels=[0])
    assert len(fgd.adapters) == 1 and (fgd.adapters[0].in_channels, fgd.adapters[0].out_channels) == (3, 5)
    student = [torch.randn(2, 3, 2, 2, requires_grad=True), torch.randn(2, 4, 1, 1)]
    teacher = [torch.full((2, 5, 4, 4), 3.0), torch.randn(2, 4, 1, 1)]  # 4x4 -> 2x2: still constant 3
    labels = torch.zeros(2, 3, dtype=torch.long)
    out = fgd(make_batch(output(features=student), output(features=teacher), labels))
    assert all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    assert student[0].grad is not None and fgd.adapters[0].weight.grad is not None
    with pytest.raises(ValueError, match=r"fgd levels must be indices of the 1 levels, got \[1\]"):
        FGD([3], [3], levels=[1])
    with pytest.raises(ValueError, match="fgd pairs levels one to one: the student has 2 levels, the teacher 1"):
        FGD([3, 4], [3])


def test_global_context_block_by_hand():
    block = GlobalContext(4)  # hidden 2
    x = torch.arange(1.0, 33.0).view(1, 4, 2, 4)  # channel 0 holds 1..8: spatial mean 4.5
    with torch.no_grad():
        block.mask.weight.zero_()  # uniform pooling weights: the context is the spatial mean
        block.transform[0].weight.zero_()
        block.transform[0].weight[0, 0] = 1.0  # hidden = (mean of channel 0, 0)
        block.transform[0].bias.zero_()
        block.transform[3].weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1).expand(4, 2, 1, 1))
    # LayerNorm over (4.5, 0): mean 2.25, variance 2.25^2 -> (+d, -d), d = 2.25 / sqrt(2.25^2 + 1e-5); ReLU -> (d, 0)
    d = 2.25 / math.sqrt(2.25**2 + 1e-5)
    expected = x + d * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(block(x), expected)


# ------------------------------------------------------------------------------------------ CrossKD
def tiny_teacher() -> SSD:
    """One 1x1 level, two priors per cell ((0.5, 0.5, 0.5, 0.5) and (0.5, 0.5, 1, 1)), 2 classes,
    1x1 plain heads with hand-set weights."""
    teacher = tiny_ssd(1, num_classes=2, channels=2, min_size=0.5, max_size=2.0)
    with torch.no_grad():
        conf, loc = teacher.conf_heads[0].predictor, teacher.loc_heads[0].predictor
        conf.weight.zero_(), conf.bias.zero_(), loc.weight.zero_(), loc.bias.zero_()
        conf.weight[1, 0] = 1.0  # prior 0, class 1 logit = v0
        conf.weight[3, 1] = 1.0  # prior 1, class 1 logit = v1
        loc.weight[0, 0] = 1.0  # prior 0, t_x = u0
    return teacher.eval().requires_grad_(False)


def test_crosskd_adapter_form_by_hand():
    teacher = tiny_teacher()
    student_mid = {
        "conf_intermediates": [torch.tensor([1.0, 2.0]).view(1, 2, 1, 1).requires_grad_()],
        "loc_intermediates": [torch.tensor([0.5, -0.5]).view(1, 2, 1, 1).requires_grad_()],
    }
    crosskd = CrossKD.from_models(teacher, teacher, temperature=1.0, cls_weight=1.0, reg_weight=2.0, align="adapter")
    labels, sampled = torch.tensor([[1, 0]]), torch.tensor([[True, True]])
    teacher_conf = torch.tensor([[[0.0, LN3], [LN3, 0.0]]])  # P_t: (1/4, 3/4) and (3/4, 1/4)
    zero_mids = {"conf_intermediates": [torch.zeros(1, 2, 1, 1)], "loc_intermediates": [torch.zeros(1, 2, 1, 1)]}
    teacher_out = output(torch.zeros(1, 2, 4), teacher_conf, **zero_mids)
    batch = make_batch(
        output(**student_mid), teacher_out, labels, sampled=sampled, teacher_model=teacher, priors=teacher.priors
    )
    out = crosskd(batch)
    # Cross-head logits (identity adapters, no activation in plain heads): prior 0 (0, 1), prior 1 (0, 2).
    p0, p1 = 1 / (1 + E), 1 / (1 + E**2)  # background probabilities
    kl = 0.25 * math.log(0.25 / p0) + 0.75 * math.log(0.75 / (1 - p0))
    kl += 0.75 * math.log(0.75 / p1) + 0.25 * math.log(0.25 / (1 - p1))
    assert out["cls"].item() == pytest.approx(kl, rel=1e-6)  # N = 1
    # Prior 0 (0.5 wide) with t_x = 0.5: centre 0.5 + 0.5 * 0.1 * 0.5 = 0.525 -> [0.275, 0.25, 0.775, 0.75]
    # against the teacher's [0.25, 0.25, 0.75, 0.75]: IoU 0.2375 / 0.2625, enclosing box = union -> GIoU = IoU.
    # Prior 1 gets t = 0 like the teacher: 1 - GIoU = 0. Each prior weighted by the teacher's highest object
    # probability (3/4 and 1/4), over N = 1.
    assert out["reg"].item() == pytest.approx(2.0 * 0.75 * (1 - 0.2375 / 0.2625), rel=1e-5)
    (out["cls"] + out["reg"]).backward()
    assert student_mid["conf_intermediates"][0].grad.abs().sum() > 0  # reaches the student through the teacher
    assert crosskd.conf_adapters[0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_match_channel_statistics_by_hand():
    # Channel 0: x = 1, 3, 5, 7 (mean 4, unbiased variance 20/3), reference 10, 10, 14, 14 (mean 12, variance
    # 16/3). Channel 1: x = 2, 2, 2, 6 (mean 3, variance 4), reference 0, 1, 2, 3 (mean 1.5, variance 5/3).
    x = torch.tensor([[1.0, 3.0], [2.0, 2.0], [5.0, 7.0], [2.0, 6.0]]).view(2, 2, 1, 2).requires_grad_()
    reference = torch.tensor([[10.0, 10.0], [0.0, 1.0], [14.0, 14.0], [2.0, 3.0]]).view(2, 2, 1, 2)
    got = match_channel_statistics(x, reference)

    def expected(values, mean, var, ref_mean, ref_var):
        return [(v - mean) / (math.sqrt(var) + 1e-6) * math.sqrt(ref_var) + ref_mean for v in values]

    channel0 = expected([1, 3, 5, 7], 4, 20 / 3, 12, 16 / 3)
    channel1 = expected([2, 2, 2, 6], 3, 4, 1.5, 5 / 3)
    torch.testing.assert_close(got[:, 0].flatten(), torch.tensor(channel0))
    torch.testing.assert_close(got[:, 1].flatten(), torch.tensor(channel1))
    got.sum().backward()
    assert x.grad is not None  # the student's statistics are differentiated through, as officially


def crosskd_affine_case(dfl_bins=0):
    """A 2x2-map teacher with random predictors, and a student whose pre-activation maps are a per-channel
    affine change of the teacher's (x 3 + 1 and x 0.5 - 2)."""
    torch.manual_seed(0)
    teacher = tiny_ssd(2, num_classes=3, channels=2, min_size=1.0, max_size=2.0, dfl_bins=dfl_bins)
    teacher.eval().requires_grad_(False)
    teacher_mids = [torch.randn(2, 2, 2, 2)]
    conf_maps = [teacher.conf_heads[0].predictor(teacher_mids[0])]
    loc_maps = [teacher.loc_heads[0].predictor(teacher_mids[0])]
    loc, conf, loc_dist = teacher.predictions(conf_maps, loc_maps)
    mids = {"conf_intermediates": teacher_mids, "loc_intermediates": teacher_mids}
    affine = torch.tensor([3.0, 0.5]).view(1, 2, 1, 1), torch.tensor([1.0, -2.0]).view(1, 2, 1, 1)
    student_mids = [teacher_mids[0] * affine[0] + affine[1]]
    student = output(conf_intermediates=student_mids, loc_intermediates=student_mids)
    labels = torch.zeros(2, 8, dtype=torch.long)
    labels[:, 0] = 1
    batch = make_batch(
        student, output(loc, conf, loc_dist=loc_dist, **mids), labels, sampled=labels >= 0,
        teacher_model=teacher, priors=teacher.priors,
    )  # fmt: skip
    return teacher, batch


@pytest.mark.parametrize("dfl_bins", [0, 2])
def test_crosskd_standardization_undoes_per_channel_affine_changes(dfl_bins):
    """Standardised to the teacher's channel statistics, the student's maps become the teacher's own, so the
    cross-head predictions are the teacher's and both terms vanish (to float32 rounding: logits and boxes
    of order 1 computed twice, ~1e-6 apart, give KL and 1 - GIoU of that order); a learned adapter (the
    identity at the start) leaves the affine change in."""
    teacher, batch = crosskd_affine_case(dfl_bins)
    out = CrossKD.from_models(teacher, teacher)(batch)
    assert out["cls"].item() == pytest.approx(0.0, abs=1e-5) and out["reg"].item() == pytest.approx(0.0, abs=1e-5)
    adapted = CrossKD.from_models(teacher, teacher, align="adapter")(batch)
    assert adapted["cls"].item() > 1e-2 and adapted["reg"].item() > 1e-2


def test_crosskd_distribution_term_sums_the_kl_over_bins_and_edges():
    """DFL heads: per prior the KL summed over the n + 1 bins and the 4 edges (the official weight 4 with
    average factor 4), priors weighted by the teacher's highest object probability, / the sum of the weights."""
    teacher = tiny_ssd(1, num_classes=2, channels=2, min_size=0.5, max_size=2.0, dfl_bins=2)
    with torch.no_grad():
        for conv in (teacher.conf_heads[0].predictor, teacher.loc_heads[0].predictor):
            conv.weight.zero_(), conv.bias.zero_()  # cross-head logits 0: uniform bins, uniform classes
    teacher.eval().requires_grad_(False)
    teacher_dist = torch.zeros(1, 2, 4, 3)
    teacher_dist[0, 0] = torch.tensor([0.0, LN2, 0.0])  # prior 0: (1/4, 1/2, 1/4) on every edge; prior 1 uniform
    teacher_conf = torch.tensor([[[0.0, LN3], [LN3, 0.0]]])  # highest object probability 3/4 and 1/4
    mids = {"conf_intermediates": [torch.zeros(1, 2, 1, 1)], "loc_intermediates": [torch.zeros(1, 2, 1, 1)]}
    batch = make_batch(
        output(**mids), output(torch.zeros(1, 2, 4), teacher_conf, loc_dist=teacher_dist, **mids),
        torch.tensor([[1, 0]]), teacher_model=teacher, priors=teacher.priors,
    )  # fmt: skip
    kl = 0.5 * math.log(3 / 4) + 0.5 * math.log(3 / 2)  # one edge of prior 0 against the uniform bins
    out = CrossKD.from_models(teacher, teacher, reg_weight=1.0)(batch)
    assert out["reg"].item() == pytest.approx((0.75 * 4 * kl + 0.25 * 0.0) / (0.75 + 0.25), rel=1e-5)


@pytest.mark.parametrize("align, reg_tolerance", [("adapter", 1e-6), ("standardize", 1e-3)])
def test_crosskd_is_zero_when_the_student_is_the_teacher(align, reg_tolerance):
    """Adapters start as the identity: cross-head and teacher predictions are the same numbers, the KL is 0 and
    1 - GIoU is what the eps of paired_giou leaves for identical boxes, eps / area. Standardisation also moves
    each value by eps * its standard score (the official eps = 1e-6 on the standard deviation), which the
    1280-wide predictors sum into box offsets of ~1e-4: 1 - GIoU of that order."""
    torch.manual_seed(0)
    teacher = build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.5).eval().requires_grad_(False)
    student = build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.5).eval()
    student.load_state_dict(teacher.state_dict())
    images = torch.randn(2, 3, 300, 300)
    student_out, teacher_out = student(images), teacher(images)
    labels = torch.zeros(2, 3000, dtype=torch.long)
    labels[:, ::97] = 1
    batch = make_batch(
        student_out, teacher_out, labels, sampled=labels >= 0, teacher_model=teacher, priors=teacher.priors
    )
    out = CrossKD.from_models(student, teacher, align=align)(batch)
    assert out["cls"].item() == pytest.approx(0.0, abs=1e-5)
    boxes = decode(teacher_out.loc, teacher.priors)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    weights = teacher_out.conf.softmax(-1)[..., 1:].amax(-1)
    floor = (weights * (1 - area / (area + 1e-7))).sum() / (labels > 0).sum()
    assert out["reg"].item() == pytest.approx(floor.item(), abs=reg_tolerance)
    with pytest.raises(ValueError, match="box heads must agree"):
        CrossKD.from_models(build_model("mobilenetv2_ssdlite300", num_classes=3, dfl_bins=4), teacher)
