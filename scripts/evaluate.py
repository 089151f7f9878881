"""PASCAL VOC AP of detections exactly as the official devkit computes it, or COCO AP through pycocotools.

From devkit result files (comp4_det_<set>_<class>.txt, devkit pixel coordinates), e.g. another tool's:

    python scripts/evaluate.py --detections results/ --voc-root VOCdevkit --year 2007 --image-set test \\
        --metric voc07 --output-json ap.json

From a model (odkd model file or training checkpoint): runs it over the set (batched, bf16 on CUDA),
writes the devkit result files to --detections, and scores those files the same way:

    python scripts/evaluate.py --checkpoint runs/x/best.pt --voc-root VOCdevkit --year 2007 --image-set test \\
        --detections runs/x/results --pr-curves runs/x/pr.png --draw 16
    python scripts/evaluate.py --config configs/demo_student_synthetic.yaml --checkpoint runs/demo_student/best.pt \\
        --found     # per class: objects found, and how high they are scored (why an AP is low)
    python scripts/evaluate.py --config configs/demo_teacher_synthetic.yaml --checkpoint runs/demo_teacher/best.pt

From an exported ONNX file (``scripts/export_onnx.py``: float or INT8, with or without NMS in the graph), run
by onnxruntime on the CPU and scored by the same code, so the accuracy is that of the file you ship:

    python scripts/evaluate.py --onnx student_int8.onnx --config configs/demo_teacher_synthetic.yaml
    python scripts/evaluate.py --onnx student.onnx --coco-json instances_val2017.json --coco-images val2017/

COCO-format data (``--coco-json``, or a config with ``data.format: coco``): ``--detections`` is a COCO results
file (a JSON list of image_id, category_id, bbox, score), scored as it is or written from a model first:

    python scripts/evaluate.py --coco-json instances_val2017.json --detections results.json
    python scripts/evaluate.py --checkpoint best.pt --coco-json instances_val2017.json --coco-images val2017/
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# Torch-free: --help answers without loading torch; what needs it is imported where it is used.
from odkd.config import Config, evaluation_config
from odkd.eval import (
    METRICS,
    ClassFound,
    COCOResult,
    VOCResult,
    devkit_image_set,
    evaluate_results,
    format_found_table,
    format_result,
    found_per_class,
    group_by_class,
    read_coco_results,
    read_devkit_results,
    write_coco_results,
    write_devkit_results,
)
from odkd.files import check_output_path

if TYPE_CHECKING:
    from odkd.data import DetectionDataset, ImageDetections


def run_model(args: argparse.Namespace, cfg: Config, dataset: DetectionDataset) -> dict[int, ImageDetections]:
    """The detections of ``--checkpoint`` (batched, bf16 on CUDA) or ``--onnx`` (onnxruntime, CPU) on
    each image of ``dataset``, in the dataset's pixels; optionally a grid of images with their detections."""
    from odkd.inference import detect_dataset

    settings = cfg.eval.postprocess
    if args.onnx is not None:
        from odkd.runtime import OnnxDetector

        model, settings, device = OnnxDetector(args.onnx, settings=settings), None, None
        where = "in the graph" if model.in_graph else "odkd's (the graph has none)"
        print(f"{args.onnx}: {model.precision}, onnxruntime on the CPU; post-processing {where}: {model.settings}")
    else:
        from odkd.checkpoint import load_model

        model, device = load_model(args.checkpoint), args.device
    if model.num_classes != len(dataset.class_names) + 1:
        raise ValueError(
            f"{args.model_file} predicts {model.num_classes - 1} classes but the class list has "
            f"{len(dataset.class_names)}: pass --classes (or --config) with the classes it was trained on"
        )
    detections = detect_dataset(
        model, dataset, device, batch_size=cfg.eval.batch_size, num_workers=args.workers, settings=settings
    )
    if args.draw:
        draw_grid(dataset, detections, args)
    return detections


def draw_grid(dataset: DetectionDataset, detections: dict[int, ImageDetections], args: argparse.Namespace) -> None:
    """The first ``--draw`` images of the set with their detections above ``--draw-threshold``."""
    from odkd.visualize import draw_detections, image_grid, write_image

    pictures = []
    for index in range(min(args.draw, len(dataset))):
        boxes, scores, labels = detections[index]
        pictures.append(
            draw_detections(
                dataset[index]["image"],
                boxes - dataset.pixel_offset,  # -> 0-based corners
                labels.tolist(),
                scores.tolist(),
                dataset.class_names,
                args.draw_threshold,
            )
        )
    out = args.draw_output or Path(args.detections).with_suffix("") / "detections.jpg"
    write_image(out, image_grid(pictures))
    print(f"wrote {out}")


def evaluate(args: argparse.Namespace, cfg: Config) -> tuple[VOCResult | COCOResult, dict[str, ClassFound] | None]:
    """Run the model and write its result files (with --checkpoint or --onnx), then score the result files:
    devkit files in a folder (VOC data) or a COCO results file. With --found, also what the model found per
    class (else None)."""
    from odkd.engine.build import build_test_set

    coco = cfg.data.format == "coco"
    dataset = build_test_set(cfg, reads_images=args.model_file is not None)
    image_set = None if coco else devkit_image_set(cfg.data.test_sets)
    found = None
    if args.model_file is not None:
        per_image = run_model(args, cfg, dataset)
        if args.found:
            found = found_per_class(per_image, dataset.annotations, dataset.class_names)
        per_class = group_by_class(per_image, dataset)
        if coco:
            print(f"wrote {write_coco_results(per_class, dataset, args.detections)}")
        else:
            paths = write_devkit_results(args.detections, image_set, dataset.class_names, per_class)
            print(f"wrote {len(paths)} result files to {args.detections}")
    if coco:
        detections = read_coco_results(args.detections, dataset)
    else:
        detections = read_devkit_results(args.detections, image_set, dataset.class_names)
    return evaluate_results(detections, dataset, cfg.eval.metric), found


