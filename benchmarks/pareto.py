"""The accuracy-latency front: several distilled students, each exported five ways, top-1 against p50 latency.

    python benchmarks/pareto.py               # the study: train (resumable), export, evaluate, time; quiet machine
    python benchmarks/pareto.py --quick       # toy sizes into /tmp (tests/test_pareto.py)

Every student is distilled from the patience study's teacher (cifar_resnet20 at 28 px, 91.02% on Fashion-MNIST; the
cached or committed `benchmarks/results/patience_teacher.eqx`) on the full 60000 training images, mode `same/ic`,
Adam with warm-up and cosine decay, `--steps` steps of batch `--batch`. The MobileNetV3 students see 64 px views of
the same crops the teacher sees at 28 px (resolutions may differ); the CIFAR ResNets see 28 px. Each student is
exported as ONNX fp32, ONNX int8 (onnxruntime static QDQ), TFLite fp32, TFLite fp16 and TFLite int8 (full integer),
int8 calibrated on Fashion-MNIST training images and kept even where slower (`keep_int8`: the front decides).

Measured per artifact: top-1 on all 10000 test images (the runtime path of `patient-eval`: the file alone, no JAX),
p50 / p90 latency at batch 1 and 1 thread (`patient.bench.latency.bench`), file size. A row is `on_front` when no
other row has a top-1 at least as high and a p50 at least as low, one of them strictly. Outputs under `--out`:
pareto.json (rows with `student`, `format`, `quantization`, `top1`, `p50_ms`, `p90_ms`, `size_mb`, `on_front`, plus
the command, date, machine and load), pareto.md (the table), pareto.png (top-1 against p50, log x, the front drawn).
Latencies are kept only from a quiet machine (`common.Quiet`); on a busy one the run stops before writing.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json  # noqa: E402
import pathlib  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parent.parent))
from common import Quiet, machine, study_args, table  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# (label, registry name, create overrides, student resolution, learning rate)
STUDENTS = [
    ("resnet8", "cifar_resnet20", dict(depths=(1, 1, 1)), 28, 1e-2),
    ("resnet20", "cifar_resnet20", {}, 28, 1e-2),
    ("mnv3_small_050", "mobilenetv3_small_050", {}, 64, 3e-3),
    ("mnv3_small_100", "mobilenetv3_small_100", {}, 64, 3e-3),
    ("mnv3_large_075", "mobilenetv3_large_075", {}, 64, 3e-3),
]
ARTIFACTS = [("onnx", "none"), ("onnx", "int8"), ("tflite", "none"), ("tflite", "fp16"), ("tflite", "int8")]

FULL = dict(res=28, teacher_steps=1500, teacher_batch=128, teacher_lr=3e-3, steps=2000, batch=64,
            students=",".join(s[0] for s in STUDENTS), runs=500, test_per_class=0,
            workdir=str(pathlib.Path.home() / ".cache" / "patient" / "pareto"), out="benchmarks/results")
QUICK = dict(FULL, res=12, teacher_steps=30, steps=4, batch=16, students="resnet8,mnv3_small_050", runs=20,
             test_per_class=4, workdir="/tmp/patient_bench/pareto_quick", out="/tmp/patient_bench/pareto_quick")


def on_front(rows: list[dict]) -> list[bool]:
    """True for each row that no other row beats on both top-1 (higher) and p50 (lower), one of them strictly."""
    flags = []
    for r in rows:
        beaten = any(o is not r and o["top1"] >= r["top1"] and o["p50_ms"] <= r["p50_ms"]
                     and (o["top1"] > r["top1"] or o["p50_ms"] < r["p50_ms"]) for o in rows)
        flags.append(not beaten)
    return flags


def train_student(a, spec, teacher, source) -> pathlib.Path:
    """The distilled student as .eqx under the workdir (trained, or resumed, unless it is there)."""
    import jax

    import patient
    from patient.models import create

    label, name, overrides, res, lr = spec
    res = res if not a.quick else min(res, 32)
    path = pathlib.Path(a.workdir) / f"{label}_{a.steps}steps.eqx"
    if path.is_file():
        return path
    model = create(name, num_classes=10, key=jax.random.key(0), resolution=res, **overrides)
    r = patient.distill(teacher, model, source, mode="same/ic", steps=a.steps, batch_size=a.batch, learning_rate=lr,
                        student_res=res, teacher_res=a.res, workdir=pathlib.Path(a.workdir) / "runs" / label,
                        log_every=max(1, a.steps // 10), checkpoint_every=max(1, a.steps // 4), progress=a.progress)
    patient.save(path, r.student, r.state, class_names=list(source.class_names or []) or None)
    return path


def export_all(a, eqx_path: pathlib.Path) -> list[tuple[str, str, pathlib.Path]]:
    """The five artifacts of one student (each skipped when already written)."""
    from patient.export import to_onnx, to_tflite

    out = []
    for fmt, quant in ARTIFACTS:
        path = eqx_path.with_name(f"{eqx_path.stem}.{quant}.{fmt}")
        if not path.is_file():
            fn = to_onnx if fmt == "onnx" else to_tflite
            kw = dict(calibration="fashion_mnist", calibration_size=128, keep_int8=True) if quant == "int8" else {}
            fn(eqx_path, path, quantize=quant, verify_data="fashion_mnist", verify_size=32, **kw)
        out.append((fmt, quant, path))
    return out


def main(argv=None):
    p, a = study_args(__doc__, FULL, QUICK, argv, quick_help="toy sizes (the test suite runs this)")
    names = [s for s in a.students.split(",") if s]
    unknown = sorted(set(names) - {s[0] for s in STUDENTS})
    if unknown or not names or a.steps < 1 or a.runs < 1:
        p.error(f"unknown students {unknown} (known: {', '.join(s[0] for s in STUDENTS)}), or --steps/--runs < 1")
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.workdir).mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join(["benchmarks/pareto.py"] + (sys.argv[1:] if argv is None else list(argv)))
    t_start = time.perf_counter()

    from funmatch import study_teacher

    from patient.bench.latency import bench
    from patient.cli.eval import evaluate
    from patient.data import fashion_mnist, subset
    from patient.runtime import open_model

    # the patience study's teacher, which travels with its results (not for --quick: another recipe)
    teacher, _, _ = study_teacher(a, None if a.quick else RESULTS / "patience_teacher.eqx")
    train = fashion_mnist("train")
    if a.quick:
        train = subset(train, per_class=4, seed=0)
    test = fashion_mnist("test")
    if a.test_per_class:
        test = subset(test, per_class=a.test_per_class, seed=1)

    # 1. train and export (CPU-heavy, any load); 2. accuracy (load does not matter); 3. latency on a quiet machine.
    artifacts = []
    for spec in (s for s in STUDENTS if s[0] in names):
        eqx_path = train_student(a, spec, teacher, train)
        for fmt, quant, path in export_all(a, eqx_path):
            artifacts.append(dict(student=spec[0], format=fmt, quantization=quant, path=path))
        print(f"  {spec[0]}: trained and exported", flush=True)
    for art in artifacts:
        runner = open_model(art["path"], threads=1, batch=None)
        art["top1"] = round(100 * evaluate(runner, test)["top1"], 2)
        art["size_mb"] = round(art["path"].stat().st_size / 1e6, 3)
    with Quiet(wait=0 if a.quick else 240) as quiet:
        for art in artifacts:
            r = bench(art["path"], threads=1, runs=a.runs, warmup=min(50, a.runs))
            art["p50_ms"], art["p90_ms"] = round(r["p50_ms"], 4), round(r["p90_ms"], 4)
    print(quiet.describe(), flush=True)
    if not quiet.valid and not a.quick:
        sys.exit(f"pareto: the machine was not quiet ({quiet.describe()}); nothing written. Rerun on a quiet machine "
                 "(training and exports are cached: only the timing runs again).")
    rows = [dict(student=r["student"], format=r["format"], quantization=r["quantization"], top1=r["top1"],
                 p50_ms=r["p50_ms"], p90_ms=r["p90_ms"], size_mb=r["size_mb"]) for r in artifacts]
    for r, f in zip(rows, on_front(rows)):
        r["on_front"] = f
    m = machine()
    doc = dict(command=command, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               machine=f"{m['cpu']}, {m['cores']} cores", quick=a.quick, steps=a.steps, batch=a.batch,
               test_images=len(test), run_time_s=round(time.perf_counter() - t_start, 1), **quiet.figures(),
               rows=rows)
    (out / "pareto.json").write_text(json.dumps(doc, indent=1) + "\n")
    cols = [("student", "student"), ("format", "format"), ("quantization", "quantization"), ("top1", "top-1 %"),
            ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"), ("size_mb", "MB"), ("on_front", "front")]
    text = table(rows, cols)
    (out / "pareto.md").write_text(f"`{command}`, {doc['date']}, {doc['machine']}, {quiet.describe()}\n\n```\n{text}\n"
                                   "```\n")
    figure(out / "pareto.png", rows)
    print(text)
    print(json.dumps(dict(benchmark="pareto", front=[f"{r['student']} {r['format']} {r['quantization']}"
                                                     for r in rows if r["on_front"]], quiet=quiet.valid)))


def figure(path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {("onnx", "none"): "o", ("onnx", "int8"): "s", ("tflite", "none"): "^", ("tflite", "fp16"): "v",
               ("tflite", "int8"): "D"}
    for student in dict.fromkeys(r["student"] for r in rows):
        rs = [r for r in rows if r["student"] == student]
        color = ax.plot([], [])[0].get_color()
        for r in rs:
            ax.scatter(r["p50_ms"], r["top1"], marker=markers[(r["format"], r["quantization"])], color=color,
                       edgecolor="black" if r["on_front"] else "none", s=40)
        ax.scatter([], [], color=color, label=student)
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["p50_ms"])
    ax.plot([r["p50_ms"] for r in front], [r["top1"] for r in front], color="black", lw=0.8, label="front")
    for (fmt, quant), mk in markers.items():
        ax.scatter([], [], marker=mk, color="grey", label=f"{fmt} {quant}")
    ax.set_xscale("log")
    ax.set_xlabel("p50 latency, ms (batch 1, 1 thread, log scale)")
    ax.set_ylabel("top-1 on Fashion-MNIST test, %")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
