"""Run any of the three formats on numpy images: `.eqx` (JAX/XLA), `.onnx` (onnxruntime), `.tflite` (LiteRT, XNNPACK).

    from patient.runtime import open_model
    m = open_model("student.onnx", threads=2)      # reads resolution, class names, ... from the file's metadata
    logits = m.predict(images)                      # f32[N, 3, R, R] in [0, 1] -> f32[N, K]

Importing this module needs numpy only; each runner imports its runtime when a model of its format is opened, so
.onnx and .tflite files run where JAX and TensorFlow are not installed (or fail to import).
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

import numpy as np

FORMATS = {".eqx": "eqx", ".onnx": "onnx", ".tflite": "tflite"}
TFLITE_METADATA_NAME = "patient"
JSON_KEYS = ("preprocessing", "class_names", "spec", "verification")


class ModelError(ValueError):
    """A model file that cannot be opened or run (missing, unknown format, damaged, wrong input size, ...)."""


def model_format(path: str | os.PathLike) -> str:
    path = pathlib.Path(path)
    if path.is_dir():
        raise ModelError(f"{path} is a folder, not a model file; give the .eqx, .onnx or .tflite file")
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ModelError(f"{path}: unknown model format {path.suffix or '(no suffix)'!r}; use .eqx, .onnx or .tflite")
    return fmt


def parse_metadata(raw: dict[str, str]) -> dict[str, Any]:
    """Metadata strings as written by patient.export, with the JSON-valued keys decoded."""
    meta: dict[str, Any] = dict(raw)
    for key in JSON_KEYS:
        if isinstance(meta.get(key), str):
            try:
                meta[key] = json.loads(meta[key])
            except json.JSONDecodeError:
                pass
    return meta


class Runner:
    """A loaded model. `predict` splits or pads the images to the file's batch size; `run_batch` runs one batch."""

    format: str
    path: pathlib.Path
    meta: dict
    batch: int | None  # None: any batch size
    resolution: int
    threads: int | None
    init_s: float
    runtime: str

    @property
    def class_names(self) -> list[str] | None:
        names = self.meta.get("class_names")
        return list(names) if isinstance(names, list) else None

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    def run_batch(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != (3, self.resolution, self.resolution):
            raise ModelError(f"{self.path.name} takes f32[B, 3, {self.resolution}, {self.resolution}], got "
                             f"{images.shape}; render the images at {self.resolution} px")
        step = self.batch or batch_size
        out = []
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            n = len(chunk)
            if self.batch is not None and n < self.batch:  # pad the fixed batch with zero images
                chunk = np.concatenate([chunk, np.zeros((self.batch - n, *chunk.shape[1:]), np.float32)])
            out.append(np.asarray(self.run_batch(chunk))[:n])
        return np.concatenate(out)

    def example_input(self, batch: int | None = None, seed: int = 0) -> np.ndarray:
        b = self.batch or batch or 1
        return np.random.default_rng(seed).random((b, 3, self.resolution, self.resolution), dtype=np.float32)

    def time_ms(self, x: np.ndarray, *, runs: int, warmup: int = 0, min_seconds: float = 0.0) -> np.ndarray:
        """Milliseconds of `run_batch(x)`, one per timed run, after `warmup` untimed runs: at least `runs` runs and,
        for small models, as many more as fit in `min_seconds` (more runs, less noise). The one timing loop of
        patient: `patient-bench` and the int8-or-fp32 decision of export both measure with it."""
        for _ in range(warmup):
            self.run_batch(x)
        times, start = [], time.perf_counter()
        while len(times) < runs or time.perf_counter() - start < min_seconds:
            t = time.perf_counter_ns()
            self.run_batch(x)
            times.append((time.perf_counter_ns() - t) / 1e6)
        return np.asarray(times, np.float64)


# ------------------------------------------------------------------------------------------------- onnxruntime


class OnnxRunner(Runner):
    format = "onnx"
    runtime = "onnxruntime"

    def __init__(self, path: str | os.PathLike | None = None, *, threads: int | None = None,
                 content: bytes | None = None):
        import onnxruntime as ort

        self.path = pathlib.Path(path) if path is not None else pathlib.Path("<memory>.onnx")
        self.threads = threads
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        t0 = time.perf_counter()
        try:
            self.session = ort.InferenceSession(content if content is not None else str(path), so,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
            raise ModelError(f"{self.path}: onnxruntime cannot load it ({_first_line(e)})") from None
        self.init_s = time.perf_counter() - t0
        self.meta = parse_metadata(dict(self.session.get_modelmeta().custom_metadata_map))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        shape = list(inp.shape)
        if len(shape) != 4 or shape[1] != 3 or not isinstance(shape[2], int):
            raise ModelError(f"{self.path}: input {inp.name} has shape {shape}; patient models take [B, 3, R, R]")
        self.batch = shape[0] if isinstance(shape[0], int) else None
        self.resolution = int(shape[2])
        out = self.session.get_outputs()[0].shape
        self._num_classes = out[-1] if isinstance(out[-1], int) else None

    def run_batch(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.asarray(x, np.float32)})[0]


# ------------------------------------------------------------------------------------------------- LiteRT


def tflite_metadata(content: bytes) -> dict[str, str]:
    """The `patient` metadata entry of a .tflite flatbuffer (a JSON object of strings), `{}` if absent."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.Model.GetRootAs(content, 0)
    for i in range(model.MetadataLength()):
        md = model.Metadata(i)
        if md.Name() == TFLITE_METADATA_NAME.encode():
            data = model.Buffers(md.Buffer()).DataAsNumpy()
            try:
                value = json.loads(bytes(data).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                return {}
            return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}
    return {}


class TfliteRunner(Runner):
    format = "tflite"
    runtime = "litert"

    def __init__(self, path: str | os.PathLike | None = None, *, threads: int | None = None,
                 content: bytes | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.path = pathlib.Path(path) if path is not None else pathlib.Path("<memory>.tflite")
        self.threads = threads
        t0 = time.perf_counter()
        try:
            content = content if content is not None else self.path.read_bytes()
            # The default op resolver applies the XNNPACK delegate to every op it supports.
            self.interpreter = Interpreter(model_content=content, num_threads=threads)
            inp = self.interpreter.get_input_details()[0]
            self._dynamic = int(inp["shape_signature"][0]) == -1
            self.interpreter.allocate_tensors()
        except Exception as e:  # LiteRT raises ValueError / RuntimeError with long messages
            raise ModelError(f"{self.path}: LiteRT cannot load it ({_first_line(e)})") from None
        self.init_s = time.perf_counter() - t0
        try:
            self.meta = parse_metadata(tflite_metadata(content))
        except Exception:  # a foreign flatbuffer without our entry
            self.meta = {}
        self._in = inp
        self._out = self.interpreter.get_output_details()[0]
        shape = [int(s) for s in inp["shape"]]
        if len(shape) != 4 or shape[1] != 3:
            raise ModelError(f"{self.path}: input has shape {shape}; patient models take [B, 3, R, R]")
        self.batch = None if self._dynamic else shape[0]
        self.resolution = shape[2]
        self._num_classes = int(self._out["shape"][-1])
        self._allocated_batch = shape[0]

    def run_batch(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        it = self.interpreter
        if self._dynamic and x.shape[0] != self._allocated_batch:
            it.resize_tensor_input(self._in["index"], list(x.shape))
            it.allocate_tensors()
            self._allocated_batch = x.shape[0]
        if self._in["dtype"] in (np.int8, np.uint8):  # integer-only input: quantise with the tensor's parameters
            scale, zero = self._in["quantization"]
            info = np.iinfo(self._in["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(self._in["dtype"])
        it.set_tensor(self._in["index"], x)
        it.invoke()
        y = it.get_tensor(self._out["index"])
        if self._out["dtype"] in (np.int8, np.uint8):
            scale, zero = self._out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y


# ------------------------------------------------------------------------------------------------- JAX


class EqxRunner(Runner):
    """A `.eqx` file run by JAX/XLA (jit of `patient.models.apply`), at any batch size and resolution the net takes."""

    format = "eqx"
    runtime = "jax"

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, resolution: int | None = None,
                 batch: int | None = None):
        self.path = pathlib.Path(path)
        t0 = time.perf_counter()
        import jax

        from patient import io
        from patient.models import apply

        try:
            model, state, header = io.load(self.path)
        except io.PatientFileError as e:
            raise ModelError(str(e)) from None
        self._fn = jax.jit(lambda x: apply(model, state, x, train=False)[0])
        self.model, self.state = model, state
        self.init_s = time.perf_counter() - t0
        self.threads = None  # XLA sizes its own thread pool; not settable once JAX is initialised
        self.meta = {"class_names": header.get("class_names"), "spec": header.get("spec"),
                     "preprocessing": header.get("preprocessing"), "eqx_payload_sha256": header.get("payload_sha256"),
                     "patient_version": header.get("patient_version"), "model": header["spec"]["name"],
                     "quantization": "none"}
        self.resolution = int(resolution or header["preprocessing"]["resolution"])
        self.batch = batch
        self._num_classes = int(header["spec"]["num_classes"])

    def run_batch(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._fn(np.asarray(x, np.float32)))


def open_model(path: str | os.PathLike, *, threads: int | None = None, resolution: int | None = None,
               batch: int | None = None) -> Runner:
    """Open a .eqx, .onnx or .tflite file for inference.

    **Arguments:**

    - `path`: the model file; its suffix picks the runtime.
    - `threads`: intra-op threads for onnxruntime / LiteRT (None: the runtime's default); ignored for .eqx.
    - `resolution`, `batch`: for .eqx only (exported files have fixed input shapes; use their own).

    **Raises:** `ModelError` with a one-line message for a missing, unknown or unreadable file.
    """
    fmt = model_format(path)
    if fmt == "onnx":
        runner = OnnxRunner(path, threads=threads)
    elif fmt == "tflite":
        runner = TfliteRunner(path, threads=threads)
    else:
        return EqxRunner(path, resolution=resolution, batch=batch)
    if resolution is not None and int(resolution) != runner.resolution:
        raise ModelError(f"{path}: exported for {runner.resolution} px inputs (fixed shape); asked for {resolution} "
                         f"px. Re-export with --resolution {resolution}")
    return runner


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def file_size(path: str | os.PathLike) -> int:
    return os.path.getsize(path)
