"""CRD (patient.engine.crd) against a float64 numpy implementation of the paper's NCE loss and memory update, and in
the engine: it trains, its banks move, and a resume from a checkpoint is bit-identical (the banks are in the state)."""

import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patient.data import digits
from patient.engine import ConfigError, distill
from patient.engine.crd import Embed, contrast_indices, crd_loss, init_memory, update_memory
from patient.models import create


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_nce(v, bank, idx, T, z):
    """float64: scores exp(v . bank[idx] / T) / Z, then -log(P_pos / (P_pos + K/N + eps)) - sum log(K/N / (P_neg +
    K/N + eps)), averaged over the batch. Z <= 0 means "first step": Z = N * mean of the unnormalised scores."""
    n = bank.shape[0]
    out = np.exp(np.einsum("bkf,bf->bk", bank[idx], v) / T)
    z = out.mean() * n if z <= 0 else z
    p = out / z
    k_pn = (idx.shape[1] - 1) / n
    d1 = np.log(p[:, 0] / (p[:, 0] + k_pn + 1e-7))
    d0 = np.log(k_pn / (p[:, 1:] + k_pn + 1e-7))
    return -(d1.sum() + d0.sum()) / v.shape[0], z


@pytest.mark.parametrize("n_data, negatives", [(50, 20), (12, 40)])  # bank rows gathered / whole bank scored
@pytest.mark.parametrize("first_step", [True, False])
def test_crd_loss_matches_float64_reference(n_data, negatives, first_step):
    rng = np.random.default_rng(0)
    B, F, T = 6, 16, 0.07
    e_s, e_t = _unit(rng.normal(size=(B, F))), _unit(rng.normal(size=(B, F)))
    mem = {"student": _unit(rng.normal(size=(n_data, F))), "teacher": _unit(rng.normal(size=(n_data, F)))}
    idx = np.concatenate([rng.choice(n_data, (B, 1), replace=False), rng.integers(0, n_data, (B, negatives))], 1)
    z_in = (-1.0, -1.0) if first_step else (3.5, 0.25)
    ref_s, z_s = reference_nce(e_s, mem["teacher"], idx, T, z_in[0])  # the student against the teacher bank
    ref_t, z_t = reference_nce(e_t, mem["student"], idx, T, z_in[1])  # and the teacher against the student bank
    memory = {k: jnp.asarray(v, jnp.float32) for k, v in mem.items()}
    memory.update(z_student=jnp.float32(z_in[0]), z_teacher=jnp.float32(z_in[1]))
    loss, z = crd_loss(jnp.asarray(e_s, jnp.float32), jnp.asarray(e_t, jnp.float32), memory, jnp.asarray(idx),
                       temperature=T)
    np.testing.assert_allclose(float(loss), ref_s + ref_t, rtol=2e-5)
    np.testing.assert_allclose([float(z["z_student"]), float(z["z_teacher"])], [z_s, z_t], rtol=2e-5)
    # the positive (column 0) pulls: its term alone is the bulk of the loss at this temperature
    assert math.isfinite(float(loss)) and float(loss) > 0


def test_crd_gradients_reach_the_embeddings_only():
    rng = np.random.default_rng(1)
    B, F, N = 4, 8, 30
    e_s, e_t = (jnp.asarray(_unit(rng.normal(size=(B, F))), jnp.float32) for _ in range(2))
    memory = init_memory(N, F, seed=0)
    idx = contrast_indices(jax.random.key(0), jnp.arange(B), N, 10)
    assert idx.shape == (B, 11) and np.array_equal(np.asarray(idx[:, 0]), np.arange(B))
    g_s, g_t, g_mem = jax.grad(lambda a, b, m: crd_loss(a, b, m, idx, temperature=0.07)[0], argnums=(0, 1, 2))(
        e_s, e_t, memory)
    for g in (g_s, g_t):
        assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(g_mem))  # the banks are buffers


