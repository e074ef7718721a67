"""Small layers every model family is built from.

Each layer acts on ONE example, channels first (C, H, W); batching is `jax.vmap(..., axis_name="batch")` in
`patient.models.apply`. Layers with running statistics (BatchNorm) read and write a plain dict state keyed by the
layer's dotted name, so the same name identifies the statistic in a timm state dict, in a checkpoint and in the .eqx file.
"""

from __future__ import annotations

import contextvars
import functools
import math

import equinox as eqx
import jax
import jax.custom_batching
import jax.numpy as jnp
import numpy as np
from jax import lax

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


def _pad_pairs(padding: int | tuple) -> tuple:
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return tuple(tuple(p) for p in padding)


class Conv2d(eqx.Module):
    """2-D convolution on one (C, H, W) example, PyTorch padding conventions.

    With `ws_eps` set the kernel is weight-standardised (per output channel, biased variance) before use, as BiT's
    `StdConv2d` does; the stored `weight` stays the raw parameter.
    """

    weight: Array  # (O, I // groups, kh, kw)
    bias: Array | None
    stride: int = eqx.field(static=True)
    padding: tuple = eqx.field(static=True)
    groups: int = eqx.field(static=True)
    ws_eps: float | None = eqx.field(static=True)

    def __init__(self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, padding: int | tuple | None = None,
                 groups: int = 1, bias: bool = False, ws_eps: float | None = None, key: Array | None):
        if padding is None:
            padding = ((stride - 1) + (kernel - 1)) // 2  # timm's get_padding for dilation 1
        fan_out = out_ch * kernel * kernel // groups
        w = host_rng(key).standard_normal((out_ch, in_ch // groups, kernel, kernel), dtype=np.float32)
        self.weight = jnp.asarray(w * np.float32(math.sqrt(2.0 / fan_out)))
        self.bias = jnp.asarray(np.zeros((out_ch,), np.float32)) if bias else None
        self.stride = stride
        self.padding = _pad_pairs(padding)
        self.groups = groups
        self.ws_eps = ws_eps

    def kernel(self) -> Array:
        """The kernel actually convolved with (weight-standardised when `ws_eps` is set)."""
        w = self.weight
        if self.ws_eps is not None:
            mean = w.mean(axis=(1, 2, 3), keepdims=True)
            var = w.var(axis=(1, 2, 3), keepdims=True)
            w = (w - mean) * lax.rsqrt(var + self.ws_eps)
        return w

    def __call__(self, x: Array) -> Array:
        w = self.kernel().astype(x.dtype)
        if self.groups == 1 and w.shape[2:] == (1, 1) and self.padding == ((0, 0), (0, 0)):
            y = pointwise_conv2d(x, w, self.stride)
        elif self.groups > 1 and self.groups == w.shape[0] and w.shape[1] == 1:
            y = depthwise_conv2d(x, w, self.stride, self.padding)
        else:
            y = _lax_conv(x, w, self.stride, self.padding, self.groups)
        if self.bias is not None:
            y = y + self.bias.astype(x.dtype)[:, None, None]
        return y


def pointwise_conv2d(x: Array, w: Array, stride: int) -> Array:
    """A 1x1 convolution without padding of one (C, H, W) example with an (O, C, 1, 1) kernel, as a matrix product
    (the semantics of `lax.conv_general_dilated` with that kernel, any stride: a strided 1x1 conv reads every
    `stride`-th pixel). Under `vmap` it is one dot over all pixels of the batch, and so are both its gradients.

    XLA's CPU convolution runs 1x1 kernels far below its matrix-product speed; measured back to back on 2 quiet
    cores (batch 32, 128 px), the dot makes a ResNet-50 forward 1004 -> 821 ms, BiT-R50x1's 1275 -> 889 ms and
    MobileNetV3-Small's forward + backward 331 -> 254 ms. On GPU and TPU a 1x1 conv is a matrix product anyway.
    Export folds models into plain convolutions first, so exported graphs keep their Conv nodes."""
    if stride > 1:
        x = x[:, ::stride, ::stride]
    y = jnp.einsum("oc,chw->ohw", w[:, :, 0, 0], x, preferred_element_type=_acc_dtype(x.dtype))
    return y.astype(x.dtype)


def _lax_conv(x: Array, w: Array, stride: int, padding: tuple, groups: int) -> Array:
    """`lax.conv_general_dilated` on one (C, H, W) example; under `vmap` (how models are batched) one batched conv
    whose kernel gradient is computed in batch chunks on CPU (`_conv_program`)."""
    return _conv_program(stride, padding, groups)(x, w)


# Bytes of input per chunk of the kernel gradient on CPU. Measured on 2 cores (B128 C16 32x32: 32 -> 15 ms; B32 C256
# 16x16: 193 -> 114 ms; B128 C64 8x8: 20 -> 11 ms): XLA's CPU kernel-gradient convolution over a whole batch runs on one
# thread with a poor memory pattern, while chunks of ~0.5 MB of input are independent ops the runtime runs in parallel.
_DW_CHUNK_BYTES = 1 << 19


def _batched_conv(x: Array, w: Array, stride: int, padding: tuple, groups: int) -> Array:
    return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                    feature_group_count=groups)


def _kernel_grad(x: Array, w: Array, g: Array, stride: int, padding: tuple, groups: int, chunk: int) -> Array:
    """d(sum(g * conv(x, w)))/dw, summed over batch chunks of `chunk` examples (the whole batch when chunk >= B)."""
    total = 0
    for lo in range(0, x.shape[0], chunk):
        xs, gs = x[lo:lo + chunk], g[lo:lo + chunk]
        part = jax.vjp(lambda w_: _batched_conv(xs, w_, stride, padding, groups), w)[1](gs)[0]
        total = total + part.astype(jnp.float32)  # chunks summed in float32 (bfloat16 sums would lose the small ones)
    return total.astype(w.dtype)


@functools.cache
def _conv_program(stride: int, padding: tuple, groups: int):
    """The one-example conv for a (stride, padding, groups): a `custom_vmap` whose batched rule is a `custom_vjp`
    conv (input gradient as XLA derives it; kernel gradient chunked on CPU, whole elsewhere). A kernel that is itself
    batched (vmapped models) falls back to the plain batched conv."""

    @jax.custom_vjp
    def batched(x, w):
        return _batched_conv(x, w, stride, padding, groups)

    def fwd(x, w):
        return _batched_conv(x, w, stride, padding, groups), (x, w)

    def bwd(res, g):
        x, w = res
        dx = jax.vjp(lambda x_: _batched_conv(x_, w, stride, padding, groups), x)[1](g)[0]
        chunk = max(1, _DW_CHUNK_BYTES // (math.prod(x.shape[1:]) * x.dtype.itemsize))
        dw = lax.platform_dependent(
            x, w, g, cpu=lambda x, w, g: _kernel_grad(x, w, g, stride, padding, groups, chunk),
            default=lambda x, w, g: _kernel_grad(x, w, g, stride, padding, groups, x.shape[0]))
        return dx, dw

    batched.defvjp(fwd, bwd)

    @jax.custom_batching.custom_vmap
    def one(x, w):
        return _batched_conv(x[None], w, stride, padding, groups)[0]

    @one.def_vmap
    def _rule(axis_size, in_batched, x, w):
        x_batched, w_batched = in_batched
        if w_batched:
            plain = jax.vmap(lambda x_, w_: _batched_conv(x_[None], w_, stride, padding, groups)[0],
                             in_axes=(0 if x_batched else None, 0))
            return plain(x, w), True
        return batched(x, w), True

    return one


def depthwise_conv2d(x: Array, w: Array, stride: int, padding: tuple) -> Array:
    """Depthwise convolution of one (C, H, W) example with a (C, 1, kh, kw) kernel; the semantics of
    `lax.conv_general_dilated(..., feature_group_count=C)` (PyTorch padding pairs, any stride).

    XLA's CPU backend runs grouped convolutions through a generic loop (a 3x3 depthwise conv on 32x96x32x32 takes
    ~190 ms forward and ~550 ms forward+backward on 2 cores, against ~20 ms forward+backward in PyTorch). On CPU this
    computes the same sum as kh*kw shifted multiply-adds, which XLA fuses into one loop, with a hand-written backward
    (`_dw_bwd`); other backends (GPU, TPU) keep `lax.conv`, which is fast there. Export never sees this function:
    it folds models into plain convolutions first.
    """
    padding = _pad_pairs(padding)
    return lax.platform_dependent(x, w, cpu=functools.partial(_depthwise_shifted, stride=stride, padding=padding),
                                  default=lambda x, w: _lax_conv(x, w, stride, padding, x.shape[0]))


def _windows(xp: Array, kh: int, kw: int, stride: int, out_hw: tuple):
    """The kh*kw strided windows of the padded (C, Hp, Wp) `xp` that tap (i, j) of the kernel reads, with (i, j)."""
    ho, wo = out_hw
    for i in range(kh):
        for j in range(kw):
            yield i, j, lax.slice(xp, (0, i, j), (xp.shape[0], i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1),
                                  (1, stride, stride))


def _acc_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)  # bfloat16 inputs accumulate in float32, as lax.conv does on CPU


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shifted(x: Array, w: Array, stride: int, padding: tuple) -> Array:
    return _dw_forward(x, w, stride, padding)


def _dw_forward(x, w, stride, padding):
    c, h, wd = x.shape
    kh, kw = w.shape[2:]
    (pt, pb), (pl, pr) = padding
    out_hw = ((h + pt + pb - kh) // stride + 1, (wd + pl + pr - kw) // stride + 1)
    acc = _acc_dtype(x.dtype)
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr)))
    y = 0
    for i, j, win in _windows(xp, kh, kw, stride, out_hw):
        y = y + w[:, 0, i, j, None, None].astype(acc) * win.astype(acc)
    return y.astype(x.dtype)


