"""The two published networks written as plain functions of their own state dicts.

These follow the architectures as documented (docs/DESIGN.md §3 and the key layouts in
tests/data/checkpoint_layouts.json, which are ssd.pytorch's and qfgaohao's state-dict layouts), with
torch.nn.functional only. They share no code with odkd, so an imported odkd model that computes the
same outputs has its weights in the right places and its prior order right.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

LAYOUTS = json.loads((Path(__file__).parent / "data" / "checkpoint_layouts.json").read_text())
SSD_PYTORCH = next(v for k, v in LAYOUTS.items() if k.startswith("ssd.pytorch"))
QFGAOHAO = next(v for k, v in LAYOUTS.items() if k.startswith("qfgaohao"))


def random_state_dict(layout: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the checkpoint's keys and shapes, scaled to keep activations sane."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout["state_dict"]:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key == "L2Norm.weight":
            state[key] = 20 + torch.randn(shape, generator=g)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif key.endswith("weight") and len(shape) == 1:  # BN gamma
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:  # biases, BN beta, running_mean
            state[key] = 0.1 * torch.randn(shape, generator=g)
    return state


def _flatten(maps, last):
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, last) for m in maps], dim=1)


def ssd_pytorch_forward(sd, x, num_classes=21):
    """VGG16-SSD300 of ssd.pytorch: returns (loc (B, 8732, 4), conf (B, 8732, C))."""
    sources = []
    for step in (0, 2, "M", 5, 7, "M", 10, 12, 14, "C", 17, 19, 21, "L2", "M", 24, 26, 28):
        if step == "M":
            x = F.max_pool2d(x, 2, 2)
        elif step == "C":
            x = F.max_pool2d(x, 2, 2, ceil_mode=True)
        elif step == "L2":
            norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10
            sources.append(x / norm * sd["L2Norm.weight"].view(1, -1, 1, 1))
        else:
            x = F.relu(F.conv2d(x, sd[f"vgg.{step}.weight"], sd[f"vgg.{step}.bias"], padding=1))
    x = F.max_pool2d(x, 3, 1, 1)
    x = F.relu(F.conv2d(x, sd["vgg.31.weight"], sd["vgg.31.bias"], padding=6, dilation=6))
    x = F.relu(F.conv2d(x, sd["vgg.33.weight"], sd["vgg.33.bias"]))
    sources.append(x)
    for k in range(8):
        down = k in (1, 3)  # the first two 3x3 extras are stride 2, padding 1; the last two valid
        x = F.relu(F.conv2d(x, sd[f"extras.{k}.weight"], sd[f"extras.{k}.bias"], stride=1 + down, padding=int(down)))
        if k % 2:
            sources.append(x)
    loc = [F.conv2d(s, sd[f"loc.{k}.weight"], sd[f"loc.{k}.bias"], padding=1) for k, s in enumerate(sources)]
    conf = [F.conv2d(s, sd[f"conf.{k}.weight"], sd[f"conf.{k}.bias"], padding=1) for k, s in enumerate(sources)]
    return _flatten(loc, 4), _flatten(conf, num_classes)


def qfgaohao_forward(sd, x, num_classes=21):
    """MobileNetV2-SSDLite of qfgaohao (eval mode): returns (loc (B, 3000, 4), conf (B, 3000, C))."""

    def conv(x, key, stride=1, padding=0, groups=1):
        return F.conv2d(x, sd[key + ".weight"], sd.get(key + ".bias"), stride, padding, 1, groups)

    def bn(x, key):
        return F.batch_norm(
            x,
            sd[key + ".running_mean"],
            sd[key + ".running_var"],
            sd[key + ".weight"],
            sd[key + ".bias"],
            False,
            0.0,
            1e-5,
        )

    def expanding_block(x, prefix, stride):
        h = F.relu6(bn(conv(x, prefix + ".0"), prefix + ".1"))
        expansion = h
        h = F.relu6(bn(conv(h, prefix + ".3", stride, 1, groups=h.shape[1]), prefix + ".4"))
        h = bn(conv(h, prefix + ".6"), prefix + ".7")
        residual = stride == 1 and h.shape[1] == x.shape[1]
        return (x + h if residual else h), expansion

    x = F.relu6(bn(conv(x, "base_net.0.0", 2, 1), "base_net.0.1"))
    h = F.relu6(bn(conv(x, "base_net.1.conv.0", 1, 1, groups=x.shape[1]), "base_net.1.conv.1"))
    x = bn(conv(h, "base_net.1.conv.3"), "base_net.1.conv.4")
    sources = []
    for i in range(2, 18):
        x, expansion = expanding_block(x, f"base_net.{i}.conv", 2 if i in (2, 4, 7, 14) else 1)
        if i == 14:
            sources.append(expansion)
    x = F.relu6(bn(conv(x, "base_net.18.0"), "base_net.18.1"))
    sources.append(x)
    for k in range(4):
        x, _ = expanding_block(x, f"extras.{k}.conv", 2)
        sources.append(x)

    def head(name, k, s):
        if k == 5:
            return conv(s, f"{name}.5")
        h = F.relu6(bn(conv(s, f"{name}.{k}.0", 1, 1, groups=s.shape[1]), f"{name}.{k}.1"))
        return conv(h, f"{name}.{k}.3")

    loc = [head("regression_headers", k, s) for k, s in enumerate(sources)]
    conf = [head("classification_headers", k, s) for k, s in enumerate(sources)]
    return _flatten(loc, 4), _flatten(conf, num_classes)
