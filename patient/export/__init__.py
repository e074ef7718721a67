"""Export patient models to ONNX and TFLite, verified against JAX on real images.

    import patient.export as pe
    pe.to_onnx("student.eqx", "student.onnx")                                   # fp32, batch 1
    pe.to_onnx("student.eqx", quantize="int8", calibration="digits")            # onnxruntime QDQ int8
    pe.to_tflite("student.eqx", quantize="fp16")                                # LiteRT, fp16 weights
    net = pe.fold(model, state)                                                 # the constant-weight network

Every export folds the model first (`patient.models.fold`), converts, checks the file, runs it on real images in its
own runtime and compares with the JAX model (`patient.export.verify`); above tolerance nothing is written.
TensorFlow, jax2onnx and onnxruntime are imported only when an export runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from patient.models.fold import FoldedNet, fold

from .verify import ExportError, VerificationError

if TYPE_CHECKING:
    import os

    from .verify import SourceLike

__all__ = ["ExportError", "VerificationError", "FoldedNet", "fold", "to_onnx", "to_tflite"]


def to_onnx(src: SourceLike, output: str | os.PathLike | None = None, **kwargs: Any) -> dict[str, Any]:
    """See `patient.export.onnx.to_onnx`."""
    from .onnx import to_onnx as _to_onnx

    return _to_onnx(src, output, **kwargs)


def to_tflite(src: SourceLike, output: str | os.PathLike | None = None, **kwargs: Any) -> dict[str, Any]:
    """See `patient.export.tflite.to_tflite`."""
    from .tflite import to_tflite as _to_tflite

    return _to_tflite(src, output, **kwargs)
