"""CPU inference of one model as PyTorch eager float32, onnxruntime float32 and onnxruntime INT8 (the
default quantisation and the other choice of float heads). All compute the same thing: preprocessing,
network, box decoding and softmax (no NMS)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from odkd.bench.timing import interleaved_ms
from odkd.export import DeployedDetector, export_onnx
from odkd.models import SSD
from odkd.quantize import DEFAULT_FLOAT_HEADS, CalibrationImages, quantize_onnx
from odkd.runtime import OnnxDetector

__all__ = ["EAGER", "ONNX_FLOAT", "EngineTiming", "benchmark_calibration", "export_engines", "time_engines"]

EAGER = "PyTorch eager float32"
ONNX_FLOAT = "onnxruntime float32"  # the reference of the ratios


@dataclass(frozen=True)
class EngineTiming:
    """Median milliseconds of one batch through one engine at a thread count, and onnxruntime float32's
    milliseconds over these (above 1: faster than onnxruntime float32)."""

    threads: int
    batch: int
    engine: str
    ms: float
    ratio: float


def benchmark_calibration(
    image_size: int, count: int, config: str | None = None, folder: str | None = None
) -> CalibrationImages:
    """``count`` INT8 calibration images of ``config``'s training set or of ``folder``, else random ones
    (the speed of the INT8 graph does not depend on its ranges)."""
    if config:
        return CalibrationImages.from_config(config, count, image_size)
    if folder:
        return CalibrationImages.from_folder(folder, count, image_size)
    noise = torch.Generator().manual_seed(0)
    return CalibrationImages(
        lambda i: torch.randint(0, 256, (3, image_size, image_size), generator=noise, dtype=torch.uint8),
        count,
        count,
        f"{count} random images (timing only)",
    )


def export_engines(model: SSD, folder: Path, calibration: CalibrationImages) -> dict[str, Path]:
    """The ONNX files to time, written into ``folder``, by engine name: float32, and INT8 with the
    default choice of float heads and with the other."""
    float_path = export_onnx(model, folder / "float.onnx")
    files = {ONNX_FLOAT: float_path}
    heads = {DEFAULT_FLOAT_HEADS: "default", not DEFAULT_FLOAT_HEADS: "other choice"}
    for float_heads in (DEFAULT_FLOAT_HEADS, not DEFAULT_FLOAT_HEADS):
        name = f"onnxruntime INT8, {'float' if float_heads else 'int8'} heads ({heads[float_heads]})"
        files[name] = quantize_onnx(float_path, folder / f"int8_{float_heads}.onnx", calibration, float_heads)
    return files


def time_engines(
    model: SSD, files: dict[str, Path], threads: Sequence[int], batches: Sequence[int], iters: int, warmup: int
) -> Iterator[EngineTiming]:
    """PyTorch eager and each ONNX file of ``files`` on random ``(batch, 3, S, S)`` images, at each thread
    count (torch's and onnxruntime's; torch's stays set) and batch size: ``iters`` interleaved runs after
    ``warmup``. One batch size at a time, as it is measured."""
    deployed = DeployedDetector(model).eval()
    size = model.image_size
    for count in threads:
        torch.set_num_threads(count)
        sessions = {name: OnnxDetector(path, count) for name, path in files.items()}
        for batch in batches:
            images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)) * 255
            array = images.numpy()

            def eager(images: torch.Tensor = images) -> None:
                with torch.inference_mode():
                    deployed(images)

            fns = {EAGER: eager}
            fns.update({name: (lambda s=session, a=array: s.run(a)) for name, session in sessions.items()})
            times = interleaved_ms(fns, iters, warmup)
            for name, ms in times.items():
                yield EngineTiming(count, batch, name, ms, times[ONNX_FLOAT] / ms)
