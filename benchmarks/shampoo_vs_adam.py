"""Shampoo (one or more grafts) vs Adam on distillation, over seeds: steps to held-out agreement targets.

Run (from the repository root; 56 minutes in the last run, on 2 cores shared with another job, teacher included):

    python benchmarks/shampoo_vs_adam.py                      # print the tables and one JSON line
    python benchmarks/shampoo_vs_adam.py --save benchmarks/results/shampoo_vs_adam.txt

Setup (Fashion-MNIST, everything at 20 px, 3 channels):

- Teacher: cifar_resnet20 trained once with `patient.train` on all 60000 training images (mode `same/rc`, Adam 3e-3,
  batch 128, 200 steps); cached as `/tmp/patient_bench/fmnist_cifar_resnet20_20px_200steps.eqx` so reruns skip it.
  Its top-1 on the 10000 test images is printed.
- Student: cifar_resnet20 with depths (1, 1, 1) (78k parameters), initialised with key 1 + seed, distilled with
  `patient.distill` in mode `fm` (inception crops of area >= 0.05 shared by teacher and student, mixup) on 5000
  training images (500 per class), batch 128, a fixed budget of 200 steps, 5% linear warm-up then cosine decay,
  global-norm clipping at 1; the distillation seed is the same seed.
- Runs, for each of `--seeds` seeds (default 2): Adam at lr 3e-3, 1e-2, 3e-2 and Shampoo (`optimizer="shampoo"`,
  block 128, precondition_every 10, eigh roots) with each graft of `--grafts` (default `adam` at 3e-3, 1e-2, 3e-2 and
  `rmsprop_normalized` at 10x smaller rates: its heavy-ball momentum makes steps ~10x larger), interleaved so that
  the load of other jobs falls on every optimizer alike.

Measures:

- Held-out agreement: % of 2000 test images (200 per class, never trained on) on which the student's top-1 equals the
  teacher's, and KL(teacher || student) at T=1, evaluated every 20 steps and at the end.
- Targets, per seed: "tight" = that seed's best Adam final agreement, "loose" = tight - `--loose` points (default 5).
  Steps to a target = the first evaluated step (a multiple of 20) at or past it. For each optimizer the best run is
  the one reaching the target first (ties: higher final agreement); the ratio is steps(best Adam) / steps(it).
- Seconds per step from the trainer's 10-step throughput windows (the first, with compilation, and those after an
  evaluation left out), median per optimizer. A speed comparison only when the machine was quiet.

Last run (benchmarks/results/shampoo_vs_adam.txt, 2026-11-30, 2 seeds, grafts adam and rmsprop_normalized): best final
agreement, mean of 2 seeds: Adam 80.2%, Shampoo graft adam 88.4%, graft rmsprop_normalized 88.7%; steps to the tight
target, Adam / Shampoo: 1.50x and 2.25x for both grafts (loose: 1.50x and 1.75x). The two grafts tie on
distillation; `benchmarks/shampoo_graft.py` decides between them on quadratics.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # Shampoo's small eigh calls crawl when BLAS threads fight

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parent.parent))
from common import Printer, cached_teacher, cpu_model, save_with_header, table, teacher_note  # noqa: E402

CACHE = pathlib.Path("/tmp/patient_bench")


def get_teacher(args, log):
    """Train cifar_resnet20 on all 60000 training images once (cached as .eqx); returns ((model, state), info)."""
    return cached_teacher(CACHE / f"fmnist_cifar_resnet20_{args.res}px_{args.teacher_steps}steps.eqx", "cifar_resnet20",
                          res=args.res, steps=args.teacher_steps, log=log)


GRAFT_LRS = {"adam": "3e-3,1e-2,3e-2", "rmsprop_normalized": "3e-4,1e-3,3e-3", "rmsprop": "3e-4,1e-3,3e-3",
             "adagrad": "3e-4,1e-3,3e-3", "sgd": "3e-4,1e-3,3e-3"}  # heavy-ball grafts take ~10x smaller steps


def run_one(args, teacher, opt, lr, seed, train_src, eval_src):
    """One distillation; `opt` is "adam" or "shampoo[<graft>]"."""
    import jax

    import patient
    from patient.models import create

    student = create("cifar_resnet20", num_classes=10, key=jax.random.key(1 + seed), resolution=args.res,
                     depths=(1, 1, 1))
    extra = {}
    if opt != "adam":
        extra = dict(shampoo_graft=opt[len("shampoo["):-1], shampoo_block_size=args.block,
                     shampoo_precondition_every=args.precondition_every)
    t0 = time.perf_counter()
    r = patient.distill(teacher, student, train_src, eval_data=eval_src, mode="fm", steps=args.steps,
                        batch_size=args.batch, optimizer="adam" if opt == "adam" else "shampoo", learning_rate=lr,
                        crop_area_min=args.crop_area_min, seed=seed, log_every=args.log_every,
                        eval_every=args.eval_every, progress=False, **extra)
    wall = time.perf_counter() - t0
    evals = [(h["step"], h["eval_agreement"], h["eval_kl"]) for h in r.history if "eval_agreement" in h]
    logs = [h for h in r.history if "images_per_s" in h]
    eval_steps = {s for s, _, _ in evals}
    # Seconds per step from the logged throughput windows: the first (compilation) and those that follow an
    # evaluation (the trainer's window clock includes it) are left out.
    windows = [args.batch / h["images_per_s"] for h in logs
               if h["step"] > args.log_every and (h["step"] - args.log_every) not in eval_steps]
    return dict(optimizer=opt, lr=lr, seed=seed, evals=evals, windows=windows, wall_s=wall,
                final_agreement=evals[-1][1], final_kl=evals[-1][2], s_per_step=statistics.median(windows))


def first_step(evals, target):
    """First evaluated step whose agreement is >= target, or None."""
    return next((s for s, a, _ in evals if a >= target), None)


def parse_lrs(text):
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv=None):
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
    p.add_argument("--seeds", type=int, default=2, help="seeds (student initialisation, data order, views, mixup)")
    p.add_argument("--adam-lrs", default="3e-3,1e-2,3e-2")
    p.add_argument("--grafts", default="adam,rmsprop_normalized", help="Shampoo grafts to run, comma-separated")
    p.add_argument("--shampoo-lrs", help="learning rates for every graft (default: 3e-3,1e-2,3e-2 for graft adam, "
                   "10x smaller for the heavy-ball grafts)")
    p.add_argument("--loose", type=float, default=5.0,
                   help="the second target is the first minus this many points of agreement")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--precondition-every", type=int, default=10)
    args = p.parse_args(argv)
    from patient.optim.shampoo import GRAFTS

    grafts = [g.strip() for g in args.grafts.split(",") if g.strip()]
    if not grafts or any(g not in GRAFTS for g in grafts):
        p.error(f"--grafts takes a comma-separated subset of {', '.join(GRAFTS)}")
    if args.eval_every % args.log_every or (args.eval_every // args.log_every) < 2:
        p.error("--eval-every must be a multiple (>= 2) of --log-every, so that some throughput windows hold no "
                "evaluation")
    try:
        adam_lrs = parse_lrs(args.adam_lrs)
        sh_lrs = {g: parse_lrs(args.shampoo_lrs or GRAFT_LRS[g]) for g in grafts}
    except ValueError:
        p.error("--adam-lrs and --shampoo-lrs take comma-separated numbers (e.g. 3e-3,1e-2)")
    if not adam_lrs or not all(sh_lrs.values()) or args.seeds < 1:
        p.error("--adam-lrs and --shampoo-lrs each need at least one learning rate, and --seeds must be >= 1")
    lines = log = Printer()

    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    import jax
    import numpy as np
    import optax

    from patient.data import fashion_mnist, subset

    teacher, tinfo = get_teacher(args, log)
    train_src = subset(fashion_mnist("train"), per_class=args.per_class, seed=0)
    eval_src = subset(fashion_mnist("test"), per_class=args.eval_per_class, seed=0)
    optimizers = ["adam"] + [f"shampoo[{g}]" for g in grafts]
    lrs_of = {"adam": adam_lrs, **{f"shampoo[{g}]": sh_lrs[g] for g in grafts}}
    # Interleave the optimizers so that the load of other jobs on the machine falls on all of them alike.
    plans = [[(o, lr) for lr in lrs_of[o]] for o in optimizers]
    order = [x for group in itertools.zip_longest(*plans) for x in group if x is not None]
    runs = []
    for seed in range(args.seeds):
        for opt, lr in order:
            r = run_one(args, teacher, opt, lr, seed, train_src, eval_src)
            runs.append(r)
            print(f"  seed {seed} {opt} lr={lr:g}: held-out agreement {r['final_agreement']:.2f}%, "
                  f"KL {r['final_kl']:.4f}, {r['s_per_step']:.3f} s/step, {r['wall_s']:.0f} s wall", flush=True)

    # Per seed: targets from that seed's best Adam run (its final held-out agreement, and that minus --loose); for
    # each optimizer its best run (fewest steps to the target, then highest final agreement).
    big = args.steps * 10
    per_seed = []
    for seed in range(args.seeds):
        mine = [r for r in runs if r["seed"] == seed]
        best_adam = max((r for r in mine if r["optimizer"] == "adam"), key=lambda r: r["final_agreement"])
        targets = {"tight": best_adam["final_agreement"], "loose": best_adam["final_agreement"] - args.loose}
        for r in mine:
            r["steps_tight"] = first_step(r["evals"], targets["tight"])
            r["steps_loose"] = first_step(r["evals"], targets["loose"])
        best = {}
        for o in optimizers:
            rs = [r for r in mine if r["optimizer"] == o]
            best[o] = {k: min(rs, key=lambda r: (r[f"steps_{k}"] or big, -r["final_agreement"])) for k in targets}
            best[o]["final"] = max(rs, key=lambda r: r["final_agreement"])
        per_seed.append(dict(seed=seed, targets=targets, best=best))
    run_time = time.perf_counter() - t0

    log(f"student: cifar_resnet20 with depths (1, 1, 1) at {args.res} px (initialisation key 1 + seed); mode fm "
        f"(crop area >= {args.crop_area_min}, mixup); {args.per_class * 10} training images, batch {args.batch}, "
        f"{args.steps} steps, warm-up {int(0.05 * args.steps)} steps + cosine, clip 1.0; Shampoo block {args.block}, "
        f"preconditioning every {args.precondition_every}")
    log(f"held-out: {args.eval_per_class * 10} test images, evaluated every {args.eval_every} steps")
    log("targets per seed: 'tight' = that seed's best Adam final held-out agreement, 'loose' = tight - "
        f"{args.loose:g} points; steps = first evaluated step at or past the target ('-': not within the budget)")
    log()
    rows = sorted(runs, key=lambda r: (r["seed"], optimizers.index(r["optimizer"]), r["lr"]))
    log(table(rows, [("seed", "seed"), ("optimizer", "optimizer"), ("lr", "lr"), ("final_agreement", "agreement %"),
                     ("final_kl", "KL"), ("steps_tight", "steps to tight"), ("steps_loose", "steps to loose"),
                     ("s_per_step", "s/step"), ("wall_s", "wall s")]))
    log()
    summary_rows, ratios = [], {}
    for o in optimizers:
        finals = [ps["best"][o]["final"]["final_agreement"] for ps in per_seed]
        row = {"optimizer": o, "final": statistics.fmean(finals), "spread": max(finals) - min(finals)}
        for k in ("tight", "loose"):
            steps = [ps["best"][o][k][f"steps_{k}"] for ps in per_seed]
            row[f"steps_{k}"] = " / ".join("-" if s is None else str(s) for s in steps)
            if o != "adam":
                adam_steps = [ps["best"]["adam"][k][f"steps_{k}"] for ps in per_seed]
                rs = [a / s if a and s else None for a, s in zip(adam_steps, steps)]
                ratios[(o, k)] = rs
                row[f"ratio_{k}"] = " / ".join("-" if x is None else f"{x:.2f}" for x in rs)
        s = [w for r in runs if r["optimizer"] == o for w in r["windows"]]
        row["s_per_step"] = statistics.median(s)
        summary_rows.append(row)
    log(f"per optimizer, over {args.seeds} seeds (values per seed separated by '/'): best final agreement (mean, "
        "max - min), steps of the best run to each target, and steps(Adam)/steps(Shampoo)")
    log(table(summary_rows, [("optimizer", "optimizer"), ("final", "agreement % (mean)"), ("spread", "spread"),
                             ("steps_tight", "steps to tight"), ("ratio_tight", "Adam/this"),
                             ("steps_loose", "steps to loose"), ("ratio_loose", "Adam/this"),
                             ("s_per_step", "s/step")]))
    log()
    by_final = max(optimizers[1:], key=lambda o: next(r["final"] for r in summary_rows if r["optimizer"] == o))
    log(f"best graft by mean final agreement: {by_final[len('shampoo['):-1]}")
    summary = dict(
        benchmark="shampoo_vs_adam", cpu=cpu_model(), cores=os.cpu_count(), run_time_s=round(run_time, 1),
        teacher=dict(name="cifar_resnet20", res=args.res, steps=args.teacher_steps,
                     test_top1=round(tinfo["test_top1"], 2), cached=tinfo["cached"]),
        student="cifar_resnet20 depths=(1,1,1)", steps=args.steps, batch=args.batch, seeds=args.seeds,
        shampoo=dict(block_size=args.block, precondition_every=args.precondition_every, grafts=grafts),
        targets=[{k: round(v, 2) for k, v in ps["targets"].items()} for ps in per_seed],
        summary=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in summary_rows],
        steps_ratio={f"{o}/{k}": [x and round(x, 2) for x in v] for (o, k), v in ratios.items()},
        best_graft=by_final[len("shampoo["):-1],
        runs=[{k: (round(r[k], 4) if isinstance(r[k], float) else r[k])
               for k in ("seed", "optimizer", "lr", "final_agreement", "final_kl", "steps_tight", "steps_loose",
                         "s_per_step")} for r in rows],
    )
    log(json.dumps(summary))
    if args.save:
        save_with_header(args.save, lines, run_time=run_time, load=load, modules=(jax, optax, np),
                         note=teacher_note(tinfo))


if __name__ == "__main__":
    main()
