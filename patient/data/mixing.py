"""Mixup on device, inside the jitted train step (the `fm` "function matching" mode).

Mixup lives in the step rather than in the loader: it is two fused multiply-adds on arrays already on device, it
draws from the step's explicit key (so a resumed run replays it exactly), and mixing the student and the teacher view
in one call makes "the same mixup for both views" true by construction.

As in the paper's code (big_vision): one lambda per batch, lambda ~ Beta(alpha, alpha) folded to max(lambda, 1 - lambda)
so the example itself always dominates, and one partner per example, the previous one in the batch (a roll by one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["mixup"]


def mixup(key: jax.Array, *arrays: jax.Array, alpha: float = 1.0) -> tuple[jax.Array, ...]:
    """Mix every array in `arrays` with the same lambda and the same partners.

    **Arguments:**

    - `key`: a JAX PRNG key (one draw per batch).
    - `*arrays`: arrays with a common leading batch axis, e.g. the student view `f32[B, C, Hs, Ws]` and the teacher
      view `f32[B, C, Ht, Wt]` (and one-hot labels, if a loss wants them mixed too).
    - `alpha`: the Beta distribution's concentration (> 0); 1.0 gives lambda uniform on [0.5, 1].

    **Returns:** `(*mixed, lam)`: `mixed[j][i] = lam * arrays[j][i] + (1 - lam) * arrays[j][i - 1]` (example 0's
    partner is the last one), each with its input's shape and dtype, and the scalar `lam` (float32, >= 0.5).

    Under a sharded `jit` the roll crosses device boundaries (it is a roll of the global batch); inside `shard_map` it
    rolls each device's block, which is an equally valid partner choice.
    """
    if not alpha > 0:
        raise ValueError(f"mixup(alpha={alpha}): alpha must be > 0")
    if not arrays:
        raise ValueError("mixup(): pass at least one array to mix")
    batch = arrays[0].shape[0]
    for a in arrays:
        if a.ndim == 0 or a.shape[0] != batch:
            shapes = [x.shape for x in arrays]
            raise ValueError(f"mixup(): every array needs the same leading batch axis; got shapes {shapes}")
    lam = jax.random.beta(key, alpha, alpha, dtype=jnp.float32)
    lam = jnp.maximum(lam, 1.0 - lam)
    mixed = tuple((lam * a + (1.0 - lam) * jnp.roll(a, 1, axis=0)).astype(a.dtype) for a in arrays)
    return (*mixed, lam)
