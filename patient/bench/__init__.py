"""Benchmark and evaluate .eqx, .onnx and .tflite models in-process; the .onnx/.tflite paths need no JAX.

- `patient.bench.runtime`: `open_model(path)` -> a runner with `predict(images)` for any of the three formats.
- `patient.bench.latency`: `bench(path, threads=...)`, `machine_info()`, `table(rows)`, `plot(rows, path)`.
- `patient.bench.data`: data specs (`digits`, `fashion_mnist`, `image_folder:PATH`) and the numpy/Pillow rendering
  every format is evaluated on.

On a device (no JAX, no TensorFlow): `pip install --no-deps patient` plus `numpy onnxruntime ai-edge-litert pillow`,
then `patient-bench model.onnx model.tflite` and `patient-eval model.tflite --data image_folder:PATH`.
"""
