"""Distillation methods side by side, on a setup that can rank them: every method, 3 seeds, the full test set.

    python benchmarks/methods.py                  # the study (about 75 minutes on 2 quiet cores), resumable
    python benchmarks/methods.py --quick          # toy sizes, about a minute, into /tmp (tests/test_methods_study.py)
    python benchmarks/methods.py --report         # train nothing: the outputs from the finished runs

Setup (benchmarks/patience.py's): Fashion-MNIST at 28 px; the teacher is the funmatch/patience cifar_resnet20 (91.02%
test top-1; loaded from its cache or from benchmarks/results/patience_teacher.eqx); the student a ResNet-8
(cifar_resnet20 with one block per stage, 78k parameters); the 1020 training images of the patience study (102 per
class); Adam lr 1e-2 (the patience study's tuned value for same/ic, fm and scratch), batch 64, 2000 steps (125
epochs), 5% warm-up then cosine, clip 1. Every row sees the same augmentation, mode `same/ic` (inception crops of area
>= 0.05, teacher and student on the same crop), except `fm` (the same plus mixup: function matching proper).

Rows: `none` trains on the labels alone (`patient.train`, same augmentation); `none 2x` is the same at twice the
budget (seed 0 only): if it is not better, the baseline has converged at this budget. Then `patient.distill` with
`kl` (KL at T 1), `fm` (kl in mode fm), `kd` (Hinton: alpha 0.5, T 4), `dkd` (KL + DKD alpha 1, beta 8, T 4, weight
warmed up over 20/240 of the run), and KL plus one feature method: `fitnets`, `at`, `nst`, `fsp`, `srd`, `crd` (the
paper's constants: 128-d embeddings, 16384 negatives, T 0.07, momentum 0.5, weight 0.8) on the pairs of the table.

Measures: top-1 on all 10000 test images, mean over the seeds and spread ((max - min) / 2); top-1 agreement with the
teacher on the same images; wall seconds per run (on a machine that may have been shared: not a speed claim). Every
(row, seed) trains in a workdir of its own under `--workdir`; a rerun skips finished runs and resumes interrupted ones,
and `--report` writes the outputs from the finished runs alone (the table's `seeds` column says how many).
Writes `--out`/methods.txt (table under the usual header) and methods.json (every run); the last line is one JSON
object.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parent.parent))
from common import Printer, json_line, save_with_header, study_args, table  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# (row, method, settings text, distill/train overrides); method None = no distillation (patient.train)
ROWS = [
    ("none", None, "CE on labels (patient.train)", {}),
    ("kl", "kl", "KL at T 1", {}),
    ("fm", "kl", "KL at T 1, mode fm (+ mixup)", dict(mode="fm")),
    ("kd", "kd", "alpha 0.5, T 4", dict(kd_alpha=0.5, temperature=4.0)),
    ("dkd", "dkd", "KL + DKD(alpha 1, beta 8), T 4", dict(dkd_alpha=1.0, dkd_beta=8.0, temperature=4.0)),
    ("fitnets", "fitnets", "KL + 1.0 * hint(stage2, stage3)", dict(method_pairs=("stage2", "stage3"))),
    ("at", "at", "KL + 1.0 * AT(stage1-3)", dict(method_pairs=("stage1", "stage2", "stage3"))),
    ("nst", "nst", "KL + 1.0 * NST(stage3)", dict(method_pairs=("stage3",))),
    ("fsp", "fsp", "KL + 1.0 * FSP(s1:s2, s2:s3)", dict(method_pairs=("stage1:stage2", "stage2:stage3"))),
    ("srd", "srd", "KL + 0.1 * SRD(pre_logits)", dict(method_weight=0.1, method_pairs=("pre_logits",))),
    ("crd", "crd", "KL + 0.8 * CRD(pre_logits)", dict(method_weight=0.8, method_pairs=("pre_logits",))),
]

FULL = dict(res=28, teacher_steps=1500, teacher_batch=128, teacher_lr=3e-3, per_class=102, steps=2000, batch=64,
            lr=1e-2, seeds="0,1,2", rows=",".join(r[0] for r in ROWS),
            workdir=str(pathlib.Path.home() / ".cache" / "patient" / "methods"), out="benchmarks/results")
QUICK = dict(FULL, res=12, teacher_steps=30, per_class=4, steps=6, batch=16, seeds="0,1", rows="none,kl,crd",
             workdir="/tmp/patient_bench/methods_quick", out="/tmp/patient_bench/methods_quick")


def run_one(a, row, seed, steps, teacher, sources) -> dict | None:
    """Train one (row, seed) in its own workdir (resumed if interrupted, skipped if finished); returns its result.
    With --report nothing trains: an unfinished run is None."""
    import jax

    import patient
    from patient.models import create

    name, method, _, extra = row
    wd = pathlib.Path(a.workdir) / "runs" / f"{name}_{steps}steps_seed{seed}"
    done = wd / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    if a.report:
        return None
    student = create("cifar_resnet20", num_classes=10, key=jax.random.key(seed + 1), resolution=a.res,
                     depths=(1, 1, 1))
    kw = dict(dict(mode="same/ic", steps=steps, batch_size=a.batch, learning_rate=a.lr, seed=seed, workdir=wd,
                   log_every=max(1, steps // 10), checkpoint_every=max(1, steps // 4), progress=a.progress), **extra)
    t0 = time.perf_counter()
    if method is None:
        r = patient.train(student, sources["train"], **kw)
    else:
        r = patient.distill(teacher, student, sources["train"], method=method, **kw)
    seconds = time.perf_counter() - t0
    m = patient.evaluate((r.student, r.state), sources["test"], teacher=teacher, resolution=a.res,
                         teacher_resolution=a.res)
    res = dict(row=name, steps=steps, seed=seed, test_top1=round(m["top1"], 2), agreement=round(m["agreement"], 2),
               seconds=round(seconds, 1))
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(res) + "\n")
    tmp.replace(done)
    return res


def summarise(rows_cfg, runs, steps_base: int) -> list[dict]:
    out = []
    for name, _method, settings, _extra in rows_cfg:
        for steps in sorted({r["steps"] for r in runs if r["row"] == name}):
            rs = [r for r in runs if r["row"] == name and r["steps"] == steps]
            top, agr = [r["test_top1"] for r in rs], [r["agreement"] for r in rs]
            out.append(dict(method=name if steps == steps_base else f"{name} 2x",
                            settings=settings, steps=steps, seeds=len(rs), top1=round(statistics.mean(top), 2),
                            spread=round((max(top) - min(top)) / 2, 2), per_seed=" / ".join(f"{x:.2f}" for x in top),
                            agreement=round(statistics.mean(agr), 2), s_per_run=round(statistics.mean(
                                r["seconds"] for r in rs), 1)))
    return out


def main(argv=None):
    p, a = study_args(__doc__, FULL, QUICK, argv, quick_help="toy sizes (the test suite runs this)",
                      extra=lambda p: p.add_argument("--report", action="store_true",
                                                     help="train nothing: write the outputs from the finished runs"))
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s]
    except ValueError:
        p.error(f"--seeds takes integers, comma-separated (e.g. 0,1,2), got {a.seeds!r}")
    names = [s for s in a.rows.split(",") if s]
    unknown = sorted(set(names) - {r[0] for r in ROWS})
    if unknown or not seeds or not names or a.steps < 1 or a.per_class < 1:
        p.error(f"unknown rows {unknown} (known: {', '.join(r[0] for r in ROWS)}), or no seeds/rows, "
                "or --steps/--per-class < 1")
    rows_cfg = [r for r in ROWS if r[0] in names]
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()

    import jax
    import numpy as np
    import optax
    from funmatch import study_teacher

    import patient
    from patient.data import fashion_mnist, subset

    lines = log = Printer()
    # the patience study's teacher, which travels with its results (not for --quick: another recipe)
    teacher, tinfo, _ = study_teacher(a, None if a.quick else RESULTS / "patience_teacher.eqx")
    sources = dict(train=subset(fashion_mnist("train"), per_class=a.per_class, seed=0), test=fashion_mnist("test"))
    if a.quick:
        sources["test"] = subset(sources["test"], per_class=4, seed=1)
    t_top1 = patient.evaluate(teacher, sources["test"], resolution=a.res)["top1"]
    print(f"teacher {t_top1:.2f}% on {len(sources['test'])} test images; {len(rows_cfg)} rows x seeds {seeds}, "
          f"{a.steps} steps", flush=True)

    runs = []
    for seed in seeds:  # seed-major: a change of machine load falls on every row alike
        for row in rows_cfg:
            r = run_one(a, row, seed, a.steps, teacher, sources)
            if r is None:
                continue
            runs.append(r)
            print(f"  {r['row']:<8} seed {seed}: top-1 {r['test_top1']:.2f}%, agreement {r['agreement']:.2f}%, "
                  f"{r['seconds']:.0f} s", flush=True)
    if "none" in names:  # has the baseline converged? the same run at twice the budget
        runs.append(run_one(a, ROWS[0], seeds[0], 2 * a.steps, teacher, sources))
    runs = [r for r in runs if r is not None]
    if not runs:
        p.error(f"no finished runs under {a.workdir}; run without --report first")
    run_time = time.perf_counter() - t0
    summary = summarise(rows_cfg, runs, a.steps)
    epochs = a.steps * a.batch / len(sources["train"])
    log(f"teacher: cifar_resnet20 at {a.res} px, {t_top1:.2f}% on the {len(sources['test'])} test images")
    log(f"student: cifar_resnet20 depths (1, 1, 1) at {a.res} px; {len(sources['train'])} training images; mode "
        f"same/ic (crop area >= 0.05) unless said; Adam lr {a.lr:g}, batch {a.batch}, {a.steps} steps ({epochs:.0f} "
        f"epochs), warm-up {int(0.05 * a.steps)} + cosine, clip 1.0; seeds {', '.join(map(str, seeds))}")
    expected = len(rows_cfg) * len(seeds) + ("none" in names)
    if len(runs) < expected:  # --report on an unfinished study: say so before any figure
        log(f"PARTIAL: {len(runs)} of {expected} runs finished (the seeds column says how many per row); rerun "
            "without --report to finish the others")
    log(f"top-1 and agreement on all {len(sources['test'])} test images; +- = (max - min) / 2 over the seeds; s/run: "
        "wall seconds of the call that finished the run (a resumed run counts its last part), machine maybe shared")
    log()
    log(table(summary, [("method", "method"), ("settings", "settings"), ("steps", "steps"), ("seeds", "seeds"),
                        ("top1", "top-1 %"),
                        ("spread", "+-"), ("per_seed", "per seed"), ("agreement", "agreement %"),
                        ("s_per_run", "s/run")]))
    log()
    figures = dict(run_time_s=round(run_time, 1), teacher_top1=round(t_top1, 2), steps=a.steps, seeds=seeds,
                   runs_finished=len(runs), runs_planned=expected, rows=summary)
    log(json_line("methods", **figures))
    save_with_header(out / "methods.txt", lines, run_time=run_time, load=load, modules=(jax, optax, np),
                     note=f"; teacher {'loaded from ' + tinfo['path'] if tinfo['cached'] else 'trained in this run'}",
                     shared=load > 1.0)
    (out / "methods.json").write_text(json.dumps(dict(figures, runs=runs, quick=a.quick,
                                                      date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
                                                 indent=1) + "\n")


if __name__ == "__main__":
    main()
