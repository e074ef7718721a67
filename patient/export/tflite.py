"""TFLite export: fold, jax2tf, `tf.lite.TFLiteConverter.from_concrete_functions`, metadata, verify with LiteRT, write.

The folded network is traced in NHWC, TFLite's own layout: the graph starts with one TRANSPOSE of the NCHW input (the
input contract of every patient format) and every convolution is a native CONV_2D / DEPTHWISE_CONV_2D. Shapes are
fixed (batch 1 by default); `dynamic_batch=True` exports a symbolic batch that LiteRT resizes at run time.

Quantisation: `fp16` stores float16 weights (LiteRT computes in float32 on CPUs without fp16 arithmetic); `int8` is
full integer quantisation (TFLITE_BUILTINS_INT8 only: every operator int8) calibrated on images from a patient source,
with float32 input and output so that callers feed the same [0, 1] images. As for ONNX, the int8 model is timed
against the fp32 one on this CPU and the faster is kept, saying so. For int8 the hard-swish is traced as
`relu6(x + 3) * x / 6` (ADD + RELU6 + MUL), because XNNPACK runs HARD_SWISH in float only: an int8 one leaves the
delegate and splits the graph (benchmarks/results/int8_investigation.md).

The metadata (the same keys as the ONNX metadata_props) is one `patient` entry in the flatbuffer's metadata table,
a JSON object of strings, readable with `ai_edge_litert.schema_py_generated` alone (see `patient.runtime.models`).
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from patient._files import write_atomic

from . import verify as V

if TYPE_CHECKING:
    from patient.models.fold import FoldedNet

    from .verify import SourceLike


def convert(net: FoldedNet, *, batch: int | None, resolution: int, quantize: str = "none",
            representative: np.ndarray | None = None) -> bytes:
    """The folded network as .tflite bytes: input f32[B, 3, R, R] (NCHW, [0, 1]), output f32[B, K]."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    from jax.experimental import jax2tf

    poly = None if batch is not None else ["(b, _, _, _)"]
    # int8: hard-swish as ADD + RELU6 + MUL, which XNNPACK runs in int8 (its int8 HARD_SWISH falls out of the delegate)
    hard_swish = "relu6" if quantize == "int8" else "fused"
    fn = jax2tf.convert(lambda x: net.forward(x, "NHWC", hard_swish=hard_swish), with_gradient=False,
                        polymorphic_shapes=poly)
    sig = [tf.TensorSpec((batch, net.in_chans, resolution, resolution), tf.float32, name="images")]
    tf_fn = tf.function(fn, autograph=False, input_signature=sig)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([tf_fn.get_concrete_function()], tf_fn)
    if quantize == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        step = batch or 1

        def dataset():
            for i in range(0, len(representative) - step + 1, step):
                yield [np.ascontiguousarray(representative[i:i + step], np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif quantize != "none":
        raise V.ExportError(f"unknown TFLite quantisation {quantize!r}; use none, fp16 or int8")
    try:
        with warnings.catch_warnings():
            # "Statistics for quantized inputs were expected": the int8 model keeps float32 input on purpose.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs", category=UserWarning)
            return bytes(converter.convert())
    except Exception as e:  # the converter raises ConverterError with pages of MLIR; keep the first line
        raise V.ExportError(f"TFLite conversion failed: {str(e).strip().splitlines()[0][:300]}") from None


def add_metadata(content: bytes, meta: dict[str, str]) -> bytes:
    """`content` with a `patient` metadata entry holding `meta` as JSON (replacing an earlier one)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    from patient.runtime.models import TFLITE_METADATA_NAME

    model = fb.ModelT.InitFromPackedBuf(bytearray(content), 0)
    buf = fb.BufferT()
    buf.data = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), np.uint8)
    model.metadata = [m for m in (model.metadata or []) if m.name != TFLITE_METADATA_NAME.encode()]
    model.buffers.append(buf)
    entry = fb.MetadataT()
    entry.name = TFLITE_METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)
    builder = flatbuffers.Builder(len(content) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def to_tflite(src: SourceLike, output: str | os.PathLike | None = None, *, batch: int = 1,
              dynamic_batch: bool = False, resolution: int | None = None,
              quantize: str = "none", calibration: str | None = None, calibration_size: int = 128,
              verify_data: str = "digits", verify_size: int = 32, tolerance: float | None = None,
              min_agreement: float | None = None, keep_int8: bool = False, class_names: list[str] | None = None,
              log: Callable[[str], object] | None = None) -> dict[str, Any]:
    """Export a patient model to TFLite, verified against JAX.

    **Arguments:** as `patient.export.to_onnx`, with `quantize` one of `"none"`, `"fp16"`, `"int8"` (full integer,
    calibrated on `calibration`). As for ONNX, an int8 model slower than the fp32 one on this CPU (the export
    machine's, which may not be the target's: compare there with `patient-bench`) is replaced by the fp32 model,
    saying so, unless `keep_int8`.

    **Returns:** a report dict. **Raises:** `ExportError` (one-line message); no file is left behind.
    """
    quantize = quantize or "none"
    if quantize not in ("none", "fp16", "int8"):
        raise V.ExportError(f"TFLite quantises to none, fp16 or int8, not {quantize!r}")
    job = V.prepare(src, class_names=class_names, batch=batch, dynamic_batch=dynamic_batch, resolution=resolution,
                    quantize=quantize, calibration=calibration, calibration_size=calibration_size,
                    verify_data=verify_data, verify_size=verify_size)
    source, net, res, fixed, x, calib = (job.source, job.net, job.resolution, job.batch, job.images, job.calibration)
    log = log or (lambda msg: None)
    content = convert(net, batch=fixed, resolution=res, quantize=quantize, representative=calib)
    label = {"none": "none", "fp16": "fp16 weights", "int8": "int8 full integer (float32 input/output)"}[quantize]
    kind, decision, timings = "fp32" if quantize == "none" else quantize, None, None
    if quantize == "int8":
        from .quantize import decide, median_ms

        _check_loads(content)
        fp32 = convert(net, batch=fixed, resolution=res)
        x1 = np.ascontiguousarray(np.resize(calib, (fixed or 1, *calib.shape[1:])), np.float32)
        timings = {"fp32": median_ms(fp32, x1, fmt="tflite"), "int8": median_ms(content, x1, fmt="tflite")}
        log(f"  int8: {timings['int8']:.2f} ms vs fp32 {timings['fp32']:.2f} ms (median, 1 thread, LiteRT)")
        kept, decision = decide(timings, keep_int8)
        if kept == "fp32":
            content, kind, label = fp32, "fp32", f"none ({decision})"
    # Named after what is written: a default name never says int8 for an fp32 model.
    written = quantize if kind != "fp32" or quantize == "none" else "none"
    out = pathlib.Path(output) if output is not None else V.default_output(source, ".tflite", written)
    meta = V.metadata(source, net, resolution=res, batch=fixed, quantization=label, fmt="tflite")
    content = add_metadata(content, meta)
    from patient.runtime.models import TfliteRunner

    ref = V.reference_logits(source, x)
    got = TfliteRunner(content=content).predict(x)
    result = V.compare(ref, got, kind=kind, tolerance=tolerance, min_agreement=min_agreement)
    result["data"] = verify_data
    content = add_metadata(content, {**meta, "verification": json.dumps(result, sort_keys=True)})
    write_atomic(out, content)
    ops = _op_counts(content)
    report = {"format": "tflite", "path": str(out), "model": net.name, "resolution": res, "batch": fixed or "dynamic",
              "bytes": len(content), "quantization": label, "ops": ops, "verification": result}
    if decision is not None:
        report.update(int8=timings, int8_decision=decision)
    return report


def _check_loads(content: bytes) -> None:
    """ExportError when LiteRT cannot load `content`: tried in a child process, because LiteRT aborts the whole
    process on some graphs its own converter wrote (int8 transformers with LiteRT 2.3: `allocate_tensors` aborts)."""
    import subprocess
    import sys
    import tempfile

    probe = ("import sys; from ai_edge_litert.interpreter import Interpreter; "
             "Interpreter(model_path=sys.argv[1], num_threads=1).allocate_tensors()")
    with tempfile.TemporaryDirectory(prefix="patient-tflite-") as tmp:
        path = pathlib.Path(tmp) / "probe.tflite"
        path.write_bytes(content)
        done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        cause = "aborted" if done.returncode < 0 or done.returncode == 134 else f"failed (exit {done.returncode})"
        raise V.ExportError(f"LiteRT cannot run the int8 model its converter wrote (loading it {cause}); export "
                            "with --quantize fp16 or none, or to ONNX for int8")


def _op_counts(content: bytes) -> dict[str, int]:
    from ai_edge_litert import schema_py_generated as fb

    model = fb.Model.GetRootAs(content, 0)
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        codes.append(names.get(max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()), "CUSTOM"))
    counts: dict[str, int] = {}
    for s in range(model.SubgraphsLength()):
        sg = model.Subgraphs(s)
        for j in range(sg.OperatorsLength()):
            name = codes[sg.Operators(j).OpcodeIndex()]
            counts[name] = counts.get(name, 0) + 1
    return counts
