"""The engine: losses against hand-computed values, the three-argument call, all eight modes, the fixed-teacher cache,
mesh equivalence, kill-and-resume, and one clear error for each kind of bad input."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lanes import fast_only

import patient
from patient.data import MODES, digits
from patient.engine import Config, ConfigError, NonFiniteLossError, distill, load_config, train
from patient.engine.losses import cross_entropy, kl_divergence, teacher_probs
from patient.engine.teachers import teacher_logits
from patient.models import apply, create

RES = 16
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------ losses

def test_kl_at_temperature_matches_hand_computation():
    t_logits = np.array([[2.0, 0.5, -1.0]])
    s_logits = np.array([[0.3, 1.2, 0.1]])
    T = 2.0
    p = np.exp(t_logits / T) / np.exp(t_logits / T).sum()
    q = np.exp(s_logits / T) / np.exp(s_logits / T).sum()
    want = T**2 * np.sum(p * np.log(p / q))
    got = kl_divergence(teacher_probs([jnp.asarray(t_logits)], T), jnp.asarray(s_logits), T)
    np.testing.assert_allclose(float(got[0]), want, rtol=1e-5)
    # T^2 scaling: the same softened distributions without the factor
    unscaled = kl_divergence(teacher_probs([jnp.asarray(t_logits)], T), jnp.asarray(s_logits), T) / T**2
    np.testing.assert_allclose(float(unscaled[0]), np.sum(p * np.log(p / q)), rtol=1e-5)
    assert float(kl_divergence(jax.nn.softmax(jnp.asarray(s_logits)), jnp.asarray(s_logits), 1.0)[0]) < 1e-6


def test_ensemble_is_mean_of_probabilities_not_logits():
    a, b = jnp.array([[4.0, 0.0]]), jnp.array([[0.0, 1.0]])
    pa, pb = jax.nn.softmax(a), jax.nn.softmax(b)
    np.testing.assert_allclose(teacher_probs([a, b], 1.0), (pa + pb) / 2, rtol=1e-6)
    assert not np.allclose(teacher_probs([a, b], 1.0), jax.nn.softmax((a + b) / 2))


def test_cross_entropy_with_smoothing_and_unlabelled():
    logits = jnp.array([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
    ce = cross_entropy(logits, jnp.array([1, -1]), smoothing=0.1)
    logp = np.log(np.exp([1.0, 2.0, 0.5]) / np.exp([1.0, 2.0, 0.5]).sum())
    want = -(0.9 * logp[1] + 0.1 / 3 * logp.sum())
    np.testing.assert_allclose(float(ce[0]), want, rtol=1e-5)
    assert float(ce[1]) == 0.0


@pytest.mark.slow
def test_teacher_receives_no_gradient(getkey):
    t, ts = create("cifar_resnet20", num_classes=10, key=getkey(), resolution=RES)
    s, ss = create("cifar_resnet20", num_classes=10, key=getkey(), resolution=RES)
    x = jax.random.uniform(getkey(), (4, 3, RES, RES))

    def loss(t_params, s_params):
        tm = eqx.combine(t_params, eqx.filter(t, eqx.is_array, inverse=True))
        sm = eqx.combine(s_params, eqx.filter(s, eqx.is_array, inverse=True))
        p = teacher_probs(teacher_logits([(tm, ts)], x), 2.0)
        return kl_divergence(p, apply(sm, ss, x, train=False)[0], 2.0).mean()

    gt, gs = jax.grad(loss, argnums=(0, 1))(eqx.filter(t, eqx.is_array), eqx.filter(s, eqx.is_array))
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(gt))
    assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree_util.tree_leaves(gs))


# ------------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def teacher():
    """A briefly trained digits teacher (about 95% on held-out digits)."""
    model = create("cifar_resnet20", num_classes=10, key=jax.random.key(0), resolution=RES)
    r = train(model, digits("train"), eval_data=digits("test"), steps=150, mode="same/rc", learning_rate=3e-3,
              progress=False)
    assert r.metrics["top1"] > 85
    return r.student, r.state


def _agreement(teacher, student, state):
    from patient.data import eval_pipeline

    batch = next(iter(eval_pipeline(digits("test"), resolution=RES, batch_size=512)))
    m = batch["mask"]
    t = np.asarray(apply(*teacher, batch["image"])[0]).argmax(-1)[m]
    s = np.asarray(apply(student, state, batch["image"])[0]).argmax(-1)[m]
    return float((t == s).mean())


@pytest.mark.slow
def test_three_argument_call(teacher):
    student = create("cifar_resnet20", num_classes=10, key=jax.random.key(1), resolution=RES, depths=(1, 1, 1))
    before = _agreement(teacher, *student)
    result = distill(teacher, student, digits("train"))
    after = _agreement(teacher, result.student, result.state)
    assert after > 0.6 and after > before + 0.4, (before, after)
    assert result.history and math.isfinite(result.history[-1]["loss"])


@pytest.mark.slow
def test_registry_student_records_the_resolution_it_was_trained_at(teacher, tmp_path):
    """Regression (README's CLI flow): a student built from a registry name by the engine, trained at student_res,
    must carry that resolution into the returned model and the .eqx file, so evaluation and export default to it."""
    import patient
    from patient.models.registry import spec_of

    r = distill(teacher, "cifar_resnet20", digits("train"), steps=2, batch_size=32, student_res=RES, progress=False)
    assert spec_of(r.student).resolution == RES
    patient.save(tmp_path / "s.eqx", r.student, r.state)
    model, state, header = patient.load(tmp_path / "s.eqx")
    assert spec_of(model).resolution == RES and header["spec"]["resolution"] == RES
    # and the default evaluation runs at that size: the same figure as asking for it explicitly
    a = patient.evaluate((model, state), digits("test"))
    b = patient.evaluate((model, state), digits("test"), resolution=RES)
    assert a["top1"] == b["top1"]


@pytest.fixture
def cache_builds(monkeypatch):
    """Counts fixed-teacher cache builds and the examples x views the teacher ran on, by wrapping the view source
    every build reads."""
    import patient.data as pdata

    real, seen = pdata.fixed_teacher_views, {"cache_builds": 0, "cache_forward_examples": 0}

    def counting(*args, **kwargs):
        seen["cache_builds"] += 1
        for batch in real(*args, **kwargs):
            seen["cache_forward_examples"] += int(np.asarray(batch["mask"]).sum()) * batch["teacher"].shape[1]
            yield batch

    monkeypatch.setattr(pdata, "fixed_teacher_views", counting)
    return seen


@pytest.mark.parametrize("mode", fast_only(sorted(MODES), keep=("fm",)))
def test_every_mode_runs_by_name(mode, teacher, tmp_path, cache_builds):
    student = create("cifar_resnet20", num_classes=10, key=jax.random.key(2), resolution=RES, depths=(1, 1, 1))
    STATS = cache_builds
    source = digits("test")  # 355 examples: several epochs in 30 steps of 64
    r = distill(teacher, student, source, steps=30, batch_size=64, mode=mode, fix_crops=3, log_every=5,
                workdir=tmp_path, progress=False)
    assert len(r.history) == 6 and all(math.isfinite(h["loss"]) for h in r.history)
    if MODES[mode].fixed:
        k = 3 if MODES[mode].ensemble else 1
        assert STATS == {"cache_builds": 1, "cache_forward_examples": len(source) * k}
        # a second run over the same workdir reuses the cached predictions: no teacher forward at all
        distill(teacher, student, source, steps=5, batch_size=64, mode=mode, fix_crops=3, workdir=tmp_path / "x",
                progress=False)
        assert STATS["cache_builds"] == 2
        import shutil

        for f in tmp_path.glob("teacher_cache-*.npy"):
            shutil.copy(f, tmp_path / "x")
        STATS["cache_builds"] = 0
        shutil.rmtree(tmp_path / "x" / "checkpoints")
        distill(teacher, student, source, steps=5, batch_size=64, mode=mode, fix_crops=3, workdir=tmp_path / "x",
                progress=False)
        assert STATS["cache_builds"] == 0
    else:
        assert STATS["cache_builds"] == 0


@pytest.mark.slow
def test_bfloat16_teacher_and_resolution_ensemble(teacher):
    student = create("cifar_resnet20", num_classes=10, key=jax.random.key(3), resolution=RES, depths=(1, 1, 1))
    r = distill([teacher, teacher], student, digits("test"), steps=6, batch_size=32, teacher_dtype="bfloat16",
                teacher_res=24, teacher_resolutions=(16,), log_every=3, progress=False, eval_data=digits("test"))
    assert math.isfinite(r.history[-2]["loss"]) and r.metrics["teacher_top1"] > 80


METHOD_PAIRS = {"kd": (), "dkd": (), "fitnets": ("stage2", "stage3"), "at": ("stage2",), "nst": ("stage3",),
                "fsp": ("stage1:stage2",), "srd": ("pre_logits",), "crd": ("pre_logits",)}


@pytest.mark.parametrize("method", fast_only(METHOD_PAIRS, keep=("kd", "fitnets")))
def test_feature_methods_plug_into_the_step(method, teacher):
    pairs = METHOD_PAIRS[method]
    student = create("cifar_resnet20", num_classes=10, key=jax.random.key(6), resolution=RES, depths=(1, 1, 1))
    extra = dict(dkd_warmup_fraction=1.0) if method == "dkd" else {}
    r = distill(teacher, student, digits("test"), steps=4, batch_size=32, method=method, method_pairs=pairs,
                log_every=1, progress=False, **extra)
    assert all(math.isfinite(h["loss"]) for h in r.history)
    if method != "kd":
        assert all(method in h for h in r.history)
    if method == "dkd":  # the loss weight warms up linearly over the whole (4-step) run here: 1/4, 2/4, 3/4, 1
        for i, h in enumerate(r.history):
            np.testing.assert_allclose(h["loss"], h["kl"] + (i + 1) / 4 * h["dkd"], rtol=1e-5)
    # the result is the bare student: auxiliary regressors/projectors are never part of it
    assert jax.tree_util.tree_structure(eqx.filter(r.student, eqx.is_array)) == jax.tree_util.tree_structure(
        eqx.filter(student[0], eqx.is_array))


@pytest.mark.parametrize("case", fast_only(["hard fm", "soft fix/rs"], keep=("hard fm",)))
def test_deit_method_trains_both_heads_in_any_mode(case, teacher):
    """A distilled DeiT student: labels on the class head, the teacher on the distillation head, and the loss is
    DeiT's alone (no KL added); both heads learn."""
    kind, mode = case.split()
    student = create("deit_tiny_distilled_patch16_224", num_classes=10, key=jax.random.key(8), resolution=RES,
                     patch_size=4, depth=1, embed_dim=24, num_heads=2)
    r = distill(teacher, student, digits("test"), steps=3, batch_size=32, method="deit", deit_kind=kind, mode=mode,
                log_every=1, progress=False)
    assert all(math.isfinite(h["loss"]) and h["loss"] == h["deit"] for h in r.history)
    for head in ("head", "head_dist"):
        assert not np.allclose(getattr(r.student, head).weight, getattr(student[0], head).weight), head
    with pytest.raises(ConfigError, match="method='deit' needs a student with a distillation token.*cifar_resnet20"):
        distill(teacher, create("cifar_resnet20", num_classes=10, key=jax.random.key(9), resolution=RES),
                digits("test"), steps=1, method="deit", progress=False)


def test_feature_method_errors_at_start_up(teacher):
    student = create("cifar_resnet20", num_classes=10, key=jax.random.key(7), resolution=RES, depths=(1, 1, 1))
    with pytest.raises(ValueError, match="student has no feature 'stage4'"):
        distill(teacher, student, digits("test"), steps=1, method="at", method_pairs=("stage4",), progress=False)
    with pytest.raises(ConfigError, match="method='nst' needs the teacher's features.*fix/rs"):
        distill(teacher, student, digits("test"), steps=1, method="nst", method_pairs=("stage3",), mode="fix/rs",
                progress=False)


# ------------------------------------------------------------------------------------------------ bad input

def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key.*learning_rat\\b"):
        Config().replace(learning_rat=1.0)
    with pytest.raises(ConfigError, match="deit_kind='medium'.*use hard or soft"):
        Config().replace(deit_kind="medium")
    with pytest.raises(ConfigError, match="deit_alpha=1.5.*alpha in \\[0, 1\\]"):
        Config().replace(deit_alpha=1.5)
    with pytest.raises(ConfigError, match="'steps' must be int, got str"):
        Config().replace(steps="ten")
    (tmp_path / "c.toml").write_text('[distill]\nmode = "fm"\nbatchsize = 3\n')
    with pytest.raises(ConfigError, match="c.toml: unknown config key\\(s\\) batchsize"):
        load_config(tmp_path / "c.toml")
    with pytest.raises(ConfigError, match="mode='fx/rs' is not a teacher mode"):
        Config(mode="fx/rs")


@pytest.mark.parametrize("setting, expect", [
    ("grad_clip=nan", "grad_clip=nan: config values must be finite"),  # used to disable clipping silently
    ("weight_decay=-0.1", "weight_decay=-0.1 must be >= 0"),  # used to disable decay silently
    ("epochs=inf", "epochs=inf: config values must be finite"),  # used to end in an OverflowError traceback
    ("learning_rate=-inf", "learning_rate=-inf: config values must be finite"),
    ("b2=1.0", "b1, b2 and momentum must be in [0, 1)"),
    ("student_res=100000", "at most 4096 px"),
    ("batch_size=10000000000", "batch sizes must be at most"),
    ("steps=1000000000000", "steps must be at most 1e9"),
])
def test_config_values_are_checked_at_parse_time(setting, expect):
    from patient.engine.config import parse_set

    with pytest.raises(ConfigError, match=re.escape(expect)):
        Config().replace(**parse_set([setting]))


def test_class_count_mismatch_and_missing_teacher(teacher, tmp_path):
    student = create("cifar_resnet20", num_classes=7, key=jax.random.key(4), resolution=RES)
    with pytest.raises(ValueError, match="teacher cifar_resnet20 predicts 10 classes but student cifar_resnet20 predicts 7"):
        distill(teacher, student, digits("test"), steps=1, progress=False)
    with pytest.raises(FileNotFoundError, match="teacher file .*nope.eqx not found"):
        distill(tmp_path / "nope.eqx", student, digits("test"), steps=1, progress=False)


@pytest.mark.slow
def test_non_finite_loss_names_the_step_and_the_cause(teacher, tmp_path):
    """The loss is read at log steps only; the error names the step range and what went non-finite (regression: a
    NaN teacher's message used to blame the learning rate)."""
    bad = jax.tree_util.tree_map(lambda x: x * np.nan if eqx.is_inexact_array(x) else x, teacher[0])
    student = create("cifar_resnet20", num_classes=10, key=jax.random.key(5), resolution=RES, depths=(1, 1, 1))
    with pytest.raises(NonFiniteLossError, match="loss is nan at steps 1-3; last good checkpoint: none; the "
                                                 "teacher's predictions are NaN"):
        distill((bad, teacher[1]), student, digits("test"), steps=3, progress=False, workdir=tmp_path)
    with pytest.raises(NonFiniteLossError, match="loss is (nan|inf) at steps 1-2; .*lower learning_rate"):
        train(student, digits("test"), steps=4, log_every=2, batch_size=32, learning_rate=1e38, warmup_fraction=0.0,
              optimizer="sgd", grad_clip=0.0, progress=False)


def test_cli_exits_non_zero_with_one_line(tmp_path):
    (tmp_path / "bad.toml").write_text("[distill]\nstepz = 3\n")
    p = subprocess.run([sys.executable, "-m", "patient.cli.distill", "--config", str(tmp_path / "bad.toml"),
                        "--teacher", "t.eqx", "--student", "cifar_resnet20"], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "unknown config key(s) stepz" in p.stderr
    p = subprocess.run([sys.executable, "-m", "patient.cli.distill", "--teacher", str(tmp_path / "t.eqx"),
                        "--student", "cifar_resnet20", "--set", "steps=1"], capture_output=True, text=True)
    assert p.returncode == 2 and "t.eqx not found" in p.stderr


@pytest.mark.parametrize("cli", ["distill", "train"])
@pytest.mark.parametrize("where, expect", [("missing/dir/s.eqx", "does not exist; create it first"),
                                           (".", "is a directory"), ("file.txt/s.eqx", "is not a directory")])
def test_cli_checks_out_before_any_work(cli, where, expect, tmp_path, capsys, monkeypatch):
    """Regression: an unwritable --out used to fail only at save, after the whole training, with a traceback."""
    import importlib

    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    main = importlib.import_module(f"patient.cli.{cli}").main
    args = (["--teacher", "nope.eqx", "--student", "cifar_resnet20"] if cli == "distill" else ["--model", "cifar_resnet20"])
    t0 = time.perf_counter()
    rc = main(args + ["--out", where, "--set", "steps=100000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and expect in err[0], err
    assert time.perf_counter() - t0 < 5  # nothing trained, no data read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


# ----------------------------------------------------------------------------- mesh equivalence (4 CPU devices)

MESH_SCRIPT = textwrap.dedent("""
    import json, sys, jax, numpy as np
    import patient
    from patient.data import digits
    from patient.models import create
    out = {}
    src = digits("test")
    # CRD: its banks are updated on every device with the whole global batch's embeddings. At learning rate 0.05
    # its 20 steps amplify rounding: on ONE device, a learning rate 3 ulps larger moved the losses by 1.2e-2, so a
    # 1e-5 comparison there measured chaos, not the mesh. At 0.01 the same check moves them by < 1e-5 (the "control"
    # run below keeps that true), while banks updated from each device's own shard move them by up to 1.9.
    for label, name, kw, extra in [("bit_r26x1_cifar", "bit_r26x1_cifar", dict(depths=(1, 1, 1, 1), width=0.5), {}),
                                   ("cifar_resnet20", "cifar_resnet20", dict(depths=(1, 1, 1)), {}),
                                   ("crd", "cifar_resnet20", dict(depths=(1, 1, 1)), dict(method="crd"))]:
        t = create("cifar_resnet20", num_classes=10, key=jax.random.key(0), resolution=16, depths=(1, 1, 1))
        s = create(name, num_classes=10, key=jax.random.key(1), resolution=16, **kw)
        lr = 0.01 if label == "crd" else 0.05
        runs = [(1, lr), (4, lr)] + ([("control", lr * (1 + 1e-6))] if label == "crd" else [])
        for n, rate in runs:
            # SGD: Adam divides every gradient entry by its own magnitude, so entries that are pure rounding noise
            # (where sums of opposite terms cancel) become full-size steps whose sign depends on summation order;
            # that measures Adam, not the mesh. With SGD the two runs agree to ~2e-8.
            r = patient.distill(t, s, src, steps=20, batch_size=32, log_every=1, progress=False,
                                devices=jax.devices()[:1 if n == "control" else n], optimizer="sgd",
                                learning_rate=rate, **extra)
            out[f"{label}/{n}"] = [h["loss"] for h in r.history]
    try:
        patient.distill(t, s, src, steps=1, batch_size=30, progress=False)
    except ValueError as e:
        out["error"] = str(e)
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_four_device_mesh_matches_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-c", MESH_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    for name in ("bit_r26x1_cifar", "cifar_resnet20", "crd"):
        one, four = np.array(out[f"{name}/1"]), np.array(out[f"{name}/4"])
        assert len(one) == 20
        np.testing.assert_allclose(four, one, atol=1e-5, rtol=0)
    # the CRD comparison is well conditioned: a 1e-6 relative change of the learning rate stays within the tolerance
    np.testing.assert_allclose(out["crd/control"], out["crd/1"], atol=1e-5, rtol=0)
    assert "batch_size=30 is not divisible by the 4 devices" in out["error"]


# -------------------------------------------------------------------------------------- kill and resume

RUN_SCRIPT = textwrap.dedent("""
    import sys, jax
    import patient
    from patient.data import digits
    from patient.models import create

    sys.path.insert(0, "tests")
    from slow_source import SlowSource  # a little time per example, so the parent can kill mid-run

    workdir, out = sys.argv[1], sys.argv[2]
    t = create("cifar_resnet20", num_classes=10, key=jax.random.key(0), resolution=16, depths=(1, 1, 1))
    s = create("cifar_resnet20", num_classes=10, key=jax.random.key(1), resolution=16, depths=(1, 1, 1))
    # FitNets trains an auxiliary regressor beside the student: resume must restore it too.
    r = patient.distill(t, s, SlowSource(digits("test"), 0.002), steps=40, batch_size=32, checkpoint_every=4,
                        keep_checkpoints=2, workdir=workdir, progress=False, method="fitnets", method_pairs=("stage2",))
    patient.save(out, r.student, r.state)
""")


def _checkpoint_steps(workdir):
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_workdir_belongs_to_one_run(tmp_path):
    """Regression: a workdir reused with another config used to return the old run's weights silently."""
    from patient.engine.config import ConfigError

    def run(**kw):
        model = create("cifar_resnet20", num_classes=10, key=jax.random.key(0), resolution=RES, depths=(1, 1, 1))
        args = dict(steps=4, batch_size=32, checkpoint_every=2, progress=False, mode="same/rc", learning_rate=1e-3)
        return train(model, digits("test"), workdir=tmp_path, **{**args, **kw})

    first = run()
    again = run()  # the same config (read back from config.toml) resumes: nothing differs
    for x, y in zip(jax.tree_util.tree_leaves(first.student), jax.tree_util.tree_leaves(again.student)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    run(steps=6, log_every=3)  # a longer run of the same recipe is a resume
    with pytest.raises(ConfigError, match=r"learning_rate \(0.001 -> 0.01\).*seed \(0 -> 3\).*new workdir"):
        run(steps=6, learning_rate=1e-2, seed=3)
    with pytest.raises(ConfigError, match=r"mode \('same/rc' -> 'fm'\)"):
        run(steps=6, mode="fm")


def test_workdir_refuses_another_student_or_data(tmp_path):
    """Regression: resuming a workdir with another student (architecture or resolution) or other data returned the
    old run's weights under the new model's name; the inputs are recorded in run.json and compared."""
    from patient.engine.config import ConfigError

    def run(res=RES, depths=(1, 1, 1), data=None):
        model = create("cifar_resnet20", num_classes=10, key=jax.random.key(0), resolution=res, depths=depths)
        return train(model, data or digits("test"), workdir=tmp_path, steps=2, batch_size=32, checkpoint_every=1,
                     progress=False, mode="same/rc")

    run()
    assert json.loads((tmp_path / "run.json").read_text())["student"] == f"cifar_resnet20 at {RES} px, 10 classes"
    run()  # the same inputs resume
    with pytest.raises(ConfigError, match=rf"student \(cifar_resnet20 at {RES} px, 10 classes -> cifar_resnet20 at "
                                          rf"{RES + 4} px, 10 classes\)"):
        run(res=RES + 4)
    with pytest.raises(ConfigError, match=r"student \(other weights\)"):
        run(depths=(1, 2, 1))
    with pytest.raises(ConfigError, match=r"data \(digits\[test\] \(355 examples\) -> digits\[train\]"):
        run(data=digits("train"))


@pytest.mark.slow
def test_sigkill_twice_then_resume_is_bit_identical(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    ref = subprocess.run([sys.executable, str(script), str(tmp_path / "ref"), str(tmp_path / "ref.eqx")],
                         capture_output=True, text=True, cwd=ROOT)
    assert ref.returncode == 0, ref.stderr[-2000:]
    work, kills = tmp_path / "work", []
    for kill_after in (8, 20):
        proc = subprocess.Popen([sys.executable, str(script), str(work), str(tmp_path / "out.eqx")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            steps = _checkpoint_steps(work)
            if steps and steps[-1] >= kill_after:
                proc.send_signal(signal.SIGKILL)
                kills.append(steps[-1])
                break
            time.sleep(0.02)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert kills[0] < kills[1] < 40
    done = subprocess.run([sys.executable, str(script), str(work), str(tmp_path / "out.eqx")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = patient.load(tmp_path / "ref.eqx"), patient.load(tmp_path / "out.eqx")
    for x, y in zip(jax.tree_util.tree_leaves(a[:2]), jax.tree_util.tree_leaves(b[:2])):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert len(_checkpoint_steps(work)) <= 2  # keep_checkpoints


def test_tensorboard_events_read_back_and_a_resume_purges_replayed_steps(tmp_path):
    """tensorboardX writes the events; TensorBoard's own reader (EventAccumulator) reads them back. A run resumed from
    its step-4 checkpoint replays steps 5..6: TensorBoard must show each step once, with the replayed values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from patient.engine.workdir import History

    first = History(tmp_path)
    first.start(0)
    for step in (2, 4, 6):
        first.append({"step": step, "loss": 1.0 / step, "note": "not a number"})
    first.append({"step": 6, "eval_top1": 97.25})
    first.close()  # killed after step 6; the last checkpoint was step 4
    resumed = History(tmp_path)
    resumed.start(4)
    assert [r["step"] for r in resumed.rows] == [2, 4]  # history.jsonl keeps the rows up to the checkpoint
    resumed.append({"step": 6, "loss": 0.125})
    resumed.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "history.jsonl").read_text().splitlines()] == [2, 4, 6]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("loss")] == [(2, 0.5), (4, 0.25), (6, 0.125)]
    assert acc.Scalars("eval_top1") == []  # the replayed step's old evaluation is purged too


def test_fixed_teacher_cache_key_covers_every_weight_and_the_data():
    """Regression: the key hashed only the first 4096 bytes of each teacher array, so a teacher changed further in
    reused a stale cache of its predictions."""
    from patient.data import subset
    from patient.engine.teachers import _cache_key

    t = create("cifar_resnet20", num_classes=10, key=jax.random.key(0), depths=(1, 1, 1))
    src = digits("train")
    key = _cache_key([t], src, "fix/rs", RES)
    leaves, tree = jax.tree_util.tree_flatten(t[0])
    big = max(range(len(leaves)), key=lambda i: leaves[i].size)
    assert leaves[big].nbytes > 4096
    changed = np.asarray(leaves[big]).copy()
    changed.reshape(-1)[-1] += 1e-3  # the last value of the largest array
    leaves[big] = jnp.asarray(changed)
    assert _cache_key([(jax.tree_util.tree_unflatten(tree, leaves), t[1])], src, "fix/rs", RES) != key
    assert _cache_key([t], subset(src, size=100), "fix/rs", RES) != key  # other data
    assert _cache_key([t], src, "fix/rs", RES + 1) != key  # other settings
    assert _cache_key([t], src, "fix/rs", RES) == key  # and stable


def test_labels_that_are_not_the_models_classes_are_errors(teacher, tmp_path):
    """Regression: labels outside the model's range, a one-class training set and an .eqx evaluated on data whose
    class names are not its own used to give plausible numbers (loss -0.0, exit 0; a top-1 of the wrong classes)."""
    import patient
    from patient.data import arrays

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (64, 8, 8)).astype(np.float32)
    model = create("cifar_resnet20", num_classes=3, key=jax.random.key(0), resolution=RES, depths=(1, 1, 1))
    with pytest.raises(ValueError, match=r"labels 0\.\.4 but the model predicts 3 classes"):
        train(model, arrays(images, np.arange(64) % 5), steps=2, progress=False)
    with pytest.raises(ValueError, match=r"1 class\(es\) of labelled examples; training needs two"):
        train(model, arrays(images, np.zeros(64, np.int64)), steps=2, progress=False)
    with pytest.raises(ValueError, match=r"eval_data has labels 0\.\.9 but the model predicts 3"):
        train(model, arrays(images, np.arange(64) % 3), eval_data=digits("test"), steps=2, progress=False)
    # distillation alone never reads labels: out-of-domain data with other classes is fine
    distill(teacher, create("cifar_resnet20", num_classes=10, key=jax.random.key(1), resolution=RES,
                            depths=(1, 1, 1)), arrays(images, np.arange(64) % 40), steps=1, progress=False)
    path = patient.save(tmp_path / "t.eqx", *teacher, class_names=[f"c{i}" for i in range(10)])
    with pytest.raises(ValueError, match="are not the data's .*relabel=True"):
        patient.evaluate(path, digits("test"))
    assert patient.evaluate(path, digits("test"), relabel=True)["top1"] > 80
    with pytest.raises(ValueError, match="no labelled examples"):
        patient.evaluate(teacher, arrays(images))


def test_only_process_zero_writes_workdir_files(teacher, tmp_path, monkeypatch):
    """On several hosts every process runs the same call; config.toml, history.jsonl, TensorBoard events and the
    fixed-teacher cache are written by process 0 alone (here: this process pretends to be process 1)."""
    import patient.engine.teachers as teachers_mod
    import patient.engine.trainer as trainer_mod
    import patient.engine.workdir as workdir_mod

    for mod in (teachers_mod, trainer_mod, workdir_mod):
        monkeypatch.setattr(mod, "is_writer", lambda: False)
    student = create("cifar_resnet20", num_classes=10, key=jax.random.key(6), resolution=RES, depths=(1, 1, 1))
    distill(teacher, student, digits("test"), steps=2, batch_size=32, mode="fix/rs", log_every=1, checkpoint_every=0,
            workdir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]  # Orbax saves collectively


@pytest.mark.slow
def test_bfloat16_compute_tracks_float32(teacher):
    """compute_dtype="bfloat16" against float32, in fm with SGD. bfloat16 keeps 8 significand bits (relative rounding
    2^-9 per operation); rounding every activation of ~10 layers, and BatchNorm's backward (differences of means),
    moved the first step's update by 6.6% (relative L2) and the loss over 20 steps by at most 1.7% when measured, so
    15% and 5% bound them with a 2-3x margin, while a wrong or missing gradient term moves the update by O(100%). The
    weights after 20 steps are not compared: trajectories drift apart as two float32 runs with another summation order
    do. Weights, optimizer state and BatchNorm statistics stay float32."""
    def run(dtype, steps):
        s = create("cifar_resnet20", num_classes=10, key=jax.random.key(1), resolution=RES, depths=(1, 1, 1))
        return s, distill(teacher, s, digits("train"), steps=steps, batch_size=32, optimizer="sgd",
                          learning_rate=0.05, log_every=1, progress=False, compute_dtype=dtype, mode="fm")

    flat = lambda m: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_array))])  # noqa: E731
    (s0, _), one32 = run("float32", 1)
    _, one16 = run("bfloat16", 1)
    u32, u16 = flat(one32.student) - flat(s0), flat(one16.student) - flat(s0)
    assert 1e-4 < np.linalg.norm(u16 - u32) / np.linalg.norm(u32) <= 0.15  # > 1e-4: bfloat16 really ran
    _, r32 = run("float32", 20)
    _, r16 = run("bfloat16", 20)
    a = np.array([h["loss"] for h in r32.history if "loss" in h])
    b = np.array([h["loss"] for h in r16.history if "loss" in h])
    assert len(a) == len(b) == 20
    assert (np.abs(a - b) / np.abs(a)).max() <= 0.05, np.abs(a - b) / np.abs(a)
    assert {x.dtype for x in jax.tree_util.tree_leaves(eqx.filter(r16.student, eqx.is_array))} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree_util.tree_leaves(r16.state)} == {np.dtype("float32")}
