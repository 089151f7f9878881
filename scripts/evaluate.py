"""PASCAL VOC AP of detections, exactly as the official devkit computes it.

From devkit result files (comp4_det_<set>_<class>.txt, devkit pixel coordinates), e.g. another tool's:

    python scripts/evaluate.py --detections results/ --voc-root VOCdevkit --year 2007 --image-set test \\
        --metric voc07 --output-json ap.json

From a model (odkd model file or training checkpoint): runs it over the set (batched, bf16 on CUDA),
writes the devkit result files to --detections, and scores those files the same way:

    python scripts/evaluate.py --checkpoint runs/x/best.pt --voc-root VOCdevkit --year 2007 --image-set test \\
        --detections runs/x/results --pr-curves runs/x/pr.png --draw 16
    python scripts/evaluate.py --config configs/demo_teacher_synthetic.yaml --checkpoint runs/demo_teacher/best.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from odkd.data.voc import VOC_CLASSES, Annotation, DatasetError, load_annotations, parse_image_sets
from odkd.eval import (
    METRICS,
    ClassDetections,
    VOCResult,
    evaluate,
    format_ap_table,
    read_devkit_results,
    write_devkit_results,
)


def load_ground_truth(voc_root: Path, image_sets: str, class_names: Sequence[str]) -> list[Annotation]:
    """The annotations of ``image_sets`` (e.g. ``2007_test``); raises the first bad one's error."""
    _, annotations = load_annotations(voc_root, image_sets, class_names)
    for annotation in annotations:
        if isinstance(annotation, DatasetError):
            raise annotation
    return annotations


def detections_from_model(args: argparse.Namespace, image_sets: str, class_names: Sequence[str]) -> None:
    """Run the model of ``--checkpoint`` over the set and write its devkit result files to ``--detections``;
    optionally draw a grid of images with their detections."""
    import torch

    from odkd.checkpoint import load_model
    from odkd.data import VOCDataset
    from odkd.inference import detect_dataset

    model = load_model(args.checkpoint)
    if model.num_classes != len(class_names) + 1:
        raise ValueError(
            f"{args.checkpoint} predicts {model.num_classes - 1} classes but the class list has {len(class_names)}: "
            f"pass --classes (or --config) with the classes it was trained on"
        )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = VOCDataset(args.voc_root, image_sets, class_names)
    eval_cfg = args.eval_cfg
    detections = detect_dataset(
        model,
        dataset,
        device,
        batch_size=eval_cfg.batch_size,
        num_workers=args.workers,
        score_threshold=eval_cfg.score_threshold,
        nms_threshold=eval_cfg.nms_threshold,
        top_k=eval_cfg.top_k,
        max_detections=eval_cfg.max_detections,
    )
    paths = write_devkit_results(args.detections, args.set_name, class_names, detections)
    print(f"wrote {len(paths)} result files to {args.detections}")
    if args.draw:
        draw_grid(dataset, detections, args)


def draw_grid(dataset, detections: dict[str, ClassDetections], args: argparse.Namespace) -> None:
    """The first ``--draw`` images of the set with their detections above ``--draw-threshold``."""
    import cv2
    import numpy as np

    from odkd.visualize import draw_detections, image_grid

    pictures = []
    for index in range(min(args.draw, len(dataset))):
        image_id = dataset.annotations[index].image_id
        boxes, labels, scores = [], [], []
        for label, name in enumerate(dataset.class_names, start=1):
            mine = detections[name].image_ids == image_id
            boxes.append(detections[name].boxes[mine] - [1, 1, 0, 0])  # devkit pixels -> 0-based corners
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
    out = args.draw_output or Path(args.detections) / "detections.jpg"
    cv2.imwrite(str(out), cv2.cvtColor(image_grid(pictures), cv2.COLOR_RGB2BGR))
    print(f"wrote {out}")


def report(result: VOCResult, output_json: Path | None, pr_curves: Path | None = None) -> None:
    """Print the AP table; write ``{"metric", "mAP", "ap"}`` (null for a class without GT) and the
    precision-recall curves if asked."""
    print(format_ap_table(result))
    if output_json is not None:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(result.to_json(), indent=1) + "\n")
        print(f"wrote {output_json}")
    if pr_curves is not None:
        from odkd.visualize import plot_pr_curves

        print(f"wrote {plot_pr_curves(result.recall, result.precision, result.ap, pr_curves)}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detections", type=Path, help="folder of devkit result files (written in model mode)")
    parser.add_argument("--checkpoint", type=Path, help="model mode: an odkd model file or training checkpoint")
    parser.add_argument("--config", type=Path, help="model mode: take data and eval settings from this config")
    parser.add_argument("--voc-root", type=Path, help="the folder that contains VOC<year>/")
    parser.add_argument("--year", help="e.g. 2007")
    parser.add_argument("--image-set", help="e.g. test, val")
    parser.add_argument("--metric", choices=METRICS, help="voc07: 11-point (default); area: VOC2010+")
    parser.add_argument("--output-json", type=Path, help="write the per-class AP and the mAP here")
    parser.add_argument("--classes", help="comma-separated class list (default: the 20 VOC classes)")
    parser.add_argument("--pr-curves", type=Path, help="save the precision-recall curves to this PNG")
    parser.add_argument("--draw", type=int, default=0, help="model mode: draw the first N images' detections")
    parser.add_argument("--draw-threshold", type=float, default=0.3, help="least score drawn")
    parser.add_argument("--draw-output", type=Path, help="grid picture path (default: DETECTIONS/detections.jpg)")
    parser.add_argument("--device", choices=["cuda", "cpu"])
    parser.add_argument("--workers", type=int, default=4, help="data loader workers in model mode")
    args = parser.parse_args(argv)

    from odkd.config import EvalConfig, load_config

    cfg = load_config(args.config) if args.config else None
    args.eval_cfg = cfg.eval if cfg else EvalConfig()
    args.metric = args.metric or args.eval_cfg.metric
    if args.classes:
        args.class_names = tuple(name.strip() for name in args.classes.split(","))
    else:
        args.class_names = cfg.class_names if cfg else VOC_CLASSES
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
    if args.checkpoint is None and (args.detections is None or args.draw):
        parser.error("without --checkpoint, --detections must name a folder of result files (and --draw needs a model)")
    if args.detections is None:
        args.detections = args.checkpoint.parent / f"results_{args.checkpoint.stem}"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    try:
        args = parse_args(argv)
        annotations = load_ground_truth(args.voc_root, args.image_sets, args.class_names)
        if args.checkpoint is not None:
            detections_from_model(args, args.image_sets, args.class_names)
        detections = read_devkit_results(args.detections, args.set_name, args.class_names)
        result = evaluate(detections, annotations, args.class_names, args.metric)
    except (OSError, ValueError, RuntimeError) as err:  # DatasetError and ConfigError are ValueErrors
        sys.exit(f"error: {err}")
    report(result, args.output_json, args.pr_curves)


if __name__ == "__main__":
    main()
