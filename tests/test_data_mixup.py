"""On-device mixup: one lambda per batch, folded to >= 0.5, partner = the previous example, same for every array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patient.data import mixup


def test_mixup_mixes_both_views_identically(getkey):
    rng = np.random.default_rng(0)
    student = rng.random((6, 3, 8, 8), dtype=np.float32)
    teacher = rng.random((6, 3, 16, 16), dtype=np.float32)
    ms, mt, lam = mixup(getkey(), jnp.asarray(student), jnp.asarray(teacher))
    lam = float(lam)
    assert 0.5 <= lam <= 1.0
    assert ms.shape == student.shape and mt.shape == teacher.shape and ms.dtype == jnp.float32
    # Independent reference: example i is mixed with example i - 1 (example 0 with the last one).
    partner = [5, 0, 1, 2, 3, 4]
    np.testing.assert_allclose(ms, lam * student + (1 - lam) * student[partner], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mt, lam * teacher + (1 - lam) * teacher[partner], rtol=1e-6, atol=1e-6)


def test_mixup_recovers_one_lambda_and_the_roll_partner(getkey):
    # One-hot "images" make the mixing weights readable: row i must be lam at i and 1 - lam at i - 1.
    eye = jnp.eye(5)
    (mixed, lam) = mixup(getkey(), eye)
    lam = float(lam)
    for i in range(5):
        expected = np.zeros(5)
        expected[i] += lam
        expected[(i - 1) % 5] += 1 - lam
        np.testing.assert_allclose(mixed[i], expected, atol=1e-6)


def test_mixup_lambda_distribution(getkey):
    keys = jax.random.split(getkey(), 4000)
    lams = np.asarray(jax.vmap(lambda k: mixup(k, jnp.zeros((2, 1)))[-1])(keys))
    assert lams.min() >= 0.5 and lams.max() <= 1.0
    # Beta(1, 1) folded is uniform on [0.5, 1]: mean 0.75, std 0.5 / sqrt(12).
    assert abs(lams.mean() - 0.75) < 0.01 and abs(lams.std() - 0.5 / np.sqrt(12)) < 0.01
    # A small alpha puts lambda near 1 (little mixing).
    lams_small = np.asarray(jax.vmap(lambda k: mixup(k, jnp.zeros((2, 1)), alpha=0.1)[-1])(keys))
    assert lams_small.mean() > 0.9


def test_mixup_is_jittable_and_deterministic(getkey):
    key = getkey()
    x = jnp.arange(24.0).reshape(4, 6)
    eager = mixup(key, x)
    jitted = jax.jit(mixup)(key, x)
    np.testing.assert_allclose(eager[0], jitted[0], rtol=1e-6)
    assert float(eager[1]) == float(jitted[1])
    assert float(mixup(getkey(), x)[1]) != float(eager[1])


def test_mixup_errors(getkey):
    with pytest.raises(ValueError, match="alpha"):
        mixup(getkey(), jnp.zeros((2, 1)), alpha=0.0)
    with pytest.raises(ValueError, match="same leading batch axis"):
        mixup(getkey(), jnp.zeros((2, 1)), jnp.zeros((3, 1)))
    with pytest.raises(ValueError, match="at least one"):
        mixup(getkey())


def test_package_names_stay_the_functions_after_the_submodules_load():
    """Regression: the submodules were `mixup.py` / `pipeline.py`; once the trainer imported them, the package's
    `mixup` and `pipeline` were the modules, and `from patient.data import mixup` gave a module to call."""
    import importlib

    importlib.import_module("patient.data.mixing")
    importlib.import_module("patient.data.pipelines")
    import patient.data as pd

    assert callable(pd.mixup) and pd.mixup.__module__ == "patient.data.mixing"
    assert callable(pd.pipeline) and pd.pipeline.__module__ == "patient.data.pipelines"
