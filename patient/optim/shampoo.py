"""Shampoo as an optax transformation: Kronecker-factored preconditioning, blocked, grafted onto a first-order method.

    opt = patient.optim.shampoo(1e-3)  # optax.chain(scale_by_shampoo(...), trace, weight decay, learning rate)

What happens to each parameter (its gradient G):

1. **Shape.** Consecutive dimensions are merged while their product stays <= `block_size` (scalable_shampoo's
   `merge_small_dims`: an `(O, I, H, W)` kernel `(16, 8, 3, 3)` becomes `(128, 9)`), except that a tensor with two
   or more dimensions > 1 is never merged into a vector: if everything fits in one block it becomes
   `(first dimension, product of the rest)`, e.g. `(20, 6)` stays `(20, 6)` and `(4, 3, 3, 3)` becomes `(4, 27)`.
   Parameters with fewer than two dimensions > 1 (biases, scales, scalars) take the graft update only. A merged
   dimension longer than `max_precond_dim` gets no preconditioner (identity on that side) and is not split; the
   others are split into blocks of `block_size` (the last block zero-padded, which leaves the statistics and roots
   of the real rows unchanged).
2. **Statistics.** One per preconditioned dimension per block, e.g. for a 2-D block `L = b2 L + (1 - b2) G G^T` and
   `R = b2 R + (1 - b2) G^T G`; plain sums when `b2 == 1`. Updated every step, in float32.
3. **Roots.** `(L + matrix_eps * lambda_max(L) I)^(-1/p)` (relative ridge, as scalable_shampoo), with
   `p = 2 * (number of preconditioned dimensions)` unless `exponent_override`; recomputed at update number
   `start_preconditioning_step` and every `precondition_every` updates after (a `lax.cond` on the step count, so
   nothing recompiles). A root that comes out non-finite keeps the previous one (the identity at first). See
   `patient.optim.roots` for the methods and their accuracy (about 1e-6 relative up to condition number 1e6).
4. **Grafting, per block.** The preconditioned block, e.g. `L^(-1/4) G R^(-1/4)`, is rescaled to the Frobenius norm
   of the same block of the graft update (so a blocked parameter behaves exactly like its blocks as separate
   parameters; for an unblocked parameter this is scalable_shampoo's layer-wise grafting). The first
   `start_preconditioning_step` updates are the graft update alone.

Grafts (each equals, while Shampoo is off, the optax optimizer named):

- `"rmsprop_normalized"` (default): RMSProp with bias correction on G / ||G|| (normalised per parameter), i.e.
  `optax.rmsprop(lr, decay=b2, eps=graft_eps, momentum=b1, nesterov=nesterov, bias_correction=True)` fed G / ||G||.
- `"rmsprop"`: the same on G.
- `"adagrad"`: `optax.adagrad(lr, initial_accumulator_value=0.0, eps=graft_eps)` (with `b1=0`).
- `"sgd"`: `optax.sgd(lr, momentum=b1, nesterov=nesterov)`.
- `"adam"`: `optax.adam(lr, b1, b2, eps=graft_eps, nesterov=nesterov)`. Here b1 is Adam's own bias-corrected first
  moment, and it is that first moment (not G) which Shampoo preconditions; no further momentum is applied.

For the other grafts, momentum is heavy-ball `optax.trace(b1, nesterov)` on the grafted update (as in
scalable_shampoo), so steps are about `1 / (1 - b1)` times the graft step (learning rates ~10x below Adam's). The
learning rate comes after momentum, like `optax.sgd` (`optax.rmsprop` applies it before; the two differ only while
the learning rate changes). Weight decay is decoupled and multiplied by the learning rate, as in `optax.adamw`:
`update = -lr * (direction + weight_decay * param)`.

Costs: memory per preconditioned parameter is two `b x b` float32 matrices per block and dimension (statistic and
root). Every `precondition_every` steps all roots are recomputed at once (eigh, plus the precise refinement: roughly
3x a plain float32 eigh), so that step is slower than the others.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from .roots import matrix_inverse_pth_root

GRAFTS = ("rmsprop_normalized", "rmsprop", "adagrad", "sgd", "adam")
_HIGHEST = lax.Precision.HIGHEST


class ScaleByShampooState(NamedTuple):
    """State of `scale_by_shampoo`; every leaf is an array.

    - `count`: int32 scalar, number of updates so far.
    - `mu`: Adam first moment (pytree like the parameters) for `graft="adam"`, else `()`.
    - `nu`: graft second moment / sum of squares (like the parameters), `()` for `graft="sgd"`.
    - `stats`: per parameter a tuple with one float32 array `(num_blocks, b, b)` per preconditioned dimension
      (`()` for parameters that take the graft update).
    - `roots`: the inverse roots currently in use, same structure as `stats`.
    """

    count: jax.Array
    mu: Any
    nu: Any
    stats: Any
    roots: Any


# ----------------------------------------------------------------------------------------------------------------
# Static plan: how a parameter of a given shape is reshaped and blocked.


def merge_small_dims(shape: Sequence[int], max_dim: int) -> tuple[int, ...]:
    """Merge consecutive dimensions while their product is <= max_dim, dropping 1s.

    `(16, 8, 3, 3), 128 -> (128, 9)`; `(1, 2, 512, 1, 2048, 1, 3, 4), 1024 -> (1024, 2048, 12)`; `(5,) -> (5,)`.
    """
    merged, product = [], 1
    for d in shape:
        if product * d <= max_dim:
            product *= d
        else:
            if product > 1:
                merged.append(product)
            product = d
    if product > 1:
        merged.append(product)
    return tuple(merged)


@dataclasses.dataclass(frozen=True)
class _Plan:
    shape: tuple  # original shape
    merged: tuple  # after merge_small_dims
    blocks: tuple  # block length along each merged dimension
    counts: tuple  # number of blocks along each merged dimension
    precond: tuple  # whether each merged dimension has a preconditioner

    @property
    def num_blocks(self):
        return math.prod(self.counts)

    @property
    def stat_sizes(self):
        return tuple(b for b, pre in zip(self.blocks, self.precond) if pre)


def _plan(shape, block_size, max_precond_dim):
    """The plan for a parameter of this shape, or None if it takes the graft update only."""
    merged = merge_small_dims(shape, block_size or max_precond_dim)
    nontrivial = [d for d in shape if d > 1]
    if len(merged) < 2 and len(nontrivial) >= 2:
        # A small matrix or kernel that merged into a vector stays a matrix: (first dim, product of the rest).
        merged = (nontrivial[0], math.prod(nontrivial[1:]))
    if len(merged) < 2:
        return None
    blocks, counts, precond = [], [], []
    for d in merged:
        if d > max_precond_dim:
            blocks.append(d), counts.append(1), precond.append(False)
        elif block_size and d > block_size:
            blocks.append(block_size), counts.append(-(-d // block_size)), precond.append(True)
        else:
            blocks.append(d), counts.append(1), precond.append(True)
    if not any(precond):
        return None
    return _Plan(tuple(shape), merged, tuple(blocks), tuple(counts), tuple(precond))


def _to_blocks(x, plan):
    """Array of the parameter's shape -> `(num_blocks, *plan.blocks)`, zero-padded."""
    x = x.reshape(plan.merged)
    pads = [(0, c * b - d) for d, b, c in zip(plan.merged, plan.blocks, plan.counts)]
    if any(hi for _, hi in pads):
        x = jnp.pad(x, pads)
    r = len(plan.merged)
    x = x.reshape([n for cb in zip(plan.counts, plan.blocks) for n in cb])  # (c1, b1, c2, b2, ...)
    x = x.transpose(list(range(0, 2 * r, 2)) + list(range(1, 2 * r, 2)))  # (c1, c2, ..., b1, b2, ...)
    return x.reshape((plan.num_blocks,) + plan.blocks)


