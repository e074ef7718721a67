"""Feature-based distillation losses against hand-written float64 numpy, their gradients (student and auxiliary
modules only), the invariances each docstring promises, both resizing paths, and the start-up shape check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patient.engine.feature_losses import (
    HintRegressor,
    Projector,
    at_loss,
    attention_map,
    check_feature_shapes,
    fitnets_loss,
    fsp_loss,
    fsp_matrix,
    hinton_kd,
    nst_loss,
    resize_hw,
    srd_loss,
)
from patient.models import apply, create

RTOL = 1e-5


def rand(seed, *shape, relu=False):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return np.maximum(x, 0) if relu else x


def f64(x):
    return np.asarray(x, np.float64)


# ------------------------------------------------------------------------------------------ numpy references


def np_avg_pool(x, h, w):
    x = f64(x)
    H, W = x.shape[-2:]
    out = np.zeros((*x.shape[:-2], h, w))
    fh, fw = H // h, W // w
    for i in range(h):
        for j in range(w):
            out[..., i, j] = x[..., i * fh:(i + 1) * fh, j * fw:(j + 1) * fw].mean(axis=(-2, -1))
    return out


def np_bilinear_up(x, h, w):
    """Half-pixel-centre bilinear with edges clamped (PyTorch align_corners=False), for enlarging only."""
    x = f64(x)
    H, W = x.shape[-2:]
    out = np.zeros((*x.shape[:-2], h, w))
    for i in range(h):
        for j in range(w):
            y = min(max((i + 0.5) * H / h - 0.5, 0), H - 1)
            z = min(max((j + 0.5) * W / w - 0.5, 0), W - 1)
            y0, z0 = int(np.floor(y)), int(np.floor(z))
            y1, z1 = min(y0 + 1, H - 1), min(z0 + 1, W - 1)
            dy, dz = y - y0, z - z0
            out[..., i, j] = ((1 - dy) * (1 - dz) * x[..., y0, z0] + (1 - dy) * dz * x[..., y0, z1]
                              + dy * (1 - dz) * x[..., y1, z0] + dy * dz * x[..., y1, z1])
    return out


def np_log_softmax(z):
    z = f64(z)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_att(f, p=2):
    return (np.abs(f64(f)) ** p).sum(1)


def np_unit(v):
    return v / np.sqrt((v * v).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------------- resizing


def test_resize_paths():
    x = rand(0, 2, 3, 4, 6)
    np.testing.assert_array_equal(np.asarray(resize_hw(jnp.asarray(x), (4, 6))), x)
    np.testing.assert_allclose(np.asarray(resize_hw(jnp.asarray(x), (2, 3))), np_avg_pool(x, 2, 3), rtol=RTOL)
    np.testing.assert_allclose(np.asarray(resize_hw(jnp.asarray(x), (2, 2))), np_avg_pool(x, 2, 2), rtol=RTOL)
    y = rand(1, 2, 2, 3, 3)
    np.testing.assert_allclose(np.asarray(resize_hw(jnp.asarray(y), (4, 5))), np_bilinear_up(y, 4, 5), rtol=RTOL,
                               atol=1e-6)


# ------------------------------------------------------------------------------------------------------ values


def test_hinton_kd_value():
    s, t = rand(0, 3, 4) * 2, rand(1, 3, 4) * 2
    labels = np.array([2, -1, 0])
    alpha, T = 0.3, 4.0
    got = hinton_kd(jnp.asarray(s), jnp.asarray(t), jnp.asarray(labels), alpha=alpha, temperature=T)
    log_p, log_q = np_log_softmax(f64(t) / T), np_log_softmax(f64(s) / T)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1) * T**2
    ls = np_log_softmax(s)
    ce = np.array([-ls[0, 2], 0.0, -ls[2, 0]])
    np.testing.assert_allclose(float(got), np.mean(alpha * ce + (1 - alpha) * kl), rtol=RTOL)


def _np_fitnets(w, b, fs, ft):
    pred = np.einsum("oc,bchw->bohw", f64(w), f64(fs)) + f64(b)[None, :, None, None]
    return np.mean((pred - f64(ft)) ** 2)


def test_fitnets_value_and_resize(getkey):
    reg = HintRegressor(2, 3, key=getkey())
    assert reg.weight.shape == (3, 2) and reg.bias.shape == (3,)
    fs, ft = rand(0, 2, 2, 3, 3), rand(1, 2, 3, 3, 3)
    got = fitnets_loss(reg, jnp.asarray(fs), jnp.asarray(ft))
    np.testing.assert_allclose(float(got), _np_fitnets(reg.weight, reg.bias, fs, ft), rtol=RTOL)
    # Student larger by an integer factor: average-pooled onto the teacher's grid.
    fs4 = rand(2, 2, 2, 6, 6)
    got = fitnets_loss(reg, jnp.asarray(fs4), jnp.asarray(ft))
    np.testing.assert_allclose(float(got), _np_fitnets(reg.weight, reg.bias, np_avg_pool(fs4, 3, 3), ft), rtol=RTOL)
    # Student smaller: bilinear upsampling onto the teacher's grid (the teacher is never resized).
    fs2 = rand(3, 2, 2, 2, 2)
    got = fitnets_loss(reg, jnp.asarray(fs2), jnp.asarray(ft))
    np.testing.assert_allclose(float(got), _np_fitnets(reg.weight, reg.bias, np_bilinear_up(fs2, 3, 3), ft),
                               rtol=RTOL)


def test_attention_value_and_resize():
    fs, ft = rand(0, 3, 2, 4, 4), rand(1, 3, 4, 4, 4)
    np.testing.assert_allclose(np.asarray(attention_map(jnp.asarray(fs))), np_unit(np_att(fs).reshape(3, -1)),
                               rtol=RTOL)
    a_s, a_t = np_unit(np_att(fs).reshape(3, -1)), np_unit(np_att(ft).reshape(3, -1))
    want = np.mean(((a_s - a_t) ** 2).sum(-1))
    np.testing.assert_allclose(float(at_loss(jnp.asarray(fs), jnp.asarray(ft))), want, rtol=RTOL)
    # p = 1 and the authors' constant: ours is their `(a_s - a_t).pow(2).mean()` times H*W.
    a_s1, a_t1 = np_unit(np_att(fs, 1).reshape(3, -1)), np_unit(np_att(ft, 1).reshape(3, -1))
    np.testing.assert_allclose(float(at_loss(jnp.asarray(fs), jnp.asarray(ft), p=1)),
                               np.mean((a_s1 - a_t1) ** 2) * 16, rtol=RTOL)
    # Teacher at 2x2: the student's raw map is average-pooled to 2x2, then both are normalised.
    ft2 = rand(2, 3, 4, 2, 2)
    a_s = np_unit(np_avg_pool(np_att(fs), 2, 2).reshape(3, -1))
    a_t = np_unit(np_att(ft2).reshape(3, -1))
    np.testing.assert_allclose(float(at_loss(jnp.asarray(fs), jnp.asarray(ft2))), np.mean(((a_s - a_t) ** 2).sum(-1)),
                               rtol=RTOL)
    # Mixed: 4x2 vs 2x4 meet at 2x2.
    fa, fb = rand(3, 2, 2, 4, 2), rand(4, 2, 3, 2, 4)
    a_a = np_unit(np_avg_pool(np_att(fa), 2, 2).reshape(2, -1))
    a_b = np_unit(np_avg_pool(np_att(fb), 2, 2).reshape(2, -1))
    np.testing.assert_allclose(float(at_loss(jnp.asarray(fa), jnp.asarray(fb))), np.mean(((a_a - a_b) ** 2).sum(-1)),
                               rtol=RTOL)


def _np_nst(fs, ft):
    def unit_channels(f):
        f = f64(f).reshape(*f.shape[:2], -1)
        return f / np.sqrt((f * f).sum(-1, keepdims=True))

    s, t = unit_channels(fs), unit_channels(ft)
    out = []
    for b in range(s.shape[0]):
        kss = np.mean([(s[b, i] @ s[b, j]) ** 2 for i in range(s.shape[1]) for j in range(s.shape[1])])
        ktt = np.mean([(t[b, i] @ t[b, j]) ** 2 for i in range(t.shape[1]) for j in range(t.shape[1])])
        kst = np.mean([(s[b, i] @ t[b, j]) ** 2 for i in range(s.shape[1]) for j in range(t.shape[1])])
        out.append(kss + ktt - 2 * kst)
    return np.mean(out)


def test_nst_value_zero_and_resize():
    fs, ft = rand(0, 2, 3, 3, 3), rand(1, 2, 4, 3, 3)
    got = float(nst_loss(jnp.asarray(fs), jnp.asarray(ft)))
    np.testing.assert_allclose(got, _np_nst(fs, ft), rtol=RTOL)
    assert got > 0
    # Identical inputs: exactly zero, eagerly and under jit; any difference makes it positive.
    for fn in (nst_loss, jax.jit(nst_loss)):
        assert float(fn(jnp.asarray(ft), jnp.asarray(ft))) == 0.0
        assert float(fn(jnp.asarray(ft), jnp.asarray(ft) * 3.0)) == pytest.approx(0.0, abs=1e-6)  # per-channel norm
        other = ft.copy()
        other[0, 1] = rand(5, 3, 3)
        assert float(fn(jnp.asarray(other), jnp.asarray(ft))) > 1e-4
    # Student at 6x6: average-pooled to the teacher's 3x3.
    fs6 = rand(2, 2, 3, 6, 6)
    np.testing.assert_allclose(float(nst_loss(jnp.asarray(fs6), jnp.asarray(ft))), _np_nst(np_avg_pool(fs6, 3, 3), ft),
                               rtol=RTOL)


def _np_fsp(f1, f2):
    f1, f2 = f64(f1), f64(f2)
    b, c1 = f1.shape[:2]
    c2, n = f2.shape[1], f2.shape[2] * f2.shape[3]
    g = np.zeros((b, c1, c2))
    for k in range(b):
        for i in range(c1):
            for j in range(c2):
                g[k, i, j] = (f1[k, i].ravel() * f2[k, j].ravel()).sum() / n
    return g


def test_fsp_value_and_resize():
    s1, s2, s3 = rand(0, 2, 2, 4, 4), rand(1, 2, 3, 4, 4), rand(2, 2, 4, 2, 2)
    t1, t2, t3 = rand(3, 2, 2, 4, 4), rand(4, 2, 3, 4, 4), rand(5, 2, 4, 2, 2)
    np.testing.assert_allclose(np.asarray(fsp_matrix(jnp.asarray(s1), jnp.asarray(s2))), _np_fsp(s1, s2), rtol=RTOL,
                               atol=1e-7)
    # Second pair crosses resolutions: f1 (4x4) is average-pooled onto f2's 2x2.
    np.testing.assert_allclose(np.asarray(fsp_matrix(jnp.asarray(s2), jnp.asarray(s3))),
                               _np_fsp(np_avg_pool(s2, 2, 2), s3), rtol=RTOL, atol=1e-7)
    got = fsp_loss([(s1, s2), (s2, s3)], [(t1, t2), (t2, t3)])
    want = np.mean([np.mean((_np_fsp(s1, s2) - _np_fsp(t1, t2)) ** 2),
                    np.mean((_np_fsp(np_avg_pool(s2, 2, 2), s3) - _np_fsp(np_avg_pool(t2, 2, 2), t3)) ** 2)])
    np.testing.assert_allclose(float(got), want, rtol=RTOL)
    with pytest.raises(ValueError, match="pair 0 gives student flow"):
        fsp_loss([(s1, s2)], [(t2, t2)])
    with pytest.raises(ValueError, match="need the same"):
        fsp_loss([(s1, s2)], [])


def _np_srd(w, fs, ft):
    def bn(x):
        return (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-4)

    zs = f64(fs) @ f64(w).T
    return 2 * np.log((np.abs(bn(zs) - bn(f64(ft))) ** 4).sum())


def test_srd_value(getkey):
    proj = Projector(3, 4, key=getkey())
    assert proj.weight.shape == (4, 3)
    fs, ft = rand(0, 3, 3), rand(1, 3, 4) * 5 + 2
    np.testing.assert_allclose(float(srd_loss(proj, jnp.asarray(fs), jnp.asarray(ft))), _np_srd(proj.weight, fs, ft),
                               rtol=RTOL)
    np.testing.assert_allclose(float(jax.jit(srd_loss)(proj, jnp.asarray(fs), jnp.asarray(ft))),
                               _np_srd(proj.weight, fs, ft), rtol=RTOL)


# ----------------------------------------------------------------------------------------------------- gradients


def _cases(getkey):
    reg, proj = HintRegressor(2, 3, key=getkey()), Projector(3, 4, key=getkey())
    fs, ft = rand(0, 2, 2, 4, 4, relu=True), rand(1, 2, 3, 4, 4, relu=True)
    s2, t2 = jnp.asarray(rand(2, 2, 3, 2, 2, relu=True)), jnp.asarray(rand(3, 2, 3, 2, 2, relu=True))
    return {
        "kd": (None, lambda m, s, t: hinton_kd(s, t, jnp.array([1, -1]), alpha=0.5, temperature=2.0),
               rand(4, 2, 5), rand(5, 2, 5)),
        "fitnets": (reg, fitnets_loss, fs, ft),
        "at": (None, lambda m, s, t: at_loss(s, t), fs, rand(6, 2, 3, 2, 2, relu=True)),
        "nst": (None, lambda m, s, t: nst_loss(s, t), fs, ft),
        # The teacher's second map is a constant here; the gradient is taken w.r.t. the first map of each pair.
        "fsp": (None, lambda m, s, t: fsp_loss([(s, s2)], [(t, t2)]), fs, ft[:, :2]),
        "srd": (proj, srd_loss, rand(7, 3, 3), rand(8, 3, 4)),
    }


@pytest.mark.parametrize("name", ["kd", "fitnets", "at", "nst", "fsp", "srd"])
def test_gradients_reach_student_and_aux_only(name, getkey):
    """jax.grad w.r.t. the teacher's features is exactly zero (stop_gradient inside every loss); the student's
    features and every leaf of the auxiliary module get a nonzero, finite gradient."""
    module, fn, fs, ft = _cases(getkey)[name]
    g_m, g_s, g_t = jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(module, jnp.asarray(fs), jnp.asarray(ft))
    assert np.all(np.isfinite(np.asarray(g_s))) and np.abs(np.asarray(g_s)).max() > 1e-6
    np.testing.assert_array_equal(np.asarray(g_t), 0.0)
    for leaf in jax.tree_util.tree_leaves(g_m):
        assert np.all(np.isfinite(np.asarray(leaf))) and np.abs(np.asarray(leaf)).max() > 1e-6


def test_dead_channels_have_finite_gradients():
    fs = np.zeros((2, 2, 3, 3), np.float32)
    fs[1, 0] = 1.0
    ft = rand(0, 2, 3, 3, 3, relu=True)
    for fn in (at_loss, nst_loss):
        g = jax.jit(jax.grad(fn))(jnp.asarray(fs), jnp.asarray(ft))
        assert np.all(np.isfinite(np.asarray(g)))


# ---------------------------------------------------------------------------------------------------- invariances


def test_at_invariances():
    fs, ft = rand(0, 3, 2, 4, 4), rand(1, 3, 4, 4, 4)
    base = float(at_loss(jnp.asarray(fs), jnp.asarray(ft)))
    scale = np.array([0.1, 3.0, 70.0], np.float32)[:, None, None, None]
    np.testing.assert_allclose(float(at_loss(jnp.asarray(fs * scale), jnp.asarray(ft * 5))), base, rtol=RTOL)
    np.testing.assert_allclose(float(at_loss(jnp.asarray(-fs[:, ::-1]), jnp.asarray(ft[:, [2, 0, 3, 1]]))), base,
                               rtol=RTOL)
    assert float(at_loss(jnp.asarray(fs), jnp.asarray(fs * 2))) == pytest.approx(0.0, abs=1e-7)


def test_fsp_invariances():
    f1, f2 = rand(0, 2, 2, 3, 3), rand(1, 2, 3, 3, 3)
    g = np.asarray(fsp_matrix(jnp.asarray(f1), jnp.asarray(f2)))
    # Repeating every position (nearest-neighbour 2x upsampling of both maps) leaves G unchanged: the 1/(H*W).
    up = lambda f: np.repeat(np.repeat(f, 2, axis=2), 2, axis=3)  # noqa: E731
    np.testing.assert_allclose(np.asarray(fsp_matrix(jnp.asarray(up(f1)), jnp.asarray(up(f2)))), g, rtol=RTOL,
                               atol=1e-7)
    # So does one permutation of positions applied to both maps.
    perm = np.random.default_rng(2).permutation(9)
    shuffle = lambda f: f.reshape(2, -1, 9)[:, :, perm].reshape(f.shape)  # noqa: E731
    np.testing.assert_allclose(np.asarray(fsp_matrix(jnp.asarray(shuffle(f1)), jnp.asarray(shuffle(f2)))), g,
                               rtol=RTOL, atol=1e-7)
    # The loss is zero when the student's flow equals the teacher's even if the maps differ (f1 -> -f1, f2 -> -f2).
    assert float(fsp_loss([(f1, f2)], [(-f1, -f2)])) == 0.0


# ------------------------------------------------------------------------------------------------ shape checking


def test_check_feature_shapes_on_real_models():
    x = jax.ShapeDtypeStruct((2, 3, 32, 32), jnp.float32)

    def shapes(name):
        model, state = create(name, num_classes=10, key=None)
        return jax.eval_shape(lambda m, s, i: apply(m, s, i, train=False), model, state, x)[1]

    student, teacher = shapes("cifar_resnet20"), shapes("resnet8x4")
    assert check_feature_shapes(student, teacher, [("stage2", "stage2"), "stage3"], "fitnets") == [(32, 128),
                                                                                                  (64, 256)]
    assert check_feature_shapes(student, teacher, ["pre_logits"], "srd") == [(64, 256)]
    assert check_feature_shapes(student, teacher, [("stage1", "stage3")], "at") == []
    assert check_feature_shapes(student, teacher, [("stage1", "stage3")], "nst") == []
    assert check_feature_shapes(student, student, [("stage1", "stage2")], "fsp") == []
    with pytest.raises(ValueError, match=r"student has no feature 'stage4' \(it has: .*stage3") as e:
        check_feature_shapes(student, teacher, [("stage4", "stage4")], "at")
    assert "teacher has no feature 'stage4'" in str(e.value)  # both problems in the one error
    with pytest.raises(ValueError, match=r"student flow matrix 16x32 .*teacher one 64x128"):
        check_feature_shapes(student, teacher, [("stage1", "stage2")], "fsp")
    with pytest.raises(ValueError, match=r"'stage3' has shape \(2, 64, 8, 8\); srd needs f32\[B, D\]"):
        check_feature_shapes(student, teacher, ["stage3"], "srd")
    with pytest.raises(ValueError, match=r"'pre_logits' has shape \(2, 64\); nst needs f32\[B, C, H, W\]"):
        check_feature_shapes(student, teacher, ["pre_logits"], "nst")


def test_check_feature_shapes_misc():
    s = {"stage1": (2, 4, 4, 4), "pre_logits": (2, 4)}
    t = {"stage1": (3, 8, 2, 2), "pre_logits": (3, 8)}
    assert check_feature_shapes(s, t, [], "kd") == []
    with pytest.raises(ValueError, match="unknown distillation method 'mine'"):
        check_feature_shapes(s, t, ["stage1"], "mine")
    with pytest.raises(ValueError, match="crd takes one feature pair .* got 2"):
        check_feature_shapes(s, {**t, "pre_logits": (2, 8)}, ["pre_logits", "pre_logits"], "crd")
    with pytest.raises(ValueError, match="no stage pairs are configured"):
        check_feature_shapes(s, t, [], "at")
    with pytest.raises(ValueError, match=r"batch sizes differ, student 'stage1' \(2, 4, 4, 4\) vs teacher"):
        check_feature_shapes(s, t, ["stage1"], "fitnets")


# ----------------------------------------------------------------------------------------------- Decoupled KD

def _dkd_numpy(s, p_t, g, alpha, beta, T):
    """float64 reference written from the paper's definitions, one example at a time."""
    out = []
    for z, pt, t in zip(s.astype(np.float64) / T, p_t.astype(np.float64), g):
        ps = np.exp(z - z.max())
        ps /= ps.sum()
        b_t, b_s = np.array([pt[t], 1 - pt[t]]), np.array([ps[t], 1 - ps[t]])
        tckd = np.sum(b_t * np.log(b_t / b_s))
        rest = np.arange(len(z)) != t
        h_t, h_s = pt[rest] / pt[rest].sum(), ps[rest] / ps[rest].sum()
        nckd = np.sum(h_t * np.log(h_t / h_s))
        out.append((alpha * tckd + beta * nckd) * T ** 2)
    return np.mean(out), out


