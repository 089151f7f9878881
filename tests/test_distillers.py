"""Each distiller on tiny hand-computed examples (DESIGN.md §4-5)."""

import math

import pytest
import torch
from _tiny_ssd import tiny_ssd
from torch import nn

from odkd.distill import FGD, CrossKD, DistillBatch, HintonKD, LocalizationDistillation, ObjectDistillationLoss
from odkd.distill.fgd import GlobalContext, feature_attention, focal_masks
from odkd.distill.ld import best_gt_diou
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
    # adapt(V) = 0, so hint = gamma * (mean(2^2) + mean(1^2)) = 0.5 * 5
    assert out["hint"].item() == pytest.approx(2.5, abs=1e-6)
    out["hint"].backward()
    assert criterion.adapters[0].weight.grad is not None
    assert teacher_maps[0].grad is None  # the teacher is a target, never trained through the hint
    # mse = mean over the B*8*19*19 elements; d/d bias_c = 2 * (0 - 2) * (B*19*19) / (B*8*19*19) = -0.5
    torch.testing.assert_close(criterion.adapters[0].bias.grad, torch.full((8,), 0.5 * -0.5))


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
    assert out["hint"].item() == pytest.approx(((v - z) ** 2).mean().item(), rel=1e-5)


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
    """GT [0, 0, 0.4, 0.4]; prior A = the GT box (positive); prior B = [0.2, 0, 0.6, 0.4]: IoU 1/3, centre
    distance^2 0.04, enclosing diagonal^2 0.52 -> DIoU 1/3 - 1/13; prior C = [0.7, 0.7, 0.9, 0.9]: IoU 0,
    centre distance^2 0.72, enclosing diagonal^2 1.62 -> DIoU -4/9. A padding entry overlaps C and is ignored."""
    priors = torch.tensor([[0.2, 0.2, 0.4, 0.4], [0.4, 0.2, 0.4, 0.4], [0.8, 0.8, 0.2, 0.2]])
    gt_boxes = torch.tensor([[[0.0, 0.0, 0.4, 0.4], [0.7, 0.7, 0.9, 0.9]]])
    gt_valid = torch.tensor([[True, False]])
    return priors, gt_boxes, gt_valid


def test_best_gt_diou_by_hand():
    priors, gt_boxes, gt_valid = ld_case()
    expected = [[1.0, 1 / 3 - 1 / 13, -4 / 9]]
    torch.testing.assert_close(best_gt_diou(gt_boxes, gt_valid, priors), torch.tensor(expected))
    no_gt = best_gt_diou(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool), priors)
    assert no_gt.shape == (2, 3) and (no_gt == -1).all()


def test_ld_main_and_valuable_region_by_hand():
    priors, gt_boxes, gt_valid = ld_case()
    labels = torch.tensor([[1, 0, 0]])
    student_dist = torch.zeros(1, 3, 4, 3)  # 2 bin intervals: 3 bins, uniform
    teacher_dist = torch.tensor([0.0, LN2, 0.0]).expand(1, 3, 4, 3)  # P_t = (1/4, 1/2, 1/4) on every edge
    zeros, conf = torch.zeros(1, 3, 4), torch.zeros(1, 3, 2)
    batch = make_batch(
        output(zeros, conf, loc_dist=student_dist), output(zeros, conf, loc_dist=teacher_dist), labels,
        gt_boxes=gt_boxes, gt_valid=gt_valid, priors=priors,
    )  # fmt: skip
    kl = 0.5 * math.log(3 / 4) + 0.5 * math.log(3 / 2)  # sum_i P_t ln(P_t / (1/3))
    per_prior = kl / 3  # per bin, the mean of four equal edges, T^2 = 1
    out = LocalizationDistillation(temperature=1.0, weight=0.25, vlr_weight=2.0, vlr_threshold=0.25)(batch)
    assert out["main"].item() == pytest.approx(0.25 * per_prior, abs=1e-7)  # prior A, N = 1
    assert out["vlr"].item() == pytest.approx(2.0 * per_prior, abs=1e-7)  # prior B: DIoU 0.256 >= 0.25
    assert LocalizationDistillation(vlr_threshold=0.26)(batch)["vlr"].item() == 0  # B drops out
    # T = 2: P_t = (1, sqrt 2, 1) / (2 + sqrt 2) against the uniform student, times T^2 = 4.
    p = [1 / (2 + math.sqrt(2)), math.sqrt(2) / (2 + math.sqrt(2)), 1 / (2 + math.sqrt(2))]
    kl2 = sum(q * math.log(3 * q) for q in p)
    assert LocalizationDistillation(temperature=2.0, weight=1.0)(batch)["main"].item() == pytest.approx(
        4 * kl2 / 3, abs=1e-6
    )


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


def test_crosskd_by_hand():
    teacher = tiny_teacher()
    student_mid = {
        "conf_intermediates": [torch.tensor([1.0, 2.0]).view(1, 2, 1, 1).requires_grad_()],
        "loc_intermediates": [torch.tensor([0.5, -0.5]).view(1, 2, 1, 1).requires_grad_()],
    }
    crosskd = CrossKD.from_models(teacher, teacher, temperature=1.0, cls_weight=1.0, reg_weight=2.0)
    labels, sampled = torch.tensor([[1, 0]]), torch.tensor([[True, True]])
    teacher_conf = torch.tensor([[[0.0, LN3], [LN3, 0.0]]])  # P_t: (1/4, 3/4) and (3/4, 1/4)
    teacher_out = output(torch.zeros(1, 2, 4), teacher_conf)
    batch = make_batch(
        output(**student_mid), teacher_out, labels, sampled=sampled, teacher_model=teacher, priors=teacher.priors
    )
    out = crosskd(batch)
    # Cross-head logits (identity adapters): prior 0 (0, 1), prior 1 (0, 2).
    p0, p1 = 1 / (1 + E), 1 / (1 + E**2)  # background probabilities
    kl = 0.25 * math.log(0.25 / p0) + 0.75 * math.log(0.75 / (1 - p0))
    kl += 0.75 * math.log(0.75 / p1) + 0.25 * math.log(0.25 / (1 - p1))
    assert out["cls"].item() == pytest.approx(kl, rel=1e-6)  # N = 1
    # Prior 0 (0.5 wide) with t_x = 0.5: centre 0.5 + 0.5 * 0.1 * 0.5 = 0.525 -> [0.275, 0.25, 0.775, 0.75]
    # against the teacher's [0.25, 0.25, 0.75, 0.75]: IoU 0.2375 / 0.2625, enclosing box = union -> GIoU = IoU.
    assert out["reg"].item() == pytest.approx(2.0 * (1 - 0.2375 / 0.2625), rel=1e-5)
    (out["cls"] + out["reg"]).backward()
    assert student_mid["conf_intermediates"][0].grad.abs().sum() > 0  # reaches the student through the teacher
    assert crosskd.conf_adapters[0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_crosskd_is_zero_when_the_student_is_the_teacher():
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
    out = CrossKD.from_models(student, teacher)(batch)
    assert out["cls"].item() == pytest.approx(0.0, abs=1e-5) and out["reg"].item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="box heads must agree"):
        CrossKD.from_models(build_model("mobilenetv2_ssdlite300", num_classes=3, dfl_bins=4), teacher)
