"""Pretrained-weight import: timm `.safetensors` state dicts and BiT `.npz` files (legacy BiT and big_vision layouts).

Every parameter is found by NAME: patient's parameter names mirror timm's state-dict keys (`<family>.timm_name` fixes the
few that differ), and the BiT layouts are translated key by key below. Nothing is matched by leaf order. Loading needs
only numpy and safetensors' numpy API, never torch.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .spec import family_of, spec_of


class WeightsError(ValueError):
    """A weights file that does not fit the model (missing or unexpected tensors, wrong shapes, unknown format)."""


def _path_name(path) -> str:
    """`layers.0.1.conv1.weight`: the dotted name of a leaf's path (attributes, list indices, dict keys)."""
    return jax.tree_util.keystr(path, simple=True, separator=".")


def named_parameters(model: eqx.Module) -> dict[str, jax.Array]:
    """{dotted name: array} for every trainable array of `model` (names follow the attribute structure)."""
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_array))[0]
    return {_path_name(p): v for p, v in leaves}


def named_tensors(model: eqx.Module, state: dict[str, Any]) -> dict[str, jax.Array]:
    """Parameters plus BatchNorm statistics, under timm state-dict names (`<bn>.running_mean` / `.running_var`)."""
    rename = family_of(spec_of(model)).timm_name
    out = {rename(k): v for k, v in named_parameters(model).items()}
    for bn, stats in state.items():
        out[rename(f"{bn}.running_mean")] = stats["mean"]
        out[rename(f"{bn}.running_var")] = stats["var"]
    return out


def assign(model: eqx.Module, state: dict[str, Any], tensors: dict[str, np.ndarray],
           source: str) -> tuple[eqx.Module, dict[str, Any]]:
    """Return `(model, state)` with every parameter and statistic replaced by `tensors[timm_name]`.

    Missing or unexpected tensors and shape mismatches raise `WeightsError` naming `source`. A classifier whose class
    count differs from the model's keeps its fresh initialisation (with a warning).
    """
    spec = spec_of(model)
    family = family_of(spec)
    rename = family.timm_name
    tensors = {k: v for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
    head_keys = {f"{head}.{p}" for head in family.heads for p in ("weight", "bias")}
    skip_head = False
    first = f"{family.heads[0]}.weight"
    if first in tensors:
        got = int(np.asarray(tensors[first]).shape[0])
        if got != spec.num_classes:
            warnings.warn(f"{source}: head has {got} classes, model has {spec.num_classes}; the head was re-initialised",
                          UserWarning, stacklevel=2)
            skip_head = True
    params = named_parameters(model)
    missing, new_leaves = [], {}
    for name, leaf in params.items():
        key = rename(name)
        if skip_head and key in head_keys:
            continue
        if key not in tensors:
            missing.append(key)
            continue
        new_leaves[name] = _fit(tensors[key], leaf.shape, key, source, family.adapt)
    new_state = {}
    for bn, stats in state.items():
        entry = {}
        for stat, suffix in (("mean", "running_mean"), ("var", "running_var")):
            key = rename(f"{bn}.{suffix}")
            if key not in tensors:
                missing.append(key)
                continue
            entry[stat] = _fit(tensors[key], stats[stat].shape, key, source)
        new_state[bn] = entry
    used = {rename(n) for n in params} | {rename(f"{b}.{s}") for b in state for s in ("running_mean", "running_var")}
    unexpected = sorted(set(tensors) - used - (head_keys if skip_head else set()))
    if missing or unexpected:
        raise WeightsError(
            f"{source}: weights do not fit {spec.name} (missing {len(missing)}: {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}; unexpected {len(unexpected)}: {', '.join(unexpected[:4])}"
            f"{' ...' if len(unexpected) > 4 else ''}); is this file for another architecture?")
    flat, treedef = jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_array))
    replaced = [new_leaves.get(_path_name(p), v) for p, v in flat]
    arrays = jax.tree_util.tree_unflatten(treedef, replaced)
    model = eqx.combine(arrays, eqx.filter(model, eqx.is_array, inverse=True))
    return model, new_state


def _fit(value, shape, key, source, adapt=None):
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != tuple(shape) and adapt is not None:
        adapted = adapt(key, arr, tuple(shape))
        arr = arr if adapted is None else np.asarray(adapted, np.float32)
    if arr.shape != tuple(shape):
        # A 1x1 conv head stored as (K, C, 1, 1) for our (K, C) linear layer, or BiT's (1,1,1,C) norms: same values.
        if arr.size == int(np.prod(shape)) and [d for d in arr.shape if d != 1] == [d for d in shape if d != 1]:
            arr = arr.reshape(shape)
        else:
            raise WeightsError(f"{source}: tensor {key} has shape {arr.shape}, the model needs {tuple(shape)}; "
                               "is this file for another architecture or width?")
    return jnp.asarray(arr)