def _dw_fwd(x, w, stride, padding):
    return _dw_forward(x, w, stride, padding), (x, w)


def _dw_bwd(stride, padding, res, g):
    """Input gradient: the output gradient, dilated by the stride and padded, correlated with the flipped kernel (one
    fused loop, like the forward). Kernel gradient: one variadic reduction with kh*kw outputs, so XLA reads `g` and
    the input once instead of kh*kw times (kh*kw separate reductions are ~4x slower on CPU)."""
    x, w = res
    c, h, wd = x.shape
    kh, kw = w.shape[2:]
    ho, wo = g.shape[1:]
    (pt, pb), (pl, pr) = padding
    acc = _acc_dtype(x.dtype)
    zero = jnp.zeros((), g.dtype)
    # gd[p] = g[(p - (kh - 1)) / stride] where that is an integer in range, else 0, on the padded input's grid.
    gd = lax.pad(g, zero, ((0, 0, 0), (kh - 1, h + pt + pb - stride * (ho - 1) - 1, stride - 1),
                           (kw - 1, wd + pl + pr - stride * (wo - 1) - 1, stride - 1)))
    dx = 0
    for i in range(kh):
        for j in range(kw):
            win = lax.slice(gd, (0, kh - 1 - i + pt, kw - 1 - j + pl), (c, kh - 1 - i + pt + h, kw - 1 - j + pl + wd))
            dx = dx + w[:, 0, i, j, None, None].astype(acc) * win.astype(acc)
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr)))
    gf = g.astype(acc)
    prods = [gf * win.astype(acc) for _, _, win in _windows(xp, kh, kw, stride, (ho, wo))]
    sums = lax.reduce(prods, [jnp.zeros((), acc)] * len(prods), lambda a, b: [u + v for u, v in zip(a, b)], (1, 2))
    dw = jnp.stack(sums, axis=-1).reshape(w.shape)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_depthwise_shifted.defvjp(_dw_fwd, _dw_bwd)


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
    """GroupNorm over (C, H, W) with per-channel affine; statistics in float32 whatever the input dtype."""

    weight: Array
    bias: Array
    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-5):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups; pick a width that is.")
        self.weight = jnp.asarray(np.ones((channels,), np.float32))
        self.bias = jnp.asarray(np.zeros((channels,), np.float32))
        self.groups = groups
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        c, h, w = x.shape
        # (G, C/G, H, W) keeps channels innermost in XLA CPU's NHWC layout; flattening a group to one axis would make
        # XLA transpose the whole activation (a quarter of BiT's forward time).
        xg = x.astype(jnp.float32).reshape(self.groups, c // self.groups, h, w)
        mean = xg.mean(axis=(1, 2, 3), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 3), keepdims=True)
        scale = lax.rsqrt(var + self.eps) * self.weight.reshape(self.groups, -1, 1, 1)
        y = xg * scale + (self.bias.reshape(self.groups, -1, 1, 1) - mean * scale)
        return y.reshape(c, h, w).astype(x.dtype)


