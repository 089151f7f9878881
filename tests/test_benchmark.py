"""The benchmarks run end to end at tiny sizes (their numbers are measured elsewhere, not asserted)."""

import time

import torch

from odkd.bench.evaluation import time_ap, time_model_evaluation
from odkd.bench.gpu_busy import GpuBusySampler
from odkd.bench.loss import time_loss
from odkd.bench.onnx_latency import EAGER, ONNX_FLOAT, benchmark_calibration, export_engines, time_engines
from odkd.bench.synthetic import random_targets, synthetic_voc_detections
from odkd.bench.training import TrainingSetup, measure_training
from odkd.engine.trainer import PHASES
from odkd.models import build_model
from odkd.priors import build_priors


def test_train_and_distill_benchmarks_report_throughput_and_phases(tmp_path):
    settings = {"model": "mobilenetv2_ssdlite300", "width": 0.5, "batch": 2, "iters": 2, "warmup": 1, "workers": 0,
                "images": 4, "root": str(tmp_path / "data"), "device": "cpu", "amp": False, "channels_last": True,
                "compile": False, "compile_mode": "default", "gt_padding": "auto", "cache": False}  # fmt: skip
    for teacher, methods in ((None, ()), ("mobilenetv2_ssdlite300", ("hinton", "fgd"))):
        done = measure_training(TrainingSetup(**settings, teacher_model=teacher, methods=methods))
        assert done.images_per_s > 0 and done.iterations == 1 + 2 + 2  # warm-up, timed, then the phases
        assert done.precision == "float32" and done.image_size == 300 and done.world_size == 1
        assert done.peak_memory_gib is None and done.gpu_busy is None  # CUDA only
        assert list(done.phases_s) == list(PHASES) and all(seconds > 0 for seconds in done.phases_s.values())


def test_end_to_end_eval_benchmark(tmp_path):
    done = time_model_evaluation(tmp_path / "data", 4, "mobilenetv2_ssdlite300", None, 2, 0, "cpu", "voc07")
    assert done.images == 4 and done.arch == "mobilenetv2_ssdlite300" and done.device.startswith("CPU")
    assert 0 < done.detection_s < done.total_s and done.ap_s > 0 and 0 <= done.mAP <= 1


def test_ap_and_loss_benchmarks_on_synthetic_data():
    annotations, detections = synthetic_voc_detections(30, 400, seed=0)
    assert len(annotations) == 30 and sum(len(d[1]) for d in detections.values()) == 400
    timing = time_ap(annotations, detections, "voc07", iters=1)
    assert timing.same_ap and 0 < timing.mAP < 1  # the vectorised AP is the reference loop's
    boxes, labels = random_targets(2, 3, torch.Generator().manual_seed(0))
    assert boxes.shape == (2, 3, 4) and ((boxes[..., 2:] > boxes[..., :2]).all())
    loss = time_loss(torch.device("cpu"), build_priors("ssd300"), boxes, labels, 21, iters=1, warmup=0)
    assert loss.positives_per_image > 0 and loss.loc_loss > 0 and loss.total_ms > 0


def test_onnx_benchmark_times_every_engine(tmp_path):
    torch.manual_seed(0)
    model = build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.5).eval()
    calibration = benchmark_calibration(model.image_size, 2)
    assert calibration.description == "2 random images (timing only)"
    files = export_engines(model, tmp_path, calibration)
    threads = torch.get_num_threads()
    try:
        rows = list(time_engines(model, files, [1], [1, 2], iters=1, warmup=0))
    finally:
        torch.set_num_threads(threads)  # time_engines leaves its last thread count set
    engines = [EAGER, ONNX_FLOAT, "onnxruntime INT8, int8 heads (default)",
               "onnxruntime INT8, float heads (other choice)"]  # fmt: skip
    assert [(row.batch, row.engine) for row in rows] == [(b, e) for b in (1, 2) for e in engines]
    assert all(row.threads == 1 and row.ms > 0 for row in rows)
    assert all(row.ratio == 1 for row in rows if row.engine == ONNX_FLOAT)


def test_gpu_busy_sampler_says_why_it_has_no_number():
    with GpuBusySampler(torch.device("cpu")) as cpu:
        time.sleep(0.25)
    assert cpu.summary() == "n/a (no samples)"  # nothing is sampled on the CPU
    if not torch.cuda.is_available():
        with GpuBusySampler(torch.device("cuda")) as gpu:
            time.sleep(0.25)  # the thread asks NVML, which is not there, and keeps its error
        assert gpu.summary().startswith("n/a (") and gpu.summary() != "n/a (no samples)"
