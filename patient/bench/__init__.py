"""Benchmark .eqx, .onnx and .tflite models in-process; the .onnx/.tflite paths need no JAX.

- `patient.bench.latency`: `bench(path, threads=...)`, `machine_info()`, `table(rows)`, `plot(rows, path)`.
- `patient.bench.profile`: `profile(path, threads=...)`, `profile_table(result)`: per-operator profiles.
- Models and data come from `patient.runtime` (`open_model`, `open_source`), shared with export verification.

On a device (no JAX, no TensorFlow) install the wheel without dependencies plus `numpy onnxruntime ai-edge-litert
pillow`, then `patient-bench model.onnx model.tflite` and `patient-eval model.tflite --data image_folder:PATH`.
"""
