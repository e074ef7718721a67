"""Inverse p-th roots of symmetric positive semi-definite matrices, in float32, accurate to ~1e-6 up to condition 1e6.

Shampoo needs `(A + d I)^(-1/p)` for its statistics `A`, where `d = eps * lambda_max(A)` (the relative ridge of
scalable_shampoo). Two methods are offered:

- `"eigh"` (default): an eigendecomposition. Plain float32 `eigh` is backward stable, so an eigenvalue `lambda` is
  only known to about `u * lambda_max` (u = 6e-8): at condition number 1e6 the smallest eigenvalues are wrong by
  several percent and the root by ~1e-2. With `precise=True` (default) one refinement pass restores relative
  accuracy: `S = V^T A V` is formed in extended precision from the float32 eigenvectors `V`, the ridge is added to `S`,
  and the eigen-pairs of the (now graded, nearly diagonal) `S` are taken from the SVD of its Cholesky factor, which
  is accurate relative to each eigenvalue (Demmel & Veselic). Cost: two extended products, a Cholesky and an SVD.
- `"newton"`: the coupled Newton iteration (Higham, Functions of Matrices, eq. 7.18), matrix products only. Its
  rounding error is made in the first iterations, while the iterate `M` still has tiny eigenvalues, so with
  `precise=True` the first `precise_iters` iterations keep `M` as an unevaluated float32 pair (hi + lo) updated with
  extended-precision products.

Extended-precision products (`dot_hi_lo`) are an Ozaki-style split: each operand is cut into slices whose entries
are small integers times a power of two shared by a row (or column), so float32 matrix products of slices are exact;
the partial products are summed with error-free `two_sum`. They assume IEEE float32 matmuls (CPU, or GPU with
`precision=HIGHEST`); on TPU the split is still correct but less accurate.

On failure (an all-zero or indefinite input, no convergence) the result is non-finite; callers test `isfinite`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


def _matmul(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


# ----------------------------------------------------------------------------------------------------------------
# Extended-precision products.


def _pow2(n):
    """Exact `2.0**n` in float32 for integer arrays n in [-126, 127] (built from the exponent bits)."""
    return lax.bitcast_convert_type(((n + 127) << 23).astype(jnp.int32), jnp.float32)


def _scale_pow2(x, n):
    """Exact `x * 2**n` for |n| <= 250 (two factors keep each power in the normal range)."""
    half = n // 2
    return x * _pow2(half) * _pow2(n - half)


def _exponent(x, axis):
    """Integer e with max |x| along `axis` < 2**e (keepdims); -125 for all-zero lines."""
    m = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    biased = lax.bitcast_convert_type(m, jnp.int32) >> 23
    return jnp.maximum(biased - 126, -125)


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Error-free sum (Knuth): returns (s, e) with s = fl(a + b) and a + b == s + e exactly."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _slices(x, k, m):
    """Cut x (|x| < 1) into m slices: slice j (1-based) is an integer of at most k bits times 2**(-j k).

    Returns `(slices, rest)` with slices stacked on a new leading axis and `x == slices.sum(0) + rest` exactly.
    """
    scale = jnp.asarray([2.0 ** (j * k) for j in range(1, m + 1)], x.dtype).reshape((m,) + (1,) * x.ndim)
    q = jnp.round(x * scale) / scale  # x rounded to the grids 2**-k, ..., 2**-mk: exact (powers of two)
    return jnp.concatenate([q[:1], q[1:] - q[:-1]]), x - q[-1]  # differences of nested roundings are exact


def dot_hi_lo(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Matrix product `a @ b` of float32 matrices in extended precision, as an unevaluated pair `hi + lo`.

    **Arguments:** `a` of shape `(r, n)`, `b` of shape `(n, c)`, float32.

    **Returns:** `(hi, lo)`, float32 arrays of shape `(r, c)` with `hi + lo ~= a @ b`; the error of entry (i, j) is
    below about `n * 2**-48 * max|a[i, :]| * max|b[:, j]|`, against float32's `2**-24 * (|a| @ |b|)[i, j]`.
    """
    n = a.shape[-1]
    # Slices carry k bits; products of two slices summed over n terms stay below 2**24, hence exact in float32.
    k = (24 - max(1, math.ceil(math.log2(n)))) // 2
    m = math.ceil(24 / k)  # number of slices
    ea, eb = _exponent(a, -1), _exponent(b, -2)  # a row-wise and b column-wise power-of-two scale
    an, bn = _scale_pow2(a, -ea), _scale_pow2(b, -eb)
    sa, a_rest = _slices(an, k, m)
    sb, b_rest = _slices(bn, k, m)
    # Slice i is below 2**(-i k): pairs with i + j < m are computed exactly (one batched matmul); the other pairs
    # (entries below 2**(-m k) <= 2**-24) and the remainders in plain float32, whose rounding is then ~n 2**-48.
    pairs = [(i, j) for i in range(m) for j in range(m) if i + j < m]
    exact = _matmul(sa[jnp.array([i for i, _ in pairs])], sb[jnp.array([j for _, j in pairs])])
    tails = jnp.stack([sb[m - i :].sum(0) for i in range(1, m)])
    small = _matmul(sa[1:], tails).sum(0) + _matmul(an - a_rest, b_rest) + _matmul(a_rest, bn)
    hi, lo = exact[0], jnp.zeros_like(small)
    for t in [*exact[1:], small]:
        hi, e = two_sum(hi, t)
        lo = lo + e
    hi, lo = two_sum(hi, lo)
    scale = ea + eb  # (n, 1) + (1, m)
    return _scale_pow2(hi, scale), _scale_pow2(lo, scale)


