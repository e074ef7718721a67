"""Small layers every model family is built from.

Each layer acts on ONE example, channels first (C, H, W); batching is `jax.vmap(..., axis_name="batch")` in
`patient.models.apply`. Layers with running statistics (BatchNorm) read and write a plain dict state keyed by the
layer's dotted name, so the same name identifies the statistic in a timm state dict, in a checkpoint and in the .eqx file.
"""

from __future__ import annotations

import contextvars
import copy
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .conv import by_layout, channel_vector, chw_sizes, depthwise_conv2d, lax_conv, pad_pairs, pointwise_conv2d

Array = jax.Array
State = dict  # {bn_name: {"mean": f32[C], "var": f32[C]}}

BATCH_AXIS = "batch"

# Mesh axes that hold parts of the batch besides the vmapped one: set (while tracing) by the train step's per-device
# program under `shard_map`, so BatchNorm's batch statistics stay statistics of the global batch.
MESH_BATCH_AXES: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("patient_mesh_batch_axes",
                                                                                 default=())


def _over_batch(reduce, x):
    """`reduce` (lax.pmean / lax.psum) over the vmapped batch axis, then over each axis in `MESH_BATCH_AXES`."""
    x = reduce(x, BATCH_AXIS)
    for axis in MESH_BATCH_AXES.get():
        x = reduce(x, axis)
    return x


def batch_mean(x: Array) -> Array:
    """Mean of `x` over every example of the batch: the vmapped axis, then each mesh axis in `MESH_BATCH_AXES` (equal
    shards, so the mean of the shard means is the global mean)."""
    return _over_batch(lax.pmean, x)


def batch_count() -> Array:
    """Number of examples in the global batch (see `batch_mean`)."""
    return _over_batch(lax.psum, 1)


def host_rng(key: Array | None) -> np.random.Generator:
    """A numpy Generator seeded from a JAX key: initialising with numpy avoids compiling one random op per layer shape
    (a 25M-parameter model is built in well under a second) while keeping all randomness derived from `key`."""
    if key is None:
        return _Zeros()
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


# Set while a skeleton is only measured (`registry.skeleton_bytes` under `eqx.filter_eval_shape`): kernels are then
# traced zeros, so a file that declares a huge model costs no memory before it is refused.
ABSTRACT_INIT = contextvars.ContextVar("patient_abstract_init", default=False)


class _Zeros:
    """Stands in for a Generator when building a skeleton to load values into (`key=None`): zeros, no random work."""

    def standard_normal(self, shape, dtype=np.float32):
        return jnp.zeros(shape, dtype) if ABSTRACT_INIT.get() else np.zeros(shape, dtype)

    def uniform(self, low, high, shape):
        return jnp.zeros(shape, np.float32) if ABSTRACT_INIT.get() else np.zeros(shape, np.float32)


def split(key: Array | None, n: int) -> list:
    """`n` independent keys; fold_in compiles once, where jax.random.split would compile once per `n`."""
    return [None if key is None else jax.random.fold_in(key, i) for i in range(n)]


