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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from odkd.class_names import VOC_CLASSES
from odkd.data import DatasetError
from odkd.data.voc import Annotation
from odkd.device import select_device
from odkd.engine import TrainingError, read_metrics
from odkd.engine.trainer import HookBase
from odkd.eval import (
    METRICS,
    evaluate,
    evaluate_dataset,
    match_detections_reference,
    read_devkit_results,
    write_devkit_results,
)
from odkd.losses import MultiBoxLoss
from odkd.matching import match
from odkd.models import MODELS, build_model
from odkd.priors import LAYOUTS, build_priors


def _devices(requested: str) -> list[torch.device]:
    if requested == "all":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [select_device(requested)]


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


def _random_pixel_boxes(image_sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One box per ``(width, height)`` row of ``image_sizes``: sides 5-70% of the image, devkit pixels."""
    size = rng.uniform(0.05, 0.7, image_sizes.shape) * image_sizes
    centre = rng.uniform(0.0, 1.0, image_sizes.shape) * image_sizes
    return _clip_to_image(np.concatenate((centre - size / 2, centre + size / 2), axis=1), image_sizes)


def _clip_to_image(boxes: np.ndarray, image_sizes: np.ndarray) -> np.ndarray:
    """Round ``(n, 4)`` boxes to whole pixels inside ``[1, width] x [1, height]``, corners in order."""
    low = np.clip(np.round(np.minimum(boxes[:, :2], boxes[:, 2:])), 1, image_sizes)
    high = np.clip(np.round(np.maximum(boxes[:, :2], boxes[:, 2:])), low, image_sizes)
    return np.concatenate((low, high), axis=1)


def synthetic_voc(
    num_images: int, num_detections: int, seed: int
) -> tuple[list[Annotation], dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """VOC-like annotations and detections for the 20 VOC classes.

    Images are 300-500 pixels a side with 1 + Poisson(1.5) objects each, 15% difficult, "person" 8x as
    frequent as any other class. Half the detections are GT boxes jittered by ~10% of their size (90% with
    the right class, scores ~ Beta(4, 2)), half are random boxes in random images (scores ~ Beta(1.5, 6)).
    """
    rng = np.random.default_rng(seed)
    image_sizes = rng.integers(300, 501, (num_images, 2)).astype(np.float64)
    counts = 1 + rng.poisson(1.5, num_images)
    gt_image = np.repeat(np.arange(num_images), counts)
    gt_boxes = _random_pixel_boxes(image_sizes[gt_image], rng)
    frequency = np.where(np.array(VOC_CLASSES) == "person", 8.0, 1.0)
    gt_labels = rng.choice(len(VOC_CLASSES), len(gt_image), p=frequency / frequency.sum()) + 1
    gt_difficult = rng.random(len(gt_image)) < 0.15
    starts = np.cumsum(counts) - counts
    annotations = [
        Annotation(
            f"{i:06d}",
            int(w),
            int(h),
            gt_boxes[s : s + n].astype(np.float32),
            gt_labels[s : s + n],
            gt_difficult[s : s + n],
        )
        for i, ((w, h), s, n) in enumerate(zip(image_sizes.tolist(), starts, counts, strict=True))
    ]

    near = rng.integers(0, len(gt_image), num_detections // 2)
    gt_size = np.tile(gt_boxes[near, 2:] - gt_boxes[near, :2], 2)
    near_boxes = _clip_to_image(
        gt_boxes[near] + rng.normal(0.0, 0.1, gt_size.shape) * gt_size, image_sizes[gt_image[near]]
    )
    wrong_class = rng.random(len(near)) >= 0.9
    near_labels = np.where(wrong_class, rng.integers(1, len(VOC_CLASSES) + 1, len(near)), gt_labels[near])
    far_image = rng.integers(0, num_images, num_detections - len(near))
    image = np.concatenate((gt_image[near], far_image))
    boxes = np.concatenate((near_boxes, _random_pixel_boxes(image_sizes[far_image], rng)))
    labels = np.concatenate((near_labels, rng.integers(1, len(VOC_CLASSES) + 1, len(far_image))))
    scores = np.concatenate((rng.beta(4, 2, len(near)), rng.beta(1.5, 6, len(far_image)))).round(6)
    image_ids = np.array([a.image_id for a in annotations])[image]
    detections = {}
    for label, name in enumerate(VOC_CLASSES, start=1):
        of_class = labels == label
        detections[name] = (image_ids[of_class], scores[of_class], boxes[of_class])
    return annotations, detections


def _benchmark_classes() -> list[str]:
    """VOC's 20 object classes for the heads' sizes: the five synthetic ones and 15 that never occur."""
    from odkd.class_names import SYNTHETIC_CLASSES

    return [*SYNTHETIC_CLASSES, *(f"unused{i}" for i in range(20 - len(SYNTHETIC_CLASSES)))]


def bench_eval_model(args: argparse.Namespace) -> None:
    """A detector's whole VOC evaluation, as evaluate.py runs it: JPEG decoding and resizing in the loader
    workers, forward (bf16 + channels_last on CUDA), post-processing, devkit AP."""
    from odkd.checkpoint import load_model
    from odkd.data import VOCDataset
    from odkd.data.synthetic import make_synthetic_voc
    from odkd.inference import detect_dataset

    make_synthetic_voc(args.root, {"test": args.images}, min_size=375, max_size=500)
    classes = _benchmark_classes()
    if args.checkpoint:
        model = load_model(args.checkpoint)
        classes = classes[: model.num_classes - 1]
    else:
        model = build_model(args.model, num_classes=len(classes) + 1)
    dataset = VOCDataset(args.root, "SYN_test", classes)
    device = select_device(args.device)
    with torch.inference_mode():  # CUDA context and kernel selection are start-up, not evaluation
        model.eval().to(device)(torch.zeros(args.batch, 3, model.image_size, model.image_size, device=device))
    start = time.perf_counter()
    detections = detect_dataset(model, dataset, device, args.batch, args.workers, progress=False)
    detected = time.perf_counter()
    result = evaluate_dataset(detections, dataset, args.metric)
    done = time.perf_counter()
    count = sum(len(d.scores) for d in detections.values())
    print(
        f"end-to-end evaluation: {model.arch} ({args.checkpoint or 'random weights'}), {len(dataset)} synthetic "
        f"375-500 px JPEGs, batch {args.batch}, {args.workers} loader workers; {_device_name(device)}"
    )
    rows = (
        ("detection (decode, resize, forward, post-process)", detected - start, f"{count} detections"),
        (f"devkit AP ({args.metric})", done - detected, f"mAP {100 * result.mAP:.2f}"),
        ("total", done - start, f"{len(dataset) / (done - start):.1f} images/s"),
    )
    for label, seconds, note in rows:
        print(f"{label:<50}{seconds:8.2f} s  {note}")


def bench_eval(args: argparse.Namespace) -> None:
    if args.model or args.checkpoint:
        return bench_eval_model(args)
    annotations, detections = synthetic_voc(args.images, args.detections, args.seed)
    num_gt = sum(len(a.labels) for a in annotations)
    num_difficult = sum(int(a.difficult.sum()) for a in annotations)
    print(
        f"VOC evaluation ({args.metric}): {args.images} images, {len(VOC_CLASSES)} classes, {num_gt} GT "
        f"({num_difficult} difficult), {args.detections} detections; numpy {np.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        fast = evaluate(detections, annotations, VOC_CLASSES, args.metric)
        times.append(time.perf_counter() - start)
    vectorised = statistics.median(times)
    start = time.perf_counter()
    loop = evaluate(detections, annotations, VOC_CLASSES, args.metric, matcher=match_detections_reference)
    reference = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        write_devkit_results(folder, "test", VOC_CLASSES, detections)
        start = time.perf_counter()
        read_devkit_results(folder, "test", VOC_CLASSES)
        reading = time.perf_counter() - start
    print(f"vectorised evaluate()        {vectorised * 1000:9.1f} ms (median of {args.iters})")
    print(f"reference loop evaluate()    {reference * 1000:9.1f} ms (one run, all detections)")
    print(f"speedup                      {reference / vectorised:9.1f}x")
    print(f"same per-class AP            {'yes' if fast.ap == loop.ap else 'NO'} (mAP {100 * fast.mAP:.2f}%)")
    print(
        f"read_devkit_results          {reading * 1000:9.1f} ms ({args.detections} lines in {len(VOC_CLASSES)} files)"
    )


def bench_loader(args: argparse.Namespace) -> None:
    from odkd.class_names import SYNTHETIC_CLASSES
    from odkd.data import VOCDataset, build_loader, build_transform
    from odkd.data.image_cache import ImageCache
    from odkd.data.synthetic import make_synthetic_voc

    # VOC-like image sizes (VOC photos are mostly 500 x 375-500) and JPEG decoding.
    make_synthetic_voc(args.root, {"trainval": args.images}, min_size=375, max_size=500)
    dataset = VOCDataset(args.root, "SYN_trainval", SYNTHETIC_CLASSES, transform=build_transform(True, args.size))
    print(
        f"train pipeline (decode + photometric + expand + min-IoU crop + flip + resize {args.size}): "
        f"{len(dataset)} images of 375-500 px; {os.cpu_count()} CPUs"
    )
    start = time.perf_counter()
    cache = ImageCache.for_images(
        Path(args.root) / "cache", dataset.image_paths, dataset.image_shapes, workers=max(args.workers), progress=False
    )
    files = dataset.images
    size = cache.path.stat().st_size / 2**20
    print(f"decoded-image cache: {size:.0f} MiB, ready in {time.perf_counter() - start:.1f} s")
    for source in ("JPEG files", "decoded cache"):
        dataset.images = cache if source == "decoded cache" else files
        start = time.perf_counter()
        for i in range(args.images):
            dataset[(i, i)]
        per_core = args.images / (time.perf_counter() - start)
        print(f"{source:14s} one process (one core)  {per_core:8.1f} images/s")
        for workers in args.workers:
            loader = build_loader(dataset, args.batch, train=True, num_workers=workers, max_iters=args.batches)
            iterator = iter(loader)
            next(iterator)  # worker start-up is not throughput
            start = time.perf_counter()
            count = sum(batch["images"].shape[0] for batch in iterator)
            rate = count / (time.perf_counter() - start)
            print(
                f"{source:14s} DataLoader, {workers:2d} workers  {rate:8.1f} images/s "
                f"({rate / max(workers, 1):.1f} per worker)"
            )


def _train_config(args: argparse.Namespace, output_dir: str, max_iters: int, log_every: int):
    """The benchmark's run config: --model at --batch, synthetic 375-500 px JPEGs, AMP / channels_last /
    compile as asked, no evaluation, a checkpoint only at the end."""
    from odkd.config import load_config

    classes = _benchmark_classes()
    overrides = [
        f"model.name={args.model}", f"model.width_mult={args.width}", f"data.voc_root={args.root}",
        "data.train_sets=SYN_trainval", "data.test_sets=''", f"data.classes=[{', '.join(classes)}]",
        f"data.batch_size={args.batch}", f"data.num_workers={args.workers}", f"optim.max_iters={max_iters}",
        "optim.warmup_iters=0",
        f"train.output_dir={output_dir}", f"train.amp={args.amp}", f"train.channels_last={args.channels_last}",
        f"train.compile={args.compile}", f"train.compile_mode={args.compile_mode}",
        f"data.gt_padding={args.gt_padding}",
        f"train.log_every={log_every}", f"train.eval_every={10 * max_iters}",
        f"train.checkpoint_every={max_iters}", "train.keep_last=1",
    ]  # fmt: skip
    if args.cache:
        overrides.append(f"data.cache_dir={Path(args.root) / 'cache'}")
    if args.benchmark == "distill":
        overrides.append(f"distill.methods=[{', '.join(args.methods)}]")
    return load_config(None, overrides)


def _teacher(args: argparse.Namespace, cfg):
    """A distillation benchmark's teacher: a randomly initialised --teacher-model (speed does not depend on
    the weights); None for a training benchmark."""
    if args.benchmark != "distill":
        return None
    teacher = build_model(args.teacher_model, num_classes=cfg.num_classes, dfl_bins=cfg.model.dfl_bins)
    return teacher.eval().requires_grad_(False)


class _TimePhasesFrom(HookBase):
    """From iteration ``start`` on, the trainer splits its step into phases (the device synchronised after
    each) and records their times: the throughput is measured before, the breakdown after (``on_start``
    is called when it begins)."""

    def __init__(self, start: int, on_start: Callable[[], None]) -> None:
        self.start, self.on_start = start, on_start

    def before_step(self) -> None:
        if self.trainer.iteration == self.start:
            self.on_start()
            self.trainer.time_phases = True


def bench_train(args: argparse.Namespace) -> None:
    """Training (or distillation) throughput: the trainer's own loop end to end, then, continuing the same
    run, its own step split into phases (the device synchronised after each)."""
    from odkd.data.synthetic import make_synthetic_voc
    from odkd.engine.build import build_trainer
    from odkd.engine.distributed import barrier, setup_distributed

    info = setup_distributed(args.device)  # under torchrun: one process writes the data, the others wait
    if info.is_main:
        make_synthetic_voc(args.root, {"trainval": args.images}, min_size=375, max_size=500)
    barrier(info)
    timed = args.warmup + args.iters  # iterations of the throughput part; as many again for the phases
    with tempfile.TemporaryDirectory() as folder:
        cfg = _train_config(args, folder, timed + (0 if info.distributed else args.iters), log_every=args.warmup)
        trainer = build_trainer(cfg, args.device, progress=False, teacher=_teacher(args, cfg))
        busy = GpuBusySampler(trainer.device)
        trainer.register(_TimePhasesFrom(timed, on_start=lambda: busy.__exit__(None, None, None)))
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        start = time.perf_counter()
        with busy:
            trainer.fit()
        wall = time.perf_counter() - start
        records = read_metrics(folder)
    if not trainer.info.is_main:
        return
    steady = [r["images_per_s"] for r in records if "images_per_s" in r and r["iter"] <= timed][1:]  # after warm-up
    what = f"{args.model} x{args.width}"
    if args.benchmark == "distill":
        what += f" distilled from {args.teacher_model} ({' + '.join(args.methods)})"
    precision = str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "float32"
    print(
        f"{args.benchmark}: {what}, batch {args.batch} per process x {trainer.info.world_size}, "
        f"{trainer.model.image_size} px, {precision}, channels_last {args.channels_last}, "
        f"compile {args.compile} ({args.compile_mode}), GT slots {'fixed' if trainer.fixed_gt_slots else 'per batch'}, "
        f"{args.workers} loader workers; "
        f"{_device_name(trainer.device)}, torch {torch.__version__}"
    )
    print(
        f"end to end, the trainer's loop: {statistics.mean(steady):.1f} images/s in total (iterations "
        f"{args.warmup + 1}-{timed}); {wall:.1f} s for all {trainer.iteration} iterations with start-up"
    )
    if trainer.device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(trainer.device) / 2**30:.2f} GiB")
        print(f"GPU busy during the loop (NVML, after the first 20% of the run): {busy.summary()}")
    if trainer.info.distributed:
        return  # the phases are timed outside DDP's wrapper, on one process
    phases = {phase: statistics.median(times[-args.iters :]) for phase, times in trainer.phase_times.items()}
    step = sum(phases.values())
    print(f"phase breakdown (median per iteration, device synchronised after each phase, {args.iters} iterations):")
    for phase, seconds in phases.items():
        print(f"  {phase:<16}{1000 * seconds:9.1f} ms {100 * seconds / step:5.1f}%")
    busy_share = 1 - phases["data wait"] / step
    print(
        f"  {'step':<16}{1000 * step:9.1f} ms -> {args.batch / step:.1f} images/s; device busy {100 * busy_share:.1f}%"
    )


class GpuBusySampler:
    """Samples NVML's GPU utilisation (the share of time a kernel was running, what nvidia-smi shows)
    every 0.1 s in a thread while the block runs: through torch (needs the nvidia-ml-py package), else
    from ``nvidia-smi --loop-ms``; nothing on CPU, and the reason when neither works."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self.error = device, [], None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            torch.cuda.utilization(self.device)
        except Exception as err:  # no NVML bindings: ask nvidia-smi
            self._run_nvidia_smi(str(err).splitlines()[0])
            return
        while not self._stop.wait(0.1):
            self.samples.append(torch.cuda.utilization(self.device))

    def _run_nvidia_smi(self, nvml_error: str) -> None:
        try:
            # The GPU as nvidia-smi numbers it: by UUID, since CUDA_VISIBLE_DEVICES may renumber devices.
            gpu = f"GPU-{torch.cuda.get_device_properties(self.device).uuid}"
            command = ["nvidia-smi", f"--id={gpu}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
            smi = subprocess.Popen(
                [*command, "--loop-ms=100"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        except Exception as err:
            self.error = f"no NVML bindings ({nvml_error}); nvidia-smi: {str(err).splitlines()[0]}"
            return
        with smi:
            for line in smi.stdout:
                if line.strip().isdigit():
                    self.samples.append(int(line))
                elif not self.samples:
                    self.error = f"nvidia-smi: {line.strip()}"
                if self._stop.is_set():
                    break
            smi.terminate()

    def __enter__(self) -> GpuBusySampler:
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> str:
        steady = self.samples[len(self.samples) // 5 :]  # the start (data writing, warm-up, compile) left out
        if not steady:
            return f"n/a ({self.error or 'no samples'})"
        return f"median {statistics.median(steady):.0f}%, mean {statistics.mean(steady):.0f}% of {len(steady)} samples"


def _cpu_name() -> str:
    """The CPU's model name (lscpu's), else what Python's platform module says."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"


def bench_demo(args: argparse.Namespace) -> None:
    from odkd.config import load_config
    from odkd.engine.build import run_training

    config = Path(__file__).resolve().parents[1] / "configs" / "demo_teacher_synthetic.yaml"
    overrides = [
        f"optim.max_iters={args.iters}",
        f"train.eval_every={args.eval_every}",
        f"train.output_dir={args.output_dir}",
        f"train.checkpoint_every={args.iters}",
        *args.overrides,
    ]
    cfg = load_config(config, overrides)
    start = time.perf_counter()
    result, _ = run_training(cfg, device="cpu" if args.cpu else None, progress=False, overwrite=True)
    minutes = (time.perf_counter() - start) / 60
    maps = read_metrics(args.output_dir)
    curve = ", ".join(f"{r['iter']}: {100 * r['mAP']:.1f}" for r in maps if "mAP" in r)
    print(
        f"demo ({cfg.model.name} x{cfg.model.width_mult}, batch {cfg.data.batch_size}, {args.iters} iterations, "
        f"{cfg.optim.schedule} lr {cfg.optim.lr}): {minutes:.1f} min, {torch.get_num_threads()} threads"
    )
    print(f"{cfg.eval.metric} mAP by iteration: {curve}")
    print(f"final mAP {100 * result.last_map:.2f}, best {100 * result.best_map:.2f}")


def _interleaved_ms(fns: dict[str, Callable[[], object]], iters: int, warmup: int) -> dict[str, float]:
    """Median wall time of each function in milliseconds, the functions called in turn at every iteration
    so that a load that comes and goes on the machine slows them alike and their ratios hold."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_onnx(args: argparse.Namespace) -> None:
    """CPU inference of one model as PyTorch eager float32, onnxruntime float32 and onnxruntime INT8 (the
    default quantisation and the other choice of float heads), at each batch size and thread count. All
    compute the same thing: preprocessing, network, box decoding and softmax (no NMS)."""
    import onnxruntime

    from odkd.checkpoint import load_model
    from odkd.export import DeployedDetector, export_onnx
    from odkd.quantize import DEFAULT_FLOAT_HEADS, CalibrationImages, quantize_onnx
    from odkd.runtime import OnnxDetector

    model = load_model(args.checkpoint).eval()
    size = model.image_size
    if args.calibration_config:
        calibration = CalibrationImages.from_config(args.calibration_config, args.calibration, size)
    elif args.calibration_images:
        calibration = CalibrationImages.from_folder(args.calibration_images, args.calibration, size)
    else:  # the speed of the INT8 graph does not depend on its ranges
        noise = torch.Generator().manual_seed(0)
        calibration = CalibrationImages(
            lambda i: torch.randint(0, 256, (3, size, size), generator=noise, dtype=torch.uint8),
            args.calibration,
            args.calibration,
            f"{args.calibration} random images (timing only)",
        )
    heads = {DEFAULT_FLOAT_HEADS: "default", not DEFAULT_FLOAT_HEADS: "other choice"}
    with tempfile.TemporaryDirectory() as folder:
        float_path = export_onnx(model, Path(folder) / "float.onnx")
        files = {"onnxruntime float32": float_path}
        for float_heads in (DEFAULT_FLOAT_HEADS, not DEFAULT_FLOAT_HEADS):
            name = f"onnxruntime INT8, {'float' if float_heads else 'int8'} heads ({heads[float_heads]})"
            files[name] = quantize_onnx(float_path, Path(folder) / f"int8_{float_heads}.onnx", calibration, float_heads)
        print(
            f"CPU inference of {args.checkpoint} ({model.arch}, {size} px, {model.num_classes} classes): "
            f"preprocessing + network + decode + softmax, no NMS; INT8 calibrated on {calibration.description}; "
            f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {_cpu_name()}"
        )
        print(f"median of {args.iters} interleaved runs after {args.warmup}; ratio = onnxruntime float32 ms / ms")
        print(f"{'threads':>7}{'batch':>6}  {'engine':<42}{'ms/image':>10}{'images/s':>10}{'ratio':>7}")
        deployed = DeployedDetector(model).eval()
        for threads in args.threads:
            torch.set_num_threads(threads)
            sessions = {name: OnnxDetector(path, threads) for name, path in files.items()}
            for batch in args.batches:
                images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)) * 255
                array = images.numpy()

                def eager(images: torch.Tensor = images) -> None:
                    with torch.inference_mode():
                        deployed(images)

                fns = {"PyTorch eager float32": eager}
                fns.update({name: (lambda s=session, a=array: s.run(a)) for name, session in sessions.items()})
                times = _interleaved_ms(fns, args.iters, args.warmup)
                for name, ms in times.items():
                    ratio = times["onnxruntime float32"] / ms
                    print(
                        f"{threads:>7}{batch:>6}  {name:<42}{ms / batch:>10.2f}{1000 * batch / ms:>10.1f}{ratio:>7.2f}"
                    )


def build_parser() -> argparse.ArgumentParser:
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
    voc_eval = sub.add_parser("eval", help="VOC AP: vectorised evaluation vs the per-detection reference loop")
    voc_eval.add_argument("--images", type=int, default=5000, help="VOC07 test has 4952")
    voc_eval.add_argument("--detections", type=int, default=100_000)
    voc_eval.add_argument("--metric", choices=METRICS, default="voc07")
    voc_eval.add_argument("--seed", type=int, default=0)
    voc_eval.add_argument("--iters", type=int, default=5)
    voc_eval.add_argument("--model", choices=sorted(MODELS), help="end to end: evaluate this (random) detector")
    voc_eval.add_argument("--checkpoint", help="end to end: evaluate this model file")
    voc_eval.add_argument("--batch", type=int, default=64, help="end to end: batch size")
    voc_eval.add_argument("--workers", type=int, default=8, help="end to end: loader workers")
    voc_eval.add_argument("--root", default="data/bench_eval", help="end to end: where the JPEGs are written")
    voc_eval.add_argument("--device", choices=["cuda", "cpu"], help="end to end: default cuda when available")
    voc_eval.set_defaults(run=bench_eval)
    loader = sub.add_parser("loader", help="training data pipeline throughput")
    loader.add_argument("--root", default="data/bench_loader", help="where the benchmark images are written")
    loader.add_argument("--images", type=int, default=200)
    loader.add_argument("--size", type=int, default=300)
    loader.add_argument("--batch", type=int, default=32)
    loader.add_argument("--batches", type=int, default=12, help="batches timed per worker count")
    loader.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    loader.set_defaults(run=bench_loader)
    for name, text in (("train", "training throughput"), ("distill", "distillation throughput")):
        train = sub.add_parser(name, help=f"{text}: images/s, peak GPU memory, time per phase (synthetic data)")
        train.add_argument("--model", choices=sorted(MODELS), default="mobilenetv2_ssdlite300")
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
            train.add_argument("--teacher-model", choices=sorted(MODELS), default="vgg16_lite300")
            train.add_argument("--methods", nargs="+", default=["chen2017"])
        train.set_defaults(run=bench_train)
    demo = sub.add_parser("demo", help="train the CPU demo to convergence, report mAP and wall time")
    demo.add_argument("--iters", type=int, default=400)
    demo.add_argument("--eval-every", type=int, default=100)
    demo.add_argument("--output-dir", default="runs/benchmark_demo")
    demo.add_argument("--cpu", action="store_true", help="train on the CPU even if CUDA is present")
    demo.add_argument("overrides", nargs="*", help="more config overrides, section.key=value")
    demo.set_defaults(run=bench_demo)
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
    onnx.set_defaults(run=bench_onnx)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    try:
        args.run(args)
    except (
        DatasetError,
        TrainingError,
        OSError,
        ValueError,
    ) as err:  # ConfigError, FileWriteError among them
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