# ----------------------------------------------------------------------------------------------------------------
# eigh.


def _eigh_root(a, p, eps, precise):
    a = a.astype(jnp.float32)
    n = a.shape[-1]
    eye = jnp.eye(n, dtype=a.dtype)
    w, v = jnp.linalg.eigh(a)
    ridge = eps * jnp.maximum(w[-1], 0.0)  # an all-zero matrix has no root: inf, i.e. failure
    plain = _matmul(v * (jnp.maximum(w, 0.0) + ridge) ** (-1.0 / p), v.T)
    if precise:
        y_hi, y_lo = dot_hi_lo(a, v)  # A V
        s_hi, s_lo = dot_hi_lo(v.T, y_hi)  # V^T A V
        s = s_hi + (s_lo + _matmul(v.T, y_lo))
        s = 0.5 * (s + s.T) + ridge * eye
        # Large diagonal first: Cholesky + SVD of a graded matrix is then accurate relative to each eigenvalue.
        order = jnp.argsort(-jnp.diagonal(s))
        s = s[order][:, order]
        chol = jnp.linalg.cholesky(s)
        u, sv, _ = jnp.linalg.svd(chol)
        v = _matmul(v[:, order], u)
        root = _matmul(v * (sv * sv) ** (-1.0 / p), v.T)
        # Cholesky fails (NaN) if rounding left S indefinite despite the ridge: fall back to the plain root.
        return jnp.where(jnp.all(jnp.isfinite(root)), root, plain)
    return plain


# ----------------------------------------------------------------------------------------------------------------
# Coupled Newton.


def _power_iteration(a, iters=100, tol=1e-7):
    """Largest eigenvalue of a symmetric PSD matrix (Rayleigh quotient, stops when it moves by < tol relative)."""
    v0 = jnp.ones(a.shape[-1], a.dtype) + 0.1 * jnp.arange(a.shape[-1], dtype=a.dtype)  # deterministic start

    def body(c):
        i, v, lam, _ = c
        av = _matmul(a, v)
        new = jnp.vdot(v, av)
        return i + 1, av / jnp.linalg.norm(av), new, lam

    def cond(c):
        i, _, lam, old = c
        return (i < iters) & (jnp.abs(lam - old) > tol * jnp.abs(lam))

    v0 = v0 / jnp.linalg.norm(v0)
    _, _, lam, _ = lax.while_loop(cond, body, (0, v0, jnp.zeros((), a.dtype), jnp.array(jnp.inf, a.dtype)))
    return lam


