"""Train an SSD detector on its data alone (a teacher, or a student baseline without distillation).

    python scripts/train_teacher.py                        # CPU demo teacher: synthetic data, a few minutes
    python scripts/train_teacher.py --config configs/vgg16_ssd300_voc0712.yaml data.voc_root=/data/VOCdevkit
    torchrun --nproc_per_node=8 scripts/train_teacher.py --config configs/vgg16_ssd300_voc0712.yaml
    python scripts/train_teacher.py --config ... --resume auto    # continue the run in train.output_dir

Any config key can be overridden after the options: optim.max_iters=1000 data.batch_size=16. A config
with a distill section is refused: distillation runs through scripts/distill.py, so that a run is never
something other than what its script's name says.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_teacher_synthetic.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: the CPU demo)")
    parser.add_argument("--resume", help="a training checkpoint, or 'auto' for the latest in train.output_dir")
    parser.add_argument(
        "--overwrite", action="store_true", help="a fresh run in a train.output_dir holding another run's files"
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_intermixed_args()  # overrides may come before or after the options

    from odkd.config import load_config
    from odkd.engine.build import SCRIPT_ERRORS, run_training, summary

    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.distill is not None:
            raise ValueError(
                f"{args.config} distils a student from a teacher (it has a distill section): run "
                f"python scripts/distill.py --config {args.config}"
            )
        result, info = run_training(cfg, args.resume, args.device, overwrite=args.overwrite)
    except SCRIPT_ERRORS as err:
        sys.exit(f"error: {err}")
    if info.is_main:
        print(summary(cfg, result, cfg.model.name))


if __name__ == "__main__":
    main()
