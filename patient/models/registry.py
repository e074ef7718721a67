"""The model registry: names -> constructors, the static spec every model carries, and the batched `apply`."""

from __future__ import annotations

import dataclasses
import inspect
import json
import warnings
from typing import Any

import jax
import numpy as np

from . import bit, mobilenetv3, resnet
from .layers import BatchNorm

FAMILIES = {"bit": bit.BiTResNetV2, "resnet": resnet.ResNet, "mobilenetv3": mobilenetv3.MobileNetV3}
TIMM_NAME = {"bit": bit.timm_name, "resnet": resnet.timm_name, "mobilenetv3": mobilenetv3.timm_name}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model without the caller: registry name, family, constructor arguments,
    class count, preprocessing and the default input resolution. Hashable, so it can be a static field."""

    name: str
    family: str
    kwargs: tuple  # sorted (key, value) pairs, JSON-friendly values (tuples for lists)
    num_classes: int
    mean: tuple
    std: tuple
    resolution: int

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["kwargs"] = {k: v for k, v in self.kwargs}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelSpec":
        def tup(v):
            return tuple(tup(x) for x in v) if isinstance(v, list) else v

        return cls(
            name=d["name"], family=d["family"], kwargs=tuple(sorted((k, tup(v)) for k, v in d["kwargs"].items())),
            num_classes=int(d["num_classes"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
            resolution=int(d["resolution"]),
        )


@dataclasses.dataclass(frozen=True)
class Entry:
    family: str
    kwargs: dict
    resolution: int
    description: str


_REGISTRY: dict[str, Entry] = {}


def _register(name, family, resolution, description, **kwargs):
    _REGISTRY[name] = Entry(family, kwargs, resolution, description)


for _d, _w in [(26, 1), (50, 1), (101, 1), (152, 1), (50, 3), (101, 3), (152, 2), (152, 4)]:
    _register(f"bit_r{_d}x{_w}", "bit", 224, f"BiT ResNetV2-{_d}x{_w} (GroupNorm + WS)", depths=bit.DEPTHS[_d], width=_w)
_register("bit_r26x1_cifar", "bit", 32, "BiT ResNetV2-26x1 with a 3x3 stride-1 stem for small images",
          depths=bit.DEPTHS[26], width=1, stem="cifar")
for _d, (_block, _depths) in resnet.IMAGENET_DEPTHS.items():
    _register(f"resnet{_d}", "resnet", 224, f"ResNet-{_d} v1.5 (BatchNorm)", depths=_depths,
              channels=(64, 128, 256, 512), block=_block)
for _d in (20, 32, 44, 56, 110):
    _n = (_d - 2) // 6
    _register(f"cifar_resnet{_d}", "resnet", 32, f"CIFAR ResNet-{_d} (16/32/64 channels)", depths=(_n,) * 3,
              channels=(16, 32, 64), block="basic", stem="cifar", stem_width=16)
for _d in (8, 32):
    _n = (_d - 2) // 6
    _register(f"resnet{_d}x4", "resnet", 32, f"CIFAR ResNet-{_d}x4 (64/128/256 channels, CRD benchmark)",
              depths=(_n,) * 3, channels=(64, 128, 256), block="basic", stem="cifar", stem_width=32)
for _size, _widths in [("small", (0.5, 0.75, 1.0)), ("large", (0.75, 1.0))]:
    for _w in _widths:
        _register(f"mobilenetv3_{_size}_{int(_w * 100):03d}", "mobilenetv3", 224,
                  f"MobileNetV3-{_size.capitalize()} {_w}x", size=_size, width=_w)


def list_models() -> list[str]:
    """Names accepted by `create`, sorted."""
    return sorted(_REGISTRY)


def describe(name: str) -> Entry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of patient.models.list_models(): {', '.join(list_models())}")
    return _REGISTRY[name]


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return tuple(_jsonable(x) for x in v)
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    raise TypeError(f"model argument value {v!r} is not a number, string or list; patient specs must be JSON-friendly")


def init_state(model) -> dict:
    """Fresh running statistics for every BatchNorm in `model` ({} for GroupNorm-only models)."""
    state = {}
    for leaf in jax.tree_util.tree_leaves(model, is_leaf=lambda m: isinstance(m, BatchNorm)):
        if isinstance(leaf, BatchNorm):
            state.update(leaf.init_state())
    return state


def build(spec: ModelSpec, key):
    """Construct the model and state a spec describes: randomly initialised from `key`, or zero-filled when `key` is
    None (a skeleton for loading values into)."""
    cls = FAMILIES[spec.family]
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
        if k == "depths" and sum(x for x in walk(v) if isinstance(x, int)) > 1000:
            raise ValueError(f"depths={v!r}: more than 1000 blocks")
        for x in walk(v):
            if isinstance(x, bool) or isinstance(x, str) or x is None:
                continue
            if isinstance(x, int) and not 0 <= x <= 100_000:
                raise ValueError(f"constructor argument {k}={v!r} outside 0..100000")
            if isinstance(x, float) and not (math.isfinite(x) and abs(x) <= 1000):
                raise ValueError(f"constructor argument {k}={v!r} is not a finite number of sane size")


def create(name: str, *, num_classes: int, key, weights: str | None = None, resolution: int | None = None,
           **overrides: Any):
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
    if not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    kwargs = {**entry.kwargs, **overrides}
    cls = FAMILIES[entry.family]
    mean, std = _preprocessing(entry.family)
    spec = ModelSpec(
        name=name, family=entry.family, kwargs=tuple(sorted((k, _jsonable(v)) for k, v in kwargs.items())),
        num_classes=num_classes, mean=mean, std=std, resolution=int(resolution or entry.resolution),
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


def _preprocessing(family: str) -> tuple[tuple, tuple]:
    if family == "bit":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return resnet.IMAGENET_MEAN, resnet.IMAGENET_STD


def apply(model, state, images, *, train: bool = False, key=None):
    """Run `model` on a batch of (B, C, H, W) images in [0, 1].

    **Returns:** `(logits f32[B, K], features {name: f32[B, ...]}, new_state)`. In training BatchNorm uses batch
    statistics reduced over the whole batch (mesh-wide under a sharded jit) and `new_state` carries updated running
    statistics; in evaluation the state is returned unchanged. A Keras model (`from_keras`) is batched already and
    runs its own batched forward.
    """
    from .keras_interop import KerasModel  # no keras import: the wrapper module imports keras only when used

    if isinstance(model, KerasModel):
        return model.forward(state, images, train=train, key=key)

    def one(x):
        return model(x, state, train=train, key=key)

    return jax.vmap(one, axis_name="batch", out_axes=(0, 0, None))(images)


def spec_of(model) -> ModelSpec:
    spec = getattr(model, "spec", None)
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"{type(model).__name__} carries no patient ModelSpec; build models with patient.models.create")
    return spec


def with_resolution(model, resolution: int):
    """`model` with `resolution` recorded in its spec (the input size it was trained at), so every file written from
    it (.eqx, .onnx, .tflite) and every evaluation defaults to that size. The arrays are shared, not copied."""
    import copy

    spec = spec_of(model)
    if spec.resolution == int(resolution):
        return model
    model = copy.copy(model)
    object.__setattr__(model, "spec", dataclasses.replace(spec, resolution=int(resolution)))  # a static field
    return model


def spec_json(model) -> str:
    return json.dumps(spec_of(model).to_json(), sort_keys=True)


def param_count(model) -> int:
    """Trainable parameters (BatchNorm running statistics live in the state and are not counted, as in timm)."""
    import equinox as eqx

    return sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)))


def warn_head(path: str, got: int, want: int) -> None:
    warnings.warn(f"{path}: head has {got} classes, model has {want}; the head was re-initialised", UserWarning,
                  stacklevel=3)