def test_memory_update_matches_float64_reference():
    rng = np.random.default_rng(2)
    N, F, m = 10, 6, 0.5
    memory = init_memory(N, F, seed=3)
    rows = np.asarray(memory["student"])
    assert abs(np.linalg.norm(rows, axis=1).mean() - 1) < 0.3  # about unit rows, as the authors initialise them
    e_s, e_t = _unit(rng.normal(size=(3, F))), _unit(rng.normal(size=(3, F)))
    index = np.array([4, -1, 7])  # -1: padding, never written
    z = {"z_student": jnp.float32(2.0), "z_teacher": jnp.float32(3.0)}
    new = update_memory(memory, jnp.asarray(e_s, jnp.float32), jnp.asarray(e_t, jnp.float32), jnp.asarray(index), z,
                        momentum=m)
    for side, e in (("student", e_s), ("teacher", e_t)):
        want = np.asarray(memory[side], np.float64).copy()
        for b, i in enumerate(index):
            if i >= 0:
                want[i] = _unit(m * want[i] + (1 - m) * e[b])
        np.testing.assert_allclose(np.asarray(new[side]), want, rtol=1e-5, atol=1e-6)
    assert float(new["z_student"]) == 2.0 and float(new["z_teacher"]) == 3.0


def test_embed_is_a_unit_linear_map():
    emb = Embed(5, 3, key=jax.random.key(0))
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    ref = _unit(x.astype(np.float64) @ np.asarray(emb.weight, np.float64).T + np.asarray(emb.bias, np.float64))
    np.testing.assert_allclose(np.asarray(emb(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-6)


RES = 16


def _pair():
    t = create("cifar_resnet20", num_classes=10, key=jax.random.key(0), resolution=RES, depths=(1, 1, 1))
    s = create("cifar_resnet20", num_classes=10, key=jax.random.key(1), resolution=RES, depths=(1, 1, 1))
    return t, s


@pytest.mark.slow  # three short distillations (about 45 s); the CRD unit tests above stay in the fast lane
def test_crd_resume_from_a_checkpoint_is_bit_identical(tmp_path):
    """Steps 4-6 of a resumed run score against the restored banks: a bank that were not checkpointed (or restored
    wrongly) would change the student. The uninterrupted run's step-6 checkpoint is removed, as a kill would."""
    t, s = _pair()
    kw = dict(steps=6, batch_size=32, checkpoint_every=3, keep_checkpoints=3, method="crd", crd_negatives=512,
              log_every=1, progress=False, workdir=tmp_path)
    first = distill(t, s, digits("test"), **kw)
    assert all(math.isfinite(h["crd"]) for h in first.history if "crd" in h)
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    again = distill(t, s, digits("test"), **kw)
    for x, y in zip(jax.tree_util.tree_leaves(first.student), jax.tree_util.tree_leaves(again.student)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    # the control: a run without the banks' influence (weight 0) ends elsewhere, so the comparison can fail
    other = distill(t, s, digits("test"), **{**kw, "workdir": tmp_path / "w0", "method_weight": 0.0})
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(first.student), jax.tree_util.tree_leaves(other.student)))


def test_crd_errors_at_start_up():
    t, s = _pair()
    with pytest.raises(ValueError, match="crd: student feature 'stage3' has shape .* needs f32\\[B, D\\]"):
        distill(t, s, digits("test"), steps=1, method="crd", method_pairs=("stage3",), progress=False)
    with pytest.raises(ConfigError, match="method='crd' needs the teacher's features"):
        distill(t, s, digits("test"), steps=1, method="crd", mode="fix/rs", progress=False)
    with pytest.raises(ConfigError, match="crd_momentum=1.0"):
        distill(t, s, digits("test"), steps=1, method="crd", crd_momentum=1.0, progress=False)


def test_every_method_is_one_table_entry():
    """The step's table (patient.engine.methods), the shape checker's list and the config's check agree."""
    from patient.engine import Config, ConfigError
    from patient.engine import feature_losses as fl
    from patient.engine.methods import METHODS

    assert set(METHODS) == set(fl.METHODS) | {"kl"}
    for name in METHODS:
        Config(method=name)
    with pytest.raises(ConfigError, match="method='mine'; use one of kl, kd, dkd, deit, fitnets, at, nst, fsp, srd, crd"):
        Config(method="mine")
