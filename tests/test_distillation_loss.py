"""ObjectDistillationLoss (Chen et al. 2017) on tiny hand-computed examples."""

import math

import pytest
import torch

from odkd.losses import ObjectDistillationLoss

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


def loss_fn(**kwargs):
    return ObjectDistillationLoss([2], [2], **{"neg_pos_ratio": 1, **kwargs})


def no_maps():
    return [torch.zeros(1, 2, 1, 1)], [torch.zeros(1, 2, 1, 1)]


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


def run_cls(criterion, student, teacher, labels):
    zeros = torch.zeros(*labels.shape, 4)
    s_maps, t_maps = no_maps()
    return criterion(zeros, student, s_maps, zeros, teacher, t_maps, zeros, labels)


def test_weighted_soft_cross_entropy_and_mu_by_hand():
    out = run_cls(loss_fn(mu=0.8), *classification_case())
    # hard: CE over the positive and the mined negative, N = 1.
    assert out["hard_cls"].item() == pytest.approx(0.8 * (LN2 + LN4), abs=1e-6)
    # soft, prior 0: -(1.5 * 1/4 * ln 1/2 + 1 * 3/4 * ln 1/2) = 1.125 ln 2
    # soft, prior 1: -(1.5 * 3/4 * ln 1/4 + 1 * 1/4 * ln 3/4) = 1.125 ln 4 + 0.25 ln 4/3
    soft = 1.125 * LN2 + 1.125 * LN4 + 0.25 * math.log(4 / 3)
    assert out["soft_cls"].item() == pytest.approx(0.2 * soft, abs=1e-6)
    assert out["loc"].item() == 0 and out["bound"].item() == 0
    # Equal class weights give the plain soft cross-entropy: prior 0 ln 2, prior 1 3/4 ln 4 + 1/4 ln 4/3.
    plain = run_cls(loss_fn(mu=0.0, w_background=1.0), *classification_case())
    assert plain["soft_cls"].item() == pytest.approx(LN2 + 0.75 * LN4 + 0.25 * math.log(4 / 3), abs=1e-6)
    assert plain["hard_cls"].item() == 0


def test_temperature_softens_both_sides_and_scales_by_t_squared():
    out = run_cls(loss_fn(mu=0.0, temperature=2.0), *classification_case())
    r3 = math.sqrt(3)  # logits / 2: ln 3 -> ln sqrt(3)
    a, b = 1 / (1 + r3), r3 / (1 + r3)  # softmax(0, ln sqrt 3)
    prior0 = -(1.5 * a * math.log(0.5) + 1.0 * b * math.log(0.5))  # P_s = (1/2, 1/2), P_t = (a, b)
    prior1 = -(1.5 * b * math.log(a) + 1.0 * a * math.log(b))  # P_s = (a, b), P_t = (b, a)
    assert out["soft_cls"].item() == pytest.approx(4 * (prior0 + prior1), abs=1e-5)


def test_teacher_bounded_regression_is_decided_per_box():
    labels = torch.tensor([[1, 1, 0]])
    targets = torch.tensor([[[0.2, 0.1, -0.3, 0.4], [1.0, -1.0, 0.5, 0.0], [0.0] * 4]])
    student = targets.clone()
    teacher = targets.clone()
    student[0, 0, 0] += 0.1  # box A: student error 0.01 beats the teacher's 0.25 -> no bound term
    teacher[0, 0, 0] += 0.5
    student[0, 1, 0] += 1.0  # box B: student error 1 > teacher error 0 -> nu * 1
    student[0, 2] += 7.0  # a negative: ignored by both regression terms
    conf = torch.zeros(1, 3, 2)
    s_maps, t_maps = no_maps()
    out = loss_fn()(student, conf, s_maps, teacher, conf, t_maps, targets, labels)
    assert out["loc"].item() == pytest.approx((0.5 * 0.01 + (1.0 - 0.5)) / 2, abs=1e-6)  # Smooth-L1, N = 2
    assert out["bound"].item() == pytest.approx(0.5 * 1.0 / 2, abs=1e-6)
    # A margin of 0.3 makes box A count too: 0.01 + 0.3 > 0.25.
    out = loss_fn(margin=0.3, lam=2.0)(student, conf, s_maps, teacher, conf, t_maps, targets, labels)
    assert out["bound"].item() == pytest.approx(2.0 * 0.5 * (0.01 + 1.0) / 2, abs=1e-6)
    assert out["loc"].item() == pytest.approx(2.0 * (0.005 + 0.5) / 2, abs=1e-6)


