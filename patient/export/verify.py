"""What every export shares: opening the source model, checking the resolution, the file's metadata, verification of
the converted model against JAX on real images, and writing the file atomically (or not at all).

Verification runs the converted bytes in their own runtime (onnxruntime, LiteRT) on `n` images from a patient source
(`digits` and `fashion_mnist` upscaled to the model's resolution, or `image_folder:PATH`) and compares the logits with
`patient.models.apply` of the original (unfolded) model. Tolerances:

| artifact | max abs logit difference                 | top-1 agreement |
|----------|------------------------------------------|-----------------|
| fp32     | <= 1e-4 x max(1, max abs JAX logit)      | reported        |
| fp16     | <= 1e-2 x max(1, max abs JAX logit)      | reported        |
| int8     | reported                                 | >= 0.90         |

`tolerance=` / `min_agreement=` replace the defaults. A failed check raises `ExportError` and nothing is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
from typing import TYPE_CHECKING, Any

import numpy as np

from patient.runtime.data import DataError, open_source, sample

if TYPE_CHECKING:
    import equinox as eqx

    from patient.models.fold import FoldedNet

    SourceLike = str | os.PathLike | tuple[eqx.Module, dict[str, Any]]  # an .eqx path or a (model, state) pair

FP32_REL_TOL = 1e-4
FP16_REL_TOL = 1e-2
INT8_MIN_AGREEMENT = 0.90
MAX_RESOLUTION = 4096


class ExportError(ValueError):
    """An export that cannot be done or failed verification; the message is one line meant for the user."""


class VerificationError(ExportError):
    """The converted model disagrees with JAX beyond the tolerance; nothing was written. The CLI exits 1 for it."""

    exit_code = 1


@dataclasses.dataclass
class Source:
    """The model being exported, with what its file said about it."""

    model: Any
    state: dict
    spec: Any
    class_names: list | None
    payload_sha256: str
    path: pathlib.Path | None


def open_eqx(src: SourceLike, class_names: list[str] | None = None) -> Source:
    """`src` is a path to a patient `.eqx` file or a `(model, state)` pair."""
    from patient.models.registry import spec_of

    if isinstance(src, (str, os.PathLike)):
        from patient import io as pio

        path = pathlib.Path(src)
        if not path.is_file():
            raise ExportError(f"{path}: no such file")
        if path.suffix.lower() != ".eqx":
            raise ExportError(f"{path}: not an .eqx file; export takes a patient model saved with patient.save")
        try:
            model, state, header = pio.load(path)
        except pio.PatientFileError as e:
            raise ExportError(str(e)) from None
        return Source(model, state, spec_of(model), class_names or header.get("class_names"),
                      header["payload_sha256"], path)
    if isinstance(src, tuple) and len(src) == 2:
        import equinox as eqx

        model, state = src
        spec = spec_of(model)
        if spec.family == "keras":
            raise ExportError(f"{spec.name} wraps a Keras model; export it with Keras: patient.models.to_keras(model, "
                              "state).export('student.onnx', format='onnx')")
        buf = io.BytesIO()
        eqx.tree_serialise_leaves(buf, (model, state or {}))  # the payload patient.save would write, so the same hash
        return Source(model, state or {}, spec, class_names, hashlib.sha256(buf.getvalue()).hexdigest(), None)
    raise ExportError(f"export takes a path to a .eqx file or a (model, state) pair, got {type(src).__name__}")


def check_resolution(net: FoldedNet, resolution: int) -> int:
    """The input side the export will use; `ExportError` if the network cannot take it.

    A network cannot take a size at which one of its feature maps would vanish (an unpadded convolution or pooling
    wider than its input). Every registry network pads its strided layers, so it runs at any size from 1 px: the
    demo student (mobilenetv3_small_050 at 16 px, half its total stride of 32) works on 1-pixel maps from stride 16
    on, as it was trained. Sizes above 4096 px are refused as a likely typo (verification alone would need gigabytes).
    """
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ExportError(f"resolution must be a positive integer, got {resolution!r}")
    resolution = int(resolution)
    if resolution > MAX_RESOLUTION:
        raise ExportError(f"{net.name} cannot take {resolution} px: patient exports inputs up to {MAX_RESOLUTION} px")
    try:
        net.shapes(resolution)
    except ValueError as e:
        raise ExportError(f"{net.name} cannot take {resolution} px: {e}") from None
    return resolution


def metadata(source: Source, net: FoldedNet, *, resolution: int, batch: int | None, quantization: str,
             fmt: str) -> dict[str, str]:
    """The file's metadata as strings (ONNX metadata_props; the JSON object of TFLite's `patient` entry)."""
    from patient._version import __version__
    from patient.models.registry import param_count

    spec = source.spec
    pre = {"input": "images", "layout": "NCHW", "channels": 3, "input_range": [0.0, 1.0], "resolution": resolution,
           "resize": "whole image, antialiased bilinear (patient.data.views.plain_resize)",
           "normalization": {"mean": list(spec.mean), "std": list(spec.std), "where": "inside the model"}}
    return {
        "patient_version": __version__,
        "format": fmt,
        "model": spec.name,
        "spec": json.dumps(spec.to_json(), sort_keys=True),
        "resolution": str(resolution),
        "batch": "dynamic" if batch is None else str(batch),
        "preprocessing": json.dumps(pre, sort_keys=True),
        "class_names": json.dumps(source.class_names),
        "eqx_payload_sha256": source.payload_sha256,
        "params": str(param_count(source.model)),
        "macs": str(net.macs(resolution)),
        "quantization": quantization,
    }


@dataclasses.dataclass
class Job:
    """What every export converts and checks: the source model, its folded net, the input side, the batch (None:
    dynamic), the verification images and, for int8, the calibration images."""

    source: Source
    net: FoldedNet
    resolution: int
    batch: int | None
    images: np.ndarray
    calibration: np.ndarray | None


def prepare(src: SourceLike, *, class_names: list[str] | None, batch: int, dynamic_batch: bool,
            resolution: int | None, quantize: str, calibration: str | None, calibration_size: int, verify_data: str,
            verify_size: int) -> Job:
    """The checks and inputs every export target shares, done before any conversion starts."""
    from patient.models.fold import fold

    if quantize == "int8" and not calibration:
        raise ExportError("--quantize int8 needs calibration images: pass --calibration digits, fashion_mnist or "
                          "image_folder:PATH")
    if not dynamic_batch and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ExportError(f"batch must be a positive integer, got {batch!r}")
    source = open_eqx(src, class_names)
    net = fold(source.model, source.state)
    res = check_resolution(net, source.spec.resolution if resolution is None else resolution)
    calib = images(calibration, calibration_size, res, split="train") if quantize == "int8" else None
    net = net.at_resolution(res)  # resolution-dependent constants (a ViT's position embeddings), made before tracing
    return Job(source, net, res, None if dynamic_batch else batch, images(verify_data, verify_size, res), calib)


def images(data: str, n: int, resolution: int, split: str = "test") -> np.ndarray:
    """`n` real images from a data spec at `resolution`, f32[n, 3, R, R] in [0, 1]. Calibration reads the train split
    of digits / fashion_mnist (so int8 is never tuned on the images `patient-eval` scores), verification the test
    split."""
    try:
        return sample(open_source(data, split), n, resolution)
    except DataError as e:
        raise ExportError(str(e)) from None


_REFERENCE_FN = None


def reference_logits(source: Source, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """Logits of the original JAX model (`patient.models.apply`, eval mode)."""
    global _REFERENCE_FN
    if _REFERENCE_FN is None:  # one jitted function, so repeated exports of a model compile once
        import equinox as eqx

        from patient.models import apply

        _REFERENCE_FN = eqx.filter_jit(lambda m, s, v: apply(m, s, v, train=False)[0])
    fn = _REFERENCE_FN
    out = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        pad = batch - len(chunk) if len(x) > batch else 0  # one compiled shape for every chunk
        padded = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)]) if pad else chunk
        out.append(np.asarray(fn(source.model, source.state, padded))[:len(chunk)])
    return np.concatenate(out)


def compare(ref: np.ndarray, got: np.ndarray, *, kind: str, tolerance: float | None = None,
            min_agreement: float | None = None) -> dict[str, Any]:
    """Verification figures; `ExportError` when they miss the tolerance of `kind` (fp32 | fp16 | int8)."""
    diff = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))
    agree = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    scale = max(1.0, float(np.max(np.abs(ref))))
    if tolerance is None and kind in ("fp32", "fp16"):
        tolerance = (FP32_REL_TOL if kind == "fp32" else FP16_REL_TOL) * scale
    if min_agreement is None and kind == "int8":
        min_agreement = INT8_MIN_AGREEMENT
    result = {"images": int(len(ref)), "max_abs_diff": diff, "top1_agreement": agree, "max_abs_logit": scale,
              "tolerance": tolerance, "min_agreement": min_agreement}
    if not np.all(np.isfinite(got)):
        raise VerificationError(f"verification failed: the {kind} model outputs non-finite logits")
    if tolerance is not None and diff > tolerance:
        raise VerificationError(f"verification failed: max abs logit difference {diff:.3g} > tolerance {tolerance:.3g} "
                          f"({kind}, {len(ref)} images, top-1 agreement {agree:.1%}); nothing written")
    if min_agreement is not None and agree < min_agreement:
        raise VerificationError(f"verification failed: top-1 agreement {agree:.1%} < {min_agreement:.0%} ({kind}, "
                          f"{len(ref)} images, max abs logit difference {diff:.3g}); nothing written")
    return result


def default_output(source: Source, suffix: str, quantize: str) -> pathlib.Path:
    stem = source.path.with_suffix("") if source.path is not None else pathlib.Path(source.spec.name)
    tag = "" if quantize in ("none", None) else f".{quantize}"
    return stem.with_name(stem.name + tag + suffix)
