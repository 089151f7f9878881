"""Convert a published SSD checkpoint into an odkd model file.

python scripts/convert_checkpoint.py --source qfgaohao --input mb2-ssd-lite-mp-0_686.pth --output student.pt
python scripts/convert_checkpoint.py --source ssd.pytorch --input ssd300_mAP_77.43_v2.pth --output teacher.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="the publisher's format: qfgaohao or ssd.pytorch")
    parser.add_argument("--input", required=True, type=Path, help="the published .pth file")
    parser.add_argument("--output", required=True, type=Path, help="the odkd model file to write")
    args = parser.parse_args()

    from odkd.checkpoint import load_model, save_model
    from odkd.convert import SOURCES

    if args.source not in SOURCES:
        parser.error(f"argument --source: invalid choice: {args.source!r} (choose from {', '.join(sorted(SOURCES))})")
    try:
        model = load_model(args.input, args.source)
    except (FileNotFoundError, ValueError) as err:  # ModelFileError is a ValueError
        sys.exit(f"error: {err}")
    save_model(model, args.output)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.input} ({args.source}) -> {args.output}: {model.arch}, {model.num_classes} classes, "
        f"{params:,} parameters, {model.priors.shape[0]} priors, preprocessing {model.preprocessing}"
    )


if __name__ == "__main__":
    main()
