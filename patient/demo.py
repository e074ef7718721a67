"""A minimal end-to-end check: build a model, run it on scikit-learn's digits, save it, reload it, and compare.

    python -m patient.demo      # a few seconds on 2 CPU cores
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

import patient
from patient.data import digits, eval_pipeline
from patient.models import apply, create, param_count


def main() -> None:
    source = digits("test")
    model, state = create("mobilenetv3_small_050", num_classes=10, key=jax.random.key(0), resolution=32)
    batch = next(iter(eval_pipeline(source, resolution=32, batch_size=64)))
    forward = eqx.filter_jit(apply)
    logits = np.asarray(forward(model, state, batch["image"])[0])
    with tempfile.TemporaryDirectory() as tmp:
        path = patient.save(Path(tmp) / "model.eqx", model, state, class_names=source.class_names)
        model2, state2, header = patient.load(path)
        again = np.asarray(forward(model2, state2, batch["image"])[0])
        size = path.stat().st_size
    print(f"model {header['spec']['name']}: {param_count(model):,} parameters, {size / 1e6:.2f} MB as .eqx")
    print(f"logits on {logits.shape[0]} digits: max |saved - reloaded| = {np.max(np.abs(logits - again)):.1e}")
    if not np.array_equal(logits, again):
        raise SystemExit("reloaded model differs from the saved one")
    print("ok: build, save, reload and run agree")


if __name__ == "__main__":
    main()
