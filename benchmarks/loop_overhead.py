"""What the training loop costs: images/s of `distill()` against the bare jitted step on batches already on the device.

    python benchmarks/loop_overhead.py [--steps 60] [--save benchmarks/results/loop_overhead.txt]

Setup: cifar_resnet56 teacher -> cifar_resnet20 student at 32 px, batch 128, mode `fm` (shared inception crop, flip,
mixup), Adam, on the 60000 Fashion-MNIST training images (Debian's `dataset-fashion-mnist`). The same models, batch
and config in every row.

- `bare step`: the step `distill` compiles (`patient.engine.step.make_step`), with the state and teachers placed on
  the mesh as the trainer places them, called `--steps` times (after 3 warm-up calls) on 4 batches rendered by the
  real pipeline and already on the device, blocking on the last one only (as the loop does between log steps);
  images/s over those steps, compilation excluded.
- `distill(num_workers=N)`: the whole loop (data pipeline with N worker processes, device prefetch, logging every 10
  steps; no evaluation, no checkpoints), `--steps` + 10 steps; images/s is the median of the trainer's own 10-step
  throughput windows after the first (which holds compilation).

The ratio distill / bare step is the share of the step's speed the loop keeps (goal >= 0.95 at the better worker
setting). The machine must be quiet (common.Quiet): otherwise the result is printed but not saved (exit status 3).
About 5 minutes on 2 cores. Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from common import Quiet, header, json_line, report, table  # noqa: E402

TEACHER, STUDENT, RES, BATCH = "cifar_resnet56", "cifar_resnet20", 32, 128


def models():
    import jax

    from patient.models import create

    teacher = create(TEACHER, num_classes=10, key=jax.random.key(0), resolution=RES)
    student = create(STUDENT, num_classes=10, key=jax.random.key(1), resolution=RES)
    return teacher, student


def bare_step(data, steps: int) -> float:
    """Images/s of the jitted step alone, on batches already on the device."""
    import contextlib

    import equinox as eqx
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from patient.data.pipelines import pipeline
    from patient.engine.config import Config
    from patient.engine.evaluation import put_batch
    from patient.engine.step import init_state, make_mesh, make_optimizer, make_step

    cfg = Config(batch_size=BATCH, steps=steps, mode="fm", log_every=10)
    (teacher, t_state), (student, s_state) = models()
    params, static = eqx.partition(student, eqx.is_array)
    opt = make_optimizer(cfg, steps)
    mesh = make_mesh()
    step = make_step(cfg, static, opt, mesh=mesh, supervised=False, use_cache=False, mix=True, total_steps=steps)
    replicated = NamedSharding(mesh, P())  # placed as the trainer places them, so no call recompiles
    ts = jax.device_put(init_state(params, s_state, opt, 0), replicated)
    teachers = jax.device_put([(teacher, t_state)], replicated)
    with contextlib.closing(iter(pipeline(data, mode="fm", student_res=RES, batch_size=BATCH, seed=0))) as it:
        raws = [next(it) for _ in range(4)]
    batches = [put_batch(mesh, {"student": r["student"], "teacher": r["teacher"], "label": r["label"].astype(np.int32)})
               for r in raws]
    for i in range(3):  # compile, and make sure a second call does not compile again
        ts, m = step(ts, batches[i % 4], teachers)
        jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for i in range(steps):
        ts, m = step(ts, batches[i % 4], teachers)
    jax.block_until_ready(m["loss"])
    return steps * BATCH / (time.perf_counter() - t0)


def loop(data, steps: int, workers: int) -> float:
    """Images/s of distill() from its own throughput windows (the first, with compilation, left out)."""
    import patient

    teacher, student = models()
    r = patient.distill(teacher, student, data, mode="fm", steps=steps + 10, batch_size=BATCH, log_every=10,
                        num_workers=workers, progress=False)
    windows = [h["images_per_s"] for h in r.history if "images_per_s" in h][1:]
    return statistics.median(windows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="timed steps per row (>= 20)")
    p.add_argument("--save", help="write the table and the JSON line here (only from a quiet machine)")
    args = p.parse_args(argv)
    if args.steps < 20:
        p.error("--steps must be >= 20 (the loop's throughput comes from 10-step windows)")
    from patient.data import fashion_mnist

    data = fashion_mnist("train")
    t0 = time.perf_counter()
    rows = []
    with Quiet() as quiet:
        bare = bare_step(data, args.steps)
        rows.append({"run": "bare step (batches on device)", "images_per_s": bare, "ratio": 1.0})
        for workers in (0, 2):
            rate = loop(data, args.steps, workers)
            rows.append({"run": f"distill(num_workers={workers})", "images_per_s": rate, "ratio": rate / bare})
    wall = time.perf_counter() - t0
    best = max(r["ratio"] for r in rows[1:])
    what = (f"{TEACHER} -> {STUDENT}, {RES} px, batch {BATCH}, fm, Adam, Fashion-MNIST; {args.steps} timed steps per "
            "row; ratio = images/s / bare step's")
    lines = header(f"python benchmarks/loop_overhead.py --steps {args.steps}", wall, what, quiet) + [
        table(rows, [("run", "run"), ("images_per_s", "images/s"), ("ratio", "vs bare step")]),
        "",
        f"the loop keeps {best:.3f} of the bare step's speed at its better worker setting (goal >= 0.95: "
        f"{'met' if best >= 0.95 else 'NOT met'})",
    ]
    lines.append(json_line("loop_overhead", run_time_s=round(wall, 1), rows=rows, best_ratio=round(best, 4),
                           **quiet.figures()))
    report(lines, {}, args.save, quiet)


if __name__ == "__main__":
    main()
