"""Paired comparison of training configs over seeds: a teacher, the student alone, distilled students.

    python scripts/compare.py                                   # the CPU demo (configs/compare_demo.yaml)
    python scripts/compare.py configs/compare_methods_synthetic.yaml --seeds 1 2 3 4 5
    python scripts/compare.py --arm alone configs/my_student.yaml --arm hinton configs/my_distill.yaml \\
        'distill.methods=[hinton]' --seeds 1 2 3 4 5 --output-dir runs/ab
    torchrun --nproc_per_node=8 scripts/compare.py configs/my_experiment.yaml
    python scripts/compare.py configs/compare_methods_synthetic.yaml --device cpu --jobs 2   # 2 runs at once

Each arm is a config file plus overrides; the same seed gives every arm the same initial weights, data
order and augmentation, so the difference to the baseline is paired by seed. Prints and writes
compare.md, compare.json, compare.png (per-class AP, loss terms) and detections.jpg to the output
folder. Run it again to add seeds or arms: finished runs of an unchanged config are reused, cut ones
resumed. Overrides (section.key=value, after the experiment file if one is given) apply to every run;
after `--only`, the words with an `=` are overrides and the others arm names.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

DEFAULT_EXPERIMENT = Path(__file__).resolve().parents[1] / "configs" / "compare_demo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", type=Path, help="experiment file (default: the CPU demo)")
    parser.add_argument(
        "--arm", nargs="+", action="append", metavar="NAME CONFIG [OVERRIDE]",
        help="an arm without an experiment file: its name, config file and overrides; the first is the baseline",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the experiment's)")
    parser.add_argument("--only", nargs="+", metavar="ARM", help="run only these arms (and the baseline)")
    parser.add_argument("--output-dir", help="default: the experiment's")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    parser.add_argument("--fresh", action="store_true", help="train every run anew instead of reusing finished ones")
    parser.add_argument(
        "--jobs", type=int, default=1, help="CPU: runs at once, each on its share of the threads (default: 1)"
    )
    parser.add_argument("--no-picture", action="store_true", help="skip detections.jpg")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, section.key=value")
    args = parser.parse_intermixed_args()
    if args.experiment is not None and "=" in str(args.experiment) and not args.experiment.exists():
        # `compare.py section.key=value`: overrides of the demo experiment, not an experiment file
        args.overrides.insert(0, str(args.experiment))
        args.experiment = None
    if args.only:  # `--only a b section.key=value`: --only takes every word after it; overrides are not arm names
        args.overrides += [name for name in args.only if "=" in name]
        args.only = [name for name in args.only if "=" not in name]

    from odkd.compare import Arm, Experiment, load_experiment, run_experiment, write_report
    from odkd.config import ConfigError
    from odkd.engine.build import SCRIPT_ERRORS, setup_logging
    from odkd.engine.distributed import setup_distributed

    try:
        if args.arm:
            if args.experiment:
                raise ConfigError("give an experiment file or --arm, not both")
            arms = [Arm(name, config, tuple(rest)) for name, config, *rest in (a for a in args.arm if len(a) >= 2)]
            if len(arms) != len(args.arm):
                raise ConfigError("each --arm needs a name and a config file")
            experiment = Experiment(
                arms, arms[0].name, args.seeds or [1, 2, 3, 4, 5], args.output_dir or "runs/compare"
            )
        else:
            experiment = load_experiment(args.experiment or DEFAULT_EXPERIMENT)
        experiment = dataclasses.replace(
            experiment,
            seeds=args.seeds or experiment.seeds,
            output_dir=args.output_dir or experiment.output_dir,
            overrides=(*experiment.overrides, *args.overrides),
        )
        info = setup_distributed(args.device)
        setup_logging(info)
        result = run_experiment(
            experiment, args.device, progress=args.jobs == 1, fresh=args.fresh, arms=args.only, jobs=args.jobs
        )
    except SCRIPT_ERRORS as err:
        sys.exit(f"error: {err}")
    if info.is_main:
        paths = write_report(result, picture=not args.no_picture)
        print("\n" + paths["markdown"].read_text())
        print("written: " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