def test_dkd_matches_float64_reference_and_decomposes_kd():
    from patient.engine.feature_losses import dkd_loss

    rng = np.random.default_rng(0)
    s = rng.normal(0, 2, (6, 7)).astype(np.float32)
    t_logits = rng.normal(0, 2, (6, 7))
    g = np.array([0, 3, 6, 2, 2, 5])
    for T, alpha, beta in [(1.0, 1.0, 8.0), (4.0, 0.5, 2.0)]:
        p_t = np.exp(t_logits / T) / np.exp(t_logits / T).sum(-1, keepdims=True)
        got = float(dkd_loss(jnp.asarray(s), jnp.asarray(p_t, jnp.float32), jnp.asarray(g), alpha=alpha, beta=beta,
                             temperature=T))
        want, _ = _dkd_numpy(s, p_t, g, alpha, beta, T)
        np.testing.assert_allclose(got, want, rtol=2e-5)
        # KD = TCKD + (1 - p_t,g) NCKD, per example (float64, from the reference's two parts)
        _, tck = _dkd_numpy(s, p_t, g, 1.0, 0.0, T)
        _, nck = _dkd_numpy(s, p_t, g, 0.0, 1.0, T)
        s64 = s.astype(np.float64)
        ps = np.exp(s64 / T) / np.exp(s64 / T).sum(-1, keepdims=True)
        kd = np.sum(p_t * np.log(p_t / ps), -1) * T ** 2
        np.testing.assert_allclose(kd, np.array(tck) + (1 - p_t[np.arange(6), g]) * np.array(nck), rtol=1e-12)


