"""int8 ONNX by onnxruntime static quantisation (QDQ), and the decision whether int8 is worth keeping on this CPU.

Three QDQ variants are made, all with per-channel int8 weights and MinMax calibration on real images: U8S8 (uint8
activations, onnxruntime's usual choice on x86), U8S8 with the stem left in float (`_stem_nodes`), and S8S8 (int8
activations, the usual choice on ARM). Each is timed against the fp32 graph on this machine (median of a short run,
one thread). int8 is not always faster: onnxruntime's x86 int8 depthwise kernels are slower than its fp32 ones, and
a 3-channel stem gains nothing from int8 either (benchmarks/results/int8_investigation.md). The fastest variant is
kept; if fp32 is faster than every int8 variant, fp32 is kept and the report says so (`keep_int8=True` overrides).

The graph quantised may differ from the fp32 one it is timed against: `patient.export.to_onnx` quantises a graph
where each hard-swish's 1/6 sits in the next layer's weights (`FoldedNet.fold_sixths`), because onnxruntime has no
quantised HardSwish and would run each one in float between DequantizeLinear and QuantizeLinear.
"""

from __future__ import annotations

import pathlib
import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

VARIANTS = {  # label -> (activation type, weight type, stem convolution left in float)
    "int8 QDQ U8S8 per-channel": ("QUInt8", "QInt8", False),
    "int8 QDQ U8S8 per-channel, float stem": ("QUInt8", "QInt8", True),
    "int8 QDQ S8S8 per-channel": ("QInt8", "QInt8", False),
}
if TYPE_CHECKING:
    import onnx

TIMING_RUNS, TIMING_WARMUP, TIMING_MIN_S = 20, 3, 0.5


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over calibration images cut into the graph's batch size."""

    def __init__(self, images: np.ndarray, batch: int):
        self._batches = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)] or [images[:batch]]
        self._it = iter(self._batches)

    def get_next(self):
        b = next(self._it, None)
        return None if b is None else {"images": np.ascontiguousarray(b, np.float32)}

    def rewind(self):
        self._it = iter(self._batches)


def _stem_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes a float-stem variant leaves in float: from the input up to the first convolution with another
    number of output channels than the stem's (MobileNetV3-Large: the stem and its first 16-channel block). Narrow
    layers on the largest maps gain nothing from int8 in onnxruntime, and the float/int8 boundary costs a
    QuantizeLinear pass wherever it is; measured on a Xeon: MobileNetV3-Large int8 4.09 ms with the stem convolution
    alone in float, 3.85 ms with its first block too (fp32 4.80 ms). Empty when no such convolution ends the stem
    (a transformer's patch embedding is its only Conv: its "stem" would be the whole network), or a Conv on the way
    has no name or no constant weight."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    names, width = [], None
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = shapes.get(node.input[1]) if len(node.input) > 1 else None
            if w is None or not node.name:
                return []
            if width is None:
                width = w[0]
            elif w[0] != width:
                return names
        names.append(node.name)
    return []


def median_ms(data: bytes, x: np.ndarray, threads: int = 1, runs: int = TIMING_RUNS, fmt: str = "onnx") -> float:
    """Median latency (ms) of a serialised .onnx or .tflite model on `x` (at least `runs` runs and 0.5 s)."""
    from patient.runtime.models import OnnxRunner, TfliteRunner

    r = (OnnxRunner if fmt == "onnx" else TfliteRunner)(content=data, threads=threads)
    return float(np.median(r.time_ms(x, runs=runs, warmup=TIMING_WARMUP, min_seconds=TIMING_MIN_S)))


def decide(timings: dict[str, float], keep_int8: bool = False) -> tuple[str, str]:
    """`(kept, decision)` from median milliseconds per artifact (`"fp32"` and one or more int8 variants): the fastest
    int8 variant when it beats fp32 (or `keep_int8`), else `"fp32"`; `decision` says why in one line."""
    best = min((k for k in timings if k != "fp32"), key=timings.__getitem__)
    if timings[best] < timings["fp32"] or keep_int8:
        return best, (f"kept {best}: {timings['fp32'] / timings[best]:.2f}x the speed of fp32 on this (the export) "
                      "machine; the target device may differ: compare there with patient-bench")
    return "fp32", (f"int8 was slower than fp32 on this (the export) machine ({timings[best]:.2f} ms vs "
                    f"{timings['fp32']:.2f} ms for {best}); kept fp32. The target device may differ: export with "
                    "--keep-int8 and compare both files there with patient-bench")


def quantize_onnx(model: onnx.ModelProto, calibration: np.ndarray, *, batch: int | None, keep_int8: bool = False,
                  variants: Sequence[str] = tuple(VARIANTS),
                  source: Callable[[bool], onnx.ModelProto] | None = None,
                  log: Callable[[str], object] | None = None) -> dict[str, Any]:
    """Quantise the fp32 `onnx.ModelProto` `model`; return the faster artifact and the timings behind the choice.

    `source(float_stem)`, if given, returns the fp32 graph to quantise for a variant (the same function as `model`,
    written for int8); by default `model` itself. A float-stem variant is skipped when `_stem_nodes` finds no stem.

    **Returns:** `{"kept": label | "fp32", "model": ModelProto, "timings": {label: ms}, "decision": str}`.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    log = log or (lambda msg: None)
    b = batch or 1
    fp32 = model.SerializeToString()
    x = np.ascontiguousarray(calibration[:b], np.float32)
    if len(x) < b:
        x = np.concatenate([x, np.zeros((b - len(x), *x.shape[1:]), np.float32)])
    timings = {"fp32": median_ms(fp32, x)}
    made, written = {}, {}  # written: id -> (graph, path), each distinct fp32 graph serialised once (kept alive)
    with tempfile.TemporaryDirectory() as tmp:
        for i, label in enumerate(variants):
            act, weight, float_stem = VARIANTS[label]
            graph = model if source is None else source(float_stem)
            stem = _stem_nodes(graph) if float_stem else []
            if float_stem and not stem:
                log(f"  {label}: skipped (no stem to leave in float: see _stem_nodes)")
                continue
            if id(graph) not in written:
                written[id(graph)] = (graph, pathlib.Path(tmp) / f"fp32_{i}.onnx")
                written[id(graph)][1].write_bytes(graph.SerializeToString())
            src = written[id(graph)][1]
            dst = pathlib.Path(tmp) / f"int8_{i}.onnx"
            quantize_static(str(src), str(dst), _Reader(calibration, b), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=getattr(QuantType, act),
                            weight_type=getattr(QuantType, weight), calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=stem)
            data = dst.read_bytes()
            made[label] = data
            timings[label] = median_ms(data, x)
            log(f"  {label}: {timings[label]:.2f} ms vs fp32 {timings['fp32']:.2f} ms (median, 1 thread, batch {b})")
    kept, decision = decide(timings, keep_int8)
    chosen = model if kept == "fp32" else onnx.load_from_string(made[kept])
    return {"kept": kept, "model": chosen, "timings": timings, "decision": decision}
