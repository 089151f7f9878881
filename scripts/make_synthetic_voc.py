"""Write the synthetic VOC-format dataset (classes: disc, block, triangle, ring, cross).

python scripts/make_synthetic_voc.py --root data/synthetic --trainval 400 --test 100 --seed 0
# then: VOCDataset("data/synthetic", "SYN_trainval", class_names=SYNTHETIC_CLASSES)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from odkd.class_names import SYNTHETIC_CLASSES


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/synthetic", help="folder that will contain VOC<year>/")
    parser.add_argument("--year", default="SYN", help="the dataset's year name (folder VOC<year>)")
    parser.add_argument("--trainval", type=int, default=400, help="images in the trainval set")
    parser.add_argument("--test", type=int, default=100, help="images in the test set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=240, help="smallest image side, pixels")
    parser.add_argument("--max-size", type=int, default=360, help="largest image side, pixels")
    args = parser.parse_args(argv)

    from odkd.data.synthetic import check_synthetic_settings, make_synthetic_voc

    splits = {"trainval": args.trainval, "test": args.test}
    try:
        check_synthetic_settings(splits, args.min_size, args.max_size, args.year)
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    folder = make_synthetic_voc(args.root, splits, args.year, args.seed, args.min_size, args.max_size)
    print(
        f"{folder}: {args.trainval} trainval + {args.test} test images, classes {', '.join(SYNTHETIC_CLASSES)} "
        f"({time.perf_counter() - start:.1f} s); image sets {args.year}_trainval, {args.year}_test"
    )


if __name__ == "__main__":
    main()
