"""Evaluation on a device mesh (`patient.evaluate`, and the trainer's evaluations), and the data checks both share."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from patient.models.registry import spec_of

from .config import Config
from .step import TrainState, make_eval_fn, make_mesh
from .teachers import resolve_model

if TYPE_CHECKING:
    from .teachers import DataLike, ModelLike


def as_source(data: DataLike) -> Any:
    """`data` as a random-access source: a source is returned as is, `(images, labels)` arrays are wrapped, anything
    else (a name, a path, an empty source) is refused with one line."""
    from patient.data import arrays

    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], np.ndarray):
        return arrays(data[0], data[1])
    if isinstance(data, np.ndarray):
        return arrays(data)
    if isinstance(data, (str, bytes, os.PathLike)):  # a str has len and indexing: it would pass for a 6-image source
        raise TypeError(f"data={data!r} is a name, not a source; pass patient.data.digits('train'), "
                        "fashion_mnist('train'), image_folder(PATH) or arrays(images, labels)")
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(f"data must be a patient.data source (digits(), fashion_mnist(...), image_folder(...), "
                        f"arrays(...)) or an (images, labels) pair of arrays, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("data is empty: the source has no examples")
    return data


def check_labels(source: Any, num_classes: int, what: str, *, supervised: bool = False) -> None:
    """Labels must index the model's classes (-1 = unlabelled); supervised training needs two classes at least."""
    labels = getattr(source, "labels", None)
    if labels is None:
        return
    labels = np.asarray(labels)
    labelled = labels[labels >= 0]
    if labelled.size and (labelled.max() >= num_classes or labels.min() < -1):
        raise ValueError(f"{what} has labels {int(labels.min())}..{int(labelled.max())} but the model predicts "
                         f"{num_classes} classes (0..{num_classes - 1}); build it with num_classes="
                         f"{int(labelled.max()) + 1} or fix the data")
    if supervised and len(np.unique(labelled)) < 2:
        raise ValueError(f"{what} holds {len(np.unique(labelled))} class(es) of labelled examples; training needs "
                         "two at least (check the folder: one sub-folder per class)")


