"""Shampoo vs Adam on distillation: steps to a held-out student-teacher agreement target, and seconds per step.

Run (from the repository root; about 10 minutes on 2 shared cores when the teacher must be trained, 2.5 less when it
is cached):

    python benchmarks/shampoo_vs_adam.py                      # print the tables and one JSON line
    python benchmarks/shampoo_vs_adam.py --save benchmarks/results/shampoo_vs_adam.txt

Setup (Fashion-MNIST, everything at 20 px, 3 channels, seed 0):

- Teacher: cifar_resnet20 trained once with `patient.train` on all 60000 training images (mode `same/rc`, Adam 3e-3,
  batch 128, 200 steps); cached as `/tmp/patient_bench/fmnist_cifar_resnet20_20px_200steps.eqx` so reruns skip it.
  Its top-1 on the 10000 test images is printed.
- Student: cifar_resnet20 with depths (1, 1, 1) (78k parameters), the same initialisation in every run, distilled
  with `patient.distill` in mode `fm` (inception crops of area >= 0.05 shared by teacher and student, mixup) on 5000
  training images (500 per class), batch 128, a fixed budget of 200 steps, 5% linear warm-up then cosine decay,
  global-norm clipping at 1.
- Runs: Adam at lr 3e-3, 1e-2, 3e-2 and Shampoo (`patient.optim.shampoo` through `optimizer="shampoo"`: block size
  128, precondition_every 10, start_preconditioning_step 10, graft "adam", eigh roots) at lr 3e-3, 1e-2, 3e-2,
  interleaved (Adam, Shampoo, Adam, ...) so that the load of other jobs falls on both alike.

Measures:

- Held-out agreement: % of 2000 test images (200 per class, never trained on) on which the student's top-1 equals the
  teacher's, and KL(teacher || student) at T=1 on them, evaluated every 20 steps (`eval_data`, `eval_every`) and at
  the end.
- Target: the best Adam run's final held-out agreement (best = highest final agreement among the Adam learning
  rates). "Steps to target" is the first evaluated step (a multiple of 20) with agreement >= target; the best Adam
  run needs its whole budget or nearly by construction. A second target uses KL: the lowest final KL of the Adam
  runs, reached when KL <= it. For each optimizer the best run is the one reaching the target in the fewest steps
  (ties: higher final agreement), and the ratio is steps(best Adam) / steps(best Shampoo).
- Seconds per step: from the trainer's logged throughput (images/s over 10-step windows, data loading included),
  leaving out the first window (compilation) and every window that follows an evaluation (the trainer's window clock
  includes the evaluation). Each remaining window holds exactly one Shampoo root recomputation (steps 11-20, 31-40,
  ...). The ratio compares the medians over every window of every run of each optimizer.

The goal of issue 5 is >= 2x fewer steps at <= 1.3x the time per step; the last lines say plainly whether it is met.

Last run (benchmarks/results/shampoo_vs_adam.txt; 2 shared Xeon cores, load average 4.2, teacher trained in the run
(154 s, test top-1 80.6%), 574 s in all):

    optimizer     lr                 shampoo settings  agreement %     KL  steps to agr.  steps to KL  s/step
    adam       0.003                                -         77.5  0.298              -            -   0.197
    adam        0.01                                -         80.2  0.238              -          200   0.199
    adam *      0.03                                -         80.6   0.24            200            -   0.202
    shampoo    0.003  block 128, every 10, graft adam         82.9  0.204            160          160   0.284
    shampoo *   0.01  block 128, every 10, graft adam         88.6  0.115            100          100     0.2
    shampoo     0.03  block 128, every 10, graft adam         88.5  0.111            100          100   0.189

Shampoo reaches the best Adam's final agreement (80.6%) in 100 steps against 200 (2.0x; at step 80 it stood at
80.2%, so the 20-step evaluation grid is what caps the ratio), the KL target too (2.0x), at 1.02x Adam's time per
step (0.202 vs 0.199 s): the goal (>= 2x at <= 1.3x) is met, just; the paper's 4x is not. With the same budget
Shampoo ends at 88.6% agreement and 2.1x lower KL. Adam at lr 0.1 (checked apart) ends at 76.1%, so Adam's grid
brackets its best. On a student this small the root recomputation is a negligible part of the step (teacher
forward, student forward/backward and data loading dominate).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # Shampoo's small eigh calls crawl when BLAS threads fight

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parent.parent))
from common import cached_teacher, cpu_model, save_with_header, table, teacher_note  # noqa: E402

CACHE = pathlib.Path("/tmp/patient_bench")


def get_teacher(args, log):
    """Train cifar_resnet20 on all 60000 training images once (cached as .eqx); returns ((model, state), info)."""
    return cached_teacher(CACHE / f"fmnist_cifar_resnet20_{args.res}px_{args.teacher_steps}steps.eqx", "cifar_resnet20",
                          res=args.res, steps=args.teacher_steps, log=log)


def run_one(args, teacher, opt, lr, train_src, eval_src):
    import jax

    import patient
    from patient.models import create

    student = create("cifar_resnet20", num_classes=10, key=jax.random.key(1), resolution=args.res, depths=(1, 1, 1))
    extra = {}
    if opt == "shampoo":
        extra = dict(shampoo_graft=args.graft, shampoo_block_size=args.block,
                     shampoo_precondition_every=args.precondition_every)
    t0 = time.perf_counter()
    r = patient.distill(teacher, student, train_src, eval_data=eval_src, mode="fm", steps=args.steps,
                        batch_size=args.batch, optimizer=opt, learning_rate=lr, crop_area_min=args.crop_area_min,
                        log_every=args.log_every, eval_every=args.eval_every, progress=False, **extra)
    wall = time.perf_counter() - t0
    evals = [(h["step"], h["eval_agreement"], h["eval_kl"]) for h in r.history if "eval_agreement" in h]
    logs = [h for h in r.history if "images_per_s" in h]
    eval_steps = {s for s, _, _ in evals}
    # Seconds per step from the logged throughput windows: the first (compilation) and those that follow an
    # evaluation (the trainer's window clock includes it) are left out.
    windows = [args.batch / h["images_per_s"] for h in logs
               if h["step"] > args.log_every and (h["step"] - args.log_every) not in eval_steps]
    return dict(optimizer=opt, lr=lr, evals=evals, windows=windows, wall_s=wall,
                train_agreement=logs[-1]["agreement"], train_kl=logs[-1]["kl"])


def first_step(evals, ok):
    """First evaluated step whose (agreement, kl) satisfies `ok`, or None."""
    return next((s for s, a, k in evals if ok(a, k)), None)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--save", type=pathlib.Path, help="also write the output, with a header, to this file")
    p.add_argument("--res", type=int, default=20, help="teacher and student resolution (px)")
    p.add_argument("--teacher-steps", type=int, default=200)
    p.add_argument("--steps", type=int, default=200, help="distillation steps per run (the fixed budget)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--per-class", type=int, default=500, help="distillation subset: training images per class")
    p.add_argument("--eval-per-class", type=int, default=200, help="held-out test images per class")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--crop-area-min", type=float, default=0.05)
    p.add_argument("--adam-lrs", default="3e-3,1e-2,3e-2")
    p.add_argument("--shampoo-lrs", default="3e-3,1e-2,3e-2")
    p.add_argument("--graft", default="adam")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--precondition-every", type=int, default=10)
    args = p.parse_args()
    if args.eval_every % args.log_every or (args.eval_every // args.log_every) < 2:
        p.error("--eval-every must be a multiple (>= 2) of --log-every, so that some throughput windows hold no "
                "evaluation")
    if not [x for x in args.adam_lrs.split(",") if x] or not [x for x in args.shampoo_lrs.split(",") if x]:
        p.error("--adam-lrs and --shampoo-lrs each need at least one learning rate")
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    import jax
    import numpy as np
    import optax

    from patient.data import fashion_mnist, subset

    teacher, tinfo = get_teacher(args, log)
    train_src = subset(fashion_mnist("train"), per_class=args.per_class, seed=0)
    eval_src = subset(fashion_mnist("test"), per_class=args.eval_per_class, seed=0)
    adam_lrs = [float(x) for x in args.adam_lrs.split(",") if x]
    sh_lrs = [float(x) for x in args.shampoo_lrs.split(",") if x]
    # Interleave the runs so that the load of other jobs on the machine falls on both optimizers alike.
    a_plan, s_plan = [("adam", lr) for lr in adam_lrs], [("shampoo", lr) for lr in sh_lrs]
    order = [x for pair in zip(a_plan, s_plan) for x in pair] + a_plan[len(s_plan):] + s_plan[len(a_plan):]
    runs = []
    for opt, lr in order:
        r = run_one(args, teacher, opt, lr, train_src, eval_src)
        runs.append(r)
        print(f"  {opt} lr={lr:g}: held-out agreement {r['evals'][-1][1]:.2f}%, KL {r['evals'][-1][2]:.4f}, "
              f"{statistics.median(r['windows']):.3f} s/step, {r['wall_s']:.0f} s wall", flush=True)
    adam = [r for r in runs if r["optimizer"] == "adam"]
    shampoo = [r for r in runs if r["optimizer"] == "shampoo"]

    # Targets: the best Adam run's final held-out agreement, and the lowest final held-out KL of the Adam runs.
    best_adam = max(adam, key=lambda r: r["evals"][-1][1])
    target_agree = best_adam["evals"][-1][1]
    target_kl = min(r["evals"][-1][2] for r in adam)
    for r in runs:
        r["final_agreement"], r["final_kl"] = r["evals"][-1][1], r["evals"][-1][2]
        r["steps_agree"] = first_step(r["evals"], lambda a, k: a >= target_agree)
        r["steps_kl"] = first_step(r["evals"], lambda a, k: k <= target_kl)
        r["s_per_step"] = statistics.median(r["windows"])
        r["settings"] = "-" if r["optimizer"] == "adam" else (
            f"block {args.block}, every {args.precondition_every}, graft {args.graft}")
    big = args.steps * 10  # ranks runs that never reach a target last

    def rank(r):
        return (r["steps_agree"] or big, -r["final_agreement"])

    best_sh = min(shampoo, key=rank)
    best_adam_steps = min(adam, key=rank)
    best_adam["best"] = True
    best_sh["best"] = True
    best_sh_kl = min(shampoo, key=lambda r: (r["steps_kl"] or big, r["final_kl"]))
    best_adam_kl = min(adam, key=lambda r: (r["steps_kl"] or big, r["final_kl"]))
    s_adam = statistics.median([w for r in adam for w in r["windows"]])
    s_sh = statistics.median([w for r in shampoo for w in r["windows"]])
    run_time = time.perf_counter() - t0

    def ratio(a, b):
        return None if not a or not b else a / b

    steps_ratio = ratio(best_adam_steps["steps_agree"], best_sh["steps_agree"])
    steps_ratio_kl = ratio(best_adam_kl["steps_kl"], best_sh_kl["steps_kl"])
    time_ratio = s_sh / s_adam

    log(f"student: cifar_resnet20 with depths (1, 1, 1) at {args.res} px (same initialisation in every run); "
        f"mode fm (crop area >= {args.crop_area_min}, mixup); {args.per_class * 10} training images, batch "
        f"{args.batch}, {args.steps} steps, warm-up {int(0.05 * args.steps)} steps + cosine, clip 1.0")
    log(f"held-out: {args.eval_per_class * 10} test images, evaluated every {args.eval_every} steps")
    log(f"target agreement = best Adam's final held-out agreement: {target_agree:.2f}% (lr {best_adam['lr']:g}); "
        f"target KL = lowest final Adam KL: {target_kl:.4f}")
    log("steps to target = first evaluated step at or past the target ('-': not within the budget); "
        "* = best of each optimizer")
    log()
    rows = [dict(r, name=r["optimizer"] + (" *" if r.get("best") else "")) for r in runs]
    rows.sort(key=lambda r: (r["optimizer"], r["lr"]))
    log(table(rows, [("name", "optimizer"), ("lr", "lr"), ("settings", "shampoo settings"),
                     ("final_agreement", "agreement %"), ("final_kl", "KL"), ("steps_agree", "steps to agr."),
                     ("steps_kl", "steps to KL"), ("s_per_step", "s/step"), ("wall_s", "wall s")]))
    log()
    log(f"held-out agreement % every {args.eval_every} steps:")
    steps = [s for s, _, _ in runs[0]["evals"]]
    curve_rows = [{"step": s, **{f"{r['optimizer']} {r['lr']:g}": r["evals"][i][1] for r in rows}}
                  for i, s in enumerate(steps)]
    log(table(curve_rows, [("step", "step")] + [(f"{r['optimizer']} {r['lr']:g}",) * 2 for r in rows]))
    log()

    def fmt(x, suffix="x"):
        return "not reached" if x is None else f"{x:.2f}{suffix}"

    log(f"steps(Adam)/steps(Shampoo) to the agreement target: {fmt(steps_ratio)} "
        f"({best_adam_steps['steps_agree'] or '-'} steps at Adam lr {best_adam_steps['lr']:g} vs "
        f"{best_sh['steps_agree'] or '-'} at Shampoo lr {best_sh['lr']:g}; {best_sh['settings']})")
    log(f"steps(Adam)/steps(Shampoo) to the KL target:        {fmt(steps_ratio_kl)} "
        f"({best_adam_kl['steps_kl'] or '-'} at Adam lr {best_adam_kl['lr']:g} vs "
        f"{best_sh_kl['steps_kl'] or '-'} at Shampoo lr {best_sh_kl['lr']:g})")
    log(f"time per step(Shampoo)/time per step(Adam):         {time_ratio:.2f}x "
        f"({s_sh:.3f} vs {s_adam:.3f} s/step, medians over every run's 10-step windows)")
    wall_ratio = ratio(steps_ratio, time_ratio)
    log(f"goal (>= 2x fewer steps at <= 1.3x time per step): "
        f"{'met' if steps_ratio and steps_ratio >= 2 and time_ratio <= 1.3 else 'not met'}; "
        f"wall-clock speed-up to the target {fmt(wall_ratio)}")
    summary = dict(
        benchmark="shampoo_vs_adam", cpu=cpu_model(), cores=os.cpu_count(), run_time_s=round(run_time, 1),
        teacher=dict(name="cifar_resnet20", res=args.res, steps=args.teacher_steps,
                     test_top1=round(tinfo["test_top1"], 2), cached=tinfo["cached"]),
        student="cifar_resnet20 depths=(1,1,1)", steps=args.steps, batch=args.batch,
        shampoo=dict(block_size=args.block, precondition_every=args.precondition_every, graft=args.graft),
        target_agreement=round(target_agree, 2), target_kl=round(target_kl, 4),
        runs=[{k: (round(r[k], 4) if isinstance(r[k], float) else r[k])
               for k in ("optimizer", "lr", "final_agreement", "final_kl", "steps_agree", "steps_kl", "s_per_step")}
              for r in rows],
        steps_ratio_agreement=steps_ratio and round(steps_ratio, 2),
        steps_ratio_kl=steps_ratio_kl and round(steps_ratio_kl, 2),
        time_per_step_ratio=round(time_ratio, 3),
        s_per_step=dict(adam=round(s_adam, 4), shampoo=round(s_sh, 4)),
    )
    log(json.dumps(summary))
    if args.save:
        save_with_header(args.save, lines, run_time=run_time, load=load, modules=(jax, optax, np),
                         note=teacher_note(tinfo))


if __name__ == "__main__":
    main()
