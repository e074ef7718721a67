"""Shampoo (patient.optim) against independent references: float64 numpy roots, hand-computed float64 updates, optax's
first-order optimizers, and a Kronecker-structured quadratic where Shampoo must beat a tuned Adam."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from patient.optim import dot_hi_lo, matrix_inverse_pth_root, merge_small_dims, scale_by_shampoo, shampoo

CONDITIONS = [1e1, 1e2, 1e3, 1e4, 1e5, 1e6]


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # Small LAPACK calls (numpy's references, JAX's CPU eigh/svd) crawl when OpenBLAS threads fight over 2 busy cores.
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = lambda _: contextlib.nullcontext()  # noqa: E731
    with threadpool_limits(1):
        yield


def _spd(n, cond, seed, scale=1.0):
    """float32 symmetric positive definite matrix, eigenvalues log-spaced in [scale/cond, scale], random eigenvectors."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return ((q * (scale * np.logspace(0, -np.log10(cond), n))) @ q.T).astype(np.float32)


def _np_root(mat, p, eps=1e-6):
    """float64 reference for the documented convention (A + eps * lambda_max(A) I)^(-1/p), from the float32 input."""
    w, v = np.linalg.eigh(np.asarray(mat, np.float64))
    return (v * (w + eps * w.max()) ** (-1.0 / p)) @ v.T


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _run(opt, grads_seq, params):
    """Apply `opt` under jit to a sequence of gradient pytrees; returns the list of updates and the final state."""
    update = jax.jit(opt.update)
    state = jax.jit(opt.init)(params)
    out = []
    for g in grads_seq:
        u, state = update(g, state, params)
        out.append(u)
    return out, state


