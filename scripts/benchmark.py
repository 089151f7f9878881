"""Benchmarks that print their numbers (speed targets live here, not in tests).

python scripts/benchmark.py loss      # matching + MultiBoxLoss on random data, CPU and CUDA
python scripts/benchmark.py models    # parameters, GMACs, inference latency of every architecture
python scripts/benchmark.py eval      # VOC AP: vectorised evaluation vs the per-detection reference loop
python scripts/benchmark.py train     # training throughput: images/s, peak memory, time per phase
python scripts/benchmark.py distill   # the same for distillation (student + frozen teacher + distillers)
python scripts/benchmark.py loader    # the training data pipeline alone
python scripts/benchmark.py demo      # accuracy: the CPU demo to convergence (distillers: scripts/compare.py)
python scripts/benchmark.py onnx --checkpoint CKPT   # CPU latency: PyTorch, onnxruntime float32 and INT8
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

# The parser's choices (these import torch, so --help does too); the benchmarks are imported when they run.
from odkd.eval import METRICS
from odkd.model_names import MODEL_NAMES, PRIOR_LAYOUT_NAMES

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_teacher_synthetic.yaml"


def print_loss(args: argparse.Namespace) -> None:
    import torch

    from odkd.bench.loss import time_loss
    from odkd.bench.synthetic import random_targets
    from odkd.bench.timing import benchmark_devices
    from odkd.priors import build_priors

    priors = build_priors(args.layout)
    boxes, labels = random_targets(args.batch, args.gt, torch.Generator().manual_seed(0))
    print(
        f"matching + MultiBoxLoss: batch {args.batch} x {priors.shape[0]} priors ({args.layout}) x {args.gt} GT, "
        f"{args.classes} classes; torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"{platform.processor() or platform.machine()}"
    )
    rows = []
    for device in benchmark_devices(args.device):
        t = time_loss(device, priors, boxes, labels, args.classes, args.iters, args.warmup)
        print(
            f"[{device.type}] positives per image {t.positives_per_image:.1f}, "
            f"loc loss {t.loc_loss:.4f}, conf loss {t.conf_loss:.4f}"
        )
        times = (t.match_ms, t.forward_ms, t.backward_ms, t.total_ms)
        rows.append(
            f"{device.type:<8}" + "".join(f"{ms:>{w}.2f}" for ms, w in zip(times, (10, 13, 17, 10), strict=True))
        )
    print(f"{'device':<8}{'match ms':>10}{'loss fwd ms':>13}{'loss fwd+bwd ms':>17}{'total ms':>10}")
    print("\n".join(rows))


def print_models(args: argparse.Namespace) -> None:
    import torch

    from odkd.bench.models import profile_model
    from odkd.bench.timing import benchmark_devices

    devices = benchmark_devices(args.device)
    print(f"inference latency, ms per image; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    columns = [f"{d.type} b{b}" for d in devices for b in args.batches]
    print(f"{'model':<26}{'params':>12}{'GMACs':>8}" + "".join(f"{c:>11}" for c in columns))
    for name in args.models:
        profile = profile_model(name, devices, args.batches, args.iters, args.warmup)
        latencies = "".join(f"{profile.ms_per_image[d, b]:>11.1f}" for d in devices for b in args.batches)
        print(f"{name:<26}{profile.params:>12,}{profile.gmacs:>8.2f}" + latencies, flush=True)


def print_eval_model(args: argparse.Namespace) -> None:
    """A detector's whole VOC evaluation, as evaluate.py runs it."""
    from odkd.bench.evaluation import time_model_evaluation
    from odkd.bench.synthetic import MAX_SIZE, MIN_SIZE

    t = time_model_evaluation(
        args.root, args.images, args.model, args.checkpoint, args.batch, args.workers, args.device, args.metric
    )
    print(
        f"end-to-end evaluation: {t.arch} ({args.checkpoint or 'random weights'}), {t.images} synthetic "
        f"{MIN_SIZE}-{MAX_SIZE} px JPEGs, batch {args.batch}, {args.workers} loader workers; {t.device}"
    )
    rows = (
        ("detection (decode, resize, forward, post-process)", t.detection_s, f"{t.detections} detections"),
        (f"devkit AP ({args.metric})", t.ap_s, f"mAP {100 * t.mAP:.2f}"),
        ("total", t.total_s, f"{t.images / t.total_s:.1f} images/s"),
    )
    for label, seconds, note in rows:
        print(f"{label:<50}{seconds:8.2f} s  {note}")


