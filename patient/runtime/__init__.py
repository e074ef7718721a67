"""Run patient's three file formats for inference, and read the data specs every command takes.

The layer between the engine and the two users of finished models (`export` verifies and calibrates through it,
`bench` times and evaluates through it). Importing it needs numpy only: onnxruntime, LiteRT and JAX are imported when a
file of their format is opened, so `.onnx` and `.tflite` files run on devices without JAX or TensorFlow.

- `open_model(path)` -> a `Runner` with `predict(images)` for `.eqx` (JAX), `.onnx` (onnxruntime), `.tflite` (LiteRT).
- `open_source(spec, split)` -> a labelled source for `digits`, `fashion_mnist` or `image_folder:PATH`;
  `batches`, `sample` and `render_plain` give the float32 NCHW images every format is evaluated on.
"""

from .data import DATA_HELP, DataError, batches, open_source, render_plain, sample
from .models import EqxRunner, ModelError, OnnxRunner, Runner, TfliteRunner, model_format, open_model

__all__ = ["DATA_HELP", "DataError", "EqxRunner", "ModelError", "OnnxRunner", "Runner", "TfliteRunner", "batches",
           "model_format", "open_model", "open_source", "render_plain", "sample"]
