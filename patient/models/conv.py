"""Convolution kernels under `Conv2d`: 1x1 convolutions as matrix products, depthwise convolutions as shifted
multiply-adds on CPU, every other convolution through `lax.conv` with a chunked kernel gradient, each on one example in
either activation layout, (C, H, W) or channels-last (H, W, C). Models reach them through `patient.models.layers.Conv2d`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.custom_batching
import jax.numpy as jnp
from jax import Array, lax


def pad_pairs(padding: int | tuple) -> tuple:
    """PyTorch-style padding (one int for all four sides, or per-side pairs) as ((top, bottom), (left, right))."""
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return tuple(tuple(p) for p in padding)


def channel_vector(v: Array, channels_last: bool) -> Array:
    """A per-channel (C,) vector shaped to broadcast against one (C, H, W) example, or (H, W, C) one."""
    return v if channels_last else v[:, None, None]


def by_layout(channels_last: bool, c: object, h: object, w: object) -> tuple:
    """(c, h, w) in the order of the example's axes: (h, w, c) when channels-last."""
    return (h, w, c) if channels_last else (c, h, w)


def chw_sizes(shape: tuple, channels_last: bool) -> tuple:
    """(C, H, W) sizes of one example's shape in either layout."""
    return (shape[2], shape[0], shape[1]) if channels_last else tuple(shape)


def pointwise_conv2d(x: Array, w: Array, stride: int, *, channels_last: bool = False) -> Array:
    """A 1x1 convolution without padding of one (C, H, W) (or channels-last (H, W, C)) example with an (O, C, 1, 1)
    kernel, as a matrix product (the semantics of `lax.conv_general_dilated` with that kernel, any stride: a strided
    1x1 conv reads every `stride`-th pixel). Under `vmap` it is one dot over all pixels of the batch, and so are both
    its gradients.

    XLA's CPU convolution runs 1x1 kernels far below its matrix-product speed; measured back to back on 2 quiet
    cores (batch 32, 128 px), the dot makes a ResNet-50 forward 1004 -> 821 ms and BiT-R50x1's 1275 -> 889 ms;
    MobileNetV3-Small's forward + backward (every gradient) went 292 -> 271 ms, and 212 ms once activations were
    channels-last (a product over pixel-major data, no layout copies around it). On GPU and TPU a 1x1 conv is a
    matrix product anyway. Export folds models into plain convolutions first, so exported graphs keep their Conv
    nodes."""
    acc = acc_dtype(x.dtype)
    if channels_last:
        x = x[::stride, ::stride] if stride > 1 else x
        return jnp.einsum("hwc,oc->hwo", x, w[:, :, 0, 0], preferred_element_type=acc).astype(x.dtype)
    x = x[:, ::stride, ::stride] if stride > 1 else x
    return jnp.einsum("oc,chw->ohw", w[:, :, 0, 0], x, preferred_element_type=acc).astype(x.dtype)


def lax_conv(x: Array, w: Array, stride: int, padding: tuple, groups: int, *, channels_last: bool = False) -> Array:
    """`lax.conv_general_dilated` on one (C, H, W) (or (H, W, C)) example; under `vmap` (how models are batched) one
    batched conv whose kernel gradient is computed in batch chunks on CPU (`_conv_program`)."""
    return _conv_program(stride, padding, groups, channels_last)(x, w)


# Bytes of input per chunk of the kernel gradient on CPU. Measured on 2 cores (B128 C16 32x32: 32 -> 15 ms; B32 C256
# 16x16: 193 -> 114 ms; B128 C64 8x8: 20 -> 11 ms): XLA's CPU kernel-gradient convolution over a whole batch runs on one
# thread with a poor memory pattern, while chunks of ~0.5 MB of input are independent ops the runtime runs in parallel.
_DW_CHUNK_BYTES = 1 << 19


def _batched_conv(x: Array, w: Array, stride: int, padding: tuple, groups: int, cl: bool) -> Array:
    act = "NHWC" if cl else "NCHW"
    return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=(act, "OIHW", act),
                                    feature_group_count=groups)


