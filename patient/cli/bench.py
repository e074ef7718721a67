"""`patient-bench`: latency of .eqx (JAX/XLA), .onnx (onnxruntime) and .tflite (LiteRT + XNNPACK) models, in-process.

    patient-bench student.eqx student.onnx student.tflite --threads 1,2 --runs 1000 --warmup 50 --plot latency.png

Prints a table, then one JSON line with every figure, the machine (CPU model, cores, ISA flags) and library versions.
.onnx and .tflite need only numpy plus their runtime (no JAX, no TensorFlow). .eqx runs once whatever --threads says:
XLA sizes its own thread pool.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PROG = "patient-bench"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


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


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Benchmark .eqx, .onnx and .tflite models in-process.")
    p.add_argument("models", nargs="+", help=".eqx / .onnx / .tflite files")
    p.add_argument("--threads", type=_threads, default=[1], help="comma-separated intra-op thread counts (default 1)")
    p.add_argument("--batch", type=int, help="batch size (default: the file's; 1 for .eqx)")
    p.add_argument("--runs", type=int, default=1000, help="timed runs (default 1000)")
    p.add_argument("--warmup", type=int, default=50, help="discarded runs after the first (default 50)")
    p.add_argument("--json", help="also write the JSON result here")
    p.add_argument("--plot", help="write a latency chart (PNG, matplotlib)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
        return _fail("--runs must be >= 1, --warmup >= 0 and --batch >= 1")
    from patient.bench.latency import bench, library_versions, machine_info, plot, table
    from patient.bench.runtime import ModelError, model_format

    try:
        formats = [model_format(m) for m in args.models]  # every file checked before any timing starts
    except ModelError as e:
        return _fail(str(e))
    rows = []
    t0 = time.perf_counter()
    try:
        for path, fmt in zip(args.models, formats):
            for threads in ([None] if fmt == "eqx" else args.threads):
                rows.append(bench(path, threads=threads, batch=args.batch, runs=args.runs, warmup=args.warmup))
    except ModelError as e:
        return _fail(str(e))
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    result = {"benchmark": "patient-bench", "machine": machine_info(), "libraries": library_versions(),
              "run_time_s": round(time.perf_counter() - t0, 1), "results": rows}
    line = json.dumps(result, sort_keys=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0


def _fail(msg: str, code: int = 2) -> int:
    print(f"{PROG}: error: {msg.strip().splitlines()[0] if msg.strip() else 'failed'}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
