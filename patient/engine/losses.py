"""Distillation losses on logits. Feature-based losses (FitNets, AT, NST, FSP, SRD) plug in beside these."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def teacher_probs(logits_list: Sequence[jax.Array], temperature: float) -> jax.Array:
    """Ensemble prediction: the mean of the teachers' probabilities at `temperature` (not of their logits).

    **Arguments:** `logits_list`: a list of f32[B, K] (several teachers, or one teacher at several resolutions).
    **Returns:** f32[B, K], rows summing to one.
    """
    probs = [jax.nn.softmax(z.astype(jnp.float32) / temperature, axis=-1) for z in logits_list]
    return sum(probs) / len(probs)


def kl_divergence(p_teacher: jax.Array, student_logits: jax.Array, temperature: float) -> jax.Array:
    """KL(teacher || student) per example, with the student's logits softened by `temperature` and the result scaled
    by T^2 (Hinton et al.), so gradient magnitudes do not shrink as T grows.

    **Returns:** f32[B].
    """
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_p = jnp.log(jnp.clip(p_teacher, 1e-30, 1.0))
    # 0 * log 0 = 0; written as `p == 0` (not `p > 0`) so a NaN teacher propagates instead of vanishing.
    kl = jnp.sum(jnp.where(p_teacher == 0, 0.0, p_teacher * (log_p - log_q)), axis=-1)
    return kl * temperature**2


def cross_entropy(logits: jax.Array, labels: jax.Array, *, smoothing: float = 0.0) -> jax.Array:
    """Softmax cross-entropy per example against integer labels (label -1 = unlabelled gives 0), with label smoothing.

    **Returns:** f32[B].
    """
    k = logits.shape[-1]
    onehot = jax.nn.one_hot(jnp.maximum(labels, 0), k)
    target = onehot * (1 - smoothing) + smoothing / k
    ce = -jnp.sum(target * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
    return jnp.where(labels >= 0, ce, 0.0)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy against a distribution (mixed one-hot labels under mixup). **Returns:** f32[B]."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
