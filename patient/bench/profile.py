"""Per-operator profiles of exported models: where the time goes, and which operators leave XNNPACK.

    from patient.bench.profile import profile, profile_table
    print(profile_table(profile("student.onnx", threads=1, runs=200)))

- `.onnx`: onnxruntime's own profiler (`SessionOptions.enable_profiling`) over `runs` inferences; each node's kernel
  time is summed by operator type (the graph as onnxruntime runs it, after its own fusions: a fused `Conv` carries its
  activation, a `QLinearConv` is an int8 convolution, `DequantizeLinear` / `QuantizeLinear` mark float islands).
- `.tflite`: the operators by type and, for each, how many the XNNPACK delegate takes (a delegate node replaces the
  operators between its inputs and outputs) and how many it leaves to LiteRT's own kernels, which split the graph
  into partitions. LiteRT's Python API has no per-operator timer, so the time is the whole model's, with XNNPACK and
  without it (`BUILTIN_WITHOUT_DEFAULT_DELEGATES`). The delegate walk reads the interpreter's node list
  (`_get_ops_details`, LiteRT 2.x).

Needs only numpy and the runtime, like `patient.bench.latency`.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import tempfile
import time
from typing import Any

import numpy as np

from patient.runtime.models import ModelError, model_format


def profile(path: str | os.PathLike, *, threads: int = 1, runs: int = 200) -> dict[str, Any]:
    """Profile one `.onnx` or `.tflite` file at batch 1 (or its fixed batch). **Returns:** `{"model", "format",
    "threads", "runs", "ops": [{"op", "count", ...}], ...}` (see the module docstring for each format's fields)."""
    fmt = model_format(path)
    if fmt == "onnx":
        return _onnx(pathlib.Path(path), threads, runs)
    if fmt == "tflite":
        return _tflite(pathlib.Path(path), threads, runs)
    raise ModelError(f"{path}: --profile reads .onnx and .tflite files; export the .eqx first (patient-export)")


def _input(shape) -> np.ndarray:
    dims = [int(d) if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in shape]  # symbolic batch -> 1
    return np.random.default_rng(0).random(dims, dtype=np.float32)


def _onnx(path: pathlib.Path, threads: int, runs: int) -> dict[str, Any]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(pathlib.Path(tmp) / "ort")
        try:
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
        inp = sess.get_inputs()[0]
        feed = {inp.name: _input(inp.shape)}
        sess.run(None, feed)  # the first run allocates; it is profiled too but not counted below
        t0 = time.perf_counter()
        for _ in range(runs):
            sess.run(None, feed)
        wall = (time.perf_counter() - t0) / runs * 1e3
        events = json.loads(pathlib.Path(sess.end_profiling()).read_text())
    time_us: dict[str, float] = collections.defaultdict(float)
    nodes: dict[str, set] = collections.defaultdict(set)
    calls: dict[str, int] = collections.Counter()
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            time_us[op] += float(ev.get("dur", 0))
            nodes[op].add(ev["name"])
            calls[op] += 1
    total = sum(time_us.values()) or 1.0
    ops = [dict(op=op, count=len(nodes[op]), ms_per_run=round(time_us[op] / (calls[op] / len(nodes[op])) / 1e3, 4),
                share=round(time_us[op] / total, 4)) for op in time_us]
    ops.sort(key=lambda r: -r["share"])
    return dict(model=str(path), format="onnx", threads=threads, runs=runs, ms_per_run_profiled=round(wall, 4),
                ops=ops)


def _delegated(details: list[dict]) -> set[int]:
    """Indices of the operators a DELEGATE node took: walk back from its outputs until its inputs."""
    orig = [o for o in details if o["op_name"] != "DELEGATE"]
    producer = {int(t): o for o in orig for t in o["outputs"]}
    taken: set[int] = set()
    for node in (o for o in details if o["op_name"] == "DELEGATE"):
        stop = {int(t) for t in node["inputs"]}
        stack = [int(t) for t in node["outputs"]]
        while stack:
            t = stack.pop()
            if t in stop or t not in producer or producer[t]["index"] in taken:
                continue
            taken.add(producer[t]["index"])
            stack.extend(int(i) for i in producer[t]["inputs"] if i >= 0)
    return taken


def _tflite(path: pathlib.Path, threads: int, runs: int) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from patient.runtime.models import TfliteRunner

    content = path.read_bytes()
    with_xnn = TfliteRunner(path, threads=threads)  # ModelError for an unreadable file
    details = with_xnn.interpreter._get_ops_details()
    taken = _delegated(details)
    orig = [o for o in details if o["op_name"] != "DELEGATE"]
    partitions = sum(o["op_name"] == "DELEGATE" for o in details)
    count = collections.Counter(o["op_name"] for o in orig)
    inside = collections.Counter(o["op_name"] for o in orig if o["index"] in taken)
    ops = [dict(op=op, count=n, in_xnnpack=inside[op], outside=n - inside[op]) for op, n in count.items()]
    ops.sort(key=lambda r: (-r["outside"], -r["count"]))
    plain = Interpreter(model_content=content, num_threads=threads,
                        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    plain.allocate_tensors()
    p50 = {name: _p50(it, runs) for name, it in (("xnnpack", with_xnn.interpreter), ("no_delegate", plain))}
    return dict(model=str(path), format="tflite", threads=threads, runs=runs, operators=len(orig),
                in_xnnpack=len(taken), partitions=partitions, p50_ms_xnnpack=round(p50["xnnpack"], 4),
                p50_ms_no_delegate=round(p50["no_delegate"], 4), ops=ops)


def _p50(interpreter, runs: int) -> float:
    """Median milliseconds of `invoke` on a fixed random input (after 10 unmeasured runs)."""
    inp = interpreter.get_input_details()[0]
    x = _input(list(inp["shape"]))
    if np.issubdtype(inp["dtype"], np.integer):
        x = np.zeros(x.shape, inp["dtype"])
    interpreter.set_tensor(inp["index"], x.astype(inp["dtype"]))
    times = []
    for i in range(10 + runs):
        t0 = time.perf_counter()
        interpreter.invoke()
        if i >= 10:
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def profile_table(p: dict[str, Any], top: int = 15) -> str:
    """A readable table of one `profile` result (the `top` operator types)."""
    head = f"{p['model']} ({p['format']}, {p['threads']} thread{'s' if p['threads'] != 1 else ''}, {p['runs']} runs)"
    if p["format"] == "onnx":
        lines = [head, f"  {p['ms_per_run_profiled']:.3f} ms per run under the profiler; kernel time by operator:",
                 f"  {'operator':<28}{'nodes':>6}{'ms/run':>10}{'share':>8}"]
        lines += [f"  {r['op']:<28}{r['count']:>6}{r['ms_per_run']:>10.3f}{100 * r['share']:>7.1f}%"
                  for r in p["ops"][:top]]
        return "\n".join(lines)
    outside = p["operators"] - p["in_xnnpack"]
    lines = [head, f"  {p['operators']} operators, {p['in_xnnpack']} in XNNPACK ({p['partitions']} partition"
                   f"{'s' if p['partitions'] != 1 else ''}), {outside} on LiteRT's own kernels; p50 "
                   f"{p['p50_ms_xnnpack']:.3f} ms with XNNPACK, {p['p50_ms_no_delegate']:.3f} ms without",
             f"  {'operator':<28}{'count':>6}{'XNNPACK':>9}{'outside':>9}"]
    lines += [f"  {r['op']:<28}{r['count']:>6}{r['in_xnnpack']:>9}{r['outside']:>9}" for r in p["ops"][:top]]
    return "\n".join(lines)