def print_eval(args: argparse.Namespace) -> None:
    if args.model or args.checkpoint:
        return print_eval_model(args)
    from odkd.bench.evaluation import time_ap
    from odkd.bench.synthetic import synthetic_voc_detections
    from odkd.class_names import VOC_CLASSES

    annotations, detections = synthetic_voc_detections(args.images, args.detections, args.seed)
    num_gt = sum(len(a.labels) for a in annotations)
    num_difficult = sum(int(a.difficult.sum()) for a in annotations)
    print(
        f"VOC evaluation ({args.metric}): {args.images} images, {len(VOC_CLASSES)} classes, {num_gt} GT "
        f"({num_difficult} difficult), {args.detections} detections; numpy {np.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    t = time_ap(annotations, detections, args.metric, args.iters)
    print(f"vectorised evaluate()        {t.vectorised_s * 1000:9.1f} ms (median of {args.iters})")
    print(f"reference loop evaluate()    {t.reference_s * 1000:9.1f} ms (one run, all detections)")
    print(f"speedup                      {t.reference_s / t.vectorised_s:9.1f}x")
    print(f"same per-class AP            {'yes' if t.same_ap else 'NO'} (mAP {100 * t.mAP:.2f}%)")
    print(
        f"read_devkit_results          {t.reading_s * 1000:9.1f} ms "
        f"({args.detections} lines in {len(VOC_CLASSES)} files)"
    )


def print_loader(args: argparse.Namespace) -> None:
    from odkd.bench.loader import build_benchmark_cache, loader_dataset, loader_rates
    from odkd.bench.synthetic import MAX_SIZE, MIN_SIZE

    dataset = loader_dataset(args.root, args.images, args.size)
    print(
        f"train pipeline (decode + photometric + expand + min-IoU crop + flip + resize {args.size}): "
        f"{len(dataset)} images of {MIN_SIZE}-{MAX_SIZE} px; {os.cpu_count()} CPUs"
    )
    cache, seconds = build_benchmark_cache(args.root, dataset, max(args.workers))
    print(f"decoded-image cache: {cache.path.stat().st_size / 2**20:.0f} MiB, ready in {seconds:.1f} s")
    for rate in loader_rates(dataset, cache, args.batch, args.workers, args.batches):
        if rate.workers is None:
            print(f"{rate.source:14s} one process (one core)  {rate.images_per_s:8.1f} images/s")
        else:
            print(
                f"{rate.source:14s} DataLoader, {rate.workers:2d} workers  {rate.images_per_s:8.1f} images/s "
                f"({rate.images_per_s / max(rate.workers, 1):.1f} per worker)"
            )


def print_train(args: argparse.Namespace) -> None:
    """Training (or distillation) throughput, then the step's phases."""
    import torch

    from odkd.bench.training import TrainingSetup, measure_training

    distill = args.benchmark == "distill"
    setup = TrainingSetup(
        model=args.model, width=args.width, batch=args.batch, iters=args.iters, warmup=args.warmup,
        workers=args.workers, images=args.images, root=args.root, device=args.device, amp=args.amp,
        channels_last=args.channels_last, compile=args.compile, compile_mode=args.compile_mode,
        gt_padding=args.gt_padding, cache=args.cache, teacher_model=args.teacher_model if distill else None,
        methods=tuple(args.methods) if distill else (),
    )  # fmt: skip
    t = measure_training(setup)
    if t is None:  # not the main process
        return
    what = f"{args.model} x{args.width}"
    if distill:
        what += f" distilled from {args.teacher_model} ({' + '.join(args.methods)})"
    print(
        f"{args.benchmark}: {what}, batch {args.batch} per process x {t.world_size}, "
        f"{t.image_size} px, {t.precision}, channels_last {args.channels_last}, "
        f"compile {args.compile} ({args.compile_mode}), GT slots {'fixed' if t.fixed_gt_slots else 'per batch'}, "
        f"{args.workers} loader workers; "
        f"{t.device}, torch {torch.__version__}"
    )
    timed = args.warmup + args.iters
    print(
        f"end to end, the trainer's loop: {t.images_per_s:.1f} images/s in total (iterations "
        f"{args.warmup + 1}-{timed}); {t.wall_s:.1f} s for all {t.iterations} iterations with start-up"
    )
    if t.peak_memory_gib is not None:
        print(f"peak GPU memory: {t.peak_memory_gib:.2f} GiB")
        print(f"GPU busy during the loop (NVML, after the first 20% of the run): {t.gpu_busy}")
    if t.phases_s is None:
        return
    step = sum(t.phases_s.values())
    print(f"phase breakdown (median per iteration, device synchronised after each phase, {args.iters} iterations):")
    for phase, seconds in t.phases_s.items():
        print(f"  {phase:<16}{1000 * seconds:9.1f} ms {100 * seconds / step:5.1f}%")
    busy_share = 1 - t.phases_s["data wait"] / step
    print(
        f"  {'step':<16}{1000 * step:9.1f} ms -> {args.batch / step:.1f} images/s; device busy {100 * busy_share:.1f}%"
    )


def print_demo(args: argparse.Namespace) -> None:
    import torch

    from odkd.bench.demo import train_demo

    run = train_demo(DEMO_CONFIG, args.iters, args.eval_every, args.output_dir, args.overrides, args.cpu)
    cfg, result = run.cfg, run.result
    curve = ", ".join(f"{iteration}: {100 * value:.1f}" for iteration, value in run.map_curve)
    print(
        f"demo ({cfg.model.name} x{cfg.model.width_mult}, batch {cfg.data.batch_size}, {args.iters} iterations, "
        f"{cfg.optim.schedule} lr {cfg.optim.lr}): {run.minutes:.1f} min, {torch.get_num_threads()} threads"
    )
    print(f"{cfg.eval.metric} mAP by iteration: {curve}")
    print(f"final mAP {100 * result.last_map:.2f}, best {100 * result.best_map:.2f}")


def print_onnx(args: argparse.Namespace) -> None:
    """CPU inference as PyTorch eager float32, onnxruntime float32 and onnxruntime INT8, at each batch size
    and thread count: preprocessing, network, box decoding and softmax (no NMS)."""
    import onnxruntime
    import torch

    from odkd.bench.onnx_latency import ONNX_FLOAT, benchmark_calibration, export_engines, time_engines
    from odkd.bench.timing import cpu_name
    from odkd.checkpoint import load_model

    model = load_model(args.checkpoint).eval()
    size = model.image_size
    calibration = benchmark_calibration(size, args.calibration, args.calibration_config, args.calibration_images)
    with tempfile.TemporaryDirectory() as folder:
        files = export_engines(model, Path(folder), calibration)
        print(
            f"CPU inference of {args.checkpoint} ({model.arch}, {size} px, {model.num_classes} classes): "
            f"preprocessing + network + decode + softmax, no NMS; INT8 calibrated on {calibration.description}; "
            f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {cpu_name()}"
        )
        print(f"median of {args.iters} interleaved runs after {args.warmup}; ratio = {ONNX_FLOAT} ms / ms")
        print(f"{'threads':>7}{'batch':>6}  {'engine':<42}{'ms/image':>10}{'images/s':>10}{'ratio':>7}")
        for t in time_engines(model, files, args.threads, args.batches, args.iters, args.warmup):
            print(
                f"{t.threads:>7}{t.batch:>6}  {t.engine:<42}{t.ms / t.batch:>10.2f}{1000 * t.batch / t.ms:>10.1f}"
                f"{t.ratio:>7.2f}"
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    loss = sub.add_parser("loss", help="matching + MultiBoxLoss on random targets")
    loss.add_argument("--batch", type=int, default=32)
    loss.add_argument("--gt", type=int, default=10, help="GT boxes per image")
    loss.add_argument("--classes", type=int, default=21)
    loss.add_argument("--layout", choices=sorted(PRIOR_LAYOUT_NAMES), default="ssd300")
    loss.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    loss.add_argument("--iters", type=int, default=10)
    loss.add_argument("--warmup", type=int, default=2)
    loss.set_defaults(run=print_loss)
    models = sub.add_parser("models", help="parameters, GMACs and inference latency per architecture")
    models.add_argument("--models", nargs="+", choices=sorted(MODEL_NAMES), default=list(MODEL_NAMES))
    models.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    models.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    models.add_argument("--iters", type=int, default=5)
    models.add_argument("--warmup", type=int, default=1)
    models.set_defaults(run=print_models)
    voc_eval = sub.add_parser("eval", help="VOC AP: vectorised evaluation vs the per-detection reference loop")
    voc_eval.add_argument("--images", type=int, default=5000, help="VOC07 test has 4952")
    voc_eval.add_argument("--detections", type=int, default=100_000)
    voc_eval.add_argument("--metric", choices=METRICS, default="voc07")
    voc_eval.add_argument("--seed", type=int, default=0)
    voc_eval.add_argument("--iters", type=int, default=5)
    voc_eval.add_argument("--model", choices=sorted(MODEL_NAMES), help="end to end: evaluate this (random) detector")
    voc_eval.add_argument("--checkpoint", help="end to end: evaluate this model file")
    voc_eval.add_argument("--batch", type=int, default=64, help="end to end: batch size")
    voc_eval.add_argument("--workers", type=int, default=8, help="end to end: loader workers")
    voc_eval.add_argument("--root", default="data/bench_eval", help="end to end: where the JPEGs are written")
    voc_eval.add_argument("--device", choices=["cuda", "cpu"], help="end to end: default cuda when available")
    voc_eval.set_defaults(run=print_eval)
    loader = sub.add_parser("loader", help="training data pipeline throughput")
    loader.add_argument("--root", default="data/bench_loader", help="where the benchmark images are written")
    loader.add_argument("--images", type=int, default=200)
    loader.add_argument("--size", type=int, default=300)
    loader.add_argument("--batch", type=int, default=32)
    loader.add_argument("--batches", type=int, default=12, help="batches timed per worker count")
    loader.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    loader.set_defaults(run=print_loader)
    for name, text in (("train", "training throughput"), ("distill", "distillation throughput")):
        train = sub.add_parser(name, help=f"{text}: images/s, peak GPU memory, time per phase (synthetic data)")
        train.add_argument("--model", choices=sorted(MODEL_NAMES), default="mobilenetv2_ssdlite300")
        train.add_argument("--width", type=float, default=1.0, help="width multiplier (MobileNetV2)")
        train.add_argument("--batch", type=int, default=64, help="per process")
        train.add_argument("--iters", type=int, default=50, help="timed iterations")
        train.add_argument("--warmup", type=int, default=10)
        train.add_argument("--workers", type=int, default=8)
        train.add_argument("--images", type=int, default=512, help="synthetic 375-500 px JPEGs to train on")
        train.add_argument("--root", default="data/bench_train")
        train.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
        train.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
        train.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
        train.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
        train.add_argument(
            "--compile-mode", default="default", help="torch.compile mode (reduce-overhead: CUDA graphs)"
        )
        train.add_argument("--gt-padding", choices=["auto", "batch", "dataset"], default="auto", help="data.gt_padding")
        train.add_argument("--cache", action="store_true", help="read decoded images from data.cache_dir")
        if name == "distill":
            train.add_argument("--teacher-model", choices=sorted(MODEL_NAMES), default="vgg16_lite300")
            train.add_argument("--methods", nargs="+", default=["chen2017"])
        train.set_defaults(run=print_train)
    demo = sub.add_parser("demo", help="train the CPU demo to convergence, report mAP and wall time")
    demo.add_argument("--iters", type=int, default=400)
    demo.add_argument("--eval-every", type=int, default=100)
    demo.add_argument("--output-dir", default="runs/benchmark_demo")
    demo.add_argument("--cpu", action="store_true", help="train on the CPU even if CUDA is present")
    demo.add_argument("overrides", nargs="*", help="more config overrides, section.key=value")
    demo.set_defaults(run=print_demo)
    onnx = sub.add_parser("onnx", help="CPU latency: PyTorch eager, onnxruntime float32 and INT8")
    onnx.add_argument("--checkpoint", required=True, help="odkd model file or training checkpoint")
    onnx.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    onnx.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    onnx.add_argument("--iters", type=int, default=20)
    onnx.add_argument("--warmup", type=int, default=3)
    onnx.add_argument("--calibration", type=int, default=32, help="INT8 calibration images")
    source = onnx.add_mutually_exclusive_group()
    source.add_argument("--calibration-config", help="calibrate on this config's training set (default: random)")
    source.add_argument("--calibration-images", help="calibrate on the images in this folder (default: random)")
    onnx.set_defaults(run=print_onnx)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    from odkd.engine.build import SCRIPT_ERRORS

    try:
        args.run(args)
    except SCRIPT_ERRORS as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
