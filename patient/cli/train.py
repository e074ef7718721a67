"""`patient-train`: supervised training of a registry model (teachers, no-distillation baselines).

    patient-train --model cifar_resnet20 --resolution 16 --data digits --eval-data digits --set steps=300 \\
                  --out teacher.eqx
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from .common import Parser, add_training_args, run, save_result, training_inputs

PROG = "patient-train"


def parser() -> Parser:
    p = Parser(prog=PROG, description="Supervised training with patient's loop.")
    p.add_argument("--model", required=True, help="registry name, or an .eqx file to continue from")
    p.add_argument("--resolution", type=int, default=0, help="input resolution of a registry model (default: its own)")
    add_training_args(p, data_default="digits")
    p.add_argument("--out", default="model.eqx", help="where to write the trained model")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(PROG, lambda: _train(args))


def _train(args) -> int:
    import jax

    from patient.engine import train
    from patient.models import create, list_models

    if args.resolution < 0:
        raise ValueError(f"--resolution must be a positive integer, got {args.resolution}")
    cfg, data, eval_data = training_inputs(args)
    if args.model in list_models():
        model = create(args.model, num_classes=data.num_classes, key=jax.random.key(cfg.seed),
                       resolution=args.resolution or None)
    else:
        model = args.model
    t0 = time.perf_counter()
    result = train(model, data, eval_data=eval_data, config=cfg, workdir=args.workdir)
    save_result(args.out, result, cfg, data.class_names, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
