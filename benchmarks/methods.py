"""Distillation methods side by side: no distillation, function matching (KL), Hinton KD, FitNets, AT, NST, FSP, SRD.

Run (from the repository root; about 8 minutes on 2 shared cores with the teacher cached, 2.5 minutes more when it
must be trained):

    python benchmarks/methods.py                              # print the table and one JSON line
    python benchmarks/methods.py --save benchmarks/results/methods.txt

Setup (Fashion-MNIST, everything at 20 px, 3 channels):

- Teacher: the one of benchmarks/shampoo_vs_adam.py (cifar_resnet20 trained with `patient.train` on all 60000
  training images, mode `same/rc`, Adam 3e-3, batch 128, 200 steps), loaded from
  `/tmp/patient_bench/fmnist_cifar_resnet20_20px_200steps.eqx` or trained and cached exactly as that script does.
  (The issue suggests cifar_resnet56 -> cifar_resnet20; on 2 CPU cores a resnet20 teacher and a depths-(1, 1, 1)
  student is the pair that fits.)
- Student: cifar_resnet20 with depths (1, 1, 1) (78k parameters), initialised from `jax.random.key(seed)`, trained on
  5000 training images (500 per class) at the same budget in every row: mode `fm` (inception crops of area >= 0.05,
  mixup; the baseline gets the same augmentation through `patient.train`), Adam, lr 1e-2, batch 128, 200 steps,
  5% warm-up then cosine, clip 1.
- Rows: `patient.train` on the labels (no distillation); `patient.distill` with method kl (function matching),
  kd (alpha 0.5, T 4), and KL plus fitnets / at / nst / fsp / srd on the pairs and weights of the table.
- Seeds 0 and 1 for every row (the seed sets both the student's initialisation and the run's data order/augmentation).

Measures: student top-1 on 2000 held-out test images (200 per class), mean over the 2 seeds and spread
(|seed0 - seed1| / 2); top-1 agreement with the teacher on the same images (computed here for every row, the baseline
included); seconds per run (wall clock, compilation included).

Last run (benchmarks/results/methods.txt; 2 shared Xeon cores, load average 3.4 at the start: another job shared the
machine during the first runs, which is why seed 0's none and kl took 36 and 43 s against ~28 s later; teacher
cached, 81.5% on the 2000 held-out images; 497 s in all):

    method                          settings  top-1 %     +-     per seed  agreement %     +-  s/run
    none        CE on labels (patient.train)     71.9  0.675  72.5 / 71.2         78.2   1.17   29.1
    kl         KL at T=1 (function matching)     69.1  0.925  68.2 / 70.0         77.9    1.1   35.2
    kd                        alpha 0.5, T 4     74.7  0.475  75.1 / 74.2         85.1   0.25   27.2
    fitnets  KL + 1.0 * hint(stage2, stage3)     69.0   1.72  67.3 / 70.8         78.2    2.6   30.9
    at               KL + 1.0 * AT(stage1-3)     69.1    0.5  68.6 / 69.6         77.4    0.9   29.8
    nst               KL + 1.0 * NST(stage3)     70.8  0.275  70.5 / 71.0         79.7  0.525   30.7
    fsp         KL + 1.0 * FSP(s1:s2, s2:s3)     69.2   2.07  71.2 / 67.1         78.3    1.8   31.4
    srd           KL + 0.1 * SRD(pre_logits)     73.6    0.4  73.2 / 74.0         83.9    0.5   27.5

At this short budget (200 steps, about 5 epochs of the 5000 images) Hinton KD (which also sees the labels) and KL +
SRD come out above the no-distillation baseline; plain function matching and KL + FitNets / AT / FSP sit about 2-3
points below it, KL + NST between. With 2 seeds and spreads of 0.3-2 points, only gaps of a few points mean anything;
function matching is known to need long schedules, so this says nothing about it at the paper's budgets.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parent.parent))
from common import Printer, json_line, save_with_header, table  # noqa: E402
from shampoo_vs_adam import get_teacher, teacher_note  # noqa: E402  (cached teacher, or trained exactly as there)

# (row name, method, settings text, Config overrides); None method = no distillation (patient.train)
ROWS = [
    ("none", None, "CE on labels (patient.train)", {}),
    ("kl", "kl", "KL at T=1 (function matching)", {}),
    ("kd", "kd", "alpha 0.5, T 4", dict(kd_alpha=0.5, temperature=4.0)),
    ("fitnets", "fitnets", "KL + 1.0 * hint(stage2, stage3)",
     dict(method_weight=1.0, method_pairs=("stage2", "stage3"))),
    ("at", "at", "KL + 1.0 * AT(stage1-3)", dict(method_weight=1.0, method_pairs=("stage1", "stage2", "stage3"))),
    ("nst", "nst", "KL + 1.0 * NST(stage3)", dict(method_weight=1.0, method_pairs=("stage3",))),
    ("fsp", "fsp", "KL + 1.0 * FSP(s1:s2, s2:s3)", dict(method_weight=1.0,
                                                     method_pairs=("stage1:stage2", "stage2:stage3"))),
    ("srd", "srd", "KL + 0.1 * SRD(pre_logits)", dict(method_weight=0.1, method_pairs=("pre_logits",))),
]


def predictions(model_state, source, res, batch=500):
    """Top-1 class of (model, state) on every example of `source` (eval pipeline: plain resize), and the labels."""
    import equinox as eqx
    import jax
    import numpy as np

    from patient.data import eval_pipeline
    from patient.models.registry import apply

    model, state = model_state
    params, static = eqx.partition(model, eqx.is_array)

    @jax.jit
    def f(params, images):
        return apply(eqx.combine(params, static), state, images, train=False)[0]

    preds, labels = [], []
    it = iter(eval_pipeline(source, resolution=res, batch_size=batch, channels=3))
    for b in it:
        m = np.asarray(b["mask"])
        preds.append(np.asarray(f(params, b["image"])).argmax(-1)[m])
        labels.append(np.asarray(b["label"])[m])
    if hasattr(it, "close"):
        it.close()
    return np.concatenate(preds), np.concatenate(labels)


def run_one(args, teacher, row, seed, train_src, eval_src, t_pred):
    import jax
    import numpy as np

    import patient
    from patient.models import create

    name, method, _, extra = row
    student = create("cifar_resnet20", num_classes=10, key=jax.random.key(seed), resolution=args.res,
                     depths=(1, 1, 1))
    common = dict(mode="fm", steps=args.steps, batch_size=args.batch, learning_rate=args.lr, seed=seed,
                  log_every=args.steps, progress=False)
    t0 = time.perf_counter()
    if method is None:
        r = patient.train(student, train_src, **common)
    else:
        r = patient.distill(teacher, student, train_src, method=method, **extra, **common)
    wall = time.perf_counter() - t0
    pred, labels = predictions((r.student, r.state), eval_src, args.res)
    return dict(row=name, seed=seed, top1=100.0 * float(np.mean(pred == labels)),
                agreement=100.0 * float(np.mean(pred == t_pred)), wall_s=wall)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--save", type=pathlib.Path, help="also write the output, with a header, to this file")
    p.add_argument("--res", type=int, default=20, help="teacher and student resolution (px)")
    p.add_argument("--teacher-steps", type=int, default=200)
    p.add_argument("--steps", type=int, default=200, help="training steps per run (the same budget in every row)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--per-class", type=int, default=500, help="training subset: images per class")
    p.add_argument("--eval-per-class", type=int, default=200, help="held-out test images per class")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--rows", default=",".join(r[0] for r in ROWS), help="comma-separated subset of the rows")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    names = [s for s in args.rows.split(",") if s]
    unknown = set(names) - {r[0] for r in ROWS}
    if unknown or not seeds:
        p.error(f"unknown rows {sorted(unknown)} or no seeds")
    rows_cfg = [r for r in ROWS if r[0] in names]
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
    t_pred, labels = predictions(teacher, eval_src, args.res)
    t_top1 = 100.0 * float(np.mean(t_pred == labels))
    log(f"teacher top-1 on the {len(labels)} held-out images: {t_top1:.2f}%")
    runs = []
    # Seed-major order, so that a change of machine load falls on every row alike.
    for seed in seeds:
        for row in rows_cfg:
            r = run_one(args, teacher, row, seed, train_src, eval_src, t_pred)
            runs.append(r)
            print(f"  {r['row']} seed {seed}: top-1 {r['top1']:.2f}%, agreement {r['agreement']:.2f}%, "
                  f"{r['wall_s']:.0f} s", flush=True)
    run_time = time.perf_counter() - t0

    table_rows = []
    for name, _method, settings, _extra in rows_cfg:
        rs = [r for r in runs if r["row"] == name]
        top = [r["top1"] for r in rs]
        agr = [r["agreement"] for r in rs]
        table_rows.append(dict(
            method=name, settings=settings, top1=float(np.mean(top)),
            spread=(max(top) - min(top)) / 2, per_seed=" / ".join(f"{x:.1f}" for x in top),
            agreement=float(np.mean(agr)), agr_spread=(max(agr) - min(agr)) / 2,
            s_per_run=float(np.mean([r["wall_s"] for r in rs]))))
    log(f"student: cifar_resnet20 depths (1, 1, 1) at {args.res} px; mode fm (crop area >= 0.05, mixup); "
        f"{args.per_class * 10} training images; Adam lr {args.lr:g}, batch {args.batch}, {args.steps} steps, "
        f"warm-up {int(0.05 * args.steps)} + cosine, clip 1.0; seeds {', '.join(map(str, seeds))}")
    log(f"held-out: {args.eval_per_class * 10} test images; spread = (max - min) / 2 over the seeds")
    log()
    log(table(table_rows, [("method", "method"), ("settings", "settings"), ("top1", "top-1 %"),
                           ("spread", "+-"), ("per_seed", "per seed"), ("agreement", "agreement %"),
                           ("agr_spread", "+-"), ("s_per_run", "s/run")]))
    log()
    log(json_line("methods", run_time_s=round(run_time, 1),
                  teacher=dict(name="cifar_resnet20", res=args.res, steps=args.teacher_steps,
                               test_top1=round(tinfo["test_top1"], 2), heldout_top1=round(t_top1, 2),
                               cached=tinfo["cached"]),
                  student="cifar_resnet20 depths=(1,1,1)", steps=args.steps, batch=args.batch, lr=args.lr,
                  seeds=seeds,
                  rows=[{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                        for r in table_rows]))
    if args.save:
        save_with_header(args.save, lines, run_time=run_time, load=load, modules=(jax, optax, np),
                         note=teacher_note(tinfo), shared=False)


if __name__ == "__main__":
    main()
