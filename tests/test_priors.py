"""Prior boxes: counts per layout and single priors worked out by hand from docs/DESIGN.md §2."""

import dataclasses
import math

import pytest
import torch

from odkd.priors import LAYOUTS, build_priors, get_layout


@pytest.mark.parametrize(("name", "count"), [("ssd300", 8732), ("lite300", 3000), ("lite320", 3234)])
def test_prior_counts(name, count):
    priors = build_priors(name)
    assert priors.shape == (count, 4)
    assert priors.dtype == torch.float32
    assert get_layout(name).num_priors == count
    assert ((priors >= 0) & (priors <= 1)).all()


def test_ssd300_boxes_per_location():
    # 38²·4 + 19²·6 + 10²·6 + 5²·6 + 3²·4 + 1·4 = 5776 + 2166 + 600 + 150 + 36 + 4
    assert LAYOUTS["ssd300"].boxes_per_location == (4, 6, 6, 6, 4, 4)


def test_ssd300_first_cell():
    p = build_priors("ssd300")
    c = 0.5 / (300 / 8)  # = 1/75
    s = math.sqrt(30 * 60) / 300
    expected = [
        [c, c, 0.1, 0.1],  # 30/300
        [c, c, s, s],
        [c, c, 30 * math.sqrt(2) / 300, 30 / math.sqrt(2) / 300],
        [c, c, 30 / math.sqrt(2) / 300, 30 * math.sqrt(2) / 300],
    ]
    torch.testing.assert_close(p[:4], torch.tensor(expected), rtol=0, atol=1e-7)
    assert p[0, 0].item() == pytest.approx(0.0133333, abs=1e-6)
    assert p[1, 2].item() == pytest.approx(0.1414214, abs=1e-6)


def test_cells_go_row_by_row():
    p = build_priors("ssd300")
    # Second cell of the first row: column j = 1, row i = 0.
    assert p[4, :2].tolist() == pytest.approx([1.5 / 37.5, 0.5 / 37.5], abs=1e-7)
    # First cell of the second row: i = 1, j = 0 (38 cells of 4 priors further on).
    assert p[38 * 4, :2].tolist() == pytest.approx([0.5 / 37.5, 1.5 / 37.5], abs=1e-7)


def test_ssd300_ratio3_box():
    p = build_priors("ssd300")
    # Level 1 (19x19, step 16, min 60) starts after 38*38*4 = 5776 priors; per cell the order is
    # sq(60), sq(sqrt(60*111)), ar2, ar2', ar3, ar3' -> the ratio-3 box is the 5th of the cell.
    start = 5776
    cx = 0.5 / (300 / 16)
    assert p[start + 4].tolist() == pytest.approx([cx, cx, 0.3464102, 0.1154701], abs=1e-6)
    assert p[start + 5].tolist() == pytest.approx([cx, cx, 0.1154701, 0.3464102], abs=1e-6)
    assert p[start + 1, 2].item() == pytest.approx(math.sqrt(60 * 111) / 300, abs=1e-7)


def test_ssd300_last_cell_is_clipped():
    p = build_priors("ssd300")
    # 1x1 level: centre 0.5; min 264, max 315, ratio 2: 264*sqrt(2)/300 = 1.2445 -> clipped to 1.
    expected = [
        [0.5, 0.5, 0.88, 0.88],
        [0.5, 0.5, 0.9612491, 0.9612491],
        [0.5, 0.5, 1.0, 0.6222540],
        [0.5, 0.5, 0.6222540, 1.0],
    ]
    torch.testing.assert_close(p[-4:], torch.tensor(expected), rtol=0, atol=1e-6)


def test_clip_can_be_disabled():
    layout = dataclasses.replace(LAYOUTS["ssd300"], clip=False)
    p = build_priors(layout)
    assert p[-2, 2].item() == pytest.approx(264 * math.sqrt(2) / 300, abs=1e-6)  # 1.2445
    assert p.max().item() > 1


def test_lite300_layout():
    p = build_priors("lite300")
    # First cell: centre 0.5/18.75, min 60 -> 0.2, sqrt(60*105)/300.
    c = 0.5 / 18.75
    assert p[0].tolist() == pytest.approx([c, c, 0.2, 0.2], abs=1e-7)
    assert p[1, 2].item() == pytest.approx(math.sqrt(60 * 105) / 300, abs=1e-7)
    # Last cell 1x1, min 285, max 330: sqrt(285*330)/300 = 1.0223 -> clipped.
    assert p[-6].tolist() == pytest.approx([0.5, 0.5, 0.95, 0.95], abs=1e-7)
    assert p[-5, 2].item() == 1.0


def test_lite320_step_107():
    p = build_priors("lite320")
    assert p[0].tolist() == pytest.approx([0.025, 0.025, 60 / 320, 60 / 320], abs=1e-7)
    # Level 3: 3x3, step 107; cells before it: (400 + 100 + 25) * 6 = 3150.
    # Cell (row 0, col 2): cx = 2.5 / (320/107) = 267.5/320 = 0.8359375.
    assert p[3150 + 2 * 6, :2].tolist() == pytest.approx([0.8359375, 0.5 * 107 / 320], abs=1e-7)


def test_layout_from_dict_and_errors():
    layout = {
        "image_size": 100,
        "feature_sizes": [2],
        "steps": [50],
        "min_sizes": [20],
        "max_sizes": [80],
        "aspect_ratios": [[2]],
    }
    p = build_priors(layout)
    # 2x2 cells x 4 boxes; cell (0, 1): centre (0.75, 0.25); sqrt(20*80)/100 = 0.4.
    assert p.shape == (16, 4)
    assert p[5].tolist() == pytest.approx([0.75, 0.25, 0.4, 0.4], abs=1e-7)

    with pytest.raises(ValueError, match="unknown key"):
        build_priors({**layout, "stride": [50]})
    with pytest.raises(ValueError, match="missing key"):
        build_priors({k: v for k, v in layout.items() if k != "steps"})
    with pytest.raises(ValueError, match="steps has 2 entries"):
        build_priors({**layout, "steps": [50, 25]})
    with pytest.raises(ValueError, match="max_sizes"):
        build_priors({**layout, "max_sizes": [10]})
    with pytest.raises(ValueError, match="must hold numbers"):
        build_priors({**layout, "min_sizes": ["20"]})
    with pytest.raises(ValueError, match="unknown prior layout 'ssd512'"):
        build_priors("ssd512")