def _from_blocks(xb, plan):
    """Inverse of `_to_blocks`."""
    r = len(plan.merged)
    x = xb.reshape(plan.counts + plan.blocks)
    x = x.transpose([i for k in range(r) for i in (k, r + k)])
    x = x.reshape([c * b for c, b in zip(plan.counts, plan.blocks)])
    x = x[tuple(slice(0, d) for d in plan.merged)]
    return x.reshape(plan.shape)


def _gram(xb, axis):
    """Per block, the Gram matrix of the slices along block axis `axis` (1-based): `G G^T` for axis 1 of a 2-D block."""
    y = jnp.moveaxis(xb, axis, 1)
    y = y.reshape(y.shape[0], y.shape[1], -1)
    return jnp.einsum("nij,nkj->nik", y, y, precision=_HIGHEST)


def _precondition(xb, roots, plan):
    """Multiply every block by its roots along each preconditioned axis: `L^(-1/4) G R^(-1/4)` for 2-D blocks."""
    roots = iter(roots)
    for pre in plan.precond:
        # Contract the leading block axis and append the result last; after all axes the order is restored.
        if pre:
            xb = jnp.einsum("na...,nab->n...b", xb, next(roots), precision=_HIGHEST)
        else:
            xb = jnp.moveaxis(xb, 1, -1)
    return xb


