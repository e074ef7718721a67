"""`patient-distill`: distil a teacher into a student from the command line, or run the demo.

    patient-distill --demo                                   # digits: teacher, fm student, student.eqx (~3 min)
    patient-distill --config examples/digits_fm.toml --teacher teacher.eqx --student mobilenetv3_small_050 \\
                    --data digits --eval-data digits --workdir runs/fm --out student.eqx [--set steps=500 ...]
"""

from __future__ import annotations

import argparse
import sys
import time

from .common import USER_ERRORS, check_output, data_source, fail

PROG = "patient-distill"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Distil a teacher into a student (function matching by default).")
    p.add_argument("--demo", action="store_true", help="run the digits demo and write student.eqx")
    p.add_argument("--config", help="TOML config (keys of patient.engine.Config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    p.add_argument("--teacher", action="append", help=".eqx file or registry name; repeat for an ensemble")
    p.add_argument("--student", help=".eqx file or registry name")
    p.add_argument("--data", default="digits", help="digits | fashion_mnist | image_folder:PATH (train split)")
    p.add_argument("--eval-data", help="digits | fashion_mnist | image_folder:PATH (test split)")
    p.add_argument("--workdir", help="checkpoints, history and resolved config; rerun to resume")
    p.add_argument("--out", default="student.eqx", help="where to write the distilled student")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.demo:
            from patient.cli.demo import run_demo

            check_output(args.out)
            run_demo(out=args.out)
            return 0
        return _distill(args)
    except USER_ERRORS as e:
        return fail(PROG, e)


def _distill(args) -> int:
    import patient
    from patient.engine import Config, load_config
    from patient.engine.config import parse_set

    if not args.teacher or not args.student:
        raise ValueError("--teacher and --student are required (or run --demo)")
    check_output(args.out)
    overrides = parse_set(args.set)
    cfg = load_config(args.config, **overrides) if args.config else Config().replace(**overrides)
    data = data_source(args.data, "train")
    eval_data = data_source(args.eval_data, "test") if args.eval_data else None
    teachers = args.teacher if len(args.teacher) > 1 else args.teacher[0]
    t0 = time.perf_counter()
    result = patient.distill(teachers, args.student, data, eval_data=eval_data, config=cfg, workdir=args.workdir)
    patient.save(args.out, result.student, result.state, class_names=getattr(data, "class_names", None),
                 meta={"config": cfg.to_toml(), "metrics": result.metrics})
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
