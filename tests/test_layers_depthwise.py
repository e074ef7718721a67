"""The CPU depthwise convolution (shifted multiply-adds, hand-written backward) against float64 references.

Forward: a float64 numpy loop over kernel taps written here. Gradients: `jax.grad` of `lax.conv_general_dilated` with
`feature_group_count=C` in float64 (the reference XLA implements). Strides 1 and 2, kernels 3 and 5, odd and even
sizes, symmetric (timm) and asymmetric padding; channels-first (C, H, W) and channels-last (H, W, C) examples (the
channels-last ones are the same arrays transposed, so both layouts meet the same reference).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from patient.models.conv import _depthwise_shifted, depthwise_conv2d
from patient.models.layers import Conv2d

CASES = [  # (channels, height, width, kernel, stride, padding)
    (8, 9, 9, 3, 1, ((1, 1), (1, 1))),
    (8, 10, 10, 3, 1, ((1, 1), (1, 1))),
    (6, 9, 9, 3, 2, ((1, 1), (1, 1))),
    (6, 10, 12, 3, 2, ((1, 1), (1, 1))),
    (5, 11, 11, 5, 1, ((2, 2), (2, 2))),
    (5, 12, 12, 5, 2, ((2, 2), (2, 2))),
    (5, 13, 8, 5, 2, ((2, 2), (2, 2))),
    (4, 8, 8, 3, 2, ((0, 1), (0, 1))),  # TF-style SAME for even sizes at stride 2
    (4, 7, 7, 3, 1, ((0, 0), (0, 0))),  # no padding
]


def numpy_depthwise(x, w, stride, padding):
    """float64 reference: y[c, a, b] = sum_ij w[c, 0, i, j] * xpad[c, a * s + i, b * s + j]."""
    (pt, pb), (pl, pr) = padding
    x = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr)))
    c, hp, wp = x.shape
    k = w.shape[2]
    ho, wo = (hp - k) // stride + 1, (wp - k) // stride + 1
    y = np.zeros((c, ho, wo))
    for a in range(ho):
        for b in range(wo):
            patch = x[:, a * stride:a * stride + k, b * stride:b * stride + k]
            y[:, a, b] = (patch * w[:, 0].astype(np.float64)).sum(axis=(1, 2))
    return y


def _inputs(case, seed=0):
    c, h, w, k, s, p = case
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, c, h, w)).astype(np.float32),
            rng.standard_normal((c, 1, k, k)).astype(np.float32), s, p)


def _last(a):
    """(B, C, H, W) -> (B, H, W, C)."""
    return np.transpose(np.asarray(a), (0, 2, 3, 1))


@pytest.mark.parametrize("cl", [False, True], ids=["chw", "hwc"])
@pytest.mark.parametrize("case", CASES)
def test_forward_equals_float64_reference(case, cl):
    x, w, s, p = _inputs(case)
    ref = np.stack([numpy_depthwise(xi, w, s, p) for xi in x])
    x, ref = (_last(x), _last(ref)) if cl else (x, ref)
    y = jax.jit(jax.vmap(lambda xi: _depthwise_shifted(xi, jnp.asarray(w), s, p, cl)))(x)
    assert y.shape == ref.shape
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    # The per-backend entry point takes the same path on CPU.
    y2 = jax.jit(jax.vmap(lambda xi: depthwise_conv2d(xi, jnp.asarray(w), s, p, channels_last=cl)))(x)
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))


@pytest.mark.parametrize("cl", [False, True], ids=["chw", "hwc"])
@pytest.mark.parametrize("case", CASES)
def test_gradients_equal_lax_conv_in_float64(case, cl):
    x, w, s, p = _inputs(case, seed=1)
    c = x.shape[1]
    cot = np.random.default_rng(2).standard_normal(np.stack([numpy_depthwise(xi, w, s, p) for xi in x]).shape)
    if cl:
        x, cot = _last(x), _last(cot)

    def loss(conv, x, w, cot):
        return jnp.sum(jax.vmap(lambda xi: conv(xi, w))(x) * cot)

    def ref_conv(xi, w):
        act = "NHWC" if cl else "NCHW"
        return lax.conv_general_dilated(xi[None], w, (s, s), p, dimension_numbers=(act, "OIHW", act),
                                        feature_group_count=c)[0]

    with jax.enable_x64(True):
        gx_ref, gw_ref = jax.grad(loss, argnums=(1, 2))(ref_conv, x.astype(np.float64), w.astype(np.float64), cot)
    gx, gw = jax.jit(jax.grad(lambda x, w: loss(lambda xi, w: _depthwise_shifted(xi, w, s, p, cl), x, w,
                                                jnp.asarray(cot, jnp.float32)), argnums=(0, 1)))(x, w)
    assert gx.dtype == jnp.float32 and gw.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_ref), rtol=0, atol=2e-5 * np.abs(gx_ref).max())
    np.testing.assert_allclose(np.asarray(gw), np.asarray(gw_ref), rtol=0, atol=2e-5 * np.abs(gw_ref).max())


@pytest.mark.slow
def test_conv2d_uses_it_for_depthwise_and_matches_lax(getkey):
    """A depthwise Conv2d (timm's padding) gives lax.conv's output and gradients; a grouped, not depthwise, conv
    stays on lax.conv."""
    x = jax.random.normal(getkey(), (3, 16, 15, 15))
    for kernel, stride in [(3, 1), (3, 2), (5, 2)]:
        conv = Conv2d(16, 16, kernel, stride=stride, groups=16, key=getkey())

        def ref(conv, x):
            return lax.conv_general_dilated(x[None], conv.weight, (stride, stride), conv.padding,
                                            dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=16)[0]

        y, y_ref = jax.vmap(conv)(x), jax.vmap(lambda xi: ref(conv, xi))(x)
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5 * float(jnp.abs(y_ref).max()))
        g = jax.grad(lambda c: jnp.sum(jax.vmap(c)(x) ** 2))(conv).weight
        g_ref = jax.grad(lambda c: jnp.sum(jax.vmap(lambda xi: ref(c, xi))(x) ** 2))(conv).weight
        np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-4 * float(jnp.abs(g_ref).max()))
    grouped = Conv2d(16, 16, 3, groups=4, key=getkey())
    text = jax.jit(jax.vmap(grouped)).lower(x).as_text()
    assert "convolution" in text


def test_bfloat16_inputs_accumulate_in_float32():
    x, w, s, p = _inputs(CASES[0])
    y = jax.vmap(lambda xi: _depthwise_shifted(xi, jnp.asarray(w, jnp.bfloat16), s, p, False))(
        jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    w16 = np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32)
    ref = np.stack([numpy_depthwise(xi, w16, s, p) for xi in np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)])
    # bf16 has 8 significant bits: one rounding of the output, not one per tap.
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2 ** -7, atol=2 ** -7 * np.abs(ref).max() / 8)
