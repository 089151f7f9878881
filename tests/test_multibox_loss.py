"""MultiBoxLoss on hand-computed examples."""

import math

import pytest
import torch

from odkd.losses import MultiBoxLoss, hard_negative_mask

CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def three_prior_batch():
    """One positive (label 1) and two negatives, two classes.

    - prior 0, label 1, logits (0, 0): CE = log 2
    - prior 1, label 0, logits (0, log 3): background CE = log(1 + 3) = log 4
    - prior 2, label 0, logits (log 3, 0): background CE = log(4 / 3)
    Loc: prior 0 predicts 0 for target (0.5, -0.5, 2, 0): Smooth-L1 = 0.125 + 0.125 + 1.5 + 0 = 1.75.
    The negatives predict garbage boxes that must not count.
    """
    conf = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)], [math.log(3), 0.0]]])
    loc = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0], [-5.0, 5.0, 1.0, 1.0]]])
    loc_targets = torch.tensor([[[0.5, -0.5, 2.0, 0.0], [0.0] * 4, [0.0] * 4]])
    labels = torch.tensor([[1, 0, 0]])
    return loc, conf, loc_targets, labels


def test_three_prior_loss_by_hand():
    loc, conf, loc_t, labels = three_prior_batch()
    out = MultiBoxLoss(neg_pos_ratio=1)(loc, conf, loc_t, labels)
    assert set(out) == {"loc", "conf"}
    assert out["loc"].item() == pytest.approx(1.75, abs=1e-6)
    # 1 negative per positive: the harder negative is prior 1 (log 4 > log 4/3).
    assert out["conf"].item() == pytest.approx(math.log(2) + math.log(4), abs=1e-6)
    # Ratio 3 wants 3 negatives, only 2 exist: both are used.
    out = MultiBoxLoss(neg_pos_ratio=3)(loc, conf, loc_t, labels)
    assert out["conf"].item() == pytest.approx(math.log(2) + math.log(4) + math.log(4 / 3), abs=1e-6)


def test_normalised_by_positives_of_the_whole_batch():
    loc, conf, loc_t, labels = three_prior_batch()
    # Second image: two positives with the same logits/targets as prior 0 -> sums double, N = 1 + 2.
    loc2 = torch.cat((loc, loc[:, [0, 0, 1]]))
    conf2 = torch.cat((conf, conf[:, [0, 0, 1]]))
    loc_t2 = torch.cat((loc_t, loc_t[:, [0, 0, 1]]))
    labels2 = torch.cat((labels, torch.tensor([[1, 1, 0]])))
    out = MultiBoxLoss(neg_pos_ratio=1)(loc2, conf2, loc_t2, labels2)
    assert out["loc"].item() == pytest.approx(3 * 1.75 / 3, abs=1e-6)
    # Image 0: log 2 + log 4; image 1: 2 log 2 + its only negative log 4 (ratio allows 2, 1 exists).
    assert out["conf"].item() == pytest.approx((3 * math.log(2) + 2 * math.log(4)) / 3, abs=1e-6)


def test_mining_picks_the_hardest_negatives_three_per_positive():
    # Two classes, logits (a, 0): background CE = log(1 + exp(-a)), larger for smaller a.
    a = torch.tensor([3.0, -1.0, 2.0, 0.5, -2.0, 1.5, 4.0, -0.5, 0.0, 2.5, 1.0, -3.0])
    conf = torch.stack((a, torch.zeros_like(a)), dim=-1).unsqueeze(0)
    labels = torch.zeros(1, 12, dtype=torch.long)
    labels[0, [4, 11]] = 1  # positives: the two hardest-looking priors must not be mined
    negative = hard_negative_mask(torch.logsumexp(conf, -1) - conf[..., 0], labels, 3)
    # Negatives sorted by a: -1.0 (1), -0.5 (7), 0.0 (8), 0.5 (3), 1.0 (10), 1.5 (5), ...
    assert negative[0].nonzero().flatten().tolist() == sorted([1, 7, 8, 3, 10, 5])


def test_mining_is_per_image():
    torch.manual_seed(0)
    conf = torch.randn(3, 50, 5)
    labels = torch.zeros(3, 50, dtype=torch.long)
    labels[0, :2] = 2
    labels[2, 10:30] = 1  # 20 positives want 60 negatives; only 30 exist
    negative = hard_negative_mask(torch.logsumexp(conf, -1) - conf[..., 0], labels, 3)
    assert negative.sum(1).tolist() == [6, 0, 30]
    assert not (negative & (labels > 0)).any()
    # Image 0: the 6 mined are the 6 largest background losses among its negatives.
    bg = -torch.log_softmax(conf[0], -1)[:, 0]
    bg[:2] = -1
    assert set(negative[0].nonzero().flatten().tolist()) == set(bg.topk(6).indices.tolist())


def test_no_positives_gives_zero_loss_and_finite_gradients():
    loc = torch.randn(2, 10, 4, requires_grad=True)
    conf = torch.randn(2, 10, 3, requires_grad=True)
    out = MultiBoxLoss()(loc, conf, torch.zeros(2, 10, 4), torch.zeros(2, 10, dtype=torch.long))
    assert out["loc"].item() == 0 and out["conf"].item() == 0
    (out["loc"] + out["conf"]).backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(conf.grad).all()


def test_gradients_only_reach_positives_and_mined_negatives():
    loc, conf, loc_t, labels = three_prior_batch()
    conf.requires_grad_(True)
    loc.requires_grad_(True)
    out = MultiBoxLoss(neg_pos_ratio=1)(loc, conf, loc_t, labels)
    (out["loc"] + out["conf"]).backward()
    assert conf.grad[0, 2].abs().sum() == 0  # easy negative not mined
    assert conf.grad[0, 1].abs().sum() > 0
    assert loc.grad[0, 1:].abs().sum() == 0  # negatives get no box gradient
    # d SmoothL1 / d loc at (0 - 0.5, 0 + 0.5, 0 - 2, 0): (-0.5, 0.5, -1, 0)
    torch.testing.assert_close(loc.grad[0, 0], torch.tensor([-0.5, 0.5, -1.0, 0.0]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_half_precision_inputs_and_autocast_give_float32_loss(device):
    torch.manual_seed(1)
    loc, conf = torch.randn(2, 40, 4, device=device), torch.randn(2, 40, 6, device=device) * 3
    loc_t = torch.randn(2, 40, 4, device=device)
    labels = torch.zeros(2, 40, dtype=torch.long, device=device)
    labels[:, :5] = torch.randint(1, 6, (2, 5))
    criterion = MultiBoxLoss()
    ref = criterion(loc, conf, loc_t, labels)
    with torch.autocast(device, dtype=torch.bfloat16):
        low = criterion(loc.bfloat16(), conf.bfloat16(), loc_t, labels)
    for key in ("loc", "conf"):
        assert low[key].dtype == torch.float32
        assert low[key].item() == pytest.approx(ref[key].item(), rel=2e-2)


def test_shape_errors():
    with pytest.raises(ValueError, match="loc and loc_targets"):
        MultiBoxLoss()(torch.zeros(1, 3, 4), torch.zeros(1, 3, 2), torch.zeros(1, 2, 4), torch.zeros(1, 3).long())
    with pytest.raises(ValueError, match="conf must be"):
        MultiBoxLoss()(torch.zeros(1, 3, 4), torch.zeros(1, 2, 2), torch.zeros(1, 3, 4), torch.zeros(1, 3).long())
