"""The SRD paper's system at CPU scale: a small DeiT student distilled from a RegNetY teacher, with the SRD projector
loss and with DeiT's own distillation token, against the same student trained on the labels alone.

Run (from the repository root; resumable: finished runs are read back from the cache directory):

    python benchmarks/srd_deit.py                                   # table + one JSON line
    python benchmarks/srd_deit.py --save benchmarks/results/srd_deit.txt

Setup (Fashion-MNIST at 32 px, 3 channels):

- Teacher: `regnety_002` (squeeze-excite, BatchNorm; 2.3M parameters at 10 classes) trained with `patient.train` on
  all 60000 training images (mode `same/rc`, Adam 3e-3, batch 128, `--teacher-steps`), cached as .eqx.
- Student: `deit_tiny_distilled_patch16_224` reduced to patch 4, depth 6, width 96, 3 heads (64 patches + class and
  distillation tokens; 0.7M parameters), initialised from `jax.random.key(seed)`, trained on `--per-class` images per
  class with the same budget, augmentation and optimiser in every row: mode `fm` (inception crops of area >= 0.05,
  mixup), Adam, `--lr`, batch `--batch`, `--steps` steps, 5% warm-up then cosine, clip 1.
- Rows: `scratch` = `patient.train` on the labels (the same augmentation); `srd` = `patient.distill` with KL (T=1) +
  `--srd-weight` * SRD on `pre_logits` (a trained linear projector from the student's 96 to the teacher's 368
  features); `deit` = `patient.distill` with `method="deit"` (hard: the class head learns the labels, the
  distillation head the teacher's top class of the same mixed view, halved each).

Measures: top-1 on all 10000 test images (the student predicts with the mean of its two heads, as timm), agreement
with the teacher on them, seconds per run (wall clock, compilation included; the machine may be shared, so these are
not speed claims). Mean and spread ((max - min) / 2) over the seeds.

Last run (benchmarks/results/srd_deit.txt, 2026-11-29; 2 Xeon cores; `--teacher-steps 600 --steps 300`, the budget
that fitted the session: the teacher alone took 33 minutes, RegNetY's grouped convolutions being slow on XLA CPU):

    teacher regnety_002: 80.44% on the 10000 test images
    student                      settings  top-1 %    +-       per seed  agreement %
    scratch  CE on labels (patient.train)     31.8   1.3  30.51 / 33.12         31.7
    srd          KL + 1 * SRD(pre_logits)     39.1  0.86  39.95 / 38.23         39.7
    deit     DeiT hard distillation token     39.8  1.48  41.32 / 38.37         41.9

Both distillations beat the labels alone by 7-8 points at this budget; SRD and DeiT's token are within their spreads
of each other. 300 steps (about 2 epochs of the 10000 images) leave the transformer far from converged (the teacher
is at 80%), so this ranks the methods' early progress only, not where they end.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parent.parent))
from common import Printer, cached_teacher, json_line, save_with_header, table, teacher_note  # noqa: E402
from methods import predictions  # noqa: E402  (top-1 class of a model on every example of a source)

CACHE = pathlib.Path.home() / ".cache" / "patient" / "srd_deit"
STUDENT = dict(patch_size=4, depth=6, embed_dim=96, num_heads=3)
ROWS = {  # name: (method, settings text)
    "scratch": (None, "CE on labels (patient.train)"),
    "srd": ("srd", "KL + w * SRD(pre_logits)"),
    "deit": ("deit", "DeiT hard distillation token"),
}


def run_one(a, teacher, name, seed, train_src, test_src, t_pred):
    """One row and seed, or its cached result."""
    import jax
    import numpy as np

    import patient
    from patient.models import create

    tag = f"{name}_seed{seed}_{a.steps}steps_lr{a.lr:g}_w{a.srd_weight:g}_{a.per_class}pc"
    done = CACHE / "runs" / f"{tag}.json"
    if done.is_file():
        return json.loads(done.read_text())
    method, _ = ROWS[name]
    student = create("deit_tiny_distilled_patch16_224", num_classes=10, key=jax.random.key(seed), resolution=a.res,
                     **STUDENT)
    common = dict(mode="fm", steps=a.steps, batch_size=a.batch, learning_rate=a.lr, seed=seed,
                  log_every=max(1, a.steps // 10), progress=True)
    t0 = time.perf_counter()
    if method is None:
        r = patient.train(student, train_src, **common)
    elif method == "srd":
        r = patient.distill(teacher, student, train_src, method="srd", method_weight=a.srd_weight,
                            method_pairs=("pre_logits",), **common)
    else:
        r = patient.distill(teacher, student, train_src, method="deit", deit_kind="hard", **common)
    wall = time.perf_counter() - t0
    pred, labels = predictions((r.student, r.state), test_src, a.res)
    out = dict(row=name, seed=seed, top1=100.0 * float(np.mean(pred == labels)),
               agreement=100.0 * float(np.mean(pred == t_pred)), wall_s=round(wall, 1), images=int(len(labels)))
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(out))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--save", type=pathlib.Path, help="also write the output, with a header, to this file")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--srd-weight", type=float, default=1.0)
    p.add_argument("--per-class", type=int, default=1000, help="student training images per class")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--rows", default=",".join(ROWS))
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",") if s]
    names = [s for s in a.rows.split(",") if s]
    if set(names) - set(ROWS) or not seeds:
        p.error(f"rows must be among {', '.join(ROWS)} and --seeds non-empty")
    lines = log = Printer()

    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    import jax
    import numpy as np
    import optax

    from patient.data import fashion_mnist, subset

    teacher, tinfo = cached_teacher(CACHE / f"teacher_regnety_002_{a.res}px_{a.teacher_steps}steps.eqx", "regnety_002",
                                    res=a.res, steps=a.teacher_steps, log=log, log_every=100, progress=True)
    train_src = subset(fashion_mnist("train"), per_class=a.per_class, seed=0)
    test_src = fashion_mnist("test")
    t_pred, labels = predictions(teacher, test_src, a.res)
    t_top1 = 100.0 * float(np.mean(t_pred == labels))
    log(f"teacher top-1 on all {len(labels)} test images: {t_top1:.2f}%")
    runs = []
    for seed in seeds:
        for name in names:
            r = run_one(a, teacher, name, seed, train_src, test_src, t_pred)
            runs.append(r)
            print(f"  {name} seed {seed}: top-1 {r['top1']:.2f}%, agreement {r['agreement']:.2f}%, {r['wall_s']:.0f} s",
                  flush=True)
    run_time = time.perf_counter() - t0
    rows = []
    for name in names:
        rs = [r for r in runs if r["row"] == name]
        top, agr = [r["top1"] for r in rs], [r["agreement"] for r in rs]
        settings = ROWS[name][1].replace("w *", f"{a.srd_weight:g} *")
        rows.append(dict(row=name, settings=settings, top1=float(np.mean(top)), spread=(max(top) - min(top)) / 2,
                         per_seed=" / ".join(f"{x:.2f}" for x in top), agreement=float(np.mean(agr)),
                         s_per_run=float(np.mean([r["wall_s"] for r in rs]))))
    log(f"student: deit_tiny_distilled_patch16_224 with {STUDENT} at {a.res} px; mode fm (crop area >= 0.05, "
        f"mixup 1); {a.per_class * 10} training images; Adam lr {a.lr:g}, batch {a.batch}, {a.steps} steps, "
        f"warm-up + cosine, clip 1.0; seeds {', '.join(map(str, seeds))}; all 10000 test images")
    log()
    log(table(rows, [("row", "student"), ("settings", "settings"), ("top1", "top-1 %"), ("spread", "+-"),
                     ("per_seed", "per seed"), ("agreement", "agreement %"), ("s_per_run", "s/run")]))
    log()
    log(json_line("srd_deit", run_time_s=round(run_time, 1),
                  teacher=dict(name="regnety_002", res=a.res, steps=a.teacher_steps,
                               test_top1=round(t_top1, 2), cached=tinfo["cached"]),
                  student=dict(name="deit_tiny_distilled_patch16_224", **STUDENT), steps=a.steps, batch=a.batch,
                  lr=a.lr, srd_weight=a.srd_weight, per_class=a.per_class, seeds=seeds,
                  rows=[{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]))
    if a.save:
        save_with_header(a.save, lines, run_time=run_time, load=load, modules=(jax, optax, np),
                         note=teacher_note(tinfo) + "; finished runs are read back from the cache", shared=True)


if __name__ == "__main__":
    main()
