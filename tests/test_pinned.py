"""Behaviour pinned across refactors: the losses of a fixed batch (detection and every distiller) and the
weights after a few CPU training steps equal the values recorded in tests/data/pinned.json.

Regenerate the file only for an intended change of behaviour: ``python tests/test_pinned.py`` (the change
then shows in the diff of the JSON file).

Tolerance, derived: the values are float32 results of networks whose outputs are sums of at most K products
per layer, summed again over ~3000 priors; another machine's kernels (another instruction set, another
summation order) may round each sum differently, by at most K u relative (u = 2^-24) per layer, and to first
order the layers' errors add up. For these models u times the sum of K over all convolutions is ~2e-3 (the
test computes it from the models), so losses agree to that relative bound, and so do the weight *changes*
of a few steps (weights = initial + lr x gradients of those losses).
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PINNED = ROOT / "tests" / "data" / "pinned.json"
METHODS = ("chen2017", "hinton", "fgd", "crosskd")


def rounding_bound(*models: nn.Module) -> float:
    """u x the sum of the convolutions' accumulation lengths (see the module docstring)."""
    convs = [c for m in models for c in m.modules() if isinstance(c, nn.Conv2d)]
    return 2.0**-24 * sum(c.in_channels // c.groups * c.kernel_size[0] * c.kernel_size[1] for c in convs)


def pinned_values() -> dict:
    """The quantities pinned, computed by the code as it is now."""
    from test_distill import models, tiny_batch, tiny_cfg

    from odkd.engine import DetectionTask
    from odkd.engine.distill_task import build_distillation_task
    from odkd.engine.schedule import build_optimizer

    values: dict = {}
    batch = tiny_batch()
    student, teacher = models()
    values["detection"] = {k: v.item() for k, v in DetectionTask(student).train()(*batch).items()}
    task = build_distillation_task(tiny_cfg(f"distill.methods=[{', '.join(METHODS)}]"), student, teacher).train()
    values["distillers"] = {k: v.item() for k, v in task(*batch).items()}
    student, teacher = models("mobilenetv2_ssdlite300", dfl_bins=4)
    task = build_distillation_task(tiny_cfg("distill.methods=[ld]"), student, teacher).train()
    values["ld"] = {k: v.item() for k, v in task(*batch).items()}
    # Three SGD steps of every method together: the change of a few weights. Conditions that keep the steps a
    # smooth function of the inputs, so that rounding cannot send them elsewhere: BatchNorm with its running
    # statistics (the batch variance of two values at the 1x1 level is near zero and huge in its gradient),
    # every negative mined (ranking near-equal losses would let a rounding difference pick other priors), four
    # images (CrossKD's per-channel standard deviation at the 1x1 level is over the batch).
    images, boxes, labels = batch
    batch = (torch.cat([images, images.flip(-1)]), torch.cat([boxes, boxes]), torch.cat([labels, labels]))
    student, teacher = models()
    cfg = tiny_cfg(f"distill.methods=[{', '.join(METHODS)}]", "loss.neg_pos_ratio=1e6")
    task = build_distillation_task(cfg, student, teacher).train()
    for module in student.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tiny_cfg().optim, lr=1e-3)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    for _ in range(3):
        loss = sum(task(*batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    watched = ["backbone.features.16.conv.0.0.weight", "conf_heads.0.predictor.weight", "loc_heads.0.predictor.bias"]
    values["weight_changes"] = {k: (student.state_dict()[k] - initial[k]).flatten()[:16].tolist() for k in watched}
    values["bound"] = rounding_bound(student, teacher)
    return values


def test_losses_and_weights_are_pinned():
    expected = json.loads(PINNED.read_text())
    got = pinned_values()
    bound = got["bound"]
    for group in [g for g in expected if g not in ("weight_changes", "bound")]:
        assert set(got[group]) == set(expected[group]), group
        for term, value in expected[group].items():
            assert abs(got[group][term] - value) <= bound * abs(value), (group, term, got[group][term], value)
    for key, changes in expected["weight_changes"].items():
        scale = max(abs(c) for c in changes)
        for a, b in zip(got["weight_changes"][key], changes, strict=True):
            assert abs(a - b) <= bound * scale, (key, a, b)


if __name__ == "__main__":
    torch.set_num_threads(1)
    PINNED.write_text(json.dumps(pinned_values(), indent=1) + "\n")
    print(f"wrote {PINNED}")
