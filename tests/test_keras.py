"""Keras 3 interop: a keras.applications MobileNetV3Small as the student and a Keras CNN as the teacher in `distill`,
`train` and the mesh step; forwards against Keras's own call; `to_keras` round trips through `.keras` and ONNX; one
clear error for a non-JAX backend and for each misuse. References are Keras itself (eager `model(x)`), never the
wrapper under test.

Run alone: python -m pytest -q tests/test_keras.py (about a minute on 2 CPU cores).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported anywhere in this process

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

keras = pytest.importorskip("keras", reason='Keras interop needs the keras extra: pip install -e ".[keras]"')
if keras.backend.backend() != "jax":
    pytest.skip(f"keras was imported with the {keras.backend.backend()!r} backend before this module (KERAS_BACKEND "
                "must be 'jax' at the first import); run this file alone", allow_module_level=True)

import patient  # noqa: E402  (keras must be imported with the jax backend first, above)
from patient.data import digits, eval_pipeline  # noqa: E402
from patient.models import KerasModel, apply, create, from_keras, param_count, to_keras  # noqa: E402

pytestmark = pytest.mark.slow  # keras.applications models: a minute to build and trace

ROOT = Path(__file__).resolve().parents[1]
L = keras.layers
S_RES, T_RES = 32, 16


def tiny_cnn(name="tiny", res=16, data_format="channels_last", seed=0, momentum=0.9, dropout=0.0, widths=(8, 16)):
    """A small Sequential CNN with BatchNorm (stats momentum 0.9 so short runs move them)."""
    keras.utils.set_random_seed(seed)
    shape = (res, res, 3) if data_format == "channels_last" else (3, res, res)
    axis = -1 if data_format == "channels_last" else 1
    layers = [keras.Input(shape), L.Conv2D(widths[0], 3, padding="same", data_format=data_format, name="c1"),
              L.BatchNormalization(axis=axis, momentum=momentum, name="bn1"), L.ReLU(name="r1"),
              L.MaxPooling2D(data_format=data_format, name="p1"),
              L.Conv2D(widths[1], 3, padding="same", data_format=data_format, name="c2"),
              L.BatchNormalization(axis=axis, momentum=momentum, name="bn2"), L.ReLU(name="r2"),
              L.GlobalAveragePooling2D(data_format=data_format, name="gap")]
    if dropout:
        layers.append(L.Dropout(dropout, name="drop"))
    return keras.Sequential(layers + [L.Dense(10, name="head")], name=name)


def mobilenet(seed):
    keras.utils.set_random_seed(seed)
    # classifier_activation=None: keras.applications classifiers end in softmax otherwise; patient needs logits.
    return keras.applications.MobileNetV3Small(weights=None, classes=10, input_shape=(S_RES, S_RES, 3),
                                               classifier_activation=None)


def images(n, res):
    batch = next(iter(eval_pipeline(digits("test"), resolution=res, batch_size=n)))
    return np.asarray(batch["image"], np.float32)  # f32[n, 3, res, res] in [0, 1]


def nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def keras_weights(net):
    return [np.array(v.value) for v in net.variables]


@pytest.fixture(scope="module")
def teacher():
    """A patient CIFAR ResNet (one block per stage) briefly trained on digits."""
    model = create("cifar_resnet20", num_classes=10, key=jax.random.key(0), resolution=T_RES, depths=(1, 1, 1))
    r = patient.train(model, digits("train"), eval_data=digits("test"), steps=80, batch_size=64, mode="same/rc",
                      learning_rate=3e-3, progress=False)
    assert r.metrics["top1"] > 80, r.metrics
    return r.student, r.state


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory):
    """keras.applications.MobileNetV3Small (weights=None) distilled from the patient teacher with `fm`."""
    net = mobilenet(seed=1)
    for layer in net.layers:  # the applications' BN momentum (0.999) barely moves the moving stats in 60 steps
        if isinstance(layer, L.BatchNormalization):
            layer.momentum = 0.9
    student = from_keras(net)
    before = patient.evaluate(student, digits("test"), teacher=teacher, resolution=S_RES, teacher_resolution=T_RES)
    workdir = tmp_path_factory.mktemp("keras_student")
    result = patient.distill(teacher, student, digits("train"), eval_data=digits("test"), workdir=workdir, steps=60,
                             batch_size=32, student_res=S_RES, teacher_res=T_RES, log_every=5, crop_area_min=0.5,
                             mixup_alpha=0.2, progress=False)
    return net, student, before, result


# ------------------------------------------------------------------------------ 1. a Keras student, end to end

def test_keras_student_distils_and_round_trips(distilled, tmp_path):
    net, (model0, state0), before, result = distilled
    assert isinstance(model0, KerasModel) and isinstance(result.student, KerasModel)
    assert dict(model0.spec.kwargs)["preprocessing"] == "0_255"  # "auto": MobileNetV3 rescales inside
    assert dict(model0.spec.kwargs)["input_layout"] == "NHWC"
    assert param_count(model0) == sum(int(np.prod(v.shape)) for v in net.trainable_variables)
    losses = [h["loss"] for h in result.history if "loss" in h]
    agree = [h["agreement"] for h in result.history if "agreement" in h]
    print("keras student: loss", losses, "train agreement", agree, "eval before", before, "after", result.metrics)
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    # loss falls and training-batch agreement rises (means of the first and last three logs)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    assert np.mean(agree[-3:]) > np.mean(agree[:3]) + 0.2, agree
    # held-out agreement with the teacher rises and KL falls (eval mode, Keras BN moving statistics); measured:
    # 10.4% -> 28.7%, KL 1.00 -> 0.76 (MobileNetV3 from scratch, 60 steps)
    assert result.metrics["agreement"] > before["agreement"] + 10, (before, result.metrics)
    assert result.metrics["kl"] < 0.9 * before["kl"], (before, result.metrics)
    # the Keras variables were not touched by training: the wrapper is pure until to_keras
    x = images(16, S_RES)
    logits = np.asarray(apply(result.student, result.state, x)[0])
    assert not np.allclose(np.asarray(net(nhwc(x) * 255.0, training=False)), logits, atol=1e-3)
    clone = to_keras(result.student, result.state, clone=True)
    back = to_keras(result.student, result.state)
    assert back is net and clone is not net
    # Keras's own eager call, input adapted by hand (NHWC, [0, 255]): same logits as the wrapper
    print("to_keras max |logit diff|", np.abs(np.asarray(back(nhwc(x) * 255.0, training=False)) - logits).max())
    np.testing.assert_allclose(np.asarray(back(nhwc(x) * 255.0, training=False)), logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(clone(nhwc(x) * 255.0, training=False)), logits, atol=1e-5, rtol=0)
    net.save(tmp_path / "student.keras")
    loaded = keras.saving.load_model(tmp_path / "student.keras")
    np.testing.assert_allclose(np.asarray(loaded(nhwc(x) * 255.0, training=False)), logits, atol=1e-5, rtol=0)


def test_keras_student_checkpoint_resumes(teacher, distilled):
    _, student, _, result = distilled
    # The finished workdir holds an Orbax checkpoint keyed by Keras variable paths; rerunning restores it and stops.
    again = patient.distill(teacher, student, digits("train"), workdir=result.workdir, steps=60, batch_size=32,
                            student_res=S_RES, teacher_res=T_RES, log_every=5, crop_area_min=0.5, mixup_alpha=0.2,
                            progress=False)
    for a, b in zip(jax.tree_util.tree_leaves((result.student, result.state)),
                    jax.tree_util.tree_leaves((again.student, again.state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------ 4. ONNX through Keras's own exporter

def test_keras_student_exports_to_onnx(distilled, tmp_path):
    import onnxruntime as ort

    net, _, _, result = distilled
    keras_net = to_keras(result.student, result.state)
    path = tmp_path / "student.onnx"
    keras_net.export(str(path), format="onnx", verbose=False)  # Keras's JAX path: jax2onnx, offline
    x = images(8, S_RES)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    got = session.run(None, {name: nhwc(x) * 255.0})[0]
    want = np.asarray(apply(result.student, result.state, x)[0])
    print("onnx max |logit diff|", np.abs(got - want).max(), "max |logit|", np.abs(want).max())
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(want).max() > 1.0  # trained logits, not a near-constant output


# ------------------------------------------------------------------ 3. forwards equal Keras's own call

@pytest.mark.parametrize("case", ["mobilenet", "nchw_minus1_1", "caffe"])
def test_forward_equals_keras_call(case):
    x = images(8, 16 if case != "mobilenet" else S_RES)
    if case == "mobilenet":
        # At initialisation its eval-mode logits are ~1e-16 for every image, so this checks layout/preprocessing
        # plumbing only; the trained MobileNetV3 (logits up to ~2) is compared with Keras in the round-trip test.
        net = mobilenet(seed=3)
        model, state = from_keras(net)  # "auto" -> "0_255", NHWC
        want = net(nhwc(x) * 255.0, training=False)
    elif case == "nchw_minus1_1":
        net = tiny_cnn(data_format="channels_first", seed=4)
        model, state = from_keras(net, preprocessing="-1_1")
        assert model.layout == "NCHW"
        want = net(x * 2.0 - 1.0, training=False)
    else:
        net = tiny_cnn(seed=5)
        model, state = from_keras(net, preprocessing="caffe")
        bgr = nhwc(x)[..., ::-1] * 255.0 - np.array([103.939, 116.779, 123.68], np.float32)
        want = net(bgr, training=False)
    got = jax.jit(lambda m, s, x: apply(m, s, x, train=False)[0])(model, state, x)
    print(case, "max |logit diff| vs keras", np.abs(np.asarray(got) - np.asarray(want)).max())
    if case != "mobilenet":  # a non-constant output, so the comparison means something
        assert np.abs(np.asarray(want)).max() > 0.1 and np.ptp(np.asarray(want)[:, 0]) > 1e-3
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(model(x[0], state)[0]), np.asarray(want)[0], atol=1e-5, rtol=0)


def test_training_forward_and_state_match_keras():
    """Train mode: batch statistics, and the returned state equals Keras's moving statistics after one call."""
    net = tiny_cnn(seed=6)
    model, state = from_keras(net, features={"stage2": "r2", "pre_logits": "gap"})
    x = images(8, 16)
    logits, feats, new_state = jax.jit(lambda m, s, x: apply(m, s, x, train=True))(model, state, x)
    assert feats["stage2"].shape == (8, 16, 8, 8) and feats["pre_logits"].shape == (8, 16)  # channels first
    want = net(nhwc(x), training=True)  # eager Keras: updates its own moving statistics
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-5, rtol=0)
    for v in net.non_trainable_variables:
        np.testing.assert_allclose(np.asarray(new_state[v.path]), np.asarray(v.value), atol=1e-6, rtol=0)
        assert not np.allclose(np.asarray(state[v.path]), np.asarray(v.value))
    tap = keras.Model(net.inputs[0], net.get_layer("r2").output)(nhwc(x), training=True)
    np.testing.assert_allclose(np.asarray(feats["stage2"]), np.transpose(np.asarray(tap), (0, 3, 1, 2)), atol=1e-5)


