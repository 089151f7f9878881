"""Distil a teacher SSD into a student: Chen et al. 2017, Hinton KD, LD, FGD, CrossKD, or several at once.

    python scripts/train_teacher.py && python scripts/distill.py   # CPU demo: synthetic data, demo teacher
    python scripts/distill.py --config configs/distill_vgg16_lite300_to_mbv2.yaml \\
        --teacher runs/vgg16_lite300_voc0712/best.pt
    python scripts/distill.py --config configs/distill_vgg16_lite300_to_mbv2.yaml 'distill.methods=[chen2017, fgd]'
    torchrun --nproc_per_node=8 scripts/distill.py --config configs/distill_vgg16_ssd300_to_mbv2.yaml \\
        --teacher ssd300_mAP_77.43_v2.pth distill.teacher_source=ssd.pytorch

Same trainer as train_teacher.py (AMP, DDP, --resume, evaluation, logs); the config's distill section says
what is distilled. The exported student (best.pt, model_final.pt) holds the student only; training
checkpoints also hold the adaptation layers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_distill_synthetic.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: the CPU demo)")
    parser.add_argument("--teacher", help="teacher weights (overrides distill.teacher)")
    parser.add_argument("--resume", help="a training checkpoint, or 'auto' for the latest in train.output_dir")
    parser.add_argument(
        "--overwrite", action="store_true", help="a fresh run in a train.output_dir holding another run's files"
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_intermixed_args()  # overrides may come before or after the options
    overrides = [*args.overrides, *([f"distill.teacher={args.teacher}"] if args.teacher else [])]

    from odkd.config import load_config
    from odkd.engine.build import SCRIPT_ERRORS, run_training, summary

    try:
        cfg = load_config(args.config, overrides)
        if cfg.distill is None:
            raise ValueError(
                f"{args.config} has no distill section (distill.methods, distill.teacher): nothing to distil; "
                f"train it alone with python scripts/train_teacher.py --config {args.config}"
            )
        if cfg.distill.teacher and not Path(cfg.distill.teacher).is_file():
            hint = " (train it first: python scripts/train_teacher.py)" if args.config == DEFAULT_CONFIG else ""
            raise FileNotFoundError(f"teacher {cfg.distill.teacher} does not exist{hint}")
        result, info = run_training(cfg, args.resume, args.device, overwrite=args.overwrite)
    except SCRIPT_ERRORS as err:
        sys.exit(f"error: {err}")
    if info.is_main:
        headline = (
            f"student {cfg.model.name} x{cfg.model.width_mult} distilled from {cfg.distill.teacher} "
            f"({' + '.join(cfg.distill.methods)})"
        )
        print(summary(cfg, result, headline))


if __name__ == "__main__":
    main()