def _newton_root(a, p, eps, precise, precise_iters=8, max_iters=100, tol=1e-6, fail_above=0.1):
    a = a.astype(jnp.float32)
    n = a.shape[-1]
    p_int, p = jnp.asarray(p).astype(jnp.int32), jnp.asarray(p, jnp.float32)  # p may be traced
    eye = jnp.eye(n, dtype=a.dtype)
    ridge = eps * _power_iteration(a)
    # Scale by a power of two (exact) so that the eigenvalues of M0 = z (A + ridge) lie in (0, (p + 1) / 2].
    fro = jnp.sqrt(jnp.sum(a * a)) + n**0.5 * ridge
    z_exp = jnp.floor(jnp.log2((1.0 + p) / (2.0 * fro))).astype(jnp.int32)
    m_hi, m_lo = two_sum(_scale_pow2(a, z_exp), _scale_pow2(ridge, z_exp) * eye)  # exact damped start
    h = _scale_pow2(jnp.ones((), a.dtype), z_exp) ** (1.0 / p) * eye

    def step_t(m):
        return ((p + 1.0) * eye - m) / p

    if precise:

        def precise_body(_, c):
            m_hi, m_lo, h = c
            t = step_t(m_hi)

            def times_t(_, m):  # M <- T M, carried as hi + lo
                x_hi, x_lo = dot_hi_lo(t, m[0])
                return two_sum(x_hi, x_lo + _matmul(t, m[1]))

            m_hi, m_lo = lax.fori_loop(0, p_int, times_t, (m_hi, m_lo))
            return m_hi, m_lo, _matmul(h, t)

        m_hi, m_lo, h = lax.fori_loop(0, precise_iters, precise_body, (m_hi, m_lo, h))
    m = m_hi + m_lo

    def body(c):
        i, m, h, _, err, _ = c
        t = step_t(m)
        new_m = lax.fori_loop(0, p_int, lambda _, x: _matmul(t, x), m)  # T^p M
        new_err = jnp.max(jnp.abs(new_m - eye))
        return i + 1, new_m, _matmul(h, t), h, new_err, err

    def cond(c):
        i, _, _, _, err, old_err = c
        # Stop when converged, or when the error grows (rounding has taken over): then keep the previous iterate.
        return (i < max_iters) & (err > tol) & (err <= 1.2 * old_err)

    err0 = jnp.max(jnp.abs(m - eye))
    _, m, h, old_h, err, old_err = lax.while_loop(cond, body, (0, m, h, h, err0, jnp.array(jnp.inf, a.dtype)))
    grew = err > 1.2 * old_err
    h, err = jnp.where(grew, old_h, h), jnp.where(grew, old_err, err)
    return jnp.where(err < fail_above, 0.5 * (h + h.T), jnp.nan)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point.


def matrix_inverse_pth_root(matrix: jax.Array | np.ndarray, p: int | jax.Array, *, eps: float = 1e-6,
                            method: str = "eigh", precise: bool = True) -> jax.Array:
    """Inverse p-th root `(A + eps * lambda_max(A) * I)^(-1/p)` of a symmetric positive semi-definite matrix.

    **Arguments:**

    - `matrix`: float32 array of shape `(n, n)` or `(..., n, n)` (a batch), symmetric PSD.
    - `p`: positive integer exponent, or an integer array broadcastable to the batch shape (one exponent per
      matrix). It may be traced: one compiled computation serves every exponent.
    - `eps`: relative ridge; `eps * lambda_max(A)` is added to the diagonal (scalable_shampoo's convention), so the
      condition number seen by the root is at most about `1 / eps`. `eps=0` gives the plain root of a definite A.
    - `method`: `"eigh"` (eigendecomposition) or `"newton"` (coupled Newton iteration, matrix products only).
    - `precise`: refine in extended precision (see the module docstring). Costs about 3x (eigh) and 10x (newton)
      the plain float32 method; without it the relative error grows like `6e-8 * condition number`.

    **Returns:** float32 array of the same shape; non-finite entries signal failure (e.g. an indefinite input or
    Newton not converging), so callers can keep a previous root with `jnp.isfinite`.
    """
    if method not in ("eigh", "newton"):
        raise ValueError(f"method must be 'eigh' or 'newton', got {method!r}")
    if isinstance(p, (int, np.integer)) and p < 1:
        raise ValueError(f"p must be a positive integer, got {p}")
    matrix = jnp.asarray(matrix, jnp.float32)
    batch = matrix.shape[:-2]
    p = jnp.broadcast_to(jnp.asarray(p, jnp.float32), batch)
    fn = functools.partial(_eigh_root if method == "eigh" else _newton_root, eps=eps, precise=precise)
    if not batch:
        return fn(matrix, p)
    flat, p = matrix.reshape((-1,) + matrix.shape[-2:]), p.reshape(-1)
    if method == "newton":
        out = jax.vmap(fn)(flat, p)
    else:
        # One matrix at a time: batched LAPACK calls split their batch over XLA's CPU thread pool and wait for it,
        # and two of them running side by side (one per statistic size) can deadlock that pool (seen with
        # jaxlib 0.10.2 on 2 cores). Unbatched calls run inline.
        out = lax.map(lambda ap: fn(*ap), (flat, p))
    return out.reshape(matrix.shape)
