"""Dense and grouped convolutions (`Conv2d` under `vmap`: a batched conv whose kernel gradient is summed over batch
chunks on CPU) and GroupNorm (grouped without flattening), against float64 references.

Gradients: `jax.grad` of `lax.conv_general_dilated` in float64. The chunk size is forced small so the last chunk is
uneven and every example lands in some chunk exactly once.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from lanes import fast_only

from patient.models import conv as kernels
from patient.models.layers import BATCH_AXIS, BatchNorm, Conv2d, GroupNorm

CASES = [  # (in, out, groups, kernel, stride, padding, size)
    (6, 8, 1, 3, 1, ((1, 1), (1, 1)), 9),
    (6, 8, 1, 3, 2, ((1, 1), (1, 1)), 10),
    (6, 8, 1, 1, 1, ((0, 0), (0, 0)), 7),
    (6, 8, 1, 1, 2, ((0, 0), (0, 0)), 8),
    (3, 4, 1, 7, 2, ((3, 3), (3, 3)), 11),  # a ResNet stem
    (8, 8, 4, 3, 1, ((1, 1), (1, 1)), 9),  # grouped (RegNet), not depthwise
    (4, 6, 1, 3, 2, ((0, 1), (0, 1)), 8),  # asymmetric padding
]


def _ref_conv(x, w, stride, padding, groups):
    return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                    feature_group_count=groups)


def _last(a):
    """(B, C, H, W) -> (B, H, W, C): channels-last examples meet the same channels-first reference, transposed."""
    return jnp.transpose(jnp.asarray(a), (0, 2, 3, 1))


# Examples per chunk of 5: one each, 2 + 2 + 1 (the fast lane), the whole batch (as on other backends).
@pytest.mark.parametrize("cl", fast_only([False, True], keep=[False, True]), ids=["chw", "hwc"])
@pytest.mark.parametrize("chunk", fast_only([1, 2, 5], keep=[2]))
@pytest.mark.parametrize("case", CASES)
def test_gradients_equal_float64_lax_conv(case, chunk, cl, monkeypatch):
    cin, cout, g, k, s, p, n = case
    monkeypatch.setattr(kernels, "_DW_CHUNK_BYTES", chunk * cin * n * n * 4)
    kernels._conv_program.cache_clear()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, cin, n, n)).astype(np.float32)
    w = rng.standard_normal((cout, cin // g, k, k)).astype(np.float32)
    out_shape = _ref_conv(x, w, s, p, g).shape
    cot = rng.standard_normal(out_shape)

    with jax.enable_x64(True):
        y_ref = _ref_conv(x.astype(np.float64), w.astype(np.float64), s, p, g)
        gx_ref, gw_ref = jax.grad(lambda x, w: jnp.sum(_ref_conv(x, w, s, p, g) * cot), argnums=(0, 1))(
            x.astype(np.float64), w.astype(np.float64))

    if cl:
        x, cot, y_ref, gx_ref = _last(x), _last(cot), _last(y_ref), _last(gx_ref)

    def loss(x, w):
        y = jax.vmap(lambda xi: kernels.lax_conv(xi, w, s, p, g, channels_last=cl))(x)
        return jnp.sum(y * jnp.asarray(cot, jnp.float32)), y

    (_, y), (gx, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
    kernels._conv_program.cache_clear()
    for got, ref in [(y, y_ref), (gx, gx_ref), (gw, gw_ref)]:
        assert got.dtype == jnp.float32 and got.shape == ref.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=2e-5 * float(np.abs(ref).max()))


def test_one_example_and_batched_kernels_take_the_plain_path(getkey):
    """Without vmap the layer is one conv; with a vmapped kernel (several models at once) it is per-model convs."""
    conv = Conv2d(4, 6, 3, key=getkey())
    x = jax.random.normal(getkey(), (2, 4, 8, 8))
    ref = _ref_conv(x, conv.weight, 1, conv.padding, 1)
    np.testing.assert_allclose(conv(x[0]), ref[0], rtol=0, atol=1e-5)
    ws = jnp.stack([conv.weight, 2 * conv.weight])
    ys = jax.vmap(lambda w: jax.vmap(lambda xi: kernels.lax_conv(xi, w, 1, conv.padding, 1))(x))(ws)
    np.testing.assert_allclose(ys[1], 2 * ref, rtol=0, atol=1e-4)
    gs = jax.vmap(jax.grad(lambda w: jnp.sum(jax.vmap(lambda xi: kernels.lax_conv(xi, w, 1, conv.padding, 1))(x))))(ws)
    g_ref = jax.grad(lambda w: jnp.sum(_ref_conv(x, w, 1, conv.padding, 1)))(conv.weight)
    np.testing.assert_allclose(gs[0], g_ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_group_norm_equals_float64_numpy(groups):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 5, 6)).astype(np.float32) * 3 + 1
    weight, bias = rng.standard_normal(16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    gn = eqx.tree_at(lambda m: (m.weight, m.bias), GroupNorm(16, groups), (jnp.asarray(weight), jnp.asarray(bias)))
    xg = x.astype(np.float64).reshape(groups, -1)
    ref = ((xg - xg.mean(1, keepdims=True)) / np.sqrt(xg.var(1, keepdims=True) + 1e-5)).reshape(x.shape)
    ref = ref * weight[:, None, None] + bias[:, None, None]
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, x: m(x))(gn, x)), ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    with pytest.raises(ValueError, match="divisible"):
        GroupNorm(10, 4)


@pytest.mark.parametrize("cl", [False, True], ids=["chw", "hwc"])
@pytest.mark.parametrize("stride, size", [(1, 7), (2, 8), (2, 9), (3, 10)])
@pytest.mark.parametrize("bias", [False, True])
def test_pointwise_conv_equals_float64_lax_conv(stride, size, bias, cl, getkey):
    """A 1x1 `Conv2d` runs as a matrix product (`pointwise_conv2d`); under vmap its output and both gradients equal
    float64 `lax.conv` with the same kernel, strided ones included (odd sizes: the last row and column are read), in
    both activation layouts."""
    conv = Conv2d(6, 8, 1, stride=stride, padding=0, bias=bias, channels_last=cl, key=getkey())
    if bias:
        conv = eqx.tree_at(lambda c: c.bias, conv, jax.random.normal(getkey(), (8,)))
    assert conv.padding == ((0, 0), (0, 0))
    rng = np.random.default_rng(stride * 100 + size)
    x = rng.standard_normal((5, 6, size, size)).astype(np.float32)
    w = np.asarray(conv.weight)
    b = np.zeros(8) if conv.bias is None else np.asarray(conv.bias, np.float64)
    cot = rng.standard_normal(_ref_conv(x, w, stride, conv.padding, 1).shape)

    def ref(x, w):
        return _ref_conv(x, w, stride, conv.padding, 1) + b[:, None, None]

    with jax.enable_x64(True):
        y_ref = ref(x.astype(np.float64), w.astype(np.float64))
        gx_ref, gw_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) * cot), argnums=(0, 1))(
            x.astype(np.float64), w.astype(np.float64))
    if cl:
        x, cot, y_ref, gx_ref = _last(x), _last(cot), _last(y_ref), _last(gx_ref)

    def loss(conv, x):
        y = jax.vmap(conv)(x)
        return jnp.sum(y * jnp.asarray(cot, jnp.float32)), y

    (_, y), (gc, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(conv, x)
    for got, want in [(y, y_ref), (gx, gx_ref), (gc.weight, gw_ref)]:
        assert got.dtype == jnp.float32 and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5 * float(np.abs(want).max()))
    jaxpr = str(jax.make_jaxpr(jax.vmap(conv))(x))
    assert "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr  # the matrix-product path is the one taken


def test_pointwise_conv_in_bfloat16_accumulates_in_float32(getkey):
    conv = Conv2d(64, 4, 1, key=getkey())
    x = jax.random.normal(getkey(), (2, 64, 3, 3)).astype(jnp.bfloat16)
    y = jax.vmap(conv)(x)
    assert y.dtype == jnp.bfloat16
    with jax.enable_x64(True):
        want = _ref_conv(np.asarray(x, np.float64), np.asarray(conv.weight.astype(jnp.bfloat16), np.float64), 1,
                         conv.padding, 1)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=0, atol=0.01 * float(np.abs(want).max()))


@pytest.mark.parametrize("train", [True, False])
def test_channels_last_batch_norm_equals_float64_numpy(train):
    """BatchNorm on (H, W, C) examples: batch statistics over batch and pixels per channel, the running statistics'
    update (unbiased variance), and the affine map, against float64 numpy; the channels-first layer agrees."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 5, 6, 7)).astype(np.float32) * 2 + 0.5  # (B, H, W, C)
    weight, bias = rng.standard_normal(7).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    run_mean, run_var = rng.standard_normal(7).astype(np.float32), rng.uniform(0.5, 2, 7).astype(np.float32)
    outs = {}
    for cl in (True, False):
        bn = eqx.tree_at(lambda m: (m.weight, m.bias), BatchNorm(7, "bn", channels_last=cl),
                         (jnp.asarray(weight), jnp.asarray(bias)))
        state = {"bn": {"mean": jnp.asarray(run_mean), "var": jnp.asarray(run_var)}}
        xi = x if cl else np.transpose(x, (0, 3, 1, 2))
        y, new = jax.vmap(lambda xe: bn(xe, state, train), axis_name=BATCH_AXIS, out_axes=(0, None))(xi)
        outs[cl] = (np.asarray(y) if cl else np.transpose(np.asarray(y), (0, 2, 3, 1)), new)
    x64 = x.astype(np.float64)
    if train:
        mean, var = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
        n = x.size // 7
        want_mean, want_var = 0.9 * run_mean + 0.1 * mean, 0.9 * run_var + 0.1 * var * n / (n - 1)
    else:
        mean, var = run_mean.astype(np.float64), run_var.astype(np.float64)
        want_mean, want_var = run_mean, run_var
    want = (x64 - mean) / np.sqrt(var + 1e-5) * weight + bias
    for y, new in outs.values():
        np.testing.assert_allclose(y, want, rtol=0, atol=2e-5 * np.abs(want).max())
        np.testing.assert_allclose(np.asarray(new["bn"]["mean"]), want_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(new["bn"]["var"]), want_var, rtol=1e-5, atol=1e-6)


