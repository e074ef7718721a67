"""Folding: a trained model becomes a plain network of constant-weight operations, ready to convert.

`fold(model, state)` returns a `FoldedNet`, a short tuple of operations with numpy weights. The operations are defined
in `fold_ops` (re-exported here); their JAX forward, shapes and MACs are here; each family's file says how its modules
become these ops (a `fold(state)` method on the model):

- BatchNorm (running statistics from `state`) is folded into the preceding convolution's weight and bias:
  `w' = w * g / sqrt(v + eps)`, `b' = (b - m) * g / sqrt(v + eps) + beta` (computed in float64, stored as float32).
- Weight standardisation (BiT's `StdConv2d`) is applied once; the kernel `conv.kernel()` returns is stored as a plain
  kernel, so no mean/variance of weights is computed at inference.
- The input normalisation `(x - mean) / std` is split. The scale `1 / std` is folded into the first convolution's
  kernel, which is exact. The mean is folded into the bias only when that convolution has no padding: with zero padding,
  the padded border of `x - mean` is 0 but the border of a bias-corrected `conv(x)` would be `-mean`, so the border
  outputs would differ. Every first convolution in the registry pads, so the network keeps one `Sub(mean)` on the
  input: one elementwise pass over 3 x H x W values (measured in onnxruntime: 0.03 ms of 1.8 ms for
  mobilenetv3_small_100 at 224 px, noise for resnet50). The alternative, a constant per-position bias map of the
  stem's output shape, is exact too but adds more work (O x H/2 x W/2 values) and a large constant.

`FoldedNet.forward(x, layout=...)` runs the folded network on a batch `f32[B, 3, H, W]` in [0, 1] in JAX, computing
internally in NCHW (ONNX's native layout: the ONNX graph needs no Transpose at all) or NHWC (TFLite's native layout: one
Transpose on the input). The layout also picks the max-pooling form each converter handles exactly (see `_max_pool`).
GroupNorm (BiT) depends on the data and stays an explicit normalisation.
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .fold_ops import (  # noqa: F401  (re-exported: families build their folds as F.<op>)
    Act,
    Attention,
    Conv,
    Flatten,
    GlobalPool,
    GroupNorm,
    LayerNorm,
    Linear,
    MaxPool,
    Pads,
    PatchTokens,
    Residual,
    SqueezeExcite,
    Sub,
    TakeTokens,
)

if TYPE_CHECKING:
    import equinox as eqx
    import jax

    from . import layers as L

    class _SqueezeExciteLike(Protocol):
        """What `fold_squeeze_excite` reads (MobileNetV3's `SqueezeExcite`): two biased 1x1 convolutions."""

        conv_reduce: L.Conv2d
        conv_expand: L.Conv2d

@dataclasses.dataclass(frozen=True, eq=False)
class FoldedNet:
    """A folded network: constant weights, batched forward in JAX, shape walk for MACs and resolution checks."""

    ops: tuple
    name: str
    num_classes: int
    resolution: int
    in_chans: int = 3

    def forward(self, x: jax.Array | np.ndarray, layout: str = "NCHW", *, hard_swish: str = "fused") -> jax.Array:
        """Logits `f32[B, K]` of images `f32[B, C, H, W]` in [0, 1] (the input is always NCHW).

        `hard_swish` picks how a hard-swish is written, for the converter that traces this: `"fused"`
        (`jax.nn.hard_swish`, which converters turn into one HARD_SWISH / HardSwish operator) or `"relu6"`
        (`relu6(x + 3) * x / 6`, which the TFLite converter keeps as ADD + RELU6 + MUL: int8 TFLite needs it, since
        XNNPACK runs HARD_SWISH in float only and an int8 one splits the graph into as many pieces). Same values.
        """
        import jax.numpy as jnp

        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
        if hard_swish not in ("fused", "relu6"):
            raise ValueError(f"hard_swish must be 'fused' or 'relu6', got {hard_swish!r}")
        x = jnp.asarray(x, jnp.float32)
        ops, _ = _at_size(self.ops, tuple(x.shape[1:]))
        if layout == "NHWC":
            x = jnp.transpose(x, (0, 2, 3, 1))
        token = _HARD_SWISH.set(hard_swish)
        try:
            return _run(ops, x, layout)
        finally:
            _HARD_SWISH.reset(token)

    def at_resolution(self, resolution: int) -> FoldedNet:
        """This network with its resolution-dependent constants (a ViT's position embeddings, resampled to the grid
        of patches) made for square inputs of `resolution` px, so a traced forward holds them as plain constants."""
        ops, changed = _at_size(self.ops, (self.in_chans, resolution, resolution))
        return dataclasses.replace(self, ops=ops) if changed else self

    def fold_sixths(self, *, keep_first: bool = False) -> FoldedNet:
        """The same function with each hard-swish's and hard-sigmoid's division by 6 moved into the weights of the
        next convolution or dense layer: hard-swish becomes `Act("hswish6")` (`x * clip(x + 3, 0, 6)`), a hard-sigmoid
        squeeze-excite gate becomes `relu6` with its + 3 in the expand bias. For int8 ONNX, where onnxruntime has no
        quantised HardSwish / HardSigmoid: written this way every activation is an int8 Add or Mul (Clip is absorbed
        into the quantisation range) instead of a float island between DequantizeLinear and QuantizeLinear.

        `keep_first` leaves the first activation (the stem's) as it is, for graphs that keep the stem in float.
        A network where some 1/6 would meet a non-linear op before a linear one (none in the registry) is returned
        unchanged."""
        from .fold_sixths import fold_sixths

        ops = fold_sixths(self.ops, keep_first=keep_first)
        return self if ops is None else dataclasses.replace(self, ops=ops)

    def shapes(self, resolution: int) -> list[tuple]:
        """Output shape (C, H, W), tokens (N, C) or (F,) after every top-level op for a square input; raises if a map
        vanishes."""
        shape: tuple = (self.in_chans, resolution, resolution)
        out = []
        for op in self.ops:
            shape, _ = _walk(op, shape)
            out.append(shape)
        return out

    def macs(self, resolution: int | None = None) -> int:
        """Multiply-accumulates of one image (convolutions, dense layers, attention products)."""
        shape: tuple = (self.in_chans, resolution or self.resolution, resolution or self.resolution)
        total = 0
        for op in self.ops:
            shape, m = _walk(op, shape)
            total += m
        return total

    def param_count(self) -> int:
        return sum(a.size for a in _arrays(self.ops))

    def stride(self) -> int:
        """Total downsampling of the main path (32 for the ImageNet networks, 4 for the CIFAR ResNets)."""
        return _stride(self.ops)


# ------------------------------------------------------------------------------------------------- folding


def fold(model: eqx.Module, state: dict[str, Any] | None) -> FoldedNet:
    """Fold `model` (a registry model) with BatchNorm running statistics from `state` into a `FoldedNet`.

    Each family folds itself: its top-level module has a `fold(state)` method returning the list of ops, built with the
    helpers below (`fold_conv`, `fold_input`, `fold_linear`, `fold_group_norm`, `fold_squeeze_excite`)."""
    from .spec import spec_of

    spec = spec_of(model)
    if not callable(getattr(model, "fold", None)):
        raise TypeError(f"cannot fold {type(model).__name__}: its family defines no fold(state) method")
    ops = model.fold(state or {})
    in_chans = int(np.asarray(_first_conv(ops).weight).shape[1])
    return FoldedNet(tuple(ops), spec.name, spec.num_classes, spec.resolution, in_chans)


def fold_conv(conv: L.Conv2d, bn: L.BatchNorm | None = None, state: L.State | None = None) -> Conv:
    """A Conv2d (weight-standardised if it is) with an optional BatchNorm folded in."""
    w = np.asarray(conv.kernel(), np.float64)  # the exact kernel the model convolves with (WS applied)
    b = np.zeros(w.shape[0]) if conv.bias is None else np.asarray(conv.bias, np.float64)
    has_bias = conv.bias is not None
    if bn is not None:
        mean = np.asarray(state[bn.name]["mean"], np.float64)
        var = np.asarray(state[bn.name]["var"], np.float64)
        scale = np.asarray(bn.weight, np.float64) / np.sqrt(var + bn.eps)
        w = w * scale[:, None, None, None]
        b = (b - mean) * scale + np.asarray(bn.bias, np.float64)
        has_bias = True
    return Conv(w.astype(np.float32), b.astype(np.float32) if has_bias else None, int(conv.stride),
                tuple(tuple(int(p) for p in pp) for pp in conv.padding), int(conv.groups))


def fold_input(normalize: L.Normalize, conv: Conv) -> list:
    """Fold `(x - mean) / std` into the first convolution (see the module docstring for why the mean usually stays)."""
    mean = np.asarray(normalize.mean, np.float64)
    std = np.asarray(normalize.std, np.float64)
    if conv.groups != 1:
        raise ValueError("the first convolution is grouped; cannot fold the input normalisation")
    w = np.asarray(conv.weight, np.float64) / std[None, :, None, None]
    b = None if conv.bias is None else np.asarray(conv.bias, np.float64)
    if all(p == 0 for pp in conv.padding for p in pp):
        b = (np.zeros(w.shape[0]) if b is None else b) - np.einsum("oihw,i->o", w, mean)
        return [Conv(w.astype(np.float32), b.astype(np.float32), conv.stride, conv.padding, conv.groups)]
    bias = None if b is None else b.astype(np.float32)
    folded = Conv(w.astype(np.float32), bias, conv.stride, conv.padding, conv.groups)
    return [Sub(tuple(float(m) for m in mean)), folded]


def fold_linear(fc: L.Linear) -> Linear:
    return Linear(np.ascontiguousarray(np.asarray(fc.weight, np.float32).T), np.asarray(fc.bias, np.float32))


def fold_group_norm(norm: L.GroupNorm) -> GroupNorm:
    return GroupNorm(np.asarray(norm.weight, np.float32), np.asarray(norm.bias, np.float32), int(norm.groups),
                     float(norm.eps))


def fold_squeeze_excite(se: _SqueezeExciteLike) -> SqueezeExcite:
    return SqueezeExcite(fold_conv(se.conv_reduce), fold_conv(se.conv_expand))


def _at_size(ops, shape: tuple) -> tuple[tuple, bool]:
    """`ops` with each `PatchTokens` resampled to the grid it gets from an input of `shape` (C, H, W); whether any
    changed. Resampling runs eagerly (numpy constants out), never inside a trace."""
    out, changed = [], False
    for op in ops:
        if isinstance(op, PatchTokens) and tuple(shape[1:]) != tuple(op.grid):
            import jax

            from .layers import resample_positions

            p = op.prefix.shape[0]
            with jax.ensure_compile_time_eval():
                grid = np.asarray(resample_positions(op.pos[p:], op.grid, shape[1:]), np.float32)
            op, changed = PatchTokens(op.prefix, np.concatenate([op.pos[:p], grid]), tuple(shape[1:])), True
        out.append(op)
        shape, _ = _walk(op, shape)
    return tuple(out), changed


def _first_conv(ops) -> Conv:
    for op in ops:
        if isinstance(op, Conv):
            return op
    raise ValueError("folded network has no convolution")


def _stride(ops) -> int:
    total = 1
    for op in ops:
        if isinstance(op, (Conv, MaxPool)):
            total *= op.stride
        elif isinstance(op, Residual):
            total *= _stride(op.pre + op.body)
    return total


def _arrays(ops):
    for op in ops:
        if isinstance(op, (Conv, Linear, GroupNorm, LayerNorm)):
            yield op.weight
            if op.bias is not None:
                yield op.bias
        elif isinstance(op, PatchTokens):
            yield from (op.prefix, op.pos)
        elif isinstance(op, Attention):
            yield from _arrays((op.qkv, op.proj))
        elif isinstance(op, SqueezeExcite):
            yield from _arrays((op.reduce, op.expand))
        elif isinstance(op, Residual):
            yield from _arrays(op.pre + op.body + (op.shortcut or ()))


# ------------------------------------------------------------------------------------------------- forward (JAX)


_HARD_SWISH: contextvars.ContextVar[str] = contextvars.ContextVar("hard_swish", default="fused")  # see forward


def _run(ops, x, layout):
    for op in ops:
        x = _apply(op, x, layout)
    return x


def _spatial(layout) -> tuple[int, int]:
    return (2, 3) if layout == "NCHW" else (1, 2)


def _per_channel(v, layout):
    import jax.numpy as jnp

    v = jnp.asarray(v, jnp.float32)
    return v[:, None, None] if layout == "NCHW" else v


def _apply(op, x, layout):
    import jax
    import jax.numpy as jnp
    from jax import lax

    if isinstance(op, Conv):
        if layout == "NCHW":
            w, dn = op.weight, ("NCHW", "OIHW", "NCHW")
        else:
            w, dn = np.ascontiguousarray(op.weight.transpose(2, 3, 1, 0)), ("NHWC", "HWIO", "NHWC")
        y = lax.conv_general_dilated(x, jnp.asarray(w), (op.stride, op.stride), op.padding, dimension_numbers=dn,
                                     feature_group_count=op.groups)
        return y if op.bias is None else y + _per_channel(op.bias, layout)
    if isinstance(op, Act):
        if op.kind == "gelu":
            return jax.nn.gelu(x, approximate=False)
        if op.kind == "relu":
            return jax.nn.relu(x)
        if op.kind == "hswish6":
            return x * jnp.clip(x + 3.0, 0.0, 6.0)
        # The operand order matters: x * relu6(x + 3) / 6 is matched back into HARD_SWISH by the TFLite converter.
        return jax.nn.relu6(x + 3.0) * x / 6.0 if _HARD_SWISH.get() == "relu6" else jax.nn.hard_swish(x)
    if isinstance(op, Sub):
        return x - _per_channel(np.asarray(op.mean, np.float32), layout)
    if isinstance(op, GroupNorm):
        b = x.shape[0]
        if layout == "NCHW":
            c, h, w = x.shape[1:]
            xg = x.reshape(b, op.groups, (c // op.groups) * h * w)
            axes = (2,)
        else:
            h, w, c = x.shape[1:]
            xg = x.reshape(b, h * w, op.groups, c // op.groups)
            axes = (1, 3)
        # jnp.mean(..., keepdims=True) lowers to one ReduceMean; the `.mean` method lowers to ReduceSum + Div + Expand.
        mean = jnp.mean(xg, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
        y = ((xg - mean) * lax.rsqrt(var + op.eps)).reshape(x.shape)
        return y * _per_channel(op.weight, layout) + _per_channel(op.bias, layout)
    if isinstance(op, MaxPool):
        return _max_pool(op, x, layout)
    if isinstance(op, SqueezeExcite):
        s = jnp.mean(x, axis=_spatial(layout), keepdims=True)
        s = _apply(op.expand, jax.nn.relu(_apply(op.reduce, s, layout)), layout)
        if op.gate == "relu6":
            return x * jnp.clip(s, 0.0, 6.0)
        return x * (jax.nn.hard_sigmoid(s) if op.gate == "hard_sigmoid" else jax.nn.sigmoid(s))
    if isinstance(op, Residual):
        pre = _run(op.pre, x, layout)
        y = _run(op.body, pre, layout)
        y = y + (x if op.shortcut is None else _run(op.shortcut, pre, layout))
        return y if op.post is None else _apply(Act(op.post), y, layout)
    if isinstance(op, PatchTokens):
        return _patch_tokens(op, x, layout)
    if isinstance(op, LayerNorm):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centred = x - mean
        var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        # written as division by a square root: the form onnxruntime's LayerNormFusion recognises
        return centred / jnp.sqrt(var + op.eps) * jnp.asarray(op.weight) + jnp.asarray(op.bias)
    if isinstance(op, Attention):
        b, n, c = x.shape
        h = op.heads
        # as torch's nn.MultiheadAttention-style graphs: one qkv product, heads by reshape + transpose, two matmuls
        qkv = jnp.transpose(_apply(op.qkv, x, layout).reshape(b, n, 3, h, c // h), (2, 0, 3, 1, 4))
        attn = jax.nn.softmax(jnp.matmul(qkv[0], jnp.swapaxes(qkv[1], -1, -2)), axis=-1)
        y = jnp.transpose(jnp.matmul(attn, qkv[2]), (0, 2, 1, 3)).reshape(b, n, c)
        return _apply(op.proj, y, layout)
    if isinstance(op, TakeTokens):
        return x[:, :op.count]
    if isinstance(op, GlobalPool):
        return jnp.mean(x, axis=_spatial(layout), keepdims=op.keepdims)
    if isinstance(op, Flatten):
        return x.reshape(x.shape[0], -1)
    if isinstance(op, Linear):
        if x.ndim > 2:  # tokens: one 2-D product (ONNX Gemm, TFLite FULLY_CONNECTED), not an Einsum / BATCH_MATMUL
            return _apply(op, x.reshape(-1, x.shape[-1]), layout).reshape(*x.shape[:-1], op.weight.shape[1])
        return x @ jnp.asarray(op.weight) + jnp.asarray(op.bias)
    raise TypeError(f"unknown folded op {op!r}")


def _patch_tokens(op: PatchTokens, x, layout):
    import jax.numpy as jnp

    b = x.shape[0]
    if layout == "NCHW":
        c, gh, gw = x.shape[1:]
        x = jnp.transpose(x.reshape(b, c, gh * gw), (0, 2, 1))
    else:
        gh, gw, c = x.shape[1:]
        x = x.reshape(b, gh * gw, c)
    if (gh, gw) != tuple(op.grid):
        raise ValueError(f"position embeddings for a {op.grid} grid of patches get {gh}x{gw}; FoldedNet.forward and "
                         "at_resolution resample them first")
    p = op.prefix.shape[0]
    prefix = op.prefix + op.pos[:p]
    # a fixed batch gets the tokens as one constant; a symbolic one broadcasts them
    prefix = np.broadcast_to(prefix, (b, p, c)) if isinstance(b, int) else jnp.broadcast_to(prefix[None], (b, p, c))
    return jnp.concatenate([jnp.asarray(prefix), x + jnp.asarray(op.pos[p:])[None]], axis=1)


def _max_pool(op: MaxPool, x, layout):
    """Max-pooling in the form each converter handles exactly (the layout also names the target: NCHW for ONNX,
    NHWC for TFLite).

    - -inf padding (or any padding of a non-negative input) for ONNX: `MaxPool` with pads.
    - Zero padding (or any padding of a non-negative input) for TFLite: PAD with zeros, then a VALID MAX_POOL_2D.
      The -inf form would need PADV2 with -inf, which int8 TFLite cannot represent.
    - Zero padding of a signed input (BiT's stem) for ONNX: `MaxPool` with -inf pads, then `Max` with a constant that
      is 0 where a window reaches into the padding and -inf elsewhere. The literal Pad + MaxPool is wrong in
      onnxruntime, whose PadFusion folds the Pad into MaxPool's -inf padding (onnxruntime PR 18136).
    """
    import jax.numpy as jnp
    from jax import lax

    k, s, p = op.kernel, op.stride, (op.padding, op.padding)
    if layout == "NCHW":
        window, strides, pads, spatial = (1, 1, k, k), (1, 1, s, s), ((0, 0), (0, 0), p, p), (2, 3)
    else:
        window, strides, pads, spatial = (1, k, k, 1), (1, s, s, 1), ((0, 0), p, p, (0, 0)), (1, 2)
    zero_ok = op.pad_value == 0.0 or op.nonneg_input
    if layout == "NHWC" and zero_ok and op.padding:
        return lax.reduce_window(jnp.pad(x, pads), -jnp.inf, lax.max, window, strides, "VALID")
    y = lax.reduce_window(x, -jnp.inf, lax.max, window, strides, pads)
    if op.pad_value == float("-inf") or op.nonneg_input or op.padding == 0:
        return y
    h, w = (x.shape[i] for i in spatial)
    mask = np.full(tuple(y.shape[i] for i in spatial), -np.inf, np.float32)
    for axis, n in ((0, h), (1, w)):
        starts = np.arange(mask.shape[axis]) * s - op.padding
        edge = (starts < 0) | (starts + k > n)
        if axis == 0:
            mask[edge, :] = op.pad_value
        else:
            mask[:, edge] = op.pad_value
    mask = mask[None, None] if layout == "NCHW" else mask[None, :, :, None]
    return jnp.maximum(y, jnp.asarray(mask))


# ------------------------------------------------------------------------------------------------- shapes and MACs


def _out(n: int, k: int, s: int, p0: int, p1: int) -> int:
    return (n + p0 + p1 - k) // s + 1


def _walk(op, shape: tuple) -> tuple[tuple, int]:
    """(output shape, MACs) of `op` on one example of `shape`; ValueError when a feature map would vanish."""
    if isinstance(op, Conv):
        c, h, w = shape
        o, i, kh, kw = op.weight.shape
        if c != i * op.groups:
            raise ValueError(f"conv expects {i * op.groups} channels, got {c}")
        (pt, pb), (pl, pr) = op.padding
        ho, wo = _out(h, kh, op.stride, pt, pb), _out(w, kw, op.stride, pl, pr)
        if ho < 1 or wo < 1:
            raise ValueError(f"a {kh}x{kw}/{op.stride} convolution gets a {h}x{w} map and outputs nothing")
        if kh == kw == op.stride > 1 and not any(p for pp in op.padding for p in pp) and (h % kh or w % kw):
            raise ValueError(f"a {kh}x{kw}/{op.stride} patch convolution gets a {h}x{w} map, not a multiple of "
                             f"{kh} (it would drop the last pixels); use a multiple of {kh}")
        return (o, ho, wo), o * ho * wo * i * kh * kw
    if isinstance(op, MaxPool):
        c, h, w = shape
        ho, wo = (_out(n, op.kernel, op.stride, op.padding, op.padding) for n in (h, w))
        if ho < 1 or wo < 1:
            raise ValueError(f"a {op.kernel}x{op.kernel}/{op.stride} max-pool gets a {h}x{w} map and outputs nothing")
        return (c, ho, wo), 0
    if isinstance(op, SqueezeExcite):
        c = shape[0]
        _, m1 = _walk(op.reduce, (c, 1, 1))
        _, m2 = _walk(op.expand, (op.reduce.weight.shape[0], 1, 1))
        return shape, m1 + m2
    if isinstance(op, Residual):
        total, pre = 0, shape
        for o in op.pre:
            pre, m = _walk(o, pre)
            total += m
        y = pre
        for o in op.body:
            y, m = _walk(o, y)
            total += m
        s = shape
        if op.shortcut is not None:
            s = pre
            for o in op.shortcut:
                s, m = _walk(o, s)
                total += m
        if s != y:
            raise ValueError(f"residual branches disagree: {y} vs {s}")
        return y, total
    if isinstance(op, PatchTokens):
        c, h, w = shape
        if c != op.pos.shape[1]:
            raise ValueError(f"patch tokens of width {op.pos.shape[1]} get {c} channels")
        return (op.prefix.shape[0] + h * w, c), 0
    if isinstance(op, Attention):
        n, c = shape
        return shape, 4 * n * c * c + 2 * n * n * c
    if isinstance(op, TakeTokens):
        return (op.count, shape[1]), 0
    if isinstance(op, GlobalPool):
        return ((shape[0], 1, 1) if op.keepdims else (shape[0],)), 0
    if isinstance(op, Flatten):
        return (int(np.prod(shape)),), 0
    if isinstance(op, Linear):
        rows = int(np.prod(shape[:-1]))  # one row per token, or 1 for a vector
        return (*shape[:-1], op.weight.shape[1]), rows * int(op.weight.size)
    return shape, 0  # elementwise ops, normalisations