def _random_grads(shapes, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [{k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()} for _ in range(steps)]


# ----------------------------------------------------------------------------------------------------------------
# Inverse roots.


@pytest.mark.parametrize("method, tol", [("eigh", 1e-5), ("newton", 1e-3)])
def test_inverse_root_matches_float64(method, tol):
    n = 128  # Shampoo's default block size
    cases = [(p, c) for p in (2, 4, 8) for c in CONDITIONS]
    mats = np.stack([_spd(n, c, seed, scale=10.0 ** (seed % 7 - 3)) for seed, (_, c) in enumerate(cases)])
    ps = np.array([p for p, _ in cases])  # one exponent per matrix, in one batch
    roots = jax.jit(lambda a, p: matrix_inverse_pth_root(a, p, eps=1e-6, method=method))(mats, ps)
    errs = {case: _rel(r, _np_root(m, case[0])) for case, r, m in zip(cases, roots, mats)}
    assert max(errs.values()) <= tol, errs


def test_plain_float32_eigh_is_not_accurate_enough():
    # Why roots are refined: a plain float32 eigh loses ~6e-8 x condition of relative accuracy.
    a = _spd(64, 1e6, 0)
    plain = jax.jit(lambda a: matrix_inverse_pth_root(a, 2, method="eigh", precise=False))(a)
    assert _rel(plain, _np_root(a, 2)) > 1e-4


def test_dot_hi_lo_is_exact_to_double_precision():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((96, 128)).astype(np.float32) * np.logspace(-3, 3, 128).astype(np.float32)
    b = rng.standard_normal((128, 64)).astype(np.float32)
    hi, lo = jax.jit(dot_hi_lo)(a, b)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(a).max(1, keepdims=True).astype(np.float64) * np.abs(b).max(0, keepdims=True)  # documented bound
    err = lambda c: (np.abs(np.asarray(c, np.float64) - exact) / scale).max()  # noqa: E731
    assert err(np.asarray(hi, np.float64) + np.asarray(lo, np.float64)) < 128 * 2.0**-47
    assert err(jax.jit(jnp.matmul)(a, b)) > 2.0**-30  # what plain float32 gets


def test_inverse_root_failure_is_non_finite():
    for method in ("eigh", "newton"):
        root = jax.jit(lambda a: matrix_inverse_pth_root(a, 4, method=method))(jnp.zeros((5, 5)))  # no root of 0
        assert not np.isfinite(np.asarray(root)).all(), method


# ----------------------------------------------------------------------------------------------------------------
# Exact updates.


@pytest.mark.parametrize("inverse_root, tol", [("eigh", 1e-5), ("newton", 1e-4)])
def test_two_steps_match_hand_computed_float64(inverse_root, tol):
    lr, b1, b2, eps = 0.1, 0.9, 0.9, 1e-8
    opt = shampoo(lr, b1=b1, b2=b2, start_preconditioning_step=0, precondition_every=1, inverse_root=inverse_root)
    grads = _random_grads({"w": (7, 5)}, 2)
    updates, _ = _run(opt, grads, {"w": jnp.zeros((7, 5))})

    L, R, nu, trace = np.zeros((7, 7)), np.zeros((5, 5)), np.zeros((7, 5)), np.zeros((7, 5))
    for t, (g, u) in enumerate(zip(grads, updates), start=1):
        G = np.asarray(g["w"], np.float64)
        L, R = b2 * L + (1 - b2) * G @ G.T, b2 * R + (1 - b2) * G.T @ G
        P = _np_root(L, 4) @ G @ _np_root(R, 4)
        g_hat = G / np.linalg.norm(G)  # rmsprop_normalized graft, bias-corrected
        nu = b2 * nu + (1 - b2) * g_hat**2
        graft = g_hat / np.sqrt(nu / (1 - b2**t) + eps)
        direction = P * np.linalg.norm(graft) / np.linalg.norm(P)
        trace = direction + b1 * trace  # nesterov heavy-ball
        expected = -lr * (direction + b1 * trace)
        assert _rel(u["w"], expected) < tol, t


@pytest.mark.parametrize("exponent_override", [None, 3])
def test_long_dimensions_are_left_unpreconditioned(exponent_override):
    # dim 9 > max_precond_dim: identity on the left, (R + eps lambda_max I)^(-1/p) on the right, p = 2 by default.
    opt = shampoo(1.0, b1=0.0, graft="sgd", max_precond_dim=8, exponent_override=exponent_override,
                  start_preconditioning_step=0, precise_roots=False)
    (g,) = _random_grads({"w": (9, 4)}, 1)
    (u,), state = _run(opt, [g], {"w": jnp.zeros((9, 4))})
    assert [s.shape for s in state[0].stats["w"]] == [(1, 4, 4)]
    G = np.asarray(g["w"], np.float64)
    P = G @ _np_root((1 - 0.999) * G.T @ G, exponent_override or 2)
    assert _rel(u["w"], -P * np.linalg.norm(G) / np.linalg.norm(P)) < 1e-5


def test_blocked_equals_unblocked_block_by_block():
    # 'a': dim 40 > max_precond_dim stays whole and unpreconditioned, dim 20 -> blocks 16 + 4.
    # 'b': both dims blocked, 24 -> 16 + 8 and 20 -> 16 + 4. Grafting is per block, so each block must behave
    # exactly like a separate parameter holding that block (here: in the same optimizer, to compile once).
    opt = shampoo(1e-2, block_size=16, max_precond_dim=30, graft="adam", start_preconditioning_step=0,
                  precondition_every=1)  # fmt: skip
    blocks = {
        "a0": ("a", np.s_[:, :16]), "a1": ("a", np.s_[:, 16:]),
        "b00": ("b", np.s_[:16, :16]), "b01": ("b", np.s_[:16, 16:]),
        "b10": ("b", np.s_[16:, :16]), "b11": ("b", np.s_[16:, 16:]),
    }  # fmt: skip
    with_blocks = lambda tree: tree | {k: tree[name][idx] for k, (name, idx) in blocks.items()}  # noqa: E731
    grads = [with_blocks(g) for g in _random_grads({"a": (40, 20), "b": (24, 20)}, 3)]
    updates, state = _run(opt, grads, with_blocks({"a": jnp.zeros((40, 20)), "b": jnp.zeros((24, 20))}))
    assert [s.shape for s in state[0].stats["a"]] == [(2, 16, 16)]
    assert [s.shape for s in state[0].stats["b"]] == [(4, 16, 16), (4, 16, 16)]
    for u in updates:
        for k, (name, idx) in blocks.items():
            assert _rel(u[name][idx], u[k]) < 1e-5, k


def test_merged_dims_behave_as_the_merged_matrix():
    assert merge_small_dims((16, 8, 3, 3), 128) == (128, 9)
    assert merge_small_dims((1, 2, 512, 1, 2048, 1, 3, 4), 1024) == (1024, 2048, 12)
    opt = shampoo(1e-2, start_preconditioning_step=0, precondition_every=1, precise_roots=False)
    merged = {"k": (128, 9), "s": (4, 27)}  # (16, 8, 3, 3) merges to (128, 9); a small kernel becomes (4, 27)
    grads = _random_grads({"k": (16, 8, 3, 3), "s": (4, 3, 3, 3)}, 2)
    grads = [g | {f"{k}_flat": v.reshape(merged[k]) for k, v in g.items()} for g in grads]
    updates, state = _run(opt, grads, jax.tree.map(jnp.zeros_like, grads[0]))
    assert [s.shape for s in state[0].stats["k"]] == [(1, 128, 128), (1, 9, 9)]
    assert [s.shape for s in state[0].stats["s"]] == [(1, 4, 4), (1, 27, 27)]
    for u in updates:
        for k in merged:
            assert _rel(u[k].reshape(merged[k]), u[f"{k}_flat"]) < 1e-6, k


# ----------------------------------------------------------------------------------------------------------------
# Grafting: before start_preconditioning_step Shampoo is exactly its graft optimizer.

_LR, _B1, _B2, _EPS = 3e-2, 0.9, 0.99, 1e-8
_SCHEDULE = optax.linear_schedule(3e-2, 1e-2, 4)
_GRAFT_CASES = {
    "sgd": (dict(graft="sgd", learning_rate=_SCHEDULE), optax.sgd(_SCHEDULE, momentum=_B1, nesterov=True)),
    "adagrad": (dict(graft="adagrad", b1=0.0), optax.adagrad(_LR, initial_accumulator_value=0.0, eps=_EPS)),
    "rmsprop": (
        dict(graft="rmsprop"),
        optax.rmsprop(_LR, decay=_B2, eps=_EPS, momentum=_B1, nesterov=True, bias_correction=True),
    ),
    "rmsprop_normalized": (  # optax.rmsprop scales by the learning rate before momentum: same for a constant one
        dict(graft="rmsprop_normalized"),
        optax.rmsprop(_LR, decay=_B2, eps=_EPS, momentum=_B1, nesterov=True, bias_correction=True),
    ),
    "adam": (dict(graft="adam"), optax.adam(_LR, _B1, _B2, eps=_EPS, nesterov=True)),
    "adamw": (
        dict(graft="adam", weight_decay=0.1, weight_decay_mask={"w": True, "b": False, "k": True}),
        optax.adamw(_LR, _B1, _B2, eps=_EPS, weight_decay=0.1, mask={"w": True, "b": False, "k": True}, nesterov=True),
    ),
}


@pytest.mark.parametrize("case", list(_GRAFT_CASES))
def test_before_start_updates_equal_the_graft_optimizer(case):
    kw, reference = _GRAFT_CASES[case]
    kw = dict(learning_rate=_LR, b1=_B1, b2=_B2, graft_eps=_EPS, start_preconditioning_step=1000,
              precise_roots=False) | kw  # fmt: skip
    shapes = {"w": (6, 5), "b": (5,), "k": (3, 2, 3, 3)}
    params = {k: jnp.asarray(np.random.default_rng(1).standard_normal(s), jnp.float32) for k, s in shapes.items()}
    grads = _random_grads(shapes, 5)
    ours, _ = _run(shampoo(**kw), grads, params)
    if case == "rmsprop_normalized":  # the reference sees the per-parameter normalised gradient
        grads = [jax.tree.map(lambda g: g / (jnp.sqrt(jnp.sum(g * g)) + 1e-16), g) for g in grads]
    theirs, _ = _run(reference, grads, params)
    for a, b in zip(ours, theirs):
        for k in shapes:
            assert _rel(a[k], b[k]) < 1e-6, k  # float32 round-off


# ----------------------------------------------------------------------------------------------------------------
# Schedule of root recomputation, failures, state.


def test_roots_are_recomputed_on_schedule_only():
    opt = scale_by_shampoo(start_preconditioning_step=2, precondition_every=3, precise_roots=False)
    params = {"w": jnp.zeros((6, 4))}
    update, state = jax.jit(opt.update), opt.init(params)
    changed = []
    for g in _random_grads({"w": (6, 4)}, 9):
        _, new = update(g, state, params)
        changed.append(not np.array_equal(new.roots["w"][0], state.roots["w"][0]))
        state = new
    assert changed == [c in (2, 5, 8) for c in range(9)]  # 0-based update index


def test_failed_root_keeps_the_previous_one():
    # All-zero statistics have no inverse root: the identity from init must survive, updates stay finite.
    opt = shampoo(1e-2, start_preconditioning_step=0, precondition_every=1)
    params = {"w": jnp.zeros((6, 4))}
    (u,), state = _run(opt, [{"w": jnp.zeros((6, 4))}], params)
    np.testing.assert_array_equal(state[0].roots["w"][0], np.eye(6)[None])
    np.testing.assert_array_equal(state[0].roots["w"][1], np.eye(4)[None])
    assert np.isfinite(np.asarray(u["w"])).all()


def test_state_is_a_pytree_of_arrays_and_survives_orbax(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = {"w": jnp.zeros((6, 5)), "b": jnp.zeros(5), "k": jnp.zeros((4, 2, 3, 3)), "s": jnp.zeros(())}
    opt = shampoo(1e-2, start_preconditioning_step=0, precise_roots=False)
    state = jax.jit(opt.init)(params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
    _, new_state = jax.jit(opt.update)(jax.tree.map(jnp.ones_like, params), state, params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "opt", new_state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "opt", jax.tree.map(ocp.utils.to_shape_dtype_struct, new_state))
    jax.tree.map(np.testing.assert_array_equal, restored, new_state)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError):
        shampoo(1e-3, graft="lion")
    with pytest.raises(ValueError):
        shampoo(1e-3, inverse_root="qr")
    with pytest.raises(ValueError):
        shampoo(1e-3, graft="adam", b2=1.0)
    with pytest.raises(ValueError):
        matrix_inverse_pth_root(jnp.eye(3), 0)


# ----------------------------------------------------------------------------------------------------------------
# Training.


def _cnn_init(rng):
    def he(shape, fan_in):
        return jnp.asarray(rng.standard_normal(shape) * (2.0 / fan_in) ** 0.5, jnp.float32)

    return {
        "c1": he((8, 1, 3, 3), 9), "c1b": jnp.zeros(8),
        "c2": he((16, 8, 3, 3), 72), "c2b": jnp.zeros(16),
        "d1": he((144, 32), 144), "d1b": jnp.zeros(32),
        "d2": he((32, 10), 32), "d2b": jnp.zeros(10),
    }  # fmt: skip


def _cnn(params, x):
    conv = lambda x, w, b: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME") + b[:, None, None]  # noqa: E731
    pool = lambda x: jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4  # noqa: E731
    x = pool(jax.nn.relu(conv(x, params["c1"], params["c1b"])))  # (B, 8, 6, 6)
    x = pool(jax.nn.relu(conv(x, params["c2"], params["c2b"])))  # (B, 16, 3, 3)
    x = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["d1"] + params["d1b"])
    return x @ params["d2"] + params["d2b"]


def test_small_cnn_50_steps_no_nan_no_recompile():
    # numpy randomness: compiling JAX's PRNG for a handful of arrays costs more than the whole test on CPU.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=(32, 1, 12, 12)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 32))
    params = _cnn_init(rng)
    # Blocks of 32 (one compiled root size; kernels merge to (24, 3) and (16, 24, 3), so p = 4 and 6 are batched
    # together); roots refreshed 10 times.
    opt = shampoo(1e-3, block_size=32, start_preconditioning_step=5, precondition_every=5)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)  # runs only while tracing
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(_cnn(p, x), y).mean()  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = jax.jit(opt.init)(params)
    with jax.debug_nans(True):
        losses = []
        for _ in range(50):
            params, state, loss = step(params, state)
            losses.append(float(loss))
    assert [s.shape for s in state[0].stats["c2"]] == [(1, 16, 16), (1, 24, 24), (1, 3, 3)]
    assert [s.shape for s in state[0].stats["d1"]] == [(5, 32, 32), (5, 32, 32)]
    assert len(traces) == 1 and step._cache_size() == 1
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
    assert all(np.isfinite(np.asarray(r)).all() for r in jax.tree.leaves(state[0].roots))