def test_standardise_kernels_once_gives_the_same_network(getkey):
    """A frozen teacher standardises BiT's kernels once (`standardise_kernels`, used by the trainer): the result
    holds no weight-standardised convolution, leaves the model it was given alone, and computes what it computed
    (features and logits, with a random head so the logits are not BiT's zero-initialised ones); a model without
    weight standardisation comes back as it was."""
    from patient.models import create
    from patient.models.layers import standardise_kernels
    from patient.models.registry import apply

    model, state = create("bit_r26x1_cifar", num_classes=10, key=getkey(), resolution=16, depths=(1, 1, 1, 1),
                          width=0.5)
    model = eqx.tree_at(lambda m: m.head.fc.weight, model, jax.random.normal(getkey(), model.head.fc.weight.shape))

    def ws(m):
        convs = jax.tree_util.tree_leaves(m, is_leaf=lambda c: isinstance(c, Conv2d))
        return [c for c in convs if isinstance(c, Conv2d) and c.ws_eps is not None]

    frozen = standardise_kernels(model)
    assert len(ws(model)) > 10 and ws(frozen) == []
    first = ws(model)[0]
    np.testing.assert_allclose(np.asarray(first.kernel()).std(axis=(1, 2, 3)), 1.0, rtol=1e-3)
    x = jax.random.uniform(getkey(), (4, 3, 16, 16))
    want, got = apply(model, state, x, train=False), apply(frozen, state, x, train=False)
    assert float(jnp.abs(want[0]).max()) > 0.1
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=0, atol=1e-5)
    for name in want[1]:
        np.testing.assert_allclose(np.asarray(got[1][name]), np.asarray(want[1][name]), rtol=0, atol=1e-5)
    plain, _ = create("cifar_resnet20", num_classes=10, key=getkey(), resolution=16, depths=(1, 1, 1))
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(plain),
                                      jax.tree_util.tree_leaves(standardise_kernels(plain))))
