"""The model registry: `create` a named model from the variants the families registered (`spec.py`), rebuild one
from its spec, and the batched `apply`. It holds no family knowledge of its own."""

from __future__ import annotations

import dataclasses
import inspect
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from . import bit, mobilenetv3, regnet, resnet, vit  # noqa: F401  (the built-in families register themselves on import)
from .layers import BatchNorm
from .spec import FAMILIES, VARIANTS, ModelSpec, Variant, family_of, spec_of

if TYPE_CHECKING:
    import equinox as eqx

__all__ = ["ModelSpec", "apply", "build", "check_spec_bounds", "create", "describe", "init_state", "list_models",
           "param_count", "skeleton_bytes", "spec_of", "with_resolution"]


def list_models() -> list[str]:
    """Names accepted by `create`, sorted."""
    return sorted(VARIANTS)


def describe(name: str) -> Variant:
    """The registered variant `name` (family, constructor arguments, default resolution, description)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose one of patient.models.list_models(): {', '.join(list_models())}")
    return VARIANTS[name]


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return tuple(_jsonable(x) for x in v)
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    raise TypeError(f"model argument value {v!r} is not a number, string or list; patient specs must be JSON-friendly")


def init_state(model: eqx.Module) -> dict:
    """Fresh running statistics for every BatchNorm in `model` ({} for GroupNorm-only models)."""
    state = {}
    for leaf in jax.tree_util.tree_leaves(model, is_leaf=lambda m: isinstance(m, BatchNorm)):
        if isinstance(leaf, BatchNorm):
            state.update(leaf.init_state())
    return state


def build(spec: ModelSpec, key: jax.Array | None) -> tuple[eqx.Module, dict[str, Any]]:
    """Construct the model and state a spec describes: randomly initialised from `key`, or zero-filled when `key` is
    None (a skeleton for loading values into)."""
    cls = family_of(spec).cls
    model = cls(**dict(spec.kwargs), num_classes=spec.num_classes, spec=spec, key=key)
    return model, init_state(model)


def skeleton_bytes(spec: ModelSpec) -> int:
    """Bytes of the arrays (parameters and state) of the model `spec` describes, found without allocating them."""
    import equinox as eqx

    from .layers import ABSTRACT_INIT

    token = ABSTRACT_INIT.set(True)
    try:
        shapes = eqx.filter_eval_shape(build, spec, None)
    finally:
        ABSTRACT_INIT.reset(token)
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes)
               if hasattr(x, "shape"))


def check_spec_bounds(spec: ModelSpec) -> None:
    """Refuse specs no real model has (they come from files, which are untrusted): class counts above 1e6,
    resolutions outside 1..4096, more than 1000 blocks, constructor integers above 1e5 or negative, non-finite or huge
    floats. (Measuring such a model before refusing it would itself cost minutes and gigabytes.)"""
    import math

    def walk(v):
        if isinstance(v, (tuple, list)):
            for x in v:
                yield from walk(x)
        else:
            yield v

    if not 1 <= spec.num_classes <= 1_000_000:
        raise ValueError(f"num_classes {spec.num_classes} outside 1..1000000")
    if not 1 <= spec.resolution <= 4096:
        raise ValueError(f"resolution {spec.resolution} outside 1..4096")
    for k, v in spec.kwargs:
        if k in ("depths", "depth") and sum(x for x in walk(v) if isinstance(x, int)) > 1000:  # ViT: `depth`
            raise ValueError(f"depths={v!r}: more than 1000 blocks")
        for x in walk(v):
            if isinstance(x, bool) or isinstance(x, str) or x is None:
                continue
            if isinstance(x, int) and not 0 <= x <= 100_000:
                raise ValueError(f"constructor argument {k}={v!r} outside 0..100000")
            if isinstance(x, float) and not (math.isfinite(x) and abs(x) <= 1000):
                raise ValueError(f"constructor argument {k}={v!r} is not a finite number of sane size")


def create(name: str, *, num_classes: int, key: jax.Array | None, weights: str | None = None,
           resolution: int | None = None, **overrides: Any) -> tuple[eqx.Module, dict[str, Any]]:
    """Build a registry model.

    **Arguments:**

    - `name`: a name from `list_models()`.
    - `num_classes`: classifier width.
    - `key`: a `jax.random.key` for initialisation, or None for a zero-filled model (a skeleton to load values into).
    - `weights`: optional path to timm `.safetensors` or BiT `.npz` weights; a head of another class count is
      re-initialised with a warning.
    - `resolution`: default input resolution recorded in the spec (the networks accept any size that survives their strides).
    - `**overrides`: constructor arguments replacing the registry's (e.g. `depths=(1, 1, 1, 1)`, `width=0.5`).

    **Returns:** `(model, state)`; `state` holds BatchNorm running statistics (`{}` for GroupNorm models).
    """
    entry = describe(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or not 1 <= num_classes <= 1_000_000:
        raise ValueError(f"num_classes must be an integer in 1..1000000, got {num_classes!r}")
    if resolution is not None and (not isinstance(resolution, (int, np.integer)) or isinstance(resolution, bool)
                                   or not 1 <= resolution <= 4096):
        raise ValueError(f"resolution must be an integer in 1..4096 px (or None for {name}'s own), got {resolution!r}")
    kwargs = {**entry.kwargs, **overrides}
    family = FAMILIES[entry.family]
    cls = family.cls
    spec = ModelSpec(
        name=name, family=entry.family, kwargs=tuple(sorted((k, _jsonable(v)) for k, v in kwargs.items())),
        num_classes=num_classes, mean=tuple(entry.mean or family.mean), std=tuple(entry.std or family.std),
        resolution=int(resolution or entry.resolution),
    )
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "num_classes", "spec", "key"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)} for {name!r}; {cls.__name__} takes "
                         f"{', '.join(sorted(allowed))}")
    model, state = build(spec, key)
    if weights is not None:
        from .weights import load_weights

        model, state = load_weights(model, state, weights)
    return model, state


def apply(model: eqx.Module, state: dict[str, Any], images: jax.Array | np.ndarray, *, train: bool = False,
          key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
    """Run `model` on a batch of (B, C, H, W) images in [0, 1].

    **Returns:** `(logits f32[B, K], features {name: f32[B, ...]}, new_state)`. In training BatchNorm uses batch
    statistics reduced over the whole batch (mesh-wide under a sharded jit) and `new_state` carries updated running
    statistics; in evaluation the state is returned unchanged. A model whose class sets `batched = True` (a Keras
    model from `from_keras`) runs its own batched `forward` instead.
    """
    if getattr(type(model), "batched", False):
        return model.forward(state, images, train=train, key=key)

    def one(x):
        return model(x, state, train=train, key=key)

    return jax.vmap(one, axis_name="batch", out_axes=(0, 0, None))(images)


def with_resolution(model: eqx.Module, resolution: int) -> eqx.Module:
    """`model` with `resolution` recorded in its spec (the input size it was trained at), so every file written from
    it (.eqx, .onnx, .tflite) and every evaluation defaults to that size. The arrays are shared, not copied."""
    import copy

    spec = spec_of(model)
    if spec.resolution == int(resolution):
        return model
    model = copy.copy(model)
    object.__setattr__(model, "spec", dataclasses.replace(spec, resolution=int(resolution)))  # a static field
    return model


def param_count(model: eqx.Module) -> int:
    """Trainable parameters (BatchNorm running statistics live in the state and are not counted, as in timm)."""
    import equinox as eqx

    return sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)))
