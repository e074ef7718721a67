"""Shared fixtures. Warnings are errors (pyproject); keys come from one fixture so tests are reproducible."""

import itertools
import os

# Keep tests on CPU and quiet; nothing in the suite may reach the network.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import pytest


@pytest.fixture
def getkey():
    """Returns a function that hands out a fresh PRNG key on every call (deterministic per test)."""
    counter = itertools.count()
    base = jax.random.key(0)

    def _getkey():
        return jax.random.fold_in(base, next(counter))

    return _getkey
