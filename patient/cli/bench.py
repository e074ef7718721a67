"""`patient-bench`: latency of .eqx (JAX/XLA), .onnx (onnxruntime) and .tflite (LiteRT + XNNPACK) models, in-process.

    patient-bench student.eqx student.onnx student.tflite --threads 1,2 --runs 1000 --warmup 50 --plot latency.png

Prints a table, then one JSON line with every figure, the machine (CPU model, cores, ISA flags) and library versions.
.onnx and .tflite need only numpy plus their runtime (no JAX, no TensorFlow). .eqx runs once whatever --threads says:
XLA sizes its own thread pool.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence

from .common import Parser, check_output, emit_json, fail, run

PROG = "patient-bench"


MAX_THREADS = 256  # runtimes allocate per-thread state up front: 100000 threads would exhaust memory and hang


def _threads(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads takes numbers like 1,2, got {text!r}") from None
    if not out or any(t < 1 for t in out):
        raise argparse.ArgumentTypeError(f"--threads takes positive numbers like 1,2, got {text!r}")
    if max(out) > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"--threads {max(out)} is more than {MAX_THREADS}; this machine has "
                                         f"{os.cpu_count()} cores, so pick counts up to that")
    return out


def parser() -> Parser:
    p = Parser(prog=PROG, description="Benchmark .eqx, .onnx and .tflite models in-process.")
    p.add_argument("models", nargs="+", help=".eqx / .onnx / .tflite files")
    p.add_argument("--threads", type=_threads, default=[1], help="comma-separated intra-op thread counts (default 1)")
    p.add_argument("--batch", type=int, help="batch size (default: the file's; 1 for .eqx)")
    p.add_argument("--runs", type=int, default=1000, help="timed runs (default 1000)")
    p.add_argument("--warmup", type=int, default=50, help="discarded runs after the first (default 50)")
    p.add_argument("--json", help="also write the JSON result here")
    p.add_argument("--plot", help="write a latency chart (PNG, matplotlib)")
    p.add_argument("--data", help="also measure top-1 of every file on this labelled data (digits | fashion_mnist | "
                                  "image_folder:PATH) and name the fastest file within --budget of the best top-1")
    p.add_argument("--split", default="test", help="split of digits / fashion_mnist for --data (default test)")
    p.add_argument("--budget", type=float, default=1.0,
                   help="accuracy budget for --data, in top-1 points below the best file (default 1.0)")
    p.add_argument("--profile", action="store_true",
                   help="per-operator profile instead of latencies: time by operator type (.onnx, onnxruntime's "
                        "profiler) or which operators run outside XNNPACK (.tflite); at most 200 runs per file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not (math.isfinite(args.budget) and 0 <= args.budget <= 100):
        return fail(PROG, f"--budget {args.budget} must be a number of top-1 points between 0 and 100")
    if args.runs < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
        return fail(PROG, "--runs must be >= 1, --warmup >= 0 and --batch >= 1")
    if args.runs > 1_000_000 or args.warmup > 100_000 or (args.batch is not None and args.batch > 65536):
        return fail(PROG, "--runs above 1000000, --warmup above 100000 or --batch above 65536 would run for days; "
                          "1000 runs give a stable median")
    return run(PROG, lambda: _bench(args))


def _bench(args) -> int:
    from patient.bench.latency import bench, library_versions, machine_info, plot, table
    from patient.runtime.models import model_format

    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_output(path, flag)

    formats = [model_format(m) for m in args.models]  # every file checked before any timing starts
    if args.profile:
        return _profile(args, formats)
    rows = []
    t0 = time.perf_counter()
    source = None
    if args.data:  # opened before any timing: a bad --data is one line, not an error after minutes of benchmarking
        from patient.runtime import open_source

        source = open_source(args.data, args.split)
    for path, fmt in zip(args.models, formats):
        for threads in ([None] if fmt == "eqx" else args.threads):
            rows.append(bench(path, threads=threads, batch=args.batch, runs=args.runs, warmup=args.warmup))
    print(table(rows))
    choice = None
    if source is not None:
        choice = _accuracy(args, rows, source)
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    result = {"benchmark": "patient-bench", "machine": machine_info(), "libraries": library_versions(),
              "run_time_s": round(time.perf_counter() - t0, 1), "results": rows}
    if choice is not None:
        result["fastest_within_budget"] = choice
    emit_json(result, args.json)
    return 0



def _accuracy(args, rows: list[dict], source) -> dict:
    """Top-1 of every file on `source` (added to its rows), then the fastest row within the budget, printed."""
    from patient.cli.eval import class_map, evaluate
    from patient.runtime import open_model

    top1 = {}
    for path in dict.fromkeys(r["path"] for r in rows):
        runner = open_model(path, threads=1, batch=None)
        classes = class_map(runner.class_names, source, relabel=False)
        top1[path] = 100 * evaluate(runner, source, classes=classes)["top1"]
    for r in rows:
        r["top1"] = round(top1[r["path"]], 2)
    best = max(top1.values())
    within = [r for r in rows if top1[r["path"]] >= best - args.budget]  # the best file is always within
    pick = min(within, key=lambda r: r["p50_ms"])
    for path, t in top1.items():
        print(f"top-1 on {source.name}: {t:6.2f}%  {path}")
    print(f"fastest within {args.budget:g} point{'s' if args.budget != 1 else ''} of the best top-1 ({best:.2f}%): "
          f"{pick['path']} ({pick['threads']} thread(s), p50 {pick['p50_ms']:.3f} ms, top-1 {pick['top1']:.2f}%)")
    return {"path": pick["path"], "threads": pick["threads"], "p50_ms": pick["p50_ms"], "top1": pick["top1"],
            "best_top1": round(best, 2), "budget": args.budget, "data": args.data}


def _profile(args, formats) -> int:
    from patient.bench.latency import library_versions, machine_info
    from patient.bench.profile import profile, profile_table

    if "eqx" in formats:
        return fail(PROG, "--profile reads .onnx and .tflite files; export the .eqx first (patient-export)")
    if args.plot or args.data:
        flag = "--plot" if args.plot else "--data"
        return fail(PROG, f"{flag} goes with the latency table; leave it out with --profile (or run without --profile)")
    t0 = time.perf_counter()
    results = []
    for path in args.models:
        for threads in args.threads:
            results.append(profile(path, threads=threads, runs=min(args.runs, 200)))
            print(profile_table(results[-1]))
    emit_json({"benchmark": "patient-bench --profile", "machine": machine_info(), "libraries": library_versions(),
               "run_time_s": round(time.perf_counter() - t0, 1), "results": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
