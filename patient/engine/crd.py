"""Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020): the NCE form with a memory bank.

Each example's student and teacher features are embedded (`Embed`: linear, then L2-normalised) into `feat_dim`
dimensions. Two memory banks hold one embedding per training example, the students' (`"student"`) and the teachers'
(`"teacher"`). For an example i with K negatives j_1..j_K drawn uniformly from the data (`contrast_indices`), the
student embedding is scored against the TEACHER bank at rows (i, j_1..j_K) and the teacher embedding against the
STUDENT bank at the same rows: `P = exp(v . m / T) / Z`. Each set of scores gets the NCE loss

    -log(P_i / (P_i + K / N)) - sum_k log((K / N) / (P_jk + K / N))      (noise distribution uniform, 1 / N)

averaged over the batch, and the CRD loss is the sum of the two. `Z` is fixed at the first step to `N` times the mean
score of that step (one constant per bank, kept in the train state). After the step the banks move towards the new
embeddings: `m_i <- normalise(momentum * m_i + (1 - momentum) * v_i)` (the banks get no gradient).

The paper's constants are the defaults of `patient.Config`: `crd_feat_dim` 128, `crd_negatives` 16384,
`crd_temperature` 0.07, `crd_momentum` 0.5. The negatives are drawn uniformly from all N examples (the paper's noise
distribution; the authors' code can also draw them from other classes, which needs labels — distillation data here
may have none). The banks live in the train state (checkpointed, replicated on a mesh: every device applies the same
update with the whole global batch's embeddings) and are never exported.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .feature_losses import _l2_normalise, torch_linear_init

Array = jax.Array
NCE_EPS = 1e-7  # the authors' constant in both NCE log-ratios


class Embed(eqx.Module):
    """CRD's embedding head: `normalise(W x + b)`, f32[B, D] -> f32[B, feat_dim], each row of unit L2 norm.
    Initialised like PyTorch's `Linear` (uniform in +-1/sqrt(D) for weight and bias)."""

    weight: Array  # (feat_dim, D)
    bias: Array  # (feat_dim,)

    def __init__(self, in_features: int, feat_dim: int, *, key: Array | None):
        self.weight, self.bias = torch_linear_init(in_features, feat_dim, key)

    def __call__(self, x: Array) -> Array:
        z = jnp.einsum("fd,bd->bf", self.weight, jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)) + self.bias
        return _l2_normalise(z)


def init_memory(n_data: int, feat_dim: int, seed: int) -> dict[str, Array]:
    """The two banks, uniform in +-sqrt(3 / feat_dim) (rows of about unit norm, as the authors initialise them), and
    the two normalising constants, -1 until the first step sets them."""
    if n_data < 2:
        raise ValueError(f"CRD needs a dataset of at least 2 examples to draw negatives from; got {n_data}")
    stdv = 1.0 / math.sqrt(feat_dim / 3)
    rng = np.random.default_rng([seed, 0xC4D])
    bank = lambda: jnp.asarray(rng.uniform(-stdv, stdv, (n_data, feat_dim)).astype(np.float32))  # noqa: E731
    return {"student": bank(), "teacher": bank(), "z_student": jnp.float32(-1.0), "z_teacher": jnp.float32(-1.0)}


def contrast_indices(key: Array, index: Array, n_data: int, negatives: int) -> Array:
    """int32[B, 1 + negatives]: column 0 the example's own row (the positive), then `negatives` rows drawn uniformly
    (with replacement) from the n_data rows."""
    neg = jax.random.randint(key, (index.shape[0], negatives), 0, n_data, dtype=jnp.int32)
    return jnp.concatenate([index.astype(jnp.int32)[:, None], neg], axis=1)


def _scores(v: Array, bank: Array, idx: Array, temperature: float) -> Array:
    """exp(v_b . bank[idx[b, k]] / T), f32[B, K+1]. With fewer bank rows than scores per example, the whole bank is
    scored once and the rows picked (cheaper); otherwise the rows are gathered first. Same values either way."""
    if bank.shape[0] <= idx.shape[1]:
        dots = jnp.take_along_axis(jnp.einsum("bf,nf->bn", v, bank), idx, axis=1)
    else:
        dots = jnp.einsum("bkf,bf->bk", bank[idx], v)
    return jnp.exp(dots / temperature)


def nce_loss(p: Array, n_data: int) -> Array:
    """The NCE loss of normalised scores p: f32[B, 1 + K] (column 0 the positive), averaged over the batch."""
    k_pn = (p.shape[1] - 1) / n_data  # K times the uniform noise probability
    log_d1 = jnp.log(p[:, 0] / (p[:, 0] + k_pn + NCE_EPS))
    log_d0 = jnp.log(k_pn / (p[:, 1:] + k_pn + NCE_EPS))
    return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / p.shape[0]


def crd_loss(e_s: Array, e_t: Array, memory: dict[str, Array], idx: Array, *, temperature: float,
             mean: Callable[[Array], Array] = lambda x: x) -> tuple[Array, dict[str, Array]]:
    """CRD's loss for embeddings `e_s`, `e_t` (f32[B, F], unit rows, e.g. from `Embed`) against the banks of `memory`
    at rows `idx` (from `contrast_indices`). `mean` averages a per-device mean over a mesh (identity on one device):
    the first step's normalising constants are global-batch means.

    **Returns:** (f32[] loss, the normalising constants `{"z_student": ..., "z_teacher": ...}` used, to keep).
    """
    n_data = memory["student"].shape[0]
    out_s = _scores(e_s, jax.lax.stop_gradient(memory["teacher"]), idx, temperature)
    out_t = _scores(e_t, jax.lax.stop_gradient(memory["student"]), idx, temperature)
    z = {}
    for name, out in (("z_student", out_s), ("z_teacher", out_t)):
        first = mean(jax.lax.stop_gradient(jnp.mean(out))) * n_data
        z[name] = jnp.where(memory[name] > 0, memory[name], first)
    loss = nce_loss(out_s / z["z_student"], n_data) + nce_loss(out_t / z["z_teacher"], n_data)
    return loss, z


def update_memory(memory: dict[str, Array], e_s: Array, e_t: Array, index: Array, z: dict[str, Array], *,
                  momentum: float) -> dict[str, Array]:
    """Move the banks' rows `index` towards the new embeddings (renormalised) and keep the constants `z`. Rows with
    index < 0 (padding) are left alone. With an index repeated in the batch one of its updates is kept."""
    index = index.astype(jnp.int32)
    n_data = memory["student"].shape[0]
    safe = jnp.where(index >= 0, index, n_data)  # out of range: dropped by the scatter

    def move(bank, v):
        row = _l2_normalise(momentum * bank[jnp.clip(index, 0, n_data - 1)] + (1.0 - momentum) * v)
        return bank.at[safe].set(jax.lax.stop_gradient(row), mode="drop")

    return {"student": move(memory["student"], e_s), "teacher": move(memory["teacher"], e_t), **z}
