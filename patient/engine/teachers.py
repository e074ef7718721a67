"""Teachers: resolving what the user passed, ensembles, reduced-precision copies and the fixed-teacher cache.

A teacher is never optimised and never checkpointed: the step receives its arrays as an argument and returns nothing
of it. For the `fix/*` modes its predictions do not depend on the training step, so they are computed once over the
data set (averaged over K inception crops for `fix/ic_ens`) and cached, in memory and in the workdir.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from patient._files import write_atomic
from patient.models.registry import apply, spec_of

from .losses import teacher_probs

if TYPE_CHECKING:
    import keras
    from jax.typing import DTypeLike

    from patient.data.sources import DataSource

    ModelPair = tuple[eqx.Module, dict[str, Any]]  # a model and its state (BatchNorm statistics, Keras variables)
    ModelLike = ModelPair | str | Path | keras.Model  # a pair, an .eqx path, a registry name or a Keras model
    TeacherLike = ModelLike | list[ModelLike]  # a list is an ensemble
    DataLike = DataSource | np.ndarray | tuple[np.ndarray, np.ndarray]  # a source, images, or (images, labels)
    _Tree = TypeVar("_Tree")


def resolve_model(obj: ModelLike, *, role: str, num_classes: int | None, key: jax.Array | None) -> ModelPair:
    """A `(model, state)` pair, an `.eqx` path, a registry name or a Keras model -> `(model, state)`."""
    from patient.io import load
    from patient.models import create
    from patient.models.keras_interop import from_keras, is_keras_model

    if is_keras_model(obj):  # a bare keras.Model: wrap with from_keras's defaults
        return from_keras(obj)
    if isinstance(obj, tuple) and len(obj) == 2:
        model, state = obj
        spec_of(model)  # clear error for foreign modules
        return model, (state or {})
    if isinstance(obj, (str, Path)):
        text = str(obj)
        if text.endswith(".eqx") or Path(text).exists():
            if not Path(text).is_file():
                raise FileNotFoundError(f"{role} file {text} not found; pass an existing .eqx path, a (model, state) "
                                        "pair or a registry name")
            model, state, _ = load(text)
            return model, state
        if num_classes is None:
            raise ValueError(f"{role}={text!r}: building a registry model needs labelled data to know the class count")
        return create(text, num_classes=num_classes, key=key)
    raise TypeError(f"{role} must be a (model, state) pair, an .eqx path, a registry name or a Keras model, got "
                    f"{type(obj).__name__}")


def is_writer() -> bool:
    """Process 0 alone writes run files (config, history, events, caches); every process computes and reads."""
    return jax.process_index() == 0


def cast_floating(tree: _Tree, dtype: DTypeLike) -> _Tree:
    """Copy of `tree` with floating arrays cast to `dtype` (the teacher in bfloat16 halves its memory traffic)."""
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


def teacher_logits(teachers: Sequence[ModelPair], images: jax.Array, resolutions: Sequence[int] = (), *,
                   with_features: bool = False) -> list[jax.Array] | tuple[list[jax.Array], dict[str, jax.Array]]:
    """Logits of every teacher (and of each extra resolution) on a batch; a list of f32[B, K].

    `teachers` is a list of `(model, state)`; `resolutions` re-renders the (already augmented) view at other sizes on
    device, so one teacher can be ensembled over resolutions. With `with_features`, also returns the first teacher's
    named features (for feature-based losses).
    """
    outs, first_features = [], None
    for model, state in teachers:
        dtype = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))[0].dtype
        views = [images] + [
            jax.image.resize(images, (*images.shape[:2], r, r), "linear", antialias=True) for r in resolutions
        ]
        for v in views:
            logits, feats, _ = apply(model, state, v.astype(dtype), train=False)
            outs.append(jax.lax.stop_gradient(logits.astype(jnp.float32)))
            if first_features is None:
                first_features = jax.tree_util.tree_map(
                    lambda f: jax.lax.stop_gradient(f.astype(jnp.float32)), feats)
    return (outs, first_features) if with_features else outs


def _cache_key(teachers, source, *settings) -> str:
    """What the cached predictions depend on: every byte of every teacher array (and its architecture), the data
    (name, size, labels, class names) and the settings (mode, views, resolution, temperature, ...)."""
    h = hashlib.sha256()
    h.update(json.dumps(settings).encode())
    for model, state in teachers:
        spec = getattr(model, "spec", None)
        h.update(repr(spec).encode())
        for leaf in jax.tree_util.tree_leaves(eqx.filter((model, state), eqx.is_array)):
            a = np.asarray(leaf)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).data)
    h.update(f"{getattr(source, 'name', type(source).__name__)}|{len(source)}".encode())
    h.update(json.dumps(list(getattr(source, "class_names", []) or [])).encode())
    labels = getattr(source, "labels", None)
    if labels is not None:
        h.update(np.ascontiguousarray(np.asarray(labels, np.int64)).data)
    return h.hexdigest()[:24]


def run_inputs(student: ModelPair, teachers: Sequence[ModelPair], source: DataSource, student_res: int) -> dict:
    """What a run is made of besides its config, as recorded in `workdir/run.json`: the student (architecture,
    resolution, initial weights), every teacher (every byte) and the data (name, size, labels, class names). A resumed
    run must have the same (`workdir.check_same_inputs`)."""
    s_model = student[0]
    spec = getattr(s_model, "spec", None)
    what = (f"{spec.name} at {student_res} px, {spec.num_classes} classes" if spec is not None
            else type(s_model).__name__)
    return {"student": what, "student_sha": _cache_key([student], [], "student"),
            "teachers_sha": _cache_key(list(teachers), [], "teachers"),
            "data": f"{getattr(source, 'name', type(source).__name__)} ({len(source)} examples)",
            "data_sha": _cache_key([], source, "data")}


def fixed_teacher_cache(teachers: Sequence[ModelPair], source: DataSource, *, mode: str,
                        resolution: int | tuple[int, int], crops: int, seed: int, temperature: float, batch_size: int,
                        channels: int, resolutions: Sequence[int] = (), workdir: str | os.PathLike | None = None,
                        progress: bool = False, crop_area: tuple[float, float] = (0.05, 1.0)) -> np.ndarray:
    """Teacher probabilities at `temperature` for every example of `source` under a `fix/*` mode: f32[N, K].

    For `fix/ic_ens` the probabilities are the mean over `crops` fixed inception crops (and over teachers). With a
    workdir the result is stored as `teacher_cache-<key>.npy` and reused by restarts.
    """
    from patient.data import fixed_teacher_views

    n = len(source)
    key = _cache_key(teachers, source, mode, resolution, crops, seed, temperature, n, channels, list(crop_area),
                     list(resolutions))
    path = Path(workdir) / f"teacher_cache-{key}.npy" if workdir is not None else None
    if path is not None and path.is_file():
        return np.load(path, allow_pickle=False)

    @jax.jit
    def probs_of(teachers, views):  # views f32[B, K, C, H, W]
        b, k = views.shape[:2]
        flat = views.reshape(b * k, *views.shape[2:])
        p = teacher_probs(teacher_logits(teachers, flat, resolutions), temperature)
        return p.reshape(b, k, -1).mean(axis=1)

    out = None
    it = fixed_teacher_views(source, mode=mode, resolution=resolution, crops=crops, seed=seed,
                             batch_size=batch_size, channels=channels, crop_area=crop_area)
    bar = _bar(n, "teacher cache", progress)
    try:
        for batch in it:
            p = np.asarray(probs_of(teachers, jnp.asarray(batch["teacher"])))
            mask = np.asarray(batch["mask"])
            idx = np.asarray(batch["index"])[mask]
            if out is None:
                out = np.zeros((n, p.shape[-1]), np.float32)
            out[idx] = p[mask]
            bar.update(int(mask.sum()))
    finally:
        bar.close()
        if hasattr(it, "close"):
            it.close()
    if path is not None and is_writer():  # every process computed the same values; one writes them
        buf = io.BytesIO()
        np.save(buf, out, allow_pickle=False)
        write_atomic(path, buf.getvalue())
    return out


def _bar(total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
