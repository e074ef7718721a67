"""Shared fixtures. Warnings are errors (pyproject); keys come from one fixture so tests are reproducible."""

import importlib.util
import itertools
import os

# Keep tests on CPU and quiet; nothing in the suite may reach the network.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Many tests build the same small programs (the same student, step and evaluation at the same shapes) in fresh jitted
# closures, which JAX's in-memory cache cannot share. XLA's persistent cache is keyed by the compiled program itself,
# so one fresh directory per pytest run, inherited by xdist workers and subprocesses through the environment, compiles
# each program once per run (funmatch --quick: 120 -> 76 s). A fresh directory: no run reuses another's programs.
# A size limit turns on JAX's file lock around every read and write (filelock, the dev extra): without it a process
# could read an entry another is still writing, and JAX's warning about the bad entry would fail the test. Programs
# that compile in under 0.5 s (eager jnp calls, mostly) stay out: thousands of them made every write's directory scan
# slow (fast lane 268 s with all, 184 s without them).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and importlib.util.find_spec("filelock") is not None:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="patient-tests-xla-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)  # the process that made it (pytest's main) removes it
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_COMPILATION_CACHE_MAX_SIZE=str(16 << 30),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

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
