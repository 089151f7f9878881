"""Benchmarks that print their numbers (speed targets live here, not in tests).

python scripts/benchmark.py loss      # matching + MultiBoxLoss on random data, CPU and CUDA
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from odkd.losses import MultiBoxLoss
from odkd.matching import match
from odkd.models import MODELS, build_model
from odkd.priors import LAYOUTS, build_priors


def _devices(requested: str) -> list[torch.device]:
    if requested == "all":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return [torch.device(requested)]


def _time_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Median wall time of ``fn`` in milliseconds (synchronising CUDA around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def random_targets(batch: int, num_gt: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, num_gt, 4)`` xyxy boxes of side 0.05-0.6 inside the image and ``(B, num_gt)`` labels 1..20."""
    centre = torch.rand(batch, num_gt, 2, generator=generator) * 0.8 + 0.1
    size = torch.rand(batch, num_gt, 2, generator=generator) * 0.55 + 0.05
    boxes = torch.cat((centre - size / 2, centre + size / 2), dim=-1).clamp(0.0, 1.0)
    labels = torch.randint(1, 21, (batch, num_gt), generator=generator)
    return boxes, labels


def _loss_row(device: torch.device, args: argparse.Namespace, priors, boxes, labels) -> str:
    """Time matching, loss forward and loss forward+backward on one device; return a table row."""
    priors, boxes, labels = priors.to(device), boxes.to(device), labels.to(device)
    num_priors = priors.shape[0]
    loc = torch.randn(args.batch, num_priors, 4, device=device, requires_grad=True)
    conf = torch.randn(args.batch, num_priors, args.classes, device=device, requires_grad=True)
    criterion = MultiBoxLoss(neg_pos_ratio=3)
    loc_t, conf_t = match(boxes, labels, priors)
    losses = criterion(loc, conf, loc_t, conf_t)
    print(
        f"[{device.type}] positives per image {(conf_t > 0).sum(1).float().mean():.1f}, "
        f"loc loss {losses['loc'].item():.4f}, conf loss {losses['conf'].item():.4f}"
    )

    def loss_backward(loc_t: torch.Tensor, conf_t: torch.Tensor) -> None:
        out = criterion(loc, conf, loc_t, conf_t)
        (out["loc"] + out["conf"]).backward()

    times = [
        _time_ms(lambda: match(boxes, labels, priors), device, args.iters, args.warmup),
        _time_ms(lambda: criterion(loc, conf, loc_t, conf_t), device, args.iters, args.warmup),
        _time_ms(lambda: loss_backward(loc_t, conf_t), device, args.iters, args.warmup),
        _time_ms(lambda: loss_backward(*match(boxes, labels, priors)), device, args.iters, args.warmup),
    ]
    return f"{device.type:<8}" + "".join(f"{t:>{w}.2f}" for t, w in zip(times, (10, 13, 17, 10), strict=True))


def bench_loss(args: argparse.Namespace) -> None:
    priors = build_priors(args.layout)
    boxes, labels = random_targets(args.batch, args.gt, torch.Generator().manual_seed(0))
    print(
        f"matching + MultiBoxLoss: batch {args.batch} x {priors.shape[0]} priors ({args.layout}) x {args.gt} GT, "
        f"{args.classes} classes; torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"{platform.processor() or platform.machine()}"
    )
    rows = [_loss_row(device, args, priors, boxes, labels) for device in _devices(args.device)]
    print(f"{'device':<8}{'match ms':>10}{'loss fwd ms':>13}{'loss fwd+bwd ms':>17}{'total ms':>10}")
    print("\n".join(rows))


def count_gmacs(model: torch.nn.Module, image_size: int) -> float:
    """Multiply-accumulates of one forward pass on one image, in billions (torch's FLOP counter / 2)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 2e9


def _latency_ms(model: torch.nn.Module, device: torch.device, batch: int, args: argparse.Namespace) -> float:
    """Median ms per image of inference at ``batch``; CUDA runs bf16 autocast + channels_last."""
    size = model.image_size
    images = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def forward() -> None:
        with torch.inference_mode(), autocast:
            model(images)

    return _time_ms(forward, device, args.iters, args.warmup) / batch


def bench_models(args: argparse.Namespace) -> None:
    devices = _devices(args.device)
    print(f"inference latency, ms per image; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    columns = [f"{d.type} b{b}" for d in devices for b in args.batches]
    print(f"{'model':<26}{'params':>12}{'GMACs':>8}" + "".join(f"{c:>11}" for c in columns))
    for name in args.models:
        model = build_model(name, num_classes=21).eval()
        params = sum(p.numel() for p in model.parameters())
        row = f"{name:<26}{params:>12,}{count_gmacs(model, model.image_size):>8.2f}"
        for device in devices:
            model = model.to(device)
            row += "".join(f"{_latency_ms(model, device, b, args):>11.1f}" for b in args.batches)
        print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    loss = sub.add_parser("loss", help="matching + MultiBoxLoss on random targets")
    loss.add_argument("--batch", type=int, default=32)
    loss.add_argument("--gt", type=int, default=10, help="GT boxes per image")
    loss.add_argument("--classes", type=int, default=21)
    loss.add_argument("--layout", choices=sorted(LAYOUTS), default="ssd300")
    loss.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    loss.add_argument("--iters", type=int, default=10)
    loss.add_argument("--warmup", type=int, default=2)
    loss.set_defaults(run=bench_loss)
    models = sub.add_parser("models", help="parameters, GMACs and inference latency per architecture")
    models.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    models.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    models.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    models.add_argument("--iters", type=int, default=5)
    models.add_argument("--warmup", type=int, default=1)
    models.set_defaults(run=bench_models)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