def report(
    result: VOCResult | COCOResult,
    output_json: Path | None,
    pr_curves: Path | None = None,
    found: dict[str, ClassFound] | None = None,
) -> None:
    """Print the AP table (and the found table, if given); write the result's JSON (``{"metric", "mAP", "ap",
    ...}``, null for a class without GT) and the precision-recall curves (devkit metrics) if asked."""
    print(format_result(result))
    if found is not None:
        print("\nFound: the best-scoring detection over the object (IoU >= 0.5) is of its class")
        print(format_found_table(found, result.ap if isinstance(result, VOCResult) else None))
    if output_json is not None:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(result.to_json(), indent=1) + "\n")
        print(f"wrote {output_json}")
    if pr_curves is not None and isinstance(result, COCOResult):
        print("--pr-curves: the curves come with the devkit metrics (--metric voc07 or area), not coco")
    elif pr_curves is not None:
        from odkd.visualize import plot_pr_curves

        print(f"wrote {plot_pr_curves(result.recall, result.precision, result.ap, pr_curves)}")


def names(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated list of names ("" none, None stays None)."""
    return None if text is None else tuple(name.strip() for name in text.split(",") if name.strip())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detections", type=Path, help="folder of devkit result files (written in model mode)")
    parser.add_argument("--checkpoint", type=Path, help="model mode: an odkd model file or training checkpoint")
    parser.add_argument("--onnx", type=Path, help="model mode: an exported .onnx file (float or INT8), onnxruntime")
    parser.add_argument("--config", type=Path, help="model mode: take data and eval settings from this config")
    parser.add_argument("--voc-root", type=Path, help="the folder that contains VOC<year>/")
    parser.add_argument("--coco-json", type=Path, help="COCO mode: the ground-truth annotation file")
    parser.add_argument("--coco-images", type=Path, help="COCO mode with a model: the folder of its images")
    parser.add_argument("--year", help="e.g. 2007")
    parser.add_argument("--image-set", help="e.g. test, val")
    parser.add_argument(
        "--metric",
        choices=[*METRICS, "coco"],
        help="voc07: 11-point (VOC default); area: VOC2010+; coco (COCO default)",
    )
    parser.add_argument("--output-json", type=Path, help="write the per-class AP and the mAP here")
    parser.add_argument(
        "--classes", help="comma-separated class list (default: the 20 VOC classes; COCO: the file's categories)"
    )
    parser.add_argument(
        "--ignore-classes",
        help="VOC: comma-separated object names left out (default: the VOC classes not in the class list)",
    )
    parser.add_argument("--pr-curves", type=Path, help="save the precision-recall curves to this PNG")
    parser.add_argument("--draw", type=int, default=0, help="model mode: draw the first N images' detections")
    parser.add_argument("--draw-threshold", type=float, default=0.3, help="least score drawn")
    parser.add_argument("--draw-output", type=Path, help="grid picture path (default: DETECTIONS/detections.jpg)")
    parser.add_argument(
        "--found",
        action="store_true",
        help="model mode: per class, the share of objects found (the best-scoring detection over each is of its "
        "class) and their median score: a low AP with most objects found is a class found but not scored",
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], help="--checkpoint's (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=4, help="data loader workers in model mode")
    args = parser.parse_args(argv)
    if args.checkpoint is not None and args.onnx is not None:
        parser.error("give one model: --checkpoint (PyTorch) or --onnx (an exported file)")
    if args.onnx is not None and args.device is not None:
        parser.error("--device is for --checkpoint: an --onnx file runs on onnxruntime's CPU provider")
    args.model_file = args.checkpoint or args.onnx
    if args.model_file is None and (args.detections is None or args.draw):
        parser.error(
            "without --checkpoint or --onnx, --detections must name the detections to score (and --draw needs a model)"
        )
    if args.found and args.model_file is None:
        parser.error("--found needs a model (--checkpoint or --onnx): it reads each image's detections")
    if args.workers < 0 or args.draw < 0:
        parser.error(f"--workers and --draw count from 0, got {args.workers} and {args.draw}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        cfg = evaluation_config(
            args.config,
            voc_root=args.voc_root,
            year=args.year,
            image_set=args.image_set,
            coco_json=args.coco_json,
            coco_images=args.coco_images,
            classes=names(args.classes) if args.classes else None,  # "" as not given
            ignore_classes=names(args.ignore_classes),
            metric=args.metric,
            reads_images=args.model_file is not None,
        )
        if args.checkpoint is not None:  # a CUDA device that is not there is said now, not after reading the data
            from odkd.device import select_device

            args.device = select_device(args.device)
        coco = cfg.data.format == "coco"
        if args.detections is None:  # model mode writes the detections: devkit files into a folder, or a COCO file
            args.detections = args.model_file.parent / f"results_{args.model_file.stem}{'.json' if coco else ''}"
        # Where the results go, checked before the model runs over the set.
        outputs = {"--output-json": args.output_json, "--pr-curves": args.pr_curves, "--draw-output": args.draw_output}
        for what, path in outputs.items():
            if path is not None:
                check_output_path(path, what)
        if args.model_file is not None:
            check_output_path(args.detections, "--detections", folder=not coco)
        result, found = evaluate(args, cfg)
    except (OSError, ValueError, RuntimeError) as err:  # DatasetError and ConfigError are ValueErrors
        sys.exit(f"error: {err}")
    report(result, args.output_json, args.pr_curves, found)


if __name__ == "__main__":
    main()
