"""In-process latency of .eqx (JAX/XLA), .onnx (onnxruntime) and .tflite (LiteRT + XNNPACK) models.

    from patient.bench.latency import bench, machine_info, table
    rows = [bench("student.onnx", threads=t) for t in (1, 2)]
    print(table(rows))

Per model and thread count: the runtime session is created (init time), one first inference is timed on its own
(it includes lazy allocation and, for JAX, compilation), `warmup` runs are discarded, then `runs` runs are timed one by
one with `time.perf_counter_ns`: p50 / p90 / p99 / mean / std / min in milliseconds. Peak RSS is the process's
high-water mark while the model was loaded and run (reset before each model through /proc/self/clear_refs on Linux,
so it includes the interpreter and the libraries already loaded, not earlier models). Parameters and MACs come from
the file's metadata (patient exports write them) or, for .eqx, from the folded network.

Needs numpy only at import; runtimes load with their model, so .onnx/.tflite benchmarks run without JAX.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any

import numpy as np

from patient.runtime.models import Runner, file_size, open_model

ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",  # x86
             "neon", "asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2", "fphp")  # ARM


def machine_info() -> dict[str, Any]:
    """CPU model, usable cores, ISA flags that matter for inference kernels, OS and Python."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and value.strip():
                    model = value.strip()
                elif key in ("flags", "features"):
                    flags.update(value.split())
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": model, "cores": cores, "isa": [f for f in ISA_FLAGS if f in flags], "machine": platform.machine(),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "load_avg_1min": None if load is None else round(load, 2)}


def library_versions() -> dict[str, str]:
    """Versions of the inference libraries this process has loaded (nothing is imported to ask)."""
    from patient._version import __version__

    out = {"patient": __version__, "numpy": np.__version__}
    for mod, name in (("onnxruntime", "onnxruntime"), ("ai_edge_litert", "ai-edge-litert"), ("jax", "jax"),
                      ("jaxlib", "jaxlib"), ("tensorflow", "tensorflow")):
        m = sys.modules.get(mod)
        if m is not None:
            version = getattr(m, "__version__", None)
            if version is None:
                try:
                    from importlib.metadata import version as _v

                    version = _v(name)
                except Exception:
                    version = "?"
            out[name] = str(version)
    return out


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _counts(runner: Runner) -> tuple[int | None, int | None]:
    meta = runner.meta
    params = int(meta["params"]) if str(meta.get("params", "")).isdigit() else None
    macs = int(meta["macs"]) if str(meta.get("macs", "")).isdigit() else None
    if runner.format == "eqx":
        from patient.models import param_count
        from patient.models.fold import fold

        params = param_count(runner.model)
        macs = fold(runner.model, runner.state).macs(runner.resolution)
    return params, macs


def bench(path: str | os.PathLike, *, threads: int | None = None, batch: int | None = None, runs: int = 1000,
          warmup: int = 50, label: str | None = None) -> dict[str, Any]:
    """Benchmark one model file at one thread count; returns a flat dict (see the module docstring)."""
    _reset_peak_rss()
    t0 = time.perf_counter()
    runner = open_model(path, threads=threads, batch=batch)
    load_s = time.perf_counter() - t0
    if batch is not None and runner.batch is not None and runner.batch != batch:
        from patient.runtime.models import ModelError

        raise ModelError(f"{path}: exported with batch {runner.batch}; re-export with --batch {batch} or bench with "
                         f"--batch {runner.batch}")
    b = runner.batch or batch or 1
    x = runner.example_input(b)
    t = time.perf_counter()
    runner.run_batch(x)
    first_ms = (time.perf_counter() - t) * 1e3
    times = runner.time_ms(x, runs=runs, warmup=warmup)
    params, macs = _counts(runner)
    result = {
        "model": label or os.path.basename(str(path)), "path": str(path), "format": runner.format,
        "runtime": runner.runtime, "quantization": runner.meta.get("quantization", "?"),
        "threads": runner.threads if runner.format != "eqx" else "xla", "batch": b, "resolution": runner.resolution,
        "p50_ms": float(np.percentile(times, 50)), "p90_ms": float(np.percentile(times, 90)),
        "p99_ms": float(np.percentile(times, 99)), "mean_ms": float(times.mean()), "std_ms": float(times.std()),
        "min_ms": float(times.min()), "runs": runs, "warmup": warmup,
        "init_s": float(runner.init_s), "load_s": float(load_s), "first_ms": float(first_ms),
        "peak_rss_mb": round(_peak_rss_mb(), 1), "file_mb": round(file_size(path) / 1e6, 3),
        "params": params, "macs": macs,
    }
    del runner
    return result


COLUMNS = [("model", "model", "{}"), ("fmt", "format", "{}"), ("quant", "quantization", "{}"), ("thr", "threads", "{}"),
           ("batch", "batch", "{}"), ("res", "resolution", "{}"), ("p50 ms", "p50_ms", "{:.3f}"),
           ("p90 ms", "p90_ms", "{:.3f}"), ("p99 ms", "p99_ms", "{:.3f}"), ("mean ms", "mean_ms", "{:.3f}"),
           ("std ms", "std_ms", "{:.3f}"), ("init s", "init_s", "{:.3f}"), ("first ms", "first_ms", "{:.1f}"),
           ("RSS MB", "peak_rss_mb", "{:.0f}"), ("file MB", "file_mb", "{:.2f}"), ("params", "params", "{:,}"),
           ("MMACs", "macs", "{:.1f}")]


def table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of `bench` results."""
    cells = []
    for r in rows:
        line = []
        for _, key, fmt in COLUMNS:
            v = r.get(key)
            if key == "macs" and v is not None:
                v = v / 1e6
            if key == "quantization" and isinstance(v, str):
                v = v.split(" (")[0].replace("int8 full integer", "int8").replace("int8 QDQ ", "int8 ")
            line.append("-" if v is None else fmt.format(v))
        cells.append(line)
    heads = [h for h, _, _ in COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    fmt_row = lambda vals: "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([fmt_row(heads)] + [fmt_row(c) for c in cells])


def plot(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """A horizontal bar chart of p50 latency with p90 whiskers per model and thread count (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']} ({r['format']}, {r['threads']} thr)" for r in rows]
    p50 = np.array([r["p50_ms"] for r in rows])
    p90 = np.array([r["p90_ms"] for r in rows])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    y = np.arange(len(rows))
    ax.barh(y, p50, xerr=[np.zeros_like(p50), p90 - p50], color="tab:blue", capsize=3)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("latency per batch, ms (bar: p50, whisker: p90)")
    info = machine_info()
    ax.set_title(f"patient-bench on {info['cpu']} ({info['cores']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