def _kernel_grad(x: Array, w: Array, g: Array, stride: int, padding: tuple, groups: int, cl: bool,
                 chunk: int) -> Array:
    """d(sum(g * conv(x, w)))/dw, summed over batch chunks of `chunk` examples (the whole batch when chunk >= B)."""
    total = 0
    for lo in range(0, x.shape[0], chunk):
        xs, gs = x[lo:lo + chunk], g[lo:lo + chunk]
        part = jax.vjp(lambda w_: _batched_conv(xs, w_, stride, padding, groups, cl), w)[1](gs)[0]
        total = total + part.astype(jnp.float32)  # chunks summed in float32 (bfloat16 sums would lose the small ones)
    return total.astype(w.dtype)


@functools.cache
def _conv_program(stride: int, padding: tuple, groups: int, cl: bool):
    """The one-example conv for a (stride, padding, groups, channels-last flag): a `custom_vmap` whose batched rule is a
    `custom_vjp` conv (input gradient as XLA derives it; kernel gradient chunked on CPU, whole elsewhere). A kernel that is itself
    batched (vmapped models) falls back to the plain batched conv."""

    @jax.custom_vjp
    def batched(x, w):
        return _batched_conv(x, w, stride, padding, groups, cl)

    def fwd(x, w):
        return _batched_conv(x, w, stride, padding, groups, cl), (x, w)

    def bwd(res, g):
        x, w = res
        dx = jax.vjp(lambda x_: _batched_conv(x_, w, stride, padding, groups, cl), x)[1](g)[0]
        chunk = max(1, _DW_CHUNK_BYTES // (math.prod(x.shape[1:]) * x.dtype.itemsize))
        dw = lax.platform_dependent(
            x, w, g, cpu=lambda x, w, g: _kernel_grad(x, w, g, stride, padding, groups, cl, chunk),
            default=lambda x, w, g: _kernel_grad(x, w, g, stride, padding, groups, cl, x.shape[0]))
        return dx, dw

    batched.defvjp(fwd, bwd)

    @jax.custom_batching.custom_vmap
    def one(x, w):
        return _batched_conv(x[None], w, stride, padding, groups, cl)[0]

    @one.def_vmap
    def _rule(axis_size, in_batched, x, w):
        x_batched, w_batched = in_batched
        if w_batched:
            plain = jax.vmap(lambda x_, w_: _batched_conv(x_[None], w_, stride, padding, groups, cl)[0],
                             in_axes=(0 if x_batched else None, 0))
            return plain(x, w), True
        return batched(x, w), True

    return one


def depthwise_conv2d(x: Array, w: Array, stride: int, padding: tuple, *, channels_last: bool = False) -> Array:
    """Depthwise convolution of one (C, H, W) (or channels-last (H, W, C)) example with a (C, 1, kh, kw) kernel; the
    semantics of `lax.conv_general_dilated(..., feature_group_count=C)` (PyTorch padding pairs, any stride).

    XLA's CPU backend runs grouped convolutions through a generic loop (a 3x3 depthwise conv on 32x96x32x32 takes
    ~190 ms forward and ~550 ms forward+backward on 2 cores, against ~20 ms forward+backward in PyTorch). On CPU this
    computes the same sum as kh*kw shifted multiply-adds, which XLA fuses into one loop, with a hand-written backward
    (`_dw_bwd`); other backends (GPU, TPU) keep `lax.conv`, which is fast there. Export never sees this function:
    it folds models into plain convolutions first.
    """
    padding = pad_pairs(padding)
    return lax.platform_dependent(
        x, w, cpu=functools.partial(_depthwise_shifted, stride=stride, padding=padding, cl=channels_last),
        default=lambda x, w: lax_conv(x, w, stride, padding, chw_sizes(x.shape, channels_last)[0],
                                       channels_last=channels_last))


def _windows(xp: Array, kh: int, kw: int, stride: int, out_hw: tuple, cl: bool):
    """The kh*kw strided windows of the padded example `xp` that tap (i, j) of the kernel reads, with (i, j)."""
    ho, wo = out_hw
    c = chw_sizes(xp.shape, cl)[0]
    for i in range(kh):
        for j in range(kw):
            yield i, j, lax.slice(xp, by_layout(cl, 0, i, j),
                                  by_layout(cl, c, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1),
                                  by_layout(cl, 1, stride, stride))


def _taps(w: Array, dtype) -> Array:
    """The (kh * kw, C) taps of a (C, 1, kh, kw) depthwise kernel, materialised contiguous. Channels-last examples
    broadcast a tap along their minor axis, so it must be a contiguous vector: a transpose of the kernel alone is
    turned into a strided view by XLA's layout assignment, which makes every multiply-add read the kernel with
    stride kh*kw (measured 2.8x slower than contiguous taps, B32 8x8x240 5x5)."""
    kh, kw = w.shape[2:]
    return lax.optimization_barrier(jnp.stack([w[:, 0, i, j] for i in range(kh) for j in range(kw)]).astype(dtype))


def acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)  # bfloat16 inputs accumulate in float32, as lax.conv does on CPU


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_shifted(x: Array, w: Array, stride: int, padding: tuple, cl: bool) -> Array:
    return _dw_forward(x, w, stride, padding, cl)


