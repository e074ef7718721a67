"""A model family is one file: a family defined and registered in this test module alone is created by name, trained
one step, saved, reloaded, and exported to ONNX and TFLite (verified against JAX), with no change anywhere in
`patient/` (registry, weight import, io and export read the family's own record and its `fold` method)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import patient
from patient.models import apply, create, list_models
from patient.models import fold as F
from patient.models.layers import BatchNorm, Conv2d, Linear, Normalize, split
from patient.models.spec import FAMILIES, VARIANTS, Family, register_family, register_variant


class ToyNet(eqx.Module):
    """conv-BN-ReLU stem, one residual conv-BN block, global pool, linear head; one (C, H, W) image in [0, 1]."""

    normalize: Normalize
    stem: Conv2d
    bn_stem: BatchNorm
    conv: Conv2d
    bn: BatchNorm
    fc: Linear
    spec: object = eqx.field(static=True)

    def __init__(self, *, width, num_classes, spec, key):
        k1, k2, k3 = split(key, 3)
        self.normalize = Normalize(spec.mean, spec.std)
        self.stem = Conv2d(3, width, 3, stride=2, padding=1, key=k1)
        self.bn_stem = BatchNorm(width, "bn_stem")
        self.conv = Conv2d(width, width, 3, padding=1, key=k2)
        self.bn = BatchNorm(width, "bn")
        self.fc = Linear(width, num_classes, key=k3)
        self.spec = spec

    def __call__(self, x, state, *, train=False, key=None):
        x, state = self.bn_stem(self.stem(self.normalize(x)), state, train)
        x = jax.nn.relu(x)
        y, state = self.bn(self.conv(x), state, train)
        x = jax.nn.relu(x + y)
        pooled = x.mean(axis=(1, 2))
        feats = {"stem": x, "stage1": x, "stage2": x, "stage3": x, "stage4": x, "pre_logits": pooled}
        return self.fc(pooled), feats, state

    def fold(self, state):
        return [*F.fold_input(self.normalize, F.fold_conv(self.stem, self.bn_stem, state)), F.Act("relu"),
                F.Residual((), (F.fold_conv(self.conv, self.bn, state),), None, "relu"),
                F.GlobalPool(False), F.fold_linear(self.fc)]


@pytest.fixture
def toy_family():
    register_family(Family("toy", ToyNet, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), head="fc"))
    register_variant("toy_net", "toy", 32, "a toy family defined in a test", width=8)
    yield
    VARIANTS.pop("toy_net")
    FAMILIES.pop("toy")


def test_a_family_defined_outside_patient_runs_saves_and_exports(toy_family, tmp_path):
    from patient.export import to_onnx, to_tflite
    from patient.runtime import open_model

    assert "toy_net" in list_models()
    model, state = create("toy_net", num_classes=10, key=jax.random.key(0))
    assert model.spec.mean == (0.5, 0.4, 0.3)  # the family's record is the one source of the normalisation
    x = jax.random.uniform(jax.random.key(1), (4, 3, 32, 32))
    _, _, state = apply(model, state, x, train=True)  # non-trivial running statistics to fold
    path = patient.save(tmp_path / "toy.eqx", model, state, class_names=[str(i) for i in range(10)])
    loaded, loaded_state, _ = patient.load(path)
    want = np.asarray(apply(model, state, x)[0])
    np.testing.assert_array_equal(np.asarray(apply(loaded, loaded_state, x)[0]), want)
    for export, suffix in ((to_onnx, ".onnx"), (to_tflite, ".tflite")):
        report = export(path, tmp_path / f"toy{suffix}", verify_size=8)  # raises unless it matches JAX
        assert report["verification"]["max_abs_diff"] <= 1e-4
        got = open_model(report["path"]).predict(np.asarray(x))
        np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())), rtol=0)


def test_the_registry_refuses_a_variant_of_an_unknown_family():
    with pytest.raises(ValueError, match="not registered"):
        register_variant("ghost_net", "ghost", 32, "no such family")
    assert "ghost_net" not in list_models()


def test_fold_needs_a_fold_method(toy_family):
    from patient.models.fold import fold

    class NoFold(eqx.Module):
        spec: object = eqx.field(static=True)

    model, _ = create("toy_net", num_classes=3, key=jax.random.key(0))
    with pytest.raises(TypeError, match="defines no fold"):
        fold(NoFold(model.spec), {})
    assert jnp.isfinite(F.fold_linear(model.fc).weight).all()
