"""patient: knowledge distillation for vision models, following "Knowledge distillation: A good teacher is patient and
consistent" (Beyer et al., CVPR 2022), and export of the students to edge CPUs.

Heavy or optional dependencies (TensorFlow, onnxruntime, jax2onnx, keras) are imported only by the sub-packages that
need them; importing `patient` itself loads JAX and Equinox only.
"""

__version__ = "0.1.0"

from .io import load, save  # noqa: E402

__all__ = ["__version__", "distill", "load", "save", "train"]


def __getattr__(name):
    # The engine pulls in optax, grain and orbax; load it on first use so `import patient` stays light.
    if name in ("distill", "train"):
        from . import distill as _d

        return getattr(_d, name)
    raise AttributeError(f"module 'patient' has no attribute {name!r}")
