"""The benchmark commands run end to end at tiny sizes (their numbers are measured elsewhere, not asserted)."""

import re
import time

import torch

from odkd.checkpoint import save_model
from odkd.models import build_model
from tests.conftest import load_script


def test_train_and_distill_benchmarks_report_throughput_and_phases(tmp_path, run_script):
    common = ["--device", "cpu", "--batch", "2", "--iters", "2", "--warmup", "1", "--workers", "0", "--images", "4",
              "--root", tmp_path / "data", "--width", "0.5", "--no-amp"]  # fmt: skip
    done = run_script("benchmark.py", "train", *common)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"end to end, the trainer's loop: [\d.]+ images/s", done.stdout)
    for phase in ("data wait", "forward", "matching \\+ loss", "backward", "optimizer"):
        assert re.search(rf"  {phase}\s+[\d.]+ ms\s+[\d.]+%", done.stdout), phase
    assert re.search(r"device busy [\d.]+%", done.stdout)
    done = run_script(
        "benchmark.py", "distill", *common, "--teacher-model", "mobilenetv2_ssdlite300", "--methods", "hinton", "fgd"
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "distilled from mobilenetv2_ssdlite300 (hinton + fgd)" in done.stdout and "device busy" in done.stdout


def test_end_to_end_eval_benchmark(tmp_path, run_script):
    done = run_script(
        "benchmark.py", "eval", "--model", "mobilenetv2_ssdlite300", "--images", "4", "--batch", "2",
        "--workers", "0", "--device", "cpu", "--root", tmp_path / "data",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "4 synthetic 375-500 px JPEGs" in done.stdout
    assert re.search(r"total\s+[\d.]+ s\s+[\d.]+ images/s", done.stdout)


def test_onnx_benchmark_times_every_engine(tmp_path, capsys):
    torch.manual_seed(0)
    save_model(build_model("mobilenetv2_ssdlite300", num_classes=3, width_mult=0.5), tmp_path / "m.pt")
    parser = load_script("benchmark").build_parser()
    args = parser.parse_args(
        ["onnx", "--checkpoint", str(tmp_path / "m.pt"), "--batches", "1", "2", "--threads", "1", "--iters", "1",
         "--warmup", "0", "--calibration", "2"]
    )  # fmt: skip
    args.run(args)
    out = capsys.readouterr().out
    assert "INT8 calibrated on 2 random images (timing only)" in out
    rows = re.findall(r"^\s+1\s+(\d)\s+(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    engines = ["PyTorch eager float32", "onnxruntime float32", "onnxruntime INT8, int8 heads (default)",
               "onnxruntime INT8, float heads (other choice)"]  # fmt: skip
    assert [(batch, engine) for batch, engine, *_ in rows] == [(b, e) for b in "12" for e in engines]
    for _, engine, ms, per_s, ratio in rows:
        # images/s = 1000 / (ms per image), each printed rounded: per_s by <= 0.05, ms by <= 0.005, which
        # moves 1000 / ms by <= 1000 x 0.005 / (ms - 0.005)^2
        assert abs(float(per_s) - 1000 / float(ms)) <= 0.05 + 5 / (float(ms) - 0.005) ** 2
        if engine == "onnxruntime float32":
            assert ratio == "1.00"


def test_gpu_busy_sampler_says_why_it_has_no_number():
    benchmark = load_script("benchmark")
    with benchmark.GpuBusySampler(torch.device("cpu")) as cpu:
        time.sleep(0.25)
    assert cpu.summary() == "n/a (no samples)"  # nothing is sampled on the CPU
    if not torch.cuda.is_available():
        with benchmark.GpuBusySampler(torch.device("cuda")) as gpu:
            time.sleep(0.25)  # the thread asks NVML, which is not there, and keeps its error
        assert gpu.summary().startswith("n/a (") and gpu.summary() != "n/a (no samples)"