def test_kronecker_quadratic_beats_tuned_adam():
    # loss = 0.5 ||A (W - W*) B||^2, W of 16 x 8, A^T A and B B^T each with condition number 100.
    rng = np.random.default_rng(0)

    def factor(n):
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        return jnp.asarray((q * np.sqrt(np.logspace(0, 2, n))) @ q.T, jnp.float32)

    A, B, w_star = factor(16), factor(8), jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    loss = lambda w: 0.5 * jnp.sum((A @ (w - w_star) @ B) ** 2)  # noqa: E731

    def final_loss(opt, steps=200):
        def body(carry, _):
            w, s = carry
            u, s = opt.update(jax.grad(loss)(w), s, w)
            return (optax.apply_updates(w, u), s), None

        w0 = jnp.zeros((16, 8))
        (w, _), _ = jax.lax.scan(body, (w0, opt.init(w0)), None, steps)
        return loss(w)

    lrs = jnp.asarray([1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0])
    adam = jax.jit(jax.vmap(lambda lr: final_loss(optax.adam(lr))))(lrs)
    best = int(jnp.argmin(adam))
    assert 0 < best < len(lrs) - 1  # the sweep brackets Adam's best learning rate
    ours = float(jax.jit(lambda: final_loss(shampoo(0.3, graft="adam")))())
    assert ours * 10 <= float(adam[best]), (ours, np.asarray(adam))
