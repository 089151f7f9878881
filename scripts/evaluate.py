"""PASCAL VOC AP of detections, exactly as the official devkit computes it.

From devkit result files (comp4_det_<set>_<class>.txt, devkit pixel coordinates):

python scripts/evaluate.py --detections results/ --voc-root VOCdevkit --year 2007 --image-set test \\
    --metric voc07 --output-json ap.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from odkd.data.voc import VOC_CLASSES, Annotation, DatasetError, load_annotations
from odkd.eval import METRICS, ClassDetections, VOCResult, evaluate, format_ap_table, read_devkit_results


def load_ground_truth(voc_root: Path, year: str, image_set: str, class_names: Sequence[str]) -> list[Annotation]:
    """The annotations of ``VOC<year>/ImageSets/Main/<image_set>.txt``; raises the first bad one's error."""
    _, annotations = load_annotations(voc_root, f"{year}_{image_set}", class_names)
    for annotation in annotations:
        if isinstance(annotation, DatasetError):
            raise annotation
    return annotations


def detections_from_files(args: argparse.Namespace, class_names: Sequence[str]) -> dict[str, ClassDetections]:
    """Detections read from the devkit result files in ``--detections``."""
    return read_devkit_results(args.detections, args.image_set, class_names)


def report(result: VOCResult, output_json: Path | None) -> None:
    """Print the AP table; write ``{"metric", "mAP", "ap"}`` (null for a class without GT) if asked."""
    print(format_ap_table(result))
    if output_json is not None:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(result.to_json(), indent=1) + "\n")
        print(f"wrote {output_json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detections", required=True, type=Path, help="folder of devkit result files")
    parser.add_argument("--voc-root", required=True, type=Path, help="the folder that contains VOC<year>/")
    parser.add_argument("--year", required=True, help="e.g. 2007")
    parser.add_argument("--image-set", required=True, help="e.g. test, val")
    parser.add_argument("--metric", choices=METRICS, default="voc07", help="voc07: 11-point; area: VOC2010+")
    parser.add_argument("--output-json", type=Path, help="write the per-class AP and the mAP here")
    parser.add_argument("--classes", help="comma-separated class list (default: the 20 VOC classes)")
    args = parser.parse_args()
    class_names = tuple(name.strip() for name in args.classes.split(",")) if args.classes else VOC_CLASSES
    try:
        annotations = load_ground_truth(args.voc_root, args.year, args.image_set, class_names)
        detections = detections_from_files(args, class_names)
        result = evaluate(detections, annotations, class_names, args.metric)
    except (OSError, ValueError) as err:  # DatasetError is a ValueError
        sys.exit(f"error: {err}")
    report(result, args.output_json)


if __name__ == "__main__":
    main()
