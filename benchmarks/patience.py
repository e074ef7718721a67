"""Patience at the paper's own augmentation: test top-1 against the training budget, per teacher mode.

    python benchmarks/patience.py                       # the full sweep; hours on 2 cores, resumable
    python benchmarks/patience.py --quick               # toy sizes, about a minute (tests/test_patience.py)

The setup is benchmarks/funmatch.py's: Fashion-MNIST, the same 1020 training images (102 per class), the same cached
cifar_resnet20 teacher at 28 px (91% test top-1), a ResNet-8 student (cifar_resnet20 with one block per stage), batch 64,
Adam with 5% warm-up and cosine decay, and the paper's augmentation: inception crops down to 5% of the image
(`crop_area_min` 0.05) and mixup with alpha 1. Modes: `scratch` (labels, same augmentation), `fix/rs`, `same/ic`, `fm`.

1. The learning rate is tuned once per mode at the shortest budget (seed 0): every value of `--lrs` is trained and the
   one with the best top-1 on a validation split (200 images per class from the training images that are NOT among the
   1020) is kept for every budget and seed of that mode. The test set is never used for the choice.
2. Every (mode, budget, seed) row then trains in a workdir of its own under `--workdir`, with checkpoints: a rerun skips
   finished rows (their `result.json`) and resumes interrupted ones from the last checkpoint. The seed sets the student's
   initialisation, the data order, the views and mixup.
3. After every finished row, `--out`/patience.{json,md,png} are rewritten from every finished row, so a partial sweep is
   always readable; `--report` writes them from the finished runs without training anything. The figure is test top-1
   against epochs (log x) per mode, mean and spread over seeds, like the paper's Figure 3.

Row `seconds` are wall time of that training on a machine that may have been shared (they are not speed claims).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json  # noqa: E402
import pathlib  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parent.parent))
from common import machine, study_args, table  # noqa: E402

MODES = ["scratch", "fix/rs", "same/ic", "fm"]

FULL = dict(res=28, teacher_steps=1500, teacher_batch=128, teacher_lr=3e-3, per_class=102, val_per_class=200,
            budgets="500,2000,8000", seeds=2, lrs="3e-3,1e-2,3e-2", batch=64, crop_area_min=0.05, mixup_alpha=1.0,
            workdir=str(pathlib.Path.home() / ".cache" / "patient" / "patience"), out="benchmarks/results")
QUICK = dict(FULL, res=12, teacher_steps=30, per_class=4, val_per_class=4, budgets="6,12", seeds=2, lrs="1e-2,3e-2",
             batch=16, workdir="/tmp/patient_bench/patience_quick", out="/tmp/patient_bench/patience_quick")


def _row_id(mode: str, steps: int, seed: int, lr: float) -> str:
    return f"{mode.replace('/', '_')}_{steps}steps_seed{seed}_lr{lr:g}"


def train_one(a, mode, steps, seed, lr, teacher, sources):
    """Train one (mode, budget, seed, lr) in its own workdir, resuming it if interrupted; returns its result row
    (validation and test top-1, test agreement with the teacher)."""
    import jax

    import patient
    from patient.models import create

    wd = pathlib.Path(a.workdir) / "rows" / _row_id(mode, steps, seed, lr)
    done = wd / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    student = create("cifar_resnet20", num_classes=10, key=jax.random.key(seed + 1), resolution=a.res,
                     depths=(1, 1, 1))
    common = dict(steps=steps, batch_size=a.batch, learning_rate=lr, crop_area_min=a.crop_area_min,
                  mixup_alpha=a.mixup_alpha, student_res=a.res, seed=seed, log_every=max(1, steps // 10),
                  checkpoint_every=max(1, min(500, steps // 4)), progress=a.progress)
    t0 = time.perf_counter()
    if mode == "scratch":
        r = patient.train(student, sources["train"], mode="fm", workdir=wd, **common)
    else:
        r = patient.distill(teacher, student, sources["train"], mode=mode, teacher_res=a.res, workdir=wd, **common)
    seconds = time.perf_counter() - t0
    res = dict(mode=mode, steps=steps, epochs=round(steps * a.batch / len(sources["train"]), 1), seed=seed, lr=lr,
               seconds=round(seconds, 1))
    for split in ("val", "test"):
        m = patient.evaluate((r.student, r.state), sources[split], teacher=teacher, resolution=a.res,
                             teacher_resolution=a.res)
        res[f"{split}_top1"] = round(m["top1"], 2)
        res[f"{split}_agreement"] = round(m["agreement"], 2)
    res["agreement"] = res.pop("test_agreement")
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(res) + "\n")
    tmp.replace(done)
    return res


def summarise(rows):
    """Mean and spread (min..max) of test top-1 and agreement per (mode, steps)."""
    out = []
    for mode in MODES:
        for steps in sorted({r["steps"] for r in rows if r["mode"] == mode}):
            rs = [r for r in rows if r["mode"] == mode and r["steps"] == steps]
            tops = [r["test_top1"] for r in rs]
            out.append(dict(mode=mode, steps=steps, epochs=rs[0]["epochs"], seeds=len(rs), lr=rs[0]["lr"],
                            mean_top1=round(statistics.mean(tops), 2), min_top1=min(tops), max_top1=max(tops),
                            mean_agreement=round(statistics.mean(r["agreement"] for r in rs), 2)))
    return out


def verdict(summary, teacher_top1) -> str:
    """The issue's claim at the longest budget: fm's mean >= fix/rs's + 1 and >= scratch's + 3, fm rising with budget."""
    if not summary:
        return ""
    longest = max(s["steps"] for s in summary)
    at = {s["mode"]: s for s in summary if s["steps"] == longest}
    if not all(m in at for m in ("fm", "fix/rs", "scratch")):
        return f"the longest budget ({longest} steps) is not finished for fm, fix/rs and scratch yet"
    fm_curve = [s["mean_top1"] for s in summary if s["mode"] == "fm"]
    rising = all(b > a for a, b in zip(fm_curve, fm_curve[1:]))
    fm, rs, sc = at["fm"]["mean_top1"], at["fix/rs"]["mean_top1"], at["scratch"]["mean_top1"]
    ok = fm - rs >= 1 and fm - sc >= 3 and rising
    return (f"at {longest} steps ({at['fm']['epochs']:g} epochs): fm {fm:.2f}% vs fix/rs {rs:.2f}% ({fm - rs:+.2f}) "
            f"and scratch {sc:.2f}% ({fm - sc:+.2f}); fm's mean {'rises' if rising else 'does NOT rise'} with every "
            f"longer budget ({' -> '.join(f'{v:.2f}' for v in fm_curve)}); teacher {teacher_top1:.2f}%. "
            f"Claim (fm >= fix/rs + 1, >= scratch + 3, rising): {'holds' if ok else 'does NOT hold'}.")


def figure(path, summary, teacher_top1, per_class):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in MODES:
        ss = [s for s in summary if s["mode"] == mode]
        if not ss:
            continue
        x = [s["epochs"] for s in ss]
        line, = ax.plot(x, [s["mean_top1"] for s in ss], marker="o", label=mode)
        ax.fill_between(x, [s["min_top1"] for s in ss], [s["max_top1"] for s in ss], color=line.get_color(),
                        alpha=0.2, lw=0)
    ax.axhline(teacher_top1, color="black", lw=0.8, ls="--", label=f"teacher ({teacher_top1:.1f}%)")
    ax.set_xscale("log")
    ax.set_xlabel(f"epochs over the {per_class * 10} training images (log scale)")
    ax.set_ylabel("test top-1 % (10000 Fashion-MNIST test images)")
    ax.set_title("Patience at the paper's augmentation (crops >= 5%, mixup 1): mean and min..max over seeds",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def adopt_committed(a, out) -> int:
    """Finished runs recorded in a committed `out`/patience.json (same settings) count as done on this machine too:
    their result.json is written back into the workdir, so a sweep continues across machines. Returns how many."""
    path = out / "patience.json"
    if not path.is_file():
        return 0
    doc = json.loads(path.read_text())
    if doc.get("settings") != settings(a):
        return 0
    n = 0
    for run in doc.get("runs", []):
        done = pathlib.Path(a.workdir) / "rows" / _row_id(run["mode"], run["steps"], run["seed"], run["lr"]) / "result.json"
        if not done.is_file():
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(run) + "\n")
            n += 1
    return n


def settings(a) -> dict:
    """What a finished run depends on (not where it is written)."""
    return {k: getattr(a, k) for k in FULL if k not in ("workdir", "out", "budgets", "seeds")}


def finished_runs(a) -> list[dict]:
    rows = pathlib.Path(a.workdir) / "rows"
    return [json.loads(p.read_text()) for p in sorted(rows.glob("*/result.json"))] if rows.is_dir() else []


def write(a, out, rows, tuning, teacher_top1, meta):
    summary = summarise(rows)
    gap = verdict(summary, teacher_top1)
    doc = dict(teacher_top1=teacher_top1, crop_area_min=a.crop_area_min, mixup_alpha=a.mixup_alpha,
               rows=[{k: r[k] for k in ("mode", "steps", "epochs", "seed", "lr", "test_top1", "agreement", "seconds")}
                     for r in rows],
               summary=summary, lr_tuning=tuning, verdict=gap, settings=settings(a), runs=finished_runs(a), **meta)
    cols = [("mode", "mode"), ("steps", "steps"), ("epochs", "epochs"), ("seeds", "seeds"), ("lr", "lr"),
            ("mean_top1", "mean top-1 %"), ("min_top1", "min"), ("max_top1", "max"),
            ("mean_agreement", "agreement %")]
    md = [f"command: `{meta['command']}`  ", f"date: {meta['date']}  ", f"machine: {meta['machine']}  ",
          f"teacher test top-1: {teacher_top1:.2f}%; crop area >= {a.crop_area_min:g}, mixup alpha {a.mixup_alpha:g}  ",
          f"finished rows: {len(rows)}", "", "Learning rate per mode (tuned once at the shortest budget, seed 0, on "
          "the validation split):", ""]
    md += [f"- {t['mode']}: " + ", ".join(f"lr {v['lr']:g} -> {v['val_top1']:.2f}%" for v in t["runs"])
           + (f" -> **{t['chosen']:g}**" if t["chosen"] is not None else " (not finished)") for t in tuning]
    md += ["", "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(s[k]) for k, _ in cols) + " |" for s in summary]
    if gap:
        md += ["", gap]
    for name, text in (("patience.json", json.dumps(doc, indent=1) + "\n"), ("patience.md", "\n".join(md) + "\n")):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)
    figure(out / "patience.png", summary, teacher_top1, a.per_class)
    return summary, gap, cols


def main(argv=None):
    p, a = study_args(__doc__, FULL, QUICK, argv, quick_help="toy sizes (the test suite runs this)",
                      extra=lambda p: p.add_argument("--report", action="store_true",
                                                     help="train nothing: write the outputs from the finished runs"))
    try:
        budgets = sorted({int(b) for b in a.budgets.split(",")})
        lrs = [float(x) for x in a.lrs.split(",")]
    except ValueError:
        p.error("--budgets takes integers and --lrs numbers, comma-separated (e.g. --budgets 500,2000 --lrs 1e-2)")
    if min(budgets) < 1 or a.seeds < 1 or not lrs or min(lrs) <= 0 or a.per_class < 1 or a.val_per_class < 1:
        p.error("budgets, --seeds, --per-class and --val-per-class must be >= 1 and learning rates > 0")
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.workdir).mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join(["benchmarks/patience.py"] + (sys.argv[1:] if argv is None else list(argv)))
    t_start = time.perf_counter()

    import numpy as np
    from funmatch import study_teacher

    import patient
    from patient.data import SubsetSource, fashion_mnist, subset

    # The teacher travels with the results (1 MB), so a sweep continued on another machine distils the same teacher.
    committed = out / "patience_teacher.eqx"
    teacher, tinfo, cached = study_teacher(a, committed)
    if not committed.is_file():
        import shutil

        shutil.copyfile(cached, committed)
    adopted = adopt_committed(a, out)
    if adopted:
        print(f"{adopted} finished runs taken from {out / 'patience.json'}", flush=True)
    full_train = fashion_mnist("train")
    train = subset(full_train, per_class=a.per_class, seed=0)  # funmatch's 1020 images
    labels = np.asarray(full_train.labels)
    rest = np.setdiff1d(np.arange(len(full_train)), np.asarray(train.indices))
    rng = np.random.default_rng(1)
    val_idx = np.sort(np.concatenate([rng.choice(rest[labels[rest] == c], a.val_per_class, replace=False)
                                      for c in range(10)]))
    sources = dict(train=train, val=SubsetSource(full_train, val_idx, f"fashion_mnist/train[val {len(val_idx)}]"),
                   test=fashion_mnist("test"))
    if a.quick:
        sources["test"] = subset(sources["test"], per_class=4, seed=1)
    teacher_top1 = round(patient.evaluate(teacher, sources["test"], resolution=a.res)["top1"], 2)
    print(f"teacher: {teacher_top1:.2f}% on {len(sources['test'])} test images; student: ResNet-8, "
          f"{len(train)} images, budgets {budgets}, {a.seeds} seeds, lrs {lrs}", flush=True)
    m = machine()

    def meta():
        return dict(command=command, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    machine=f"{m['cpu']}, {m['cores']} cores", quick=a.quick,
                    teacher=dict(model="cifar_resnet20", res=a.res, steps=a.teacher_steps, train_s=tinfo["train_s"]),
                    student="cifar_resnet20 depths (1, 1, 1) (ResNet-8)", train_images=len(train), batch=a.batch,
                    session_run_time_s=round(time.perf_counter() - t_start, 1))

    def run(mode, steps, seed, lr):
        """A finished run's result; trains it (or resumes it) unless --report, where an unfinished run is None."""
        if a.report:
            done = pathlib.Path(a.workdir) / "rows" / _row_id(mode, steps, seed, lr) / "result.json"
            return json.loads(done.read_text()) if done.is_file() else None
        return train_one(a, mode, steps, seed, lr, teacher, sources)

    # 1. learning rate per mode at the shortest budget, seed 0, chosen on the validation split.
    tuning, chosen, rows = [], {}, []
    for mode in MODES:
        runs = []
        for lr in lrs:
            r = run(mode, budgets[0], 0, lr)
            if r is not None:
                runs.append(dict(lr=lr, val_top1=r["val_top1"]))
                print(f"  tune {mode:<8} lr {lr:<7g} val top-1 {r['val_top1']:6.2f}%", flush=True)
        if len(runs) == len(lrs):
            chosen[mode] = max(runs, key=lambda v: v["val_top1"])["lr"]
        tuning.append(dict(mode=mode, steps=budgets[0], runs=runs, chosen=chosen.get(mode)))
        if a.report:
            write(a, out, rows, tuning, teacher_top1, meta())

    # 2. every (budget, seed, mode) at the chosen learning rate; shortest budgets first so partial sweeps are useful.
    for steps in budgets:
        for seed in range(a.seeds):
            for mode in MODES:
                r = run(mode, steps, seed, chosen[mode]) if mode in chosen else None
                if r is None:
                    continue
                rows.append(r)
                print(f"  {mode:<8} {steps:>6} steps ({r['epochs']:g} epochs) seed {seed}: top-1 {r['test_top1']:6.2f}%"
                      f"  agreement {r['agreement']:6.2f}%  {r['seconds']:.0f} s", flush=True)
                write(a, out, rows, tuning, teacher_top1, meta())
    summary, gap, cols = write(a, out, rows, tuning, teacher_top1, meta())
    print()
    print(table(summary, cols))
    if gap:
        print(gap)
    print(json.dumps(dict(benchmark="patience", teacher_top1=teacher_top1,
                          run_time_s=round(time.perf_counter() - t_start, 1),
                          **{f"{s['mode']}@{s['steps']}": s["mean_top1"] for s in summary})))


if __name__ == "__main__":
    main()
