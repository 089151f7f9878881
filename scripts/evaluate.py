"""PASCAL VOC AP of detections exactly as the official devkit computes it, or COCO AP through pycocotools.

From devkit result files (comp4_det_<set>_<class>.txt, devkit pixel coordinates), e.g. another tool's:

    python scripts/evaluate.py --detections results/ --voc-root VOCdevkit --year 2007 --image-set test \\
        --metric voc07 --output-json ap.json

From a model (odkd model file or training checkpoint): runs it over the set (batched, bf16 on CUDA),
writes the devkit result files to --detections, and scores those files the same way:

    python scripts/evaluate.py --checkpoint runs/x/best.pt --voc-root VOCdevkit --year 2007 --image-set test \\
        --detections runs/x/results --pr-curves runs/x/pr.png --draw 16
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

from odkd.class_names import VOC_CLASSES
from odkd.eval import (
    METRICS,
    ClassDetections,
    COCOResult,
    VOCResult,
    evaluate_dataset,
    format_result,
    read_coco_results,
    read_devkit_results,
    write_coco_results,
    write_devkit_results,
)
from odkd.files import check_output_path


def run_model(args: argparse.Namespace, dataset) -> dict[str, ClassDetections]:
    """The detections of ``--checkpoint`` (batched, bf16 on CUDA) or ``--onnx`` (onnxruntime, CPU) on
    ``dataset``, grouped by class in the dataset's pixels; optionally a grid of images with their detections."""
    from odkd.inference import detect_dataset

    eval_cfg = args.eval_cfg
    settings = {
        "score_threshold": eval_cfg.score_threshold,
        "nms_threshold": eval_cfg.nms_threshold,
        "top_k": eval_cfg.top_k,
        "max_detections": eval_cfg.max_detections,
    }
    if args.onnx is not None:
        from odkd.runtime import OnnxDetector

        model, settings, device = OnnxDetector(args.onnx, **settings), {}, None
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
        model, dataset, device, batch_size=eval_cfg.batch_size, num_workers=args.workers, **settings
    )
    if args.draw:
        draw_grid(dataset, detections, args)
    return detections


def draw_grid(dataset, detections: dict[str, ClassDetections], args: argparse.Namespace) -> None:
    """The first ``--draw`` images of the set with their detections above ``--draw-threshold``."""
    import numpy as np

    from odkd.visualize import draw_detections, image_grid, write_image

    pictures = []
    for index in range(min(args.draw, len(dataset))):
        image_id = dataset.annotations[index].image_id
        boxes, labels, scores = [], [], []
        for label, name in enumerate(dataset.class_names, start=1):
            mine = detections[name].image_ids == image_id
            boxes.append(detections[name].boxes[mine] - dataset.pixel_offset)  # -> 0-based corners
            labels += [label] * int(mine.sum())
            scores.append(detections[name].scores[mine])
        pictures.append(
            draw_detections(
                dataset[index]["image"],
                np.concatenate(boxes),
                labels,
                np.concatenate(scores).tolist(),
                dataset.class_names,
                args.draw_threshold,
            )
        )
    out = args.draw_output or Path(args.detections).with_suffix("") / "detections.jpg"
    write_image(out, image_grid(pictures))
    print(f"wrote {out}")


