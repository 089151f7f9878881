"""A batch built to catch NMS that depends on an image's place in the batch."""

import torch

IMAGES, BOXES = 8, 60


def crowded_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``loc (64, 480, 4)``, ``conf (64, 480, 21)``, ``priors (480, 4)``: eight images of 60 small crowded
    boxes of class 20 (image i owns priors 60 i .. 60 i + 59, the rest is background), each placed first
    (i) and again last (63 - i) in a batch of 64, where NMS that shifts each (image, class) group by
    about twice its index in float32 (to ~2,700) rounds coordinates to 2.4e-4."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.45 + 0.1 * torch.rand(IMAGES * BOXES, 2, generator=g)
    sizes = 0.005 + 0.02 * torch.rand(IMAGES * BOXES, 2, generator=g)
    conf = torch.zeros(64, IMAGES * BOXES, 21)
    conf[..., 0] = 30.0
    scores = 30.0 + 3 * torch.randn(IMAGES, BOXES, generator=g)
    for i in range(IMAGES):
        conf[[i, 63 - i], i * BOXES : (i + 1) * BOXES, 20] = scores[i]
    return torch.zeros(64, IMAGES * BOXES, 4), conf, torch.cat((centres, sizes), 1)
