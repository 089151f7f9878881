"""The Python steps of scripts/gpu_check.sh: size its real-photo stage, read its logs into summary.json.

python scripts/gpu_check.py plan configs/compare_voc5_real.yaml --seconds 280 --throughput-log OUT/2_throughput.log \\
        --write runs/gpu_check/voc5_real.yaml --output-dir runs/gpu_check/voc5_real [section.key=value ...]
    scale every run's iterations (the teacher keeps its longer schedule) so that the teacher, the student alone
    and the distilled student fit the seconds left at the speed the throughput stage measured, and write that
    experiment, one seed, for scripts/compare.py
python scripts/gpu_check.py summary OUT [--compare runs/gpu_check/voc5_real/compare.json]
    every number of OUT's logs (and the comparison) in OUT/summary.json, the goals met or missed; a digest
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    plan = sub.add_parser("plan", help="size the real-photo experiment to the seconds left")
    plan.add_argument("experiment", type=Path)
    plan.add_argument("--seconds", type=int, required=True, help="for the whole comparison, report included")
    plan.add_argument("--throughput-log", required=True, help="the throughput stage's log (its 'student' block)")
    plan.add_argument("--write", required=True, help="the experiment file to write")
    plan.add_argument("--output-dir", required=True, help="where the comparison's runs go")
    plan.add_argument("--iters", type=int, help="this many iterations for every run instead (dry run)")
    plan.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every run")
    summary = sub.add_parser("summary", help="OUT/summary.json from OUT's logs, and a digest")
    summary.add_argument("out", type=Path)
    summary.add_argument("--compare", type=Path, help="the real-photo stage's compare.json")
    # Overrides may follow the options (argparse gives a trailing nargs="*" positional only what precedes them).
    args, extra = parser.parse_known_args()
    if extra and (args.step != "plan" or any(x.startswith("-") or "=" not in x for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]

    from odkd import gpu_check

    if args.step == "plan":
        planned = gpu_check.plan_experiment(
            args.experiment, args.seconds, Path(args.throughput_log), args.output_dir, args.iters, args.overrides
        )
        planned.write(args.write)
        measured = planned.measured_images_per_s
        source = f"{measured:.0f} images/s measured for the student" if measured else "no throughput measured"
        print(
            f"real-photo plan for {args.seconds} s ({source}; planned at {planned.planned_images_per_s:.0f} "
            f"images/s, a distilled image costing {gpu_check.COST_DISTILLED}x, {gpu_check.RUN_OVERHEAD_S} s per "
            f"run and {gpu_check.ONCE_OVERHEAD_S} s besides):"
        )
        for name, run in planned.runs.items():
            print(
                f"  {name:<10} {run.model} x{run.width_mult}: {run.iterations} iterations of {run.batch_size} "
                f"({run.iterations * run.batch_size} images), ~{run.seconds:.0f} s"
            )
        print(f"written: {args.write}")
    else:
        data = gpu_check.summarise(args.out, args.compare)
        (args.out / "summary.json").write_text(json.dumps(data, indent=1))
        print(gpu_check.digest(data))


if __name__ == "__main__":
    main()