# ----------------------------------------------------------------------------------------------------------------
# The transformation.


def scale_by_shampoo(
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    block_size: int | None = 128,
    matrix_eps: float = 1e-6,
    precondition_every: int = 10,
    start_preconditioning_step: int = 10,
    graft: str = "rmsprop_normalized",
    graft_eps: float = 1e-8,
    nesterov: bool = True,
    exponent_override: int | None = None,
    max_precond_dim: int = 4096,
    inverse_root: str = "eigh",
    precise_roots: bool = True,
) -> optax.GradientTransformation:
    """Shampoo's preconditioned direction, grafted per block onto a first-order update (no learning rate, no momentum
    except Adam's own). See the module docstring for the algorithm; `shampoo` adds momentum and the learning rate.

    **Arguments:**

    - `b1`: momentum (applied by `shampoo` as `optax.trace(b1, nesterov)`); Adam's first moment for `graft="adam"`.
    - `b2`: EMA decay of the statistics and of the graft's second moment; `1.0` makes both plain sums.
    - `block_size`: dimensions longer than this are split into blocks (preconditioner cost is cubic in it); also
      the limit for merging small dimensions. `None`: no blocking, merge up to `max_precond_dim`.
    - `matrix_eps`: relative ridge; roots are of `L + matrix_eps * lambda_max(L) * I`.
    - `precondition_every`: steps between root recomputations (default 10).
    - `start_preconditioning_step`: number of initial updates that use the graft alone (default 10); the first
      roots are computed at this step.
    - `graft`: `"rmsprop_normalized"` (default), `"rmsprop"`, `"adagrad"`, `"sgd"` or `"adam"` (module docstring).
    - `graft_eps`: epsilon of the graft optimizer (inside the square root for rmsprop/adagrad, outside for adam).
    - `nesterov`: Nesterov momentum.
    - `exponent_override`: use `p` instead of `2 * (number of preconditioned dimensions)`.
    - `max_precond_dim`: merged dimensions longer than this get no preconditioner (default 4096).
    - `inverse_root`: `"eigh"` (default) or `"newton"`.
    - `precise_roots`: extended-precision refinement of the roots (default True, see `patient.optim.roots`);
      False is 3-10x cheaper per root but its relative error grows like 6e-8 x the condition number.

    **Returns:** an `optax.GradientTransformation` with state `ScaleByShampooState`.
    """
    if graft not in GRAFTS:
        raise ValueError(f"graft must be one of {GRAFTS}, got {graft!r}")
    if inverse_root not in ("eigh", "newton"):
        raise ValueError(f"inverse_root must be 'eigh' or 'newton', got {inverse_root!r}")
    if precondition_every < 1 or start_preconditioning_step < 0:
        raise ValueError("need precondition_every >= 1 and start_preconditioning_step >= 0")
    if graft == "adam" and b2 == 1.0:
        raise ValueError("graft='adam' needs b2 < 1")
    plan_of = lambda p: _plan(jnp.shape(p), block_size, max_precond_dim)  # noqa: E731

    def exponent(plan):
        return exponent_override or 2 * len(plan.stat_sizes)

    def init_fn(params):
        def stats(p, fill):
            plan = plan_of(p)
            if plan is None:
                return ()
            return tuple(jnp.tile(fill(b), (plan.num_blocks, 1, 1)) for b in plan.stat_sizes)

        zeros = lambda b: jnp.zeros((b, b), jnp.float32)  # noqa: E731
        eye = lambda b: jnp.eye(b, dtype=jnp.float32)  # noqa: E731
        return ScaleByShampooState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params) if graft == "adam" else (),
            nu=optax.tree.zeros_like(params) if graft != "sgd" else (),
            stats=jax.tree.map(lambda p: stats(p, zeros), params),
            roots=jax.tree.map(lambda p: stats(p, eye), params),
        )

    def graft_update(g, mu, nu, t):
        """One leaf of the graft optimizer: (graft update, what Shampoo preconditions, new mu, new nu)."""
        if graft == "sgd":
            return g, g, mu, nu
        if graft == "adagrad":
            nu = g**2 + nu
            return g * lax.rsqrt(nu + graft_eps), g, mu, nu
        if graft == "adam":
            mu = (1 - b1) * g + b1 * mu
            nu = (1 - b2) * (g**2) + b2 * nu
            if nesterov:
                m_hat = b1 * (mu / (1 - b1 ** (t + 1)).astype(mu.dtype)) + (1 - b1) * (g / (1 - b1**t).astype(g.dtype))
            else:
                m_hat = mu / (1 - b1**t).astype(mu.dtype)
            nu_hat = nu / (1 - b2**t).astype(nu.dtype)
            return m_hat / (jnp.sqrt(nu_hat) + graft_eps), m_hat, mu, nu
        # rmsprop, rmsprop_normalized
        x = g / (jnp.sqrt(jnp.sum(g * g)) + 1e-16) if graft == "rmsprop_normalized" else g
        if b2 == 1.0:  # sums, like the statistics
            nu = x**2 + nu
            nu_hat = nu
        else:
            nu = (1 - b2) * (x**2) + b2 * nu
            nu_hat = nu / (1 - b2**t).astype(nu.dtype)
        return x * lax.rsqrt(nu_hat + graft_eps), g, mu, nu

    def new_roots(stats_flat, plans, roots_flat):
        """Recompute every root. Statistics are zero-padded to a few sizes (32, 64, 128, then multiples of 128) and
        batched by size, so only a few root computations get compiled; zero rows and columns leave the roots of the
        real rows unchanged (the padded matrix is block diagonal, its lambda_max is the same)."""
        groups = {}
        for i, (stats, _plan) in enumerate(zip(stats_flat, plans)):
            for j, s in enumerate(stats):
                n = s.shape[-1]
                size = max(32, 1 << (n - 1).bit_length()) if n <= 128 else -(-n // 128) * 128
                groups.setdefault(size, []).append((i, j))
        out = [list(r) for r in roots_flat]
        for size, members in groups.items():
            pad = lambda s: jnp.pad(s, ((0, 0), (0, size - s.shape[-1]), (0, size - s.shape[-1])))  # noqa: E731
            batch = jnp.concatenate([pad(stats_flat[i][j]) for i, j in members])
            p = jnp.concatenate([jnp.full(stats_flat[i][j].shape[0], exponent(plans[i])) for i, j in members])
            roots = matrix_inverse_pth_root(batch, p, eps=matrix_eps, method=inverse_root, precise=precise_roots)
            start = 0
            for i, j in members:
                old = roots_flat[i][j]
                new = roots[start : start + old.shape[0], : old.shape[1], : old.shape[2]]
                start += old.shape[0]
                ok = jnp.all(jnp.isfinite(new), axis=(1, 2), keepdims=True)  # per block
                out[i][j] = jnp.where(ok, new, old)
        return [tuple(r) for r in out]

    def update_fn(updates, state, params=None):
        del params
        count = state.count
        t = optax.safe_int32_increment(count)  # 1-based index of this update
        grads, treedef = jax.tree.flatten(updates)
        plans = [plan_of(g) for g in grads]
        mu = treedef.flatten_up_to(state.mu) if graft == "adam" else [None] * len(grads)
        nu = treedef.flatten_up_to(state.nu) if graft != "sgd" else [None] * len(grads)
        stats = treedef.flatten_up_to(state.stats)
        roots = treedef.flatten_up_to(state.roots)

        grafted = [graft_update(g, m, n, t) for g, m, n in zip(grads, mu, nu)]
        w_old, w_new = (1.0, 1.0) if b2 == 1.0 else (b2, 1.0 - b2)
        stats = [
            ()
            if plan is None
            else tuple(
                w_old * s + w_new * _gram(_to_blocks(g.astype(jnp.float32), plan), axis)
                for s, axis in zip(st, [a + 1 for a, pre in enumerate(plan.precond) if pre])
            )
            for g, st, plan in zip(grads, stats, plans)
        ]
        since_start = count - start_preconditioning_step
        refresh = (since_start >= 0) & (since_start % precondition_every == 0)
        if any(plans):
            roots = lax.cond(refresh, lambda: new_roots(stats, plans, roots), lambda: roots)

        use_shampoo = count >= start_preconditioning_step
        out = []
        for (gu, x, _, _), rts, plan in zip(grafted, roots, plans):
            if plan is None:
                out.append(gu)
                continue
            db = _precondition(_to_blocks(x.astype(jnp.float32), plan), rts, plan)
            gb = _to_blocks(gu.astype(jnp.float32), plan)
            axes = tuple(range(1, db.ndim))
            gnorm = jnp.sqrt(jnp.sum(gb * gb, axis=axes, keepdims=True))
            dnorm = jnp.sqrt(jnp.sum(db * db, axis=axes, keepdims=True))
            direction = _from_blocks(db * (gnorm / (dnorm + 1e-16)), plan).astype(gu.dtype)
            out.append(jnp.where(use_shampoo, direction, gu))

        new_state = ScaleByShampooState(
            count=t,
            mu=treedef.unflatten([m for _, _, m, _ in grafted]) if graft == "adam" else (),
            nu=treedef.unflatten([n for _, _, _, n in grafted]) if graft != "sgd" else (),
            stats=treedef.unflatten(stats),
            roots=treedef.unflatten(roots),
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def shampoo(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    *,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    **options: Any,
) -> optax.GradientTransformation:
    """The Shampoo optimizer (Gupta et al. 2018; Anil et al. 2020, "Scalable second order optimization").

    `optax.chain` of `scale_by_shampoo(**options)` (the preconditioned, grafted direction), heavy-ball momentum
    `optax.trace(b1, nesterov)` (Adam's first moment is inside the graft for `graft="adam"`), decoupled weight decay
    and the learning rate.

    **Arguments:**

    - `learning_rate`: a float or an optax schedule (step -> learning rate).
    - `weight_decay`, `weight_decay_mask`: decoupled weight decay (times the learning rate, as `optax.adamw`); the
      mask is a pytree of bools or a callable, as for `optax.add_decayed_weights`.
    - `**options`: the keyword arguments of `scale_by_shampoo`, with its defaults: `b1` (momentum), `b2`,
      `block_size`, `matrix_eps`, `precondition_every`, `start_preconditioning_step`, `graft`, `graft_eps`,
      `nesterov`, `exponent_override`, `max_precond_dim`, `inverse_root`, `precise_roots`.

    **Returns:** an `optax.GradientTransformation` (an `optax.chain`).
    """
    try:
        bound = inspect.signature(scale_by_shampoo).bind(**options)
    except TypeError as e:
        raise TypeError(f"shampoo: {e} (options are the keyword arguments of scale_by_shampoo)") from None
    bound.apply_defaults()
    o = bound.arguments
    parts = [scale_by_shampoo(**o)]
    if o["graft"] != "adam" and o["b1"]:
        parts.append(optax.trace(decay=o["b1"], nesterov=o["nesterov"]))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