# ----------------------------------------------------------------------------------------------------------- BiT npz

def _hwio(k):
    return np.transpose(np.asarray(k), (3, 2, 0, 1))


def bit_npz_to_timm(arrays: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Translate a BiT `.npz` (legacy `resnet/...` layout or big_vision's layout) into timm `resnetv2` names."""
    out = {}
    legacy = any(k.startswith("resnet/") for k in arrays)
    for key, v in arrays.items():
        k = key[len("resnet/"):] if legacy else key
        if legacy:
            m = re.fullmatch(r"block(\d+)/unit(\d+)/(a|b|c)/(standardized_conv2d/kernel|group_norm/gamma|group_norm/beta)", k)
            p = re.fullmatch(r"block(\d+)/unit(\d+)/a/proj/standardized_conv2d/kernel", k)
            if m:
                b, u, abc, what = int(m[1]) - 1, int(m[2]) - 1, m[3], m[4]
                i = "abc".index(abc) + 1
                pre = f"stages.{b}.blocks.{u}."
                if what.endswith("kernel"):
                    out[f"{pre}conv{i}.weight"] = _hwio(v)
                else:
                    out[f"{pre}norm{i}.{'weight' if what.endswith('gamma') else 'bias'}"] = np.asarray(v).reshape(-1)
            elif p:
                out[f"stages.{int(p[1]) - 1}.blocks.{int(p[2]) - 1}.downsample.conv.weight"] = _hwio(v)
            elif k == "root_block/standardized_conv2d/kernel":
                out["stem.conv.weight"] = _hwio(v)
            elif k in ("group_norm/gamma", "group_norm/beta"):
                out[f"norm.{'weight' if k.endswith('gamma') else 'bias'}"] = np.asarray(v).reshape(-1)
            elif k == "head/conv2d/kernel":
                out["head.fc.weight"] = _hwio(v)
            elif k == "head/conv2d/bias":
                out["head.fc.bias"] = np.asarray(v).reshape(-1)
            else:
                raise WeightsError(f"{source}: unexpected tensor {key!r} in a legacy BiT npz")
        else:
            m = re.fullmatch(r"block(\d+)/unit(\d+)/(conv\d|gn\d|conv_proj)/(kernel|scale|bias)", k)
            if m:
                b, u, layer, what = int(m[1]) - 1, int(m[2]) - 1, m[3], m[4]
                pre = f"stages.{b}.blocks.{u}."
                if layer == "conv_proj":
                    out[f"{pre}downsample.conv.weight"] = _hwio(v)
                elif layer.startswith("conv"):
                    out[f"{pre}conv{layer[-1]}.weight"] = _hwio(v)
                else:
                    out[f"{pre}norm{layer[-1]}.{'weight' if what == 'scale' else 'bias'}"] = np.asarray(v).reshape(-1)
            elif k == "root_block/conv_root/kernel":
                out["stem.conv.weight"] = _hwio(v)
            elif k in ("norm-pre-head/scale", "norm-pre-head/bias"):
                out[f"norm.{'weight' if k.endswith('scale') else 'bias'}"] = np.asarray(v).reshape(-1)
            elif k == "head/kernel":
                out["head.fc.weight"] = np.asarray(v).T  # Dense (C, K) -> (K, C)
            elif k == "head/bias":
                out["head.fc.bias"] = np.asarray(v)
            else:
                raise WeightsError(f"{source}: unexpected tensor {key!r} in a big_vision BiT npz")
    return out


def read_tensors(path: str | os.PathLike) -> tuple[str, dict[str, np.ndarray]]:
    """Read a weights file into {name: array}; returns (format, tensors). Format is detected from the content."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":  # npz is a zip archive
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:
            raise WeightsError(f"{path}: unreadable .npz ({e})") from None
        return "bit_npz", bit_npz_to_timm(arrays, str(path))
    try:
        from safetensors.numpy import load_file

        return "safetensors", load_file(str(path))
    except Exception:
        raise WeightsError(f"{path}: neither a safetensors state dict nor a BiT .npz; "
                           "pass timm .safetensors or BiT .npz weights") from None


def load_weights(model: eqx.Module, state: dict[str, Any],
                 path: str | os.PathLike) -> tuple[eqx.Module, dict[str, Any]]:
    """Load pretrained weights from `path` into `(model, state)` (see `patient.models.create(weights=...)`)."""
    fmt, tensors = read_tensors(path)
    if fmt == "bit_npz" and spec_of(model).family != "bit":
        raise WeightsError(f"{path}: a BiT .npz cannot initialise {spec_of(model).name}; use a bit_* model")
    return assign(model, state, tensors, str(path))