class BatchNorm(eqx.Module):
    """BatchNorm2d with PyTorch semantics (momentum 0.1, unbiased running variance, biased batch variance).

    In training the statistics are reduced over the vmapped `batch` axis and, inside the train step's `shard_map`, over
    the mesh's data axis too (`batch_mean`), so they are statistics of the global batch. Running statistics live in
    `state[self.name]`.
    """

    weight: Array
    bias: Array
    name: str = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    momentum: float = eqx.field(static=True)

    def __init__(self, channels: int, name: str, *, eps: float = 1e-5, momentum: float = 0.1):
        self.weight = jnp.asarray(np.ones((channels,), np.float32))
        self.bias = jnp.asarray(np.zeros((channels,), np.float32))
        self.name = name
        self.eps = eps
        self.momentum = momentum

    def init_state(self) -> State:
        c = self.weight.shape[0]
        return {self.name: {"mean": jnp.asarray(np.zeros((c,), np.float32)), "var": jnp.asarray(np.ones((c,), np.float32))}}

    def __call__(self, x: Array, state: State, train: bool) -> tuple[Array, State]:
        xf = x.astype(jnp.float32)
        if train:
            mean = batch_mean(xf.mean(axis=(1, 2)))
            var = batch_mean(jnp.square(xf - mean[:, None, None]).mean(axis=(1, 2)))
            n = batch_count() * x.shape[1] * x.shape[2]
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
        y = xf * scale[:, None, None] + (self.bias - mean * scale)[:, None, None]
        return y.astype(x.dtype), state


