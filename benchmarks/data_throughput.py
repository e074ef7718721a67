"""Data-loader throughput: images/s that `patient.data.pipeline` delivers in `fm` mode (two views + flips per image).

Run (from the repository root; about 1-2 minutes on 2 cores):

    python benchmarks/data_throughput.py                      # print the table and one JSON line
    python benchmarks/data_throughput.py --save benchmarks/results/data_throughput.txt

Cases: Fashion-MNIST (28x28 in memory, student and teacher 28 px) and a folder of 512 JPEGs (256x256 RGB, made from
Fashion-MNIST images upscaled, written to a temporary directory; decoded on every access; student 128 px, teacher
224 px), each with 0 worker processes (threads only) and 2 worker processes. 16 warm-up batches (worker start-up, and
draining the batches the workers buffered meanwhile) are excluded; "images/s" is measured over the timed batches,
"p50 ms/batch" is the median wait for one batch.

The number that matters is the ratio against the distill step's consumption on the same machine (the loader must
never be what the step waits for); that comparison belongs with the engine's benchmark once it exists.

Last run (benchmarks/results/data_throughput.txt; 2 shared Xeon cores, load average 4.2 at start, so noisy):

    source                   student teacher workers batch  images/s p50 ms/batch first batch s
    fashion_mnist                 28      28       0   256      7427         34.2          0.07
    fashion_mnist                 28      28       2   256      6481         23.9          2.03
    jpeg_folder[512x256px]       128     224       0    64       547        112.8          0.38
    jpeg_folder[512x256px]       128     224       2    64       319         55.7          2.64

On 2 busy cores worker processes do not pay off (the threads of one process already keep both cores busy, and each
JPEG batch moves 50 MB of float32 through shared memory); they are for machines with cores to spare.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import shlex
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402

import patient.data as pdata  # noqa: E402


def make_jpeg_folder(root: pathlib.Path, n: int, size: int) -> pdata.ImageFolderSource:
    from PIL import Image

    src = pdata.fashion_mnist("train")
    for i in range(n):
        ex = src[i]
        cls = root / f"{ex['label']:02d}_{src.class_names[ex['label']].replace('/', '-')}"
        cls.mkdir(exist_ok=True)
        img = Image.fromarray(ex["image"][..., 0]).resize((size, size), Image.Resampling.BICUBIC)
        img.convert("RGB").save(cls / f"{i:05d}.jpg", "JPEG", quality=90)
    return pdata.image_folder(root)


def measure(source, *, student_res, teacher_res, batch_size, num_workers, warmup, batches) -> dict:
    ds = pdata.pipeline(
        source, mode="fm", student_res=student_res, teacher_res=teacher_res, batch_size=batch_size, seed=0,
        num_workers=num_workers,
    )  # fmt: skip
    t0 = time.perf_counter()
    with contextlib.closing(iter(ds)) as it:
        next(it)
        first = time.perf_counter() - t0
        for _ in range(warmup - 1):
            next(it)
        times = []
        start = time.perf_counter()
        for _ in range(batches):
            t = time.perf_counter()
            batch = next(it)
            times.append(time.perf_counter() - t)
            del batch  # release shared memory promptly
        total = time.perf_counter() - start
    return {
        "images_per_s": batches * batch_size / total,
        "p50_ms_per_batch": 1e3 * statistics.median(times),
        "first_batch_s": first,
        "batches": batches,
        "batch_size": batch_size,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save", type=pathlib.Path, help="also write the output to this file")
    parser.add_argument("--jpegs", type=int, default=512, help="number of JPEGs in the generated folder")
    parser.add_argument("--quick", action="store_true", help="fewer batches (smoke test)")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]
    scale = 0.2 if args.quick else 1.0

    cases = []
    fashion = pdata.fashion_mnist("train")
    with tempfile.TemporaryDirectory(prefix="patient-jpegs-") as tmp:
        folder = make_jpeg_folder(pathlib.Path(tmp), args.jpegs, 256)
        specs = [
            ("fashion_mnist", fashion, 28, 28, 256, 64),
            (f"jpeg_folder[{len(folder)}x256px]", folder, 128, 224, 64, 32),
        ]
        for name, source, s_res, t_res, bs, n_batches in specs:
            for workers in (0, 2):
                r = measure(
                    source, student_res=s_res, teacher_res=t_res, batch_size=bs, num_workers=workers,
                    warmup=max(3, int(16 * scale)), batches=max(3, int(n_batches * scale)),
                )  # fmt: skip
                cases.append({"source": name, "student_res": s_res, "teacher_res": t_res, "workers": workers, **r})
                print(f"  done: {name} workers={workers}: {r['images_per_s']:.0f} images/s", file=sys.stderr)
    run_time = time.perf_counter() - t_start

    import grain

    lines = [
        f"command: python {' '.join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}",
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"machine: {cpu_model()}, {os.cpu_count()} cores (shared with other jobs), {platform.system()} {platform.release()}",
        f"software: python {platform.python_version()}, grain {grain.__version__ if hasattr(grain, '__version__') else '?'},"
        f" numpy {np.__version__}, pillow {__import__('PIL').__version__}",
        f"run time: {run_time:.1f} s (1-min load average at start: {load_before:.2f})",
        "",
        "mode fm (student + teacher view, shared inception crop + flip per image), seed 0, warm-up excluded",
        "",
        f"{'source':<24} {'student':>7} {'teacher':>7} {'workers':>7} {'batch':>5} {'images/s':>9} "
        f"{'p50 ms/batch':>12} {'first batch s':>13}",
    ]
    for c in cases:
        lines.append(
            f"{c['source']:<24} {c['student_res']:>7} {c['teacher_res']:>7} {c['workers']:>7} {c['batch_size']:>5} "
            f"{c['images_per_s']:>9.0f} {c['p50_ms_per_batch']:>12.1f} {c['first_batch_s']:>13.2f}"
        )
    summary = {
        "benchmark": "data_throughput",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "run_time_s": round(run_time, 1),
        "cases": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in c.items()} for c in cases],
    }
    lines += ["", json.dumps(summary)]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(text)


if __name__ == "__main__":
    main()
