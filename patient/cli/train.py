"""`patient-train`: supervised training of a registry model (teachers, no-distillation baselines).

    patient-train --model cifar_resnet20 --data digits --eval-data digits --set steps=300 --set resolution=16 \\
                  --out teacher.eqx
"""

from __future__ import annotations

import argparse
import sys
import time

from .common import USER_ERRORS, check_output, data_source, fail

PROG = "patient-train"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Supervised training with patient's loop.")
    p.add_argument("--model", required=True, help="registry name or .eqx file to continue from")
    p.add_argument("--resolution", type=int, default=0, help="input resolution for a registry model")
    p.add_argument("--config", help="TOML config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data", default="digits")
    p.add_argument("--eval-data")
    p.add_argument("--workdir")
    p.add_argument("--out", default="model.eqx")
    args = p.parse_args(argv)
    try:
        import jax

        import patient
        from patient.engine import Config, load_config
        from patient.engine.config import parse_set
        from patient.models import create, list_models

        check_output(args.out)
        overrides = parse_set(args.set)
        cfg = load_config(args.config, **overrides) if args.config else Config().replace(**overrides)
        data = data_source(args.data, "train")
        eval_data = data_source(args.eval_data, "test") if args.eval_data else None
        if args.model in list_models():
            model = create(args.model, num_classes=data.num_classes, key=jax.random.key(cfg.seed),
                           resolution=args.resolution or None)
        else:
            model = args.model
        t0 = time.perf_counter()
        result = patient.train(model, data, eval_data=eval_data, config=cfg, workdir=args.workdir)
        patient.save(args.out, result.student, result.state, class_names=data.class_names,
                     meta={"config": cfg.to_toml(), "metrics": result.metrics})
        print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
        return 0
    except USER_ERRORS as e:
        return fail(PROG, e)


if __name__ == "__main__":
    sys.exit(main())