def test_hint_adapters_shapes_values_and_gradients():
    criterion = ObjectDistillationLoss([4, 6], [8, 6], gamma=0.5)
    assert [(a.in_channels, a.out_channels, a.kernel_size) for a in criterion.adapters] == [
        (4, 8, (1, 1)),
        (6, 6, (1, 1)),
    ]
    for adapter in criterion.adapters:
        torch.nn.init.zeros_(adapter.weight)
        torch.nn.init.zeros_(adapter.bias)
    student_maps = [torch.randn(2, 4, 19, 19, requires_grad=True), torch.randn(2, 6, 10, 10, requires_grad=True)]
    # Teacher maps: level 0 at another size (38x38, resized to 19x19), constant 2 and 1.
    teacher_maps = [torch.full((2, 8, 38, 38), 2.0, requires_grad=True), torch.full((2, 6, 10, 10), 1.0)]
    zeros, labels = torch.zeros(2, 5, 4), torch.zeros(2, 5, dtype=torch.long)
    conf = torch.zeros(2, 5, 3)
    out = criterion(zeros, conf, student_maps, zeros, conf, teacher_maps, zeros, labels)
    # adapt(V) = 0, so hint = gamma * (mean(2^2) + mean(1^2)) = 0.5 * 5
    assert out["hint"].item() == pytest.approx(2.5, abs=1e-6)
    out["hint"].backward()
    assert criterion.adapters[0].bias.grad.abs().sum() > 0 and criterion.adapters[0].weight.grad is not None
    assert teacher_maps[0].grad is None  # the teacher is a target, never trained through the hint
    # mse = mean over the B*8*19*19 elements; d/d bias_c = 2 * (0 - 2) * (B*19*19) / (B*8*19*19) = -0.5
    torch.testing.assert_close(criterion.adapters[0].bias.grad, torch.full((8,), 0.5 * -0.5))


def test_mu_schedule_and_iteration_state():
    criterion = loss_fn(mu=0.8, mu_end=0.5, mu_ramp_iters=10)
    assert [criterion.mu_at(i) for i in (0, 5, 10, 20)] == pytest.approx([0.8, 0.65, 0.5, 0.5])
    case = classification_case()
    first = run_cls(criterion, *case)["hard_cls"].item()
    assert first == pytest.approx(0.8 * (LN2 + LN4), abs=1e-6)
    for _ in range(4):
        run_cls(criterion, *case)
    assert criterion.iteration == 5
    assert run_cls(criterion, *case)["hard_cls"].item() == pytest.approx(0.65 * (LN2 + LN4), abs=1e-6)
    criterion.eval()  # evaluation does not advance the schedule
    run_cls(criterion, *case)
    assert criterion.iteration == 6
    restored = loss_fn(mu=0.8, mu_end=0.5, mu_ramp_iters=10)
    restored.load_state_dict(criterion.state_dict())
    assert restored.iteration == 6
    with pytest.raises(ValueError, match="mu schedule"):
        loss_fn(mu_end=0.5)
    with pytest.raises(ValueError, match="levels one to one"):
        ObjectDistillationLoss([4, 6], [8])


def test_adapters_start_as_identity_when_channels_match():
    criterion = ObjectDistillationLoss([6, 4], [6, 8], gamma=1.0)
    v = torch.randn(1, 6, 5, 5)
    torch.testing.assert_close(criterion.adapters[0](v), v)  # 6 -> 6: identity, so the hint is logit matching
    z = torch.randn(1, 6, 5, 5)
    zeros, labels, conf = torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, 3)
    for adapter in criterion.adapters[1:]:
        torch.nn.init.zeros_(adapter.weight)
        torch.nn.init.zeros_(adapter.bias)
    out = criterion(zeros, conf, [v, torch.zeros(1, 4, 2, 2)], zeros, conf, [z, torch.zeros(1, 8, 2, 2)], zeros, labels)
    assert out["hint"].item() == pytest.approx(((v - z) ** 2).mean().item(), rel=1e-5)