def _dw_forward(x, w, stride, padding, cl):
    c, h, wd = chw_sizes(x.shape, cl)
    kh, kw = w.shape[2:]
    (pt, pb), (pl, pr) = padding
    out_hw = ((h + pt + pb - kh) // stride + 1, (wd + pl + pr - kw) // stride + 1)
    acc = acc_dtype(x.dtype)
    xp = jnp.pad(x, by_layout(cl, (0, 0), (pt, pb), (pl, pr)))
    taps = _taps(w, acc)
    y = 0
    for i, j, win in _windows(xp, kh, kw, stride, out_hw, cl):
        y = y + channel_vector(taps[i * kw + j], cl) * win.astype(acc)
    return y.astype(x.dtype)


def _dw_fwd(x, w, stride, padding, cl):
    return _dw_forward(x, w, stride, padding, cl), (x, w)


def _dw_bwd(stride, padding, cl, res, g):
    """Input gradient: the output gradient, dilated by the stride and padded, correlated with the flipped kernel (one
    fused loop, like the forward). Kernel gradient: one variadic reduction with kh*kw outputs, so XLA reads `g` and
    the input once instead of kh*kw times (kh*kw separate reductions are ~4x slower on CPU)."""
    x, w = res
    c, h, wd = chw_sizes(x.shape, cl)
    kh, kw = w.shape[2:]
    ho, wo = chw_sizes(g.shape, cl)[1:]
    (pt, pb), (pl, pr) = padding
    acc = acc_dtype(x.dtype)
    zero = jnp.zeros((), g.dtype)
    # gd[p] = g[(p - (kh - 1)) / stride] where that is an integer in range, else 0, on the padded input's grid.
    gd = lax.pad(g, zero, by_layout(cl, (0, 0, 0), (kh - 1, h + pt + pb - stride * (ho - 1) - 1, stride - 1),
                                     (kw - 1, wd + pl + pr - stride * (wo - 1) - 1, stride - 1)))
    taps = _taps(w, acc)
    dx = 0
    for i in range(kh):
        for j in range(kw):
            r, q = kh - 1 - i + pt, kw - 1 - j + pl
            win = lax.slice(gd, by_layout(cl, 0, r, q), by_layout(cl, c, r + h, q + wd))
            dx = dx + channel_vector(taps[i * kw + j], cl) * win.astype(acc)
    xp = jnp.pad(x, by_layout(cl, (0, 0), (pt, pb), (pl, pr)))
    gf = g.astype(acc)
    prods = [gf * win.astype(acc) for _, _, win in _windows(xp, kh, kw, stride, (ho, wo), cl)]
    sums = lax.reduce(prods, [jnp.zeros((), acc)] * len(prods), lambda a, b: [u + v for u, v in zip(a, b)],
                      (0, 1) if cl else (1, 2))
    dw = jnp.stack(sums, axis=-1).reshape(w.shape)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_depthwise_shifted.defvjp(_dw_fwd, _dw_bwd)