class Conv2d(eqx.Module):
    """2-D convolution on one (C, H, W) example, PyTorch padding conventions.

    With `ws_eps` set the kernel is weight-standardised (per output channel, biased variance) before use, as BiT's
    `StdConv2d` does; the stored `weight` stays the raw parameter. With `channels_last` the example is (H, W, C)
    instead (the kernel keeps PyTorch's (O, I, kh, kw) layout): a family whose activations stay channels-last inside
    makes 1x1 convolutions plain matrix products over pixel-major data (no layout copies on CPU).
    """

    weight: Array  # (O, I // groups, kh, kw)
    bias: Array | None
    stride: int = eqx.field(static=True)
    padding: tuple = eqx.field(static=True)
    groups: int = eqx.field(static=True)
    ws_eps: float | None = eqx.field(static=True)
    channels_last: bool = eqx.field(static=True, default=False)

    def __init__(self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, padding: int | tuple | None = None,
                 groups: int = 1, bias: bool = False, ws_eps: float | None = None, channels_last: bool = False,
                 key: Array | None):
        if padding is None:
            padding = ((stride - 1) + (kernel - 1)) // 2  # timm's get_padding for dilation 1
        fan_out = out_ch * kernel * kernel // groups
        w = host_rng(key).standard_normal((out_ch, in_ch // groups, kernel, kernel), dtype=np.float32)
        self.weight = jnp.asarray(w * np.float32(math.sqrt(2.0 / fan_out)))
        self.bias = jnp.asarray(np.zeros((out_ch,), np.float32)) if bias else None
        self.stride = stride
        self.padding = pad_pairs(padding)
        self.groups = groups
        self.ws_eps = ws_eps
        self.channels_last = channels_last

    def kernel(self) -> Array:
        """The kernel actually convolved with (weight-standardised when `ws_eps` is set)."""
        w = self.weight
        if self.ws_eps is not None:
            mean = w.mean(axis=(1, 2, 3), keepdims=True)
            var = w.var(axis=(1, 2, 3), keepdims=True)
            w = (w - mean) * lax.rsqrt(var + self.ws_eps)
        return w

    def standardised(self) -> Conv2d:
        """This convolution with `kernel()` stored as its plain weight (`ws_eps` None): the same function while the
        weights stay fixed (a teacher, inference), without standardising the kernel at every call."""
        if self.ws_eps is None:
            return self
        plain = copy.copy(self)
        # ws_eps is a static field, which eqx.tree_at cannot set; the copy is new and not yet shared, so set both here.
        object.__setattr__(plain, "weight", self.kernel())
        object.__setattr__(plain, "ws_eps", None)
        return plain

    def __call__(self, x: Array) -> Array:
        w = self.kernel().astype(x.dtype)
        cl = self.channels_last
        if self.groups == 1 and w.shape[2:] == (1, 1) and self.padding == ((0, 0), (0, 0)):
            y = pointwise_conv2d(x, w, self.stride, channels_last=cl)
        elif self.groups > 1 and self.groups == w.shape[0] and w.shape[1] == 1:
            y = depthwise_conv2d(x, w, self.stride, self.padding, channels_last=cl)
        else:
            y = lax_conv(x, w, self.stride, self.padding, self.groups, channels_last=cl)
        if self.bias is not None:
            y = y + channel_vector(self.bias.astype(x.dtype), cl)
        return y


def standardise_kernels(model: Any) -> Any:
    """`model` with every weight-standardised `Conv2d` replaced by `Conv2d.standardised()`: for a model whose weights
    no longer change, such as a distillation teacher (BiT-R50x1's forward at batch 32, 128 px: 561 -> 531 ms on CPU)."""
    return jax.tree_util.tree_map(lambda m: m.standardised() if isinstance(m, Conv2d) else m, model,
                                  is_leaf=lambda m: isinstance(m, Conv2d))


class Linear(eqx.Module):
    """Dense layer on a vector; PyTorch's (out, in) weight layout and default uniform init."""

    weight: Array
    bias: Array

    def __init__(self, in_features: int, out_features: int, *, key: Array | None, zero_init: bool = False,
                 std: float | None = None):
        bound = 1.0 / math.sqrt(in_features)
        if std is not None:  # timm's transformer init: truncated normal (2 std) weights, zero bias
            w = host_rng(key).standard_normal((out_features, in_features), dtype=np.float32)
            self.weight = jnp.asarray(jnp.clip(w, -2.0, 2.0) * np.float32(std))
            self.bias = jnp.asarray(np.zeros((out_features,), np.float32))
        elif zero_init:
            self.weight = jnp.zeros((out_features, in_features), jnp.float32)
            self.bias = jnp.asarray(np.zeros((out_features,), np.float32))
        else:
            rng = host_rng(key)
            self.weight = jnp.asarray(rng.uniform(-bound, bound, (out_features, in_features)).astype(np.float32))
            self.bias = jnp.asarray(rng.uniform(-bound, bound, (out_features,)).astype(np.float32))

    def __call__(self, x: Array) -> Array:
        return self.weight.astype(x.dtype) @ x + self.bias.astype(x.dtype)


class LayerNorm(eqx.Module):
    """LayerNorm over the last axis (tokens (N, D) or a vector (D,)); statistics in float32 whatever the input dtype."""

    weight: Array
    bias: Array
    eps: float = eqx.field(static=True)

    def __init__(self, features: int, eps: float = 1e-6):
        self.weight = jnp.asarray(np.ones((features,), np.float32))
        self.bias = jnp.asarray(np.zeros((features,), np.float32))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * lax.rsqrt(var + self.eps) * self.weight + self.bias
        return y.astype(x.dtype)


def resample_positions(pos: Array | np.ndarray, grid: tuple[int, int], new_grid: tuple[int, int]) -> Array:
    """Position embeddings `(gh * gw, D)` of a `grid` of patches resampled to `new_grid`: bicubic with antialiasing
    when shrinking, on the (D, gh, gw) map, as timm's `resample_abs_pos_embed` (its torch `interpolate(mode="bicubic",
    antialias=True)` and `jax.image.resize(method="bicubic", antialias=True)` agree to 1e-6)."""
    if tuple(grid) == tuple(new_grid):
        return jnp.asarray(pos)
    d = pos.shape[-1]
    m = jnp.asarray(pos, jnp.float32).T.reshape(d, *grid)
    m = jax.image.resize(m, (d, *new_grid), method="bicubic", antialias=True)
    return m.reshape(d, -1).T.astype(jnp.asarray(pos).dtype)


class GroupNorm(eqx.Module):
    """GroupNorm over (C, H, W) (or channels-last (H, W, C)) with per-channel affine; statistics in float32 whatever
    the input dtype."""

    weight: Array
    bias: Array
    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channels_last: bool = eqx.field(static=True, default=False)

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-5, *, channels_last: bool = False):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups; pick a width that is.")
        self.weight = jnp.asarray(np.ones((channels,), np.float32))
        self.bias = jnp.asarray(np.zeros((channels,), np.float32))
        self.groups = groups
        self.eps = eps
        self.channels_last = channels_last

    def __call__(self, x: Array) -> Array:
        c, h, w = chw_sizes(x.shape, self.channels_last)
        g = self.groups
        xf = x.astype(jnp.float32)
        if self.channels_last:
            # Per-channel means over the pixels first (reductions that keep channels minor), then over each group's
            # channels; reducing an (H, W, G, C/G) view directly is up to 13x slower on CPU (C/G = 2 is the worst).
            def group_mean(v):  # (H, W, C) -> the mean over its group, per channel: (C,)
                return jnp.repeat(v.mean(axis=(0, 1)).reshape(g, c // g).mean(axis=1), c // g)

            mean = group_mean(xf)
            var = group_mean(jnp.square(xf - mean))
            scale = lax.rsqrt(var + self.eps) * self.weight
            return (xf * scale + (self.bias - mean * scale)).astype(x.dtype)
        # (G, C/G, H, W) keeps channels innermost in XLA CPU's NHWC layout; flattening a group to one axis would make
        # XLA transpose the whole activation (a quarter of BiT's forward time).
        xg = xf.reshape(g, c // g, h, w)
        mean = xg.mean(axis=(1, 2, 3), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 3), keepdims=True)
        scale = lax.rsqrt(var + self.eps) * self.weight.reshape(g, -1, 1, 1)
        y = xg * scale + (self.bias.reshape(g, -1, 1, 1) - mean * scale)
        return y.reshape(c, h, w).astype(x.dtype)


class BatchNorm(eqx.Module):
    """BatchNorm2d with PyTorch semantics (momentum 0.1, unbiased running variance, biased batch variance).

    In training the statistics are reduced over the vmapped `batch` axis and, inside the train step's `shard_map`, over
    the mesh's data axis too (`batch_mean`), so they are statistics of the global batch. Running statistics live in
    `state[self.name]`. With `channels_last` the example is (H, W, C), as for `Conv2d`.
    """

    weight: Array
    bias: Array
    name: str = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    channels_last: bool = eqx.field(static=True, default=False)

    def __init__(self, channels: int, name: str, *, eps: float = 1e-5, momentum: float = 0.1,
                 channels_last: bool = False):
        self.weight = jnp.asarray(np.ones((channels,), np.float32))
        self.bias = jnp.asarray(np.zeros((channels,), np.float32))
        self.name = name
        self.eps = eps
        self.momentum = momentum
        self.channels_last = channels_last

    def init_state(self) -> State:
        c = self.weight.shape[0]
        return {self.name: {"mean": jnp.asarray(np.zeros((c,), np.float32)), "var": jnp.asarray(np.ones((c,), np.float32))}}

    def __call__(self, x: Array, state: State, train: bool) -> tuple[Array, State]:
        xf = x.astype(jnp.float32)
        cl = self.channels_last
        if train:
            spatial = (0, 1) if cl else (1, 2)
            mean = batch_mean(xf.mean(axis=spatial))
            var = batch_mean(jnp.square(xf - channel_vector(mean, cl)).mean(axis=spatial))
            _, h, w = chw_sizes(x.shape, cl)
            n = batch_count() * h * w
            running = state[self.name]
            m = self.momentum
            new = {
                "mean": (1 - m) * running["mean"] + m * mean,
                "var": (1 - m) * running["var"] + m * var * (n / max(n - 1, 1)),
            }
            state = {**state, self.name: new}
        else:
            mean, var = state[self.name]["mean"], state[self.name]["var"]
        scale = self.weight * lax.rsqrt(var + self.eps)
        y = xf * channel_vector(scale, cl) + channel_vector(self.bias - mean * scale, cl)
        return y.astype(x.dtype), state


class Normalize(eqx.Module):
    """Maps [0, 1] images to the model's expected input range; constants are static so export can fold them."""

    mean: tuple = eqx.field(static=True)
    std: tuple = eqx.field(static=True)

    def __call__(self, x: Array) -> Array:
        mean = jnp.asarray(self.mean, x.dtype)[:, None, None]
        std = jnp.asarray(self.std, x.dtype)[:, None, None]
        return (x - mean) / std


def run_stages(stages: list, x: Array, state: State, train: bool, feats: dict[str, Array], *,
               channels_last: bool = False) -> tuple[Array, State, Array]:
    """Run stages of residual blocks (`block(x, state, train) -> (x, state)`) in order, record each stage's output as
    `feats["stage<i>"]` (channels first, whatever the layout inside) and the globally pooled output as
    `feats["pre_logits"]`; returns `(x, state, pooled)`."""
    for i, stage in enumerate(stages):
        for block in stage:
            x, state = block(x, state, train)
        feats[f"stage{i + 1}"] = to_channels_first(x) if channels_last else x
    pooled = x.mean(axis=(0, 1) if channels_last else (1, 2))
    feats["pre_logits"] = pooled
    return x, state, pooled


def to_channels_last(x: Array) -> Array:
    """One (C, H, W) example as (H, W, C): how the convolutional families carry activations inside (see `Conv2d`)."""
    return jnp.transpose(x, (1, 2, 0))


def to_channels_first(x: Array) -> Array:
    """One (H, W, C) example as (C, H, W): features leave every family channels first, the contract of the methods."""
    return jnp.transpose(x, (2, 0, 1))


def max_pool(x: Array, kernel: int, stride: int, padding: int, *, channels_last: bool = False) -> Array:
    """Max-pool one (C, H, W) (or (H, W, C)) example, padding with -inf (PyTorch's MaxPool2d)."""
    return lax.reduce_window(
        x, -jnp.inf, lax.max, by_layout(channels_last, 1, kernel, kernel), by_layout(channels_last, 1, stride, stride),
        by_layout(channels_last, (0, 0), (padding, padding), (padding, padding)),
    )


def hard_sigmoid(x: Array) -> Array:
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def hard_swish(x: Array) -> Array:
    return x * hard_sigmoid(x)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round channels to a multiple of `divisor`, never dropping below `round_limit` of the request (timm's rule)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v