class Normalize(eqx.Module):
    """Maps [0, 1] images to the model's expected input range; constants are static so export can fold them."""

    mean: tuple = eqx.field(static=True)
    std: tuple = eqx.field(static=True)

    def __call__(self, x: Array) -> Array:
        mean = jnp.asarray(self.mean, x.dtype)[:, None, None]
        std = jnp.asarray(self.std, x.dtype)[:, None, None]
        return (x - mean) / std


def run_stages(stages: list, x: Array, state: State, train: bool,
               feats: dict[str, Array]) -> tuple[Array, State, Array]:
    """Run stages of residual blocks (`block(x, state, train) -> (x, state)`) in order, record each stage's output as
    `feats["stage<i>"]` and the globally pooled output as `feats["pre_logits"]`; returns `(x, state, pooled)`."""
    for i, stage in enumerate(stages):
        for block in stage:
            x, state = block(x, state, train)
        feats[f"stage{i + 1}"] = x
    pooled = x.mean(axis=(1, 2))
    feats["pre_logits"] = pooled
    return x, state, pooled


def max_pool(x: Array, kernel: int, stride: int, padding: int) -> Array:
    """Max-pool one (C, H, W) example, padding with -inf (PyTorch's MaxPool2d)."""
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, kernel, kernel), (1, stride, stride),
        ((0, 0), (padding, padding), (padding, padding)),
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