def report(result: VOCResult | COCOResult, output_json: Path | None, pr_curves: Path | None = None) -> None:
    """Print the AP table; write the result's JSON (``{"metric", "mAP", "ap", ...}``, null for a class without
    GT) and the precision-recall curves (devkit metrics) if asked."""
    print(format_result(result))
    if output_json is not None:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(result.to_json(), indent=1) + "\n")
        print(f"wrote {output_json}")
    if pr_curves is not None and isinstance(result, COCOResult):
        print("--pr-curves: the curves come with the devkit metrics (--metric voc07 or area), not coco")
    elif pr_curves is not None:
        from odkd.visualize import plot_pr_curves

        print(f"wrote {plot_pr_curves(result.recall, result.precision, result.ap, pr_curves)}")


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
    parser.add_argument("--device", choices=["cuda", "cpu"], help="--checkpoint's (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=4, help="data loader workers in model mode")
    args = parser.parse_args(argv)

    from odkd.config import EvalConfig, load_config

    cfg = load_config(args.config) if args.config else None
    args.eval_cfg = cfg.eval if cfg else EvalConfig()
    args.coco = args.coco_json is not None or (cfg is not None and cfg.data.format == "coco")
    if args.classes:
        args.class_names = tuple(name.strip() for name in args.classes.split(","))
    else:
        args.class_names = cfg.class_names if cfg else (None if args.coco else VOC_CLASSES)
    if args.ignore_classes is not None:
        args.ignore_classes = tuple(name.strip() for name in args.ignore_classes.split(",") if name.strip())
    elif cfg is not None:
        args.ignore_classes = cfg.data.ignore_classes
    if args.checkpoint is not None and args.onnx is not None:
        parser.error("give one model: --checkpoint (PyTorch) or --onnx (an exported file)")
    if args.onnx is not None and args.device is not None:
        parser.error("--device is for --checkpoint: an --onnx file runs on onnxruntime's CPU provider")
    if args.checkpoint is not None:  # a CUDA device that is not there is said now, not after reading the data
        from odkd.device import select_device

        args.device = select_device(args.device)
    args.model_file = args.checkpoint or args.onnx
    if args.model_file is None and (args.detections is None or args.draw):
        parser.error(
            "without --checkpoint or --onnx, --detections must name the detections to score (and --draw needs a model)"
        )
    if args.workers < 0 or args.draw < 0:
        parser.error(f"--workers and --draw count from 0, got {args.workers} and {args.draw}")
    args = _coco_args(parser, args, cfg) if args.coco else _voc_args(parser, args, cfg)
    # Where the results go, checked before the model runs over the set.
    outputs = {"--output-json": args.output_json, "--pr-curves": args.pr_curves, "--draw-output": args.draw_output}
    for what, path in outputs.items():
        if path is not None:
            check_output_path(path, what)
    if args.model_file is not None:  # model mode writes the detections: devkit files into a folder, or a COCO file
        check_output_path(args.detections, "--detections", folder=not args.coco)
    return args


def _voc_args(parser: argparse.ArgumentParser, args: argparse.Namespace, cfg) -> argparse.Namespace:
    from odkd.data.voc import parse_image_sets

    args.metric = args.metric or args.eval_cfg.metric
    if args.metric == "coco":
        parser.error("--metric coco scores COCO-format data: give --coco-json")
    args.voc_root = args.voc_root or (Path(cfg.data.voc_root) if cfg else None)
    if args.year and args.image_set:
        args.image_sets = f"{args.year}_{args.image_set}"
    elif cfg is not None and not (args.year or args.image_set):
        args.image_sets = cfg.data.test_sets
    else:
        parser.error("give --year and --image-set (or a --config whose data.test_sets names the set)")
    if args.voc_root is None:
        parser.error("give --voc-root (or a --config with data.voc_root)")
    sets = parse_image_sets(args.image_sets)
    args.set_name = sets[0][1] if len(sets) == 1 else args.image_sets
    if args.detections is None:
        args.detections = args.model_file.parent / f"results_{args.model_file.stem}"
    return args


def _coco_args(parser: argparse.ArgumentParser, args: argparse.Namespace, cfg) -> argparse.Namespace:
    args.metric = args.metric or (cfg.eval.metric if cfg is not None else "coco")  # as training scored it
    coco = cfg.data.coco if cfg is not None else None
    args.coco_json = args.coco_json or (Path(coco.test_json) if coco and coco.test_json else None)
    args.coco_images = args.coco_images or (Path(coco.test_images) if coco and coco.test_images else None)
    if args.ignore_classes:
        parser.error("--ignore-classes is for VOC data (COCO leaves out the categories outside --classes)")
    if args.coco_json is None:
        parser.error("COCO mode needs --coco-json (or a --config with data.coco.test_json)")
    if args.model_file is not None and args.coco_images is None:
        parser.error("running a model on COCO data needs --coco-images (or data.coco.test_images)")
    if args.detections is None:
        args.detections = args.model_file.parent / f"results_{args.model_file.stem}.json"
    return args


def evaluate_voc_data(args: argparse.Namespace) -> VOCResult:
    """VOC mode: run the model and write the devkit result files (with --checkpoint or --onnx), then score them."""
    from odkd.data import VOCDataset

    # Scoring result files needs the annotations only: the images are checked when a model will read them.
    dataset = VOCDataset(
        args.voc_root,
        args.image_sets,
        args.class_names,
        ignore_classes=args.ignore_classes,
        check_headers=args.model_file is not None,
    )
    if args.model_file is not None:
        paths = write_devkit_results(args.detections, args.set_name, args.class_names, run_model(args, dataset))
        print(f"wrote {len(paths)} result files to {args.detections}")
    detections = read_devkit_results(args.detections, args.set_name, args.class_names)
    return evaluate_dataset(detections, dataset, args.metric)


def evaluate_coco_data(args: argparse.Namespace) -> VOCResult | COCOResult:
    """COCO mode: run the model and write its results file (with --checkpoint or --onnx), then score the
    results file."""
    from odkd.data.coco import COCODataset

    images = args.coco_images or args.coco_json.parent
    dataset = COCODataset(args.coco_json, images, args.class_names, check_headers=args.model_file is not None)
    if args.model_file is not None:
        print(f"wrote {write_coco_results(run_model(args, dataset), dataset, args.detections)}")
    return evaluate_dataset(read_coco_results(args.detections, dataset), dataset, args.metric)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        args = parse_args(argv)
        result = evaluate_coco_data(args) if args.coco else evaluate_voc_data(args)
    except (OSError, ValueError, RuntimeError) as err:  # DatasetError and ConfigError are ValueErrors
        sys.exit(f"error: {err}")
    report(result, args.output_json, args.pr_curves)


if __name__ == "__main__":
    main()
