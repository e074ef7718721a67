"""The `.eqx` file: one self-describing file per model.

Layout: one line of JSON (the header), a newline, then the `equinox.tree_serialise_leaves` payload of `(model, state)`.
The header carries a magic string, the format version, the model spec (enough to rebuild the module tree), class names,
preprocessing, the patient version, user metadata, the sha256 and length of the payload and a sha256 of the header
itself, so a damaged header is caught before anything is built from it. Writes go to a temporary file
in the same folder and are renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

from ._files import write_atomic

MAGIC = "patient-eqx"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20


class PatientFileError(ValueError):
    """A file that is not a readable patient `.eqx` file (truncated, tampered, wrong magic or version, ...)."""


def save(path: str | os.PathLike, model: eqx.Module, state: dict[str, Any] | None = None, *,
         class_names: Sequence[str] | None = None, meta: dict[str, Any] | None = None,
         allow_nonfinite: bool = False) -> Path:
    """Write `(model, state)` to one `.eqx` file, atomically.

    **Arguments:**

    - `path`: destination (conventionally `*.eqx`).
    - `model`, `state`: a registry model and its state (`{}` or `None` for GroupNorm models).
    - `class_names`: optional list of `num_classes` names, kept in the header.
    - `meta`: optional JSON-serialisable dict (training config, metrics, ...).
    - `allow_nonfinite`: write weights or statistics that hold NaN or infinity (refused by default: such a model
      evaluates to a plausible-looking number of nothing).

    **Returns:** the path written.
    """
    from .models.registry import spec_of

    path = Path(path)
    spec = spec_of(model)
    if spec.family == "keras":
        raise TypeError(f"patient.save writes patient's own models; {spec.name} wraps a Keras model: save it with "
                        "patient.models.to_keras(model, state).save('student.keras')")
    state = {} if state is None else state
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != spec.num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries but the model has {spec.num_classes} classes")
    if not allow_nonfinite:
        for where, leaf in jax.tree_util.tree_flatten_with_path(eqx.filter((model, state), eqx.is_inexact_array))[0]:
            if not np.isfinite(np.asarray(leaf)).all():  # on the host: serialising copies it there anyway
                name = jax.tree_util.keystr(where, simple=True, separator=".")
                raise ValueError(f"{path}: {name} holds NaN or infinite values; the model diverged (pass "
                                 "allow_nonfinite=True to write it anyway)")
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, (model, state))
    payload = buf.getvalue()
    from ._version import __version__

    header = {
        "magic": MAGIC,
        "format_version": FORMAT_VERSION,
        "spec": spec.to_json(),
        "class_names": class_names,
        "preprocessing": {"input_range": [0.0, 1.0], "layout": "NCHW", "mean": list(spec.mean), "std": list(spec.std),
                          "resolution": spec.resolution},
        "patient_version": __version__,
        "meta": meta or {},
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "payload_bytes": len(payload),
    }
    try:
        header["header_sha256"] = _header_hash(header)
        line = json.dumps(header, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta for {path} is not JSON-serialisable: {e}") from None
    return write_atomic(path, line + b"\n" + payload)


def _header_hash(header: dict) -> str:
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def read_header(path: str | os.PathLike) -> tuple[dict, bytes]:
    """Parse and check the header; returns `(header, payload)` with the payload's length and hash verified.

    Only the first MAX_HEADER_BYTES are read before the header is checked, and the payload is read only when the
    file's size is the one the header declares, so a large or foreign file costs no memory before its error."""
    path = Path(path)
    if path.is_dir():
        raise PatientFileError(f"{path} is a folder, not an .eqx file; give the file written by patient.save")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(MAX_HEADER_BYTES + 1)
        nl = head.find(b"\n", 0, MAX_HEADER_BYTES)
        if nl < 0:
            raise PatientFileError(f"{path}: not a patient .eqx file (no header line); write models with patient.save")
        header = _parse_header(path, head[:nl])
        want_len, want_hash = header.get("payload_bytes"), header.get("payload_sha256")
        if not isinstance(want_len, int) or isinstance(want_len, bool) or want_len < 0 or not isinstance(want_hash, str):
            raise PatientFileError(f"{path}: header lacks payload_bytes/payload_sha256; the file is damaged")
        have = os.fstat(f.fileno()).st_size - (nl + 1)
        if have != want_len:
            raise PatientFileError(f"{path}: truncated or padded file (payload {have} bytes, header says {want_len})")
        f.seek(nl + 1)
        payload = f.read()
    if len(payload) != want_len:
        raise PatientFileError(f"{path}: the file changed while it was read; read it again")
    if hashlib.sha256(payload).hexdigest() != want_hash:
        raise PatientFileError(f"{path}: payload hash mismatch; the file is corrupt or was modified after saving")
    return header, payload


def _parse_header(path: Path, line: bytes) -> dict:
    try:
        header = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise PatientFileError(f"{path}: not a patient .eqx file (header is not JSON); write models with patient.save") from None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise PatientFileError(f"{path}: wrong magic, not a patient .eqx file; write models with patient.save")
    if header.get("format_version") != FORMAT_VERSION:
        raise PatientFileError(
            f"{path}: .eqx format version {header.get('format_version')!r} is not supported by this patient "
            f"(reads version {FORMAT_VERSION}); upgrade patient or re-save the model")
    try:
        intact = header.get("header_sha256") == _header_hash(header)
    except (TypeError, ValueError):
        intact = False
    if not intact:
        raise PatientFileError(f"{path}: header hash mismatch; the header was modified after saving")
    return header


def load(path: str | os.PathLike) -> tuple[eqx.Module, dict[str, Any], dict[str, Any]]:
    """Read a `.eqx` file written by `save`.

    **Returns:** `(model, state, meta)` where `meta` is the header dict (spec, class names, preprocessing, user meta).
    **Raises:** `FileNotFoundError` for a missing file, `PatientFileError` for anything that is not an intact patient file.
    """
    from .models.registry import ModelSpec, build, check_spec_bounds, describe, skeleton_bytes

    header, payload = read_header(path)
    try:
        spec = ModelSpec.from_json(header["spec"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise PatientFileError(f"{path}: header has no valid model spec; the file is damaged") from None
    try:
        describe(spec.name)
    except ValueError:
        raise PatientFileError(f"{path}: unknown model {spec.name!r} (written by a newer patient?)") from None
    try:
        check_spec_bounds(spec)
    except ValueError as e:
        raise PatientFileError(f"{path}: header's model spec is not plausible ({e}); the file is damaged") from None
    # The sha256 values are integrity checks, not signatures: anyone can edit a header and recompute them. So the
    # model the header describes is measured before it is built, and must fit in the payload that carries its values.
    try:
        need = skeleton_bytes(spec)
    except Exception as e:  # constructor arguments the family does not take: a damaged or edited header
        raise PatientFileError(f"{path}: header's model spec cannot be built ({type(e).__name__}); the file is "
                               "damaged") from None
    if need > len(payload):
        raise PatientFileError(f"{path}: the header describes a model of {need} bytes but the payload holds "
                               f"{len(payload)}; the file is damaged or its header was edited")
    try:
        skeleton = build(spec, None)  # zero-filled module tree of the right shapes
        model, state = eqx.tree_deserialise_leaves(io.BytesIO(payload), skeleton)
    except Exception as e:  # any mismatch between spec and payload is a damaged file, reported as such
        raise PatientFileError(f"{path}: payload does not match its model spec ({type(e).__name__}); "
                               "the file is damaged") from None
    return model, state, header