def put_batch(mesh: Mesh, tree: Any) -> Any:
    """Host arrays (this process's share of the global batch) -> arrays split over the mesh's data axis."""
    sharding = NamedSharding(mesh, P("data"))
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def evaluate_on_mesh(cfg: Config, mesh: Mesh, ts: TrainState, student_eval: Callable, teacher_eval: Callable,
                     teachers: Sequence[Any], source: Any, s_res: int, t_res: int) -> dict:
    """Student top-1/top-5, teacher top-1, agreement and KL(teacher || student) at T=1 over every example once.

    Every process walks the same (deterministic) evaluation batches and puts only its share of each on the mesh;
    counts and sums are reduced on device and come back replicated, so every process returns the same figures, equal
    to a single-process evaluation. Padding examples (mask False) are never counted."""
    from patient.data import eval_pipeline

    n_proc, pid = jax.process_count(), jax.process_index()
    bs = -(-cfg.eval_batch_size // mesh.size) * mesh.size
    s_it = iter(eval_pipeline(source, resolution=s_res, batch_size=bs, channels=cfg.channels))
    t_it = iter(eval_pipeline(source, resolution=t_res, batch_size=bs, channels=cfg.channels)) if (
        teachers and t_res != s_res) else None
    sums_fn = _batch_sums(mesh, bool(teachers))

    def share(x):
        per = x.shape[0] // n_proc
        return np.asarray(x)[pid * per:(pid + 1) * per]

    total = None
    for sb in s_it:
        tb = next(t_it) if t_it is not None else sb
        logits = student_eval(ts.params[0], ts.model_state, put_batch(mesh, share(sb["image"])))
        probs = teacher_eval(teachers, put_batch(mesh, share(tb["image"]))) if teachers else None
        labels, mask = put_batch(mesh, (share(sb["label"]).astype(np.int32), share(sb["mask"])))
        batch = sums_fn(logits, probs, labels, mask)
        total = batch if total is None else jax.tree_util.tree_map(jnp.add, total, batch)
    for x in (s_it, t_it):
        if x is not None and hasattr(x, "close"):
            x.close()
    sums = {k: v.item() for k, v in jax.device_get(total).items()} if total is not None else {"n": 0, "labelled": 0}
    out = {}
    if sums["labelled"]:
        out["top1"] = 100.0 * sums["top1"] / sums["labelled"]
        out["top5"] = 100.0 * sums["top5"] / sums["labelled"]
    if teachers:
        if sums["labelled"]:
            out["teacher_top1"] = 100.0 * sums["teacher_top1"] / sums["labelled"]
        if sums["n"]:
            out["agreement"] = 100.0 * sums["agreement"] / sums["n"]
            out["kl"] = sums["kl"] / sums["n"]
    out["examples"] = int(sums["n"])
    return out


@functools.lru_cache(maxsize=16)
def _batch_sums(mesh, with_teacher: bool):
    """Jitted per-batch counts (and the KL sum) over a batch split across `mesh`, returned replicated (one compiled
    function per mesh, reused by every evaluation of a run)."""

    def sums(logits, probs, labels, mask):
        lab = mask & (labels >= 0)
        top1 = jnp.argmax(logits, -1)
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        out = {"n": mask.sum(), "labelled": lab.sum(), "top1": ((top1 == labels) & lab).sum(),
               "top5": ((top5 == labels[:, None]).any(-1) & lab).sum()}
        if with_teacher:
            t1 = jnp.argmax(probs, -1)
            logq = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
            kl = jnp.sum(jnp.where(probs == 0, 0.0, probs * (jnp.log(jnp.clip(probs, 1e-30, 1.0)) - logq)), -1)
            out.update(teacher_top1=((t1 == labels) & lab).sum(), agreement=((t1 == top1) & mask).sum(),
                       kl=jnp.where(mask, kl, 0.0).sum())
        return out

    return jax.jit(sums, out_shardings=NamedSharding(mesh, P()))


def evaluate(student: ModelLike, data: DataLike, *, teacher: ModelLike | None = None, resolution: int = 0,
             teacher_resolution: int = 0, batch_size: int = 256, channels: int = 3, relabel: bool = False) -> dict:
    """Top-1/top-5 of `student` on labelled `data` (and, with a `teacher`, teacher top-1, agreement and KL at T=1).

    `student` and `teacher` are `(model, state)` pairs or `.eqx` paths; resolutions default to the student's spec.
    Labels must be the model's classes: an `.eqx` file whose class names differ from the data's is an error unless
    `relabel=True` says the data's label i is the model's class i.
    **Returns:** a dict of percentages (`top1`, `top5`, `teacher_top1`, `agreement`) and `kl`, `examples`.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    source = as_source(data)
    names = None
    if isinstance(student, (str, Path)) and Path(student).is_file():  # read once: the model and its class names
        from patient.io import load

        model, state, header = load(student)
        names = header.get("class_names")
    else:
        model, state = resolve_model(student, role="student", num_classes=None, key=None)
    teachers = [] if teacher is None else [resolve_model(teacher, role="teacher", num_classes=None, key=None)]
    check_labels(source, spec_of(model).num_classes, "data")
    labels = getattr(source, "labels", None)
    if labels is not None and not (np.asarray(labels) >= 0).any():
        raise ValueError("data has no labelled examples (every label is -1); top-1 needs labels")
    if names and not relabel:
        data_names = list(getattr(source, "class_names", []) or [])
        if data_names and list(names) != data_names:
            raise ValueError(f"the model's classes {names[:4]}... are not the data's {data_names[:4]}... (in that "
                             "order); pass relabel=True if the data's label i really is the model's class i")
    params, static = eqx.partition(model, eqx.is_array)
    cfg = Config(eval_batch_size=batch_size, channels=channels)
    mesh = make_mesh()
    s_res = resolution or spec_of(model).resolution
    student_eval, teacher_eval = make_eval_fn(static)
    ts = TrainState(jnp.asarray(0), (params, []), state, None, jnp.zeros((2,), jnp.uint32))
    return evaluate_on_mesh(cfg, mesh, ts, student_eval, teacher_eval, teachers, source, s_res, teacher_resolution or s_res)
