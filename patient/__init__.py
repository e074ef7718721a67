"""patient: knowledge distillation for vision models, following "Knowledge distillation: A good teacher is patient and
consistent" (Beyer et al., CVPR 2022), and export of the students to edge CPUs.

Heavy or optional dependencies (TensorFlow, onnxruntime, jax2onnx, keras) are imported only by the sub-packages that
need them. Importing `patient` itself imports nothing: `save`/`load` (JAX, Equinox) and `distill`/`train` (optax,
grain, orbax) load on first use, so `patient.bench` runs .onnx/.tflite files on devices that carry no JAX.
"""

from ._version import __version__

__all__ = ["__version__", "distill", "evaluate", "join_hosts", "load", "save", "train"]


def __getattr__(name):
    # Load on first use so `import patient` stays light (and works without JAX on a device).
    import importlib

    if name == "io":
        return importlib.import_module("patient.io")
    if name in ("save", "load"):
        return getattr(importlib.import_module("patient.io"), name)
    if name in ("distill", "train", "evaluate", "join_hosts"):
        # The engine lives in patient.engine: a sub-package named `distill` would shadow the function.
        return getattr(importlib.import_module("patient.engine"), name)
    raise AttributeError(f"module 'patient' has no attribute {name!r}")