# ------------------------------------------------------------------------- 2. a Keras teacher, then a student

def test_keras_teacher_distils_into_patient_student():
    net = tiny_cnn(name="keras_teacher", seed=7, widths=(32, 64))
    # patient.train with a Keras model as the model being trained, then back into Keras
    trained = patient.train(from_keras(net), digits("train"), eval_data=digits("test"), steps=120, batch_size=64,
                            mode="same/rc", learning_rate=1e-2, progress=False)
    assert trained.metrics["top1"] > 50, trained.metrics
    to_keras(trained.student, trained.state)
    frozen = keras_weights(net)
    # the bare keras.Model as teacher (wrapped with defaults) with a layer tap for attention transfer, in bfloat16
    teacher = from_keras(net, features={"stage2": "r2"})
    student = create("cifar_resnet20", num_classes=10, key=jax.random.key(8), resolution=16, depths=(1, 1, 1))
    before = patient.evaluate(student, digits("test"), teacher=teacher)
    result = patient.distill(teacher, student, digits("train"), eval_data=digits("test"), steps=60, batch_size=64,
                             method="at", method_pairs=("stage2",), teacher_dtype="bfloat16", log_every=10,
                             crop_area_min=0.5, mixup_alpha=0.2, progress=False)
    print("keras teacher top1", trained.metrics["top1"], "before", before, "after", result.metrics)
    assert all("at" in h and math.isfinite(h["loss"]) for h in result.history if "loss" in h)
    assert result.metrics["agreement"] > before["agreement"] + 30, (before, result.metrics)
    assert abs(result.metrics["teacher_top1"] - trained.metrics["top1"]) < 3  # the bfloat16 copy predicts the same
    for a, b in zip(frozen, keras_weights(net)):  # the teacher's Keras variables are bit-for-bit unchanged
        np.testing.assert_array_equal(a, b)
    r2 = patient.distill(net, student, digits("test"), steps=2, batch_size=32, progress=False)  # bare keras.Model
    assert math.isfinite(r2.history[-1]["loss"])
    for a, b in zip(frozen, keras_weights(net)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------- the mesh (2 CPU devices)

MESH_SCRIPT = textwrap.dedent("""
    import os
    os.environ["KERAS_BACKEND"] = "jax"
    import json, jax, keras
    import patient
    from patient.data import digits
    from patient.models import from_keras
    L = keras.layers
    def cnn(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((16, 16, 3)), L.Conv2D(8, 3, padding="same"), L.BatchNormalization(),
                                 L.ReLU(), L.MaxPooling2D(), L.Conv2D(16, 3, padding="same"), L.BatchNormalization(),
                                 L.ReLU(), L.GlobalAveragePooling2D(), L.Dense(10)])
    teacher, student = from_keras(cnn(0)), from_keras(cnn(1))
    out = {}
    for n in (1, 2):
        r = patient.distill(teacher, student, digits("test"), steps=8, batch_size=32, log_every=1, progress=False,
                            devices=jax.devices()[:n], optimizer="sgd", learning_rate=0.05)
        out[str(n)] = [h["loss"] for h in r.history]
    print(json.dumps(out))
""")


def test_two_device_mesh_matches_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", MESH_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    one, two = np.array(out["1"]), np.array(out["2"])
    print("mesh losses 1 vs 2 devices, max diff", np.abs(one - two).max(), one.tolist())
    assert len(one) == 8 and one[-1] < one[0]
    # BatchNorm statistics over the global batch: the same losses on 1 and 2 devices
    np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ errors

BACKEND_SCRIPT = textwrap.dedent("""
    import sys
    import patient, patient.models, patient.engine, patient.io
    assert not [m for m in sys.modules if m.split(".")[0] == "keras"], "core imported keras"
    import keras
    net = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    try:
        patient.models.from_keras(net)
    except RuntimeError as e:
        print(e)
""")


def test_non_jax_backend_is_one_clear_error():
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    p = subprocess.run([sys.executable, "-c", BACKEND_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    msg = p.stdout.strip().splitlines()[-1]
    assert "needs Keras's JAX backend, but keras runs on 'tensorflow'" in msg
    assert "os.environ['KERAS_BACKEND'] = 'jax' before the first `import keras`" in msg


def test_misuse_gives_clear_errors(tmp_path):
    softmax = keras.Sequential([keras.Input((8, 8, 3)), L.Flatten(), L.Dense(3, activation="softmax")])
    with pytest.raises(ValueError, match="ends in a softmax.*classifier_activation=None"):
        from_keras(softmax)
    with pytest.raises(ValueError, match="is not built; give it an input shape"):
        from_keras(keras.Sequential([L.Dense(3)]))
    net = tiny_cnn(seed=9)
    with pytest.raises(ValueError, match="has no layer 'nope' to tap"):
        from_keras(net, features={"stage2": "nope"})
    with pytest.raises(ValueError, match="preprocessing='0-255'"):
        from_keras(net, preprocessing="0-255")
    model, state = from_keras(net)
    with pytest.raises(ValueError, match=r"takes images f32\[B, 3, H, W\].*set channels=3"):
        apply(model, state, np.zeros((2, 1, 16, 16), np.float32))
    with pytest.raises(TypeError, match=r"to_keras\(model, state\).save\('student.keras'\)"):
        patient.save(tmp_path / "s.eqx", model, state)
    from patient.export import ExportError, to_onnx

    with pytest.raises(ExportError, match=r"export\('student.onnx', format='onnx'\)"):
        to_onnx((model, state), tmp_path / "s.onnx")
    with pytest.raises(TypeError, match="to_keras takes a model made by patient.models.from_keras"):
        to_keras(*create("cifar_resnet20", num_classes=10, key=jax.random.key(0), depths=(1, 1, 1)))
    with pytest.raises(ValueError, match="state lacks"):
        to_keras(model, {})
