"""Post-processing: threshold, NMS, caps, clipping; boxes built so the answer is known by hand."""

import math

import pytest
import torch
from _crowded import BOXES, IMAGES, crowded_batch

from odkd.postprocess import postprocess
from odkd.postprocess_settings import PostprocessSettings

CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Priors chosen as the boxes themselves (loc = 0 decodes to the prior). xyxy:
#   A (0.10, 0.10, 0.50, 0.50)   B (0.12, 0.10, 0.52, 0.50): IoU(A, B) = 0.152 / 0.168 = 0.905
#   D (0.30, 0.10, 0.70, 0.50): IoU(A, D) = 0.08 / 0.24 = 0.333     E: a background box
PRIORS = torch.tensor([[0.30, 0.30, 0.4, 0.4], [0.32, 0.30, 0.4, 0.4], [0.50, 0.30, 0.4, 0.4], [0.50, 0.80, 0.2, 0.2]])
# Class probabilities (background, class 1, class 2) per prior.
PROBS = torch.tensor(
    [
        [0.099999, 0.9, 0.000001],  # A: class 1 at 0.9; class 2 far below the 0.01 threshold
        [0.1, 0.6, 0.3],  # B: class 1 suppressed by A; class 2 survives (NMS is per class)
        [0.299999, 0.7, 0.000001],  # D: class 1 kept (IoU with A < 0.45)
        [0.995, 0.005, 0.0],  # E: class 1 at 0.005 < 0.01
    ]
)


def run(**kwargs):
    logits = PROBS.clamp(min=1e-12).log()
    background = torch.tensor([0.0, -20.0, -20.0]).expand(4, 3)
    conf = torch.stack([logits, background, logits])
    loc = torch.zeros(3, 4, 4)
    return postprocess(loc, conf, PRIORS, PostprocessSettings(**kwargs))


def test_threshold_and_nms():
    out = run()
    assert len(out) == 3
    det = out[0]
    assert det.labels.tolist() == [1, 1, 2]
    assert det.scores.tolist() == pytest.approx([0.9, 0.7, 0.3], abs=1e-5)
    expected = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.3, 0.1, 0.7, 0.5], [0.12, 0.1, 0.52, 0.5]])
    torch.testing.assert_close(det.boxes, expected)
    # Image 1 is all background; image 2 repeats image 0 and is not suppressed across images.
    assert len(out[1].boxes) == 0 and out[1].boxes.shape == (0, 4)
    for a, b in zip(out[0], out[2], strict=True):
        torch.testing.assert_close(a, b)


def test_nms_threshold_is_configurable():
    # At IoU threshold 0.95, B (IoU 0.905 with A) survives in class 1 too.
    det = run(nms_threshold=0.95)[0]
    assert det.labels.tolist() == [1, 1, 1, 2]
    assert det.scores.tolist() == pytest.approx([0.9, 0.7, 0.6, 0.3], abs=1e-5)
    # A higher score threshold removes B's class-2 detection.
    assert run(score_threshold=0.5)[0].labels.tolist() == [1, 1]


def test_top_k_per_class_and_cap_per_image():
    det = run(top_k=1)[0]  # only the best prior per class enters NMS
    assert det.labels.tolist() == [1, 2]
    assert det.scores.tolist() == pytest.approx([0.9, 0.3], abs=1e-5)
    det = run(max_detections=2)[0]  # the two highest scores of the image
    assert det.scores.tolist() == pytest.approx([0.9, 0.7], abs=1e-5)


def test_decode_and_clip():
    priors = torch.tensor([[0.9, 0.5, 0.2, 0.2]])
    loc = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])  # cx = 0.9 + 1 * 0.1 * 0.2 = 0.92
    conf = torch.tensor([[[0.0, math.log(9.0)]]])  # class 1 probability 0.9
    det = postprocess(loc, conf, priors)[0]
    torch.testing.assert_close(det.boxes, torch.tensor([[0.82, 0.4, 1.0, 0.6]]))
    det = postprocess(loc, conf, priors, PostprocessSettings(clip=False))[0]
    torch.testing.assert_close(det.boxes, torch.tensor([[0.82, 0.4, 1.02, 0.6]]))
    assert det.scores.item() == pytest.approx(0.9)


def test_many_priors_cap_holds():
    torch.manual_seed(0)
    priors = torch.rand(3000, 4) * 0.5 + 0.25
    conf = torch.randn(2, 3000, 21) * 4
    loc = torch.randn(2, 3000, 4)
    out = postprocess(loc, conf, priors, PostprocessSettings(max_detections=50))
    for det in out:
        assert len(det.boxes) == 50
        assert (det.scores[:-1] >= det.scores[1:]).all()
        assert ((det.boxes >= 0) & (det.boxes <= 1)).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_an_images_detections_do_not_depend_on_its_place_in_the_batch(device):
    """One NMS call serves the batch (960 candidates: few enough for torchvision's coordinate-offset
    path on CPU as well); each image placed first and last in the batch gives the same detections."""
    for seed in range(6):
        loc, conf, priors = crowded_batch(seed)
        out = postprocess(loc.to(device), conf.to(device), priors.to(device))
        for i in range(IMAGES):
            assert 10 < len(out[i].scores) < BOXES
            assert all(torch.equal(a, b) for a, b in zip(out[i], out[63 - i], strict=True)), (seed, i)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_detections_and_on_cpu_copies_them_back():
    logits = PROBS.clamp(min=1e-12).log()
    loc, conf = torch.zeros(2, 4, 4), torch.stack([logits, logits.flip(0)])
    expected = postprocess(loc, conf, PRIORS)
    on_gpu = postprocess(loc.cuda(), conf.cuda(), PRIORS.cuda())
    copied = postprocess(loc.cuda(), conf.cuda(), PRIORS.cuda(), on_cpu=True)
    assert on_gpu[0].boxes.is_cuda and not copied[0].boxes.is_cuda
    for want, gpu, cpu in zip(expected, on_gpu, copied, strict=True):
        for a, b, c in zip(want, gpu, cpu, strict=True):
            torch.testing.assert_close(b.cpu(), a)
            torch.testing.assert_close(c, a)
