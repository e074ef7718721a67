"""The .eqx file: bit-exact round trips for every registry model and one clear error for every kind of damage."""

import json
import os

import equinox as eqx
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lanes import fast_only

import patient
from patient.io import PatientFileError
from patient.models import create, list_models

BIG = [n for n in list_models() if n.startswith(("bit_r101x3", "bit_r152", "bit_r50x3"))]


def _perturbed_state(state, key):
    # Non-default running statistics, so the test sees them survive the trip.
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(key, max(1, len(leaves)))
    return jax.tree_util.tree_unflatten(treedef, [x + jax.random.uniform(k, x.shape) for x, k in zip(leaves, keys)])


def _assert_identical(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


@pytest.mark.parametrize("name", fast_only(list_models(), keep=("cifar_resnet20", "bit_r26x1_cifar",
                                                                  "mobilenetv3_small_050")))
def test_round_trip_bit_exact(name, tmp_path, getkey):
    if name in BIG:
        # 0.2-0.9 G parameters (7 GB written and read for the four): one block per stage at full width (32-128 M
        # parameters, the same layer types and widths), zero-filled (no random init) with a random head, keeps the
        # suite quick; the file format does not depend on depth.
        model, state = create(name, num_classes=5, key=None, depths=(1, 1, 1, 1))
        model = eqx.tree_at(lambda m: m.head.fc.weight, model, jax.random.normal(getkey(), model.head.fc.weight.shape))
    else:
        model, state = create(name, num_classes=5, key=getkey())
    state = _perturbed_state(state, getkey())
    path = patient.save(tmp_path / "m.eqx", model, state, class_names=list("abcde"), meta={"note": name})
    m2, s2, header = patient.load(path)
    _assert_identical((model, state), (m2, s2))
    assert m2.spec == model.spec
    assert header["class_names"] == list("abcde") and header["meta"] == {"note": name}
    assert not list(tmp_path.glob(".*tmp")), "no temporary file may be left behind"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, state = create("cifar_resnet20", num_classes=3, key=jax.random.key(1))
    path = tmp_path_factory.mktemp("eqx") / "good.eqx"
    patient.save(path, model, state)
    return path


def test_truncated_file(saved, tmp_path):
    bad = tmp_path / "trunc.eqx"
    bad.write_bytes(saved.read_bytes()[:-100])
    with pytest.raises(PatientFileError, match=r"trunc\.eqx: truncated"):
        patient.load(bad)


def test_wrong_magic(saved, tmp_path):
    data = saved.read_bytes().replace(b'"patient-eqx"', b'"patient-eqy"', 1)
    bad = tmp_path / "magic.eqx"
    bad.write_bytes(data)
    with pytest.raises(PatientFileError, match=r"magic\.eqx: wrong magic"):
        patient.load(bad)


def test_tampered_payload(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[-10] ^= 0xFF
    bad = tmp_path / "tamper.eqx"
    bad.write_bytes(bytes(data))
    with pytest.raises(PatientFileError, match=r"tamper\.eqx: payload hash mismatch"):
        patient.load(bad)


def test_tampered_header(saved, tmp_path):
    head, payload = saved.read_bytes().split(b"\n", 1)
    header = json.loads(head)
    header["spec"]["num_classes"] = 4
    bad = tmp_path / "head.eqx"
    bad.write_bytes(json.dumps(header).encode() + b"\n" + payload)
    with pytest.raises(PatientFileError, match=r"head\.eqx: header hash mismatch"):
        patient.load(bad)


def test_unknown_model_name_in_file(saved, tmp_path):
    from patient.io import _header_hash

    head, payload = saved.read_bytes().split(b"\n", 1)
    header = json.loads(head)
    header["spec"]["name"] = "resnet9000"
    header["header_sha256"] = _header_hash(header)
    bad = tmp_path / "unknown.eqx"
    bad.write_bytes(json.dumps(header).encode() + b"\n" + payload)
    with pytest.raises(PatientFileError, match=r"unknown\.eqx: unknown model 'resnet9000'"):
        patient.load(bad)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.eqx: no such file"):
        patient.load(tmp_path / "nothing.eqx")
    (tmp_path / "img.eqx").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(PatientFileError, match="img.eqx: not a patient .eqx file"):
        patient.load(tmp_path / "img.eqx")


def test_bad_save_arguments(tmp_path, getkey):
    model, state = create("cifar_resnet20", num_classes=3, key=getkey())
    with pytest.raises(ValueError, match="class_names has 2 entries but the model has 3 classes"):
        patient.save(tmp_path / "a.eqx", model, state, class_names=["a", "b"])
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        patient.save(tmp_path / "b.eqx", model, state, meta={"x": object()})
    assert not list(tmp_path.iterdir())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_load_only_raises_clear_errors(saved, tmp_path, data):
    original = saved.read_bytes()
    kind = data.draw(st.sampled_from(["random", "flip", "cut", "header"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=2000))
    elif kind == "flip":
        pos = data.draw(st.integers(0, len(original) - 1))
        blob = original[:pos] + bytes([original[pos] ^ data.draw(st.integers(1, 255))]) + original[pos + 1:]
    elif kind == "cut":
        blob = original[: data.draw(st.integers(0, len(original) - 1))]
    else:
        head, payload = original.split(b"\n", 1)
        header = json.loads(head)
        key = data.draw(st.sampled_from(sorted(header)))
        header[key] = data.draw(st.one_of(st.none(), st.integers(), st.text(max_size=20), st.lists(st.integers())))
        blob = json.dumps(header).encode() + b"\n" + payload
    path = tmp_path / "fuzz.eqx"
    path.write_bytes(blob)
    try:
        patient.load(path)
    except PatientFileError as e:
        assert "fuzz.eqx" in str(e)
    else:
        assert blob == original


@pytest.mark.parametrize("edit, expect", [
    (lambda spec: spec["kwargs"].update(channels=[1024, 2048, 4096]), "describes a model of"),  # ~4 GB of zeros
    (lambda spec: spec["kwargs"].update(depths=[500, 1, 1]), "describes a model of"),
    (lambda spec: spec["kwargs"].update(width=2.0), "cannot be built"),  # not an argument of this family
    (lambda spec: spec["kwargs"].update(width=1e300), "not plausible"),
    (lambda spec: spec["kwargs"].update(depths=[10 ** 9, 1, 1]), "not plausible"),
    (lambda spec: spec["kwargs"].update(depths=[100000, 1, 1]), "more than 1000 blocks"),
    (lambda spec: spec.update(num_classes=10 ** 9), "not plausible"),
])
def test_edited_header_cannot_make_load_allocate(tmp_path, edit, expect):
    """Regression: the hashes are keyless, so anyone can edit a header and recompute them. A header that declares a
    bigger model than its payload used to build that model's zero skeleton first (a 1.1 MB file exhausted 23 GB)."""
    import resource

    from patient.io import _header_hash

    model, state = create("cifar_resnet20", num_classes=10, key=jax.random.key(0), depths=(1, 1, 1))
    good = patient.save(tmp_path / "good.eqx", model, state)
    head, payload = good.read_bytes().split(b"\n", 1)
    header = json.loads(head)
    edit(header["spec"])
    header["header_sha256"] = _header_hash(header)
    bad = tmp_path / "edited.eqx"
    bad.write_bytes(json.dumps(header, sort_keys=True).encode() + b"\n" + payload)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(PatientFileError, match=expect):
        patient.load(bad)
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grew_mb < 200, grew_mb  # the wider model would be ~4 GB of zeros


def test_header_is_read_with_a_cap(tmp_path):
    """A large file that is not ours (no newline in the first MiB) is refused after reading 1 MiB, not all of it."""
    big = tmp_path / "big.eqx"
    with open(big, "wb") as f:
        f.truncate(3 << 30)  # 3 GB sparse file of zero bytes
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(PatientFileError, match="no header line"):
        patient.load(big)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 100


def test_save_refuses_non_finite_weights(tmp_path):
    model, state = create("cifar_resnet20", num_classes=3, key=jax.random.key(1), depths=(1, 1, 1))
    bad = eqx.tree_at(lambda m: m.fc.bias, model, model.fc.bias.at[1].set(np.nan))
    with pytest.raises(ValueError, match=r"fc\.bias holds NaN or infinite values.*allow_nonfinite=True"):
        patient.save(tmp_path / "bad.eqx", bad, state)
    assert not list(tmp_path.iterdir())
    patient.save(tmp_path / "bad.eqx", bad, state, allow_nonfinite=True)
    assert np.isnan(np.asarray(patient.load(tmp_path / "bad.eqx")[0].fc.bias[1]))


def test_save_removes_temp_files_of_killed_saves(tmp_path):
    """A SIGKILL during save leaves `.name.<pid>.*.tmp`; the next save of that path removes it if that pid is gone."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".m.eqx.{int(dead.stdout)}.abc123.tmp"
    stale.write_bytes(b"half a file")
    live = tmp_path / f".m.eqx.{os.getpid()}.def456.tmp"  # a save still running in this process
    live.write_bytes(b"being written")
    model, state = create("cifar_resnet20", num_classes=3, key=jax.random.key(1), depths=(1, 1, 1))
    patient.save(tmp_path / "m.eqx", model, state)
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("edit, expect", [
    ({"depth": 100000}, "more than 1000 blocks"),  # tracing 100000 blocks would itself take minutes
    ({"embed_dim": 24576, "depth": 12}, "describes a model of"),  # ~87 GB of zeros
])
def test_edited_transformer_header_is_refused_before_building(tmp_path, edit, expect):
    from patient.io import _header_hash

    model, state = create("deit_tiny_patch16_224", num_classes=10, key=jax.random.key(0), depth=1, embed_dim=48,
                          num_heads=3, patch_size=8, resolution=32)
    head, payload = patient.save(tmp_path / "vit.eqx", model, state).read_bytes().split(b"\n", 1)
    header = json.loads(head)
    header["spec"]["kwargs"].update(edit)
    header["header_sha256"] = _header_hash(header)
    bad = tmp_path / "edited.eqx"
    bad.write_bytes(json.dumps(header, sort_keys=True).encode() + b"\n" + payload)
    with pytest.raises(PatientFileError, match=expect):
        patient.load(bad)