def test_dkd_gradients_are_finite_and_reach_only_the_student():
    from patient.engine.feature_losses import dkd_loss

    s = jnp.asarray([[30.0, -30.0, 0.0], [0.0, 0.0, 0.0]])  # a saturated student: p_s,g ~ 1
    p_t = jnp.asarray([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])  # a one-hot teacher: 0 log 0 terms
    g = jnp.asarray([0, 2])
    gs, gt = jax.grad(lambda s, p: dkd_loss(s, p, g, alpha=1.0, beta=8.0, temperature=4.0), argnums=(0, 1))(s, p_t)
    assert np.isfinite(np.asarray(gs)).all() and float(jnp.abs(gs).max()) > 0
    assert float(jnp.abs(gt).max()) == 0.0
    assert np.isfinite(float(dkd_loss(s, p_t, g, alpha=1.0, beta=8.0, temperature=4.0)))


# ------------------------------------------------------------------------------------------------------ DeiT


def _deit_numpy(cls, dist, targets, p_t, kind, alpha, T):
    """DeiT's loss in float64, written from the paper's equations."""
    cls, dist, targets, p_t = (np.asarray(a, np.float64) for a in (cls, dist, targets, p_t))

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ce = -(targets * log_softmax(cls)).sum(-1)
    if kind == "hard":
        d = -log_softmax(dist)[np.arange(len(dist)), p_t.argmax(-1)]
    else:
        d = np.array([sum(p * (np.log(p) - q) for p, q in zip(pr, qr) if p > 0)
                      for pr, qr in zip(p_t, log_softmax(dist / T))]) * T ** 2
    return np.mean((1 - alpha) * ce + alpha * d)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_deit_matches_float64_reference(kind):
    from patient.engine.feature_losses import deit_loss

    rng = np.random.default_rng(1)
    cls, dist = rng.normal(0, 2, (2, 6, 5)).astype(np.float32)
    targets = np.eye(5)[[0, 1, 4, 2, 3, 3]]
    targets[2] = 0.3 * targets[2] + 0.7 * np.eye(5)[1]  # mixup: a mixed label
    targets[5] = 0.0  # an unlabelled example
    for T, alpha in [(1.0, 0.5), (3.0, 0.1)]:
        t = rng.normal(0, 2, (6, 5))
        p_t = np.exp(t / T) / np.exp(t / T).sum(-1, keepdims=True)
        p_t[0] = [1, 0, 0, 0, 0]  # a one-hot teacher row: 0 log 0 terms
        got = float(deit_loss(jnp.asarray(cls), jnp.asarray(dist), jnp.asarray(targets, jnp.float32),
                              jnp.asarray(p_t, jnp.float32), kind=kind, alpha=alpha, temperature=T))
        np.testing.assert_allclose(got, _deit_numpy(cls, dist, targets, p_t, kind, alpha, T), rtol=2e-6)
    # the two heads' terms are separate: the class head never sees the teacher, the distillation head never the labels
    gc, gd, gt = jax.grad(lambda c, d, p: deit_loss(c, d, jnp.asarray(targets, jnp.float32), p, kind=kind, alpha=0.5,
                                                    temperature=1.0), argnums=(0, 1, 2))(
        jnp.asarray(cls), jnp.asarray(dist), jnp.asarray(p_t, jnp.float32))
    assert float(jnp.abs(gt).max()) == 0.0 and np.isfinite(np.asarray(gd)).all()
    gc_alone = jax.grad(lambda c: deit_loss(c, jnp.zeros_like(c), jnp.asarray(targets, jnp.float32),
                                            jnp.asarray(p_t, jnp.float32), kind=kind, alpha=0.5, temperature=1.0))(
        jnp.asarray(cls))
    np.testing.assert_allclose(gc, gc_alone, rtol=1e-6)
