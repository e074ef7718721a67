"""`patient-distill`: distil a teacher into a student from the command line, or run the demo.

    patient-distill --demo                                   # digits: teacher, fm student, student.eqx (~3 min)
    patient-distill --config examples/digits_fm.toml --teacher teacher.eqx --student mobilenetv3_small_050 \\
                    --data digits --eval-data digits --workdir runs/fm --out student.eqx [--set steps=500 ...]
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from .common import Parser, add_training_args, check_output, run, save_result, training_inputs

PROG = "patient-distill"


def parser() -> Parser:
    p = Parser(prog=PROG, description="Distil a teacher into a student (function matching by default).")
    p.add_argument("--demo", action="store_true", help="run the digits demo and write student.eqx")
    p.add_argument("--teacher", action="append", help=".eqx file or registry name; repeat for an ensemble")
    p.add_argument("--student", help=".eqx file or registry name")
    add_training_args(p, data_default="digits")
    p.add_argument("--out", default="student.eqx", help="where to write the distilled student")
    p.add_argument("--relabel", action="store_true",
                   help="the data's class names differ from the teacher's, yet its label i is the teacher's class i")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(PROG, lambda: _demo(args) if args.demo else _distill(args))


def _demo(args) -> int:
    from patient.cli.demo import run_demo

    check_output(args.out)
    run_demo(out=args.out)
    return 0


def _distill(args) -> int:
    from patient.engine import distill

    if not args.teacher or not args.student:
        raise ValueError("--teacher and --student are required (or run --demo)")
    cfg, data, eval_data = training_inputs(args)
    if not args.relabel:
        _check_teacher_classes(args.teacher, data)
    teachers = args.teacher if len(args.teacher) > 1 else args.teacher[0]
    t0 = time.perf_counter()
    result = distill(teachers, args.student, data, eval_data=eval_data, config=cfg, workdir=args.workdir)
    save_result(args.out, result, cfg, getattr(data, "class_names", None), time.perf_counter() - t0)
    return 0


def _check_teacher_classes(teachers: list[str], data: object) -> None:
    """The student records the data's class names; a teacher .eqx that records others predicts other classes, so the
    student would be named after classes it never learnt. Refused unless --relabel says the order is the same."""
    from patient.io import read_header

    data_names = [str(n) for n in (getattr(data, "class_names", None) or [])]
    for path in teachers:
        if not path.endswith(".eqx") or not data_names or not os.path.isfile(path):
            continue  # a registry name, or a missing file (the engine names it)
        names = read_header(path)[0].get("class_names")
        if names and [str(n) for n in names] != data_names:
            raise ValueError(f"teacher {path} predicts classes {names[:4]}... but the data's are {data_names[:4]}... "
                             "(in that order); distil on data of the teacher's classes, or pass --relabel if the "
                             "data's label i really is the teacher's class i")


if __name__ == "__main__":
    sys.exit(main())
