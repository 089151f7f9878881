"""Run a detector on images, folders of images or videos; draw what it finds and time it.

    python scripts/demo.py --checkpoint runs/distill/best.pt --input photos/ street.mp4 dog.jpg --output out/

Every image is written to ``--output`` with its boxes, class names and scores drawn (videos as
``<name>.mp4``, frame by frame). Per image the script prints the detections and the latency of
preprocessing + forward + post-processing (bf16 and channels_last on CUDA; the first image includes
warm-up), and a summary at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # the rest after the arguments are read: --help answers without loading torch
    from odkd.inference import Predictor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given and the images of the given folders (sorted by name)."""
    files = []
    for path in inputs:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    return files


def video_frames(path: Path) -> Iterator[np.ndarray]:
    """The frames of a video as (H, W, 3) uint8 RGB."""
    from odkd.data.dataset import DatasetError

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise DatasetError(f"{path}: not a readable video")
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


def annotate(predictor: Predictor, image: np.ndarray, names: list[str], min_score: float):
    """``image`` with its detections drawn, the detections shown (label, score), and the milliseconds the
    prediction took (preprocessing, forward, post-processing; the results reach the CPU, so the device has
    finished)."""
    from odkd.visualize import draw_detections

    start = time.perf_counter()
    det = predictor(image)
    ms = 1000 * (time.perf_counter() - start)
    drawn = draw_detections(image, det.boxes.numpy(), det.labels.tolist(), det.scores.tolist(), names, min_score)
    shown = [(names[int(c) - 1], float(s)) for c, s in zip(det.labels, det.scores, strict=True) if s >= min_score]
    return drawn, shown, ms


def run_video(predictor: Predictor, path: Path, output: Path, names: list[str], min_score: float) -> list[float]:
    """Detect on every frame of ``path`` and write ``output/<name>.mp4``; returns per-frame milliseconds."""
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    capture.release()
    target = output / f"{path.stem}.mp4"
    writer, latencies = None, []
    for frame in video_frames(path):
        drawn, _, ms = annotate(predictor, frame, names, min_score)
        latencies.append(ms)
        if writer is None:
            size = (frame.shape[1], frame.shape[0])
            writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        writer.write(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
    if writer is not None:
        writer.release()
        print(f"{path.name}: {len(latencies)} frames, {statistics.mean(latencies):.1f} ms per frame -> {target}")
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="odkd model file or training checkpoint")
    parser.add_argument("--input", type=Path, nargs="+", required=True, help="images, folders of images, videos")
    parser.add_argument("--output", type=Path, required=True, help="folder for the drawn images and videos")
    parser.add_argument("--min-score", type=float, default=0.4, help="draw detections from this score")
    parser.add_argument("--classes", help="class names: 'voc' or comma-separated (default: from the model file)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    args = parser.parse_args()

    from odkd.checkpoint import load_model
    from odkd.class_names import VOC_CLASSES
    from odkd.data.dataset import DatasetError, read_image
    from odkd.device import select_device
    from odkd.files import check_output_path
    from odkd.inference import Predictor
    from odkd.postprocess_settings import PostprocessSettings
    from odkd.visualize import write_image

    try:
        check_output_path(args.output, "--output", folder=True)
        device = select_device(args.device)
        model = load_model(args.checkpoint)
        files = expand_inputs(args.input)
        if args.classes:
            model.class_names = VOC_CLASSES if args.classes == "voc" else [c.strip() for c in args.classes.split(",")]
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        sys.exit(f"error: {err}")
    names = model.label_names
    # only what is drawn goes through NMS
    predictor = Predictor(model, device, PostprocessSettings(score_threshold=args.min_score))
    args.output.mkdir(parents=True, exist_ok=True)
    latencies = []
    for path in files:
        try:
            if path.suffix.lower() in VIDEO_SUFFIXES:
                latencies += run_video(predictor, path, args.output, names, args.min_score)
                continue
            image = read_image(path)
        except DatasetError as err:
            print(f"skipped: {err}", file=sys.stderr)
            continue
        drawn, shown, ms = annotate(predictor, image, names, args.min_score)
        latencies.append(ms)
        write_image(args.output / f"{path.stem}.jpg", drawn)
        found = ", ".join(f"{name} {score:.2f}" for name, score in shown)
        print(f"{path.name} {image.shape[1]}x{image.shape[0]}: {ms:.1f} ms, {len(shown)} detections [{found}]")
    if not latencies:
        sys.exit("error: no readable image or video among the inputs")
    steady = latencies[1:] or latencies  # the first image pays for warm-up
    print(
        f"{len(latencies)} images on {device.type} ({model.arch}): {statistics.mean(steady):.1f} ms per image "
        f"(median {statistics.median(steady):.1f}, first {latencies[0]:.1f}); drawn into {args.output}"
    )


if __name__ == "__main__":
    main()
