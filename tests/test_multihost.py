"""Two processes on one machine (gloo collectives over loopback), as several hosts would run: evaluation and a
distillation with eval data finish on both, with identical figures, equal to one process."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import pytest

import patient
from patient.data import digits
from patient.models import create

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, sys, jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]),
                               initialization_timeout=120)
    import patient
    from patient.data import digits
    from patient.models import create
    teacher = create("cifar_resnet20", num_classes=10, key=jax.random.key(0), resolution=12, depths=(1, 1, 1))
    student = create("cifar_resnet20", num_classes=10, key=jax.random.key(1), resolution=12, depths=(1, 1, 1))
    ev = patient.evaluate(student, digits("test"), teacher=teacher, batch_size=100)
    r = patient.distill(teacher, student, digits("train"), eval_data=digits("test"), steps=3, batch_size=32,
                        eval_batch_size=100, progress=False, optimizer="sgd", learning_rate=0.05)
    print("RESULT", json.dumps({"evaluate": ev, "distill": r.metrics}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_evaluate_like_one(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env) for i in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[7:]))
    assert outs[0] == outs[1]  # every process returns the same figures
    # ... equal to one process evaluating the same models (exact counts; the KL sum in float32 up to rounding)
    teacher = create("cifar_resnet20", num_classes=10, key=jax.random.key(0), resolution=12, depths=(1, 1, 1))
    student = create("cifar_resnet20", num_classes=10, key=jax.random.key(1), resolution=12, depths=(1, 1, 1))
    one = patient.evaluate(student, digits("test"), teacher=teacher, batch_size=100)
    two = outs[0]["evaluate"]
    for k in ("top1", "top5", "teacher_top1", "agreement", "examples"):
        assert two[k] == one[k], (k, two[k], one[k])
    assert abs(two["kl"] - one["kl"]) <= 1e-5 * max(1.0, abs(one["kl"]))
    assert outs[0]["distill"]["examples"] == len(digits("test"))


RUN = textwrap.dedent("""
    import json, sys, jax, numpy as np
    port, pid, nproc, out, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid,
                                   initialization_timeout=120)
    import equinox as eqx
    import patient
    from patient.data import digits
    from patient.models import create

    sys.path.insert(0, "tests")
    from slow_source import SlowSource  # a little time per example (argv[6] == "slow"), so a test can kill mid-run

    data = SlowSource(digits("train"), 0.03) if sys.argv[6:] == ["slow"] else digits("train")
    teacher = create("cifar_resnet20", num_classes=10, key=jax.random.key(0), resolution=12, depths=(1, 1, 1))
    student = create("cifar_resnet20", num_classes=10, key=jax.random.key(1), resolution=12, depths=(1, 1, 1))
    r = patient.distill(teacher, student, data, eval_data=digits("test"), mode="fm", steps=20,
                        batch_size=32, eval_batch_size=100, progress=False, optimizer="sgd", learning_rate=0.05,
                        workdir=workdir, checkpoint_every=10, log_every=5)
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(r.student, eqx.is_array))]
    np.savez(out + ".npz", *leaves)
    with open(out + ".json", "w") as f:
        json.dump({"metrics": r.metrics, "loss": [h["loss"] for h in r.history if "loss" in h]}, f)
""")


def _launch(script, tmp_path, name, nproc, devices, workdir, *extra):
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return [subprocess.Popen([sys.executable, str(script), str(port), str(i), str(nproc), str(tmp_path / f"{name}{i}"),
                              str(workdir), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env=env) for i in range(nproc)]


def _wait(procs, timeout=900):
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        errs.append((p.returncode, err))
    return errs


def _result(tmp_path, name):
    import numpy as np

    with open(tmp_path / f"{name}.json") as f:
        out = json.load(f)
    with np.load(tmp_path / f"{name}.npz", allow_pickle=False) as z:
        out["params"] = [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]
    return out


@pytest.mark.slow
def test_two_hosts_of_two_devices_reproduce_one_host_of_four(tmp_path):
    """Topology independence: 2 processes x 2 devices and 1 process x 4 devices see the same global batches (views
    and mixup included), so the fm run ends with the same loss and weights (up to float32 reduction order), the same
    eval counts on every process, and only process 0 writes the workdir."""
    import numpy as np

    script = tmp_path / "run.py"
    script.write_text(RUN)
    errs = _wait(_launch(script, tmp_path, "one", 1, 4, tmp_path / "wd1"))
    assert errs[0][0] == 0, errs[0][1][-3000:]
    errs = _wait(_launch(script, tmp_path, "two", 2, 2, tmp_path / "wd2"))
    for code, err in errs:
        assert code == 0, err[-3000:]
    one, p0, p1 = _result(tmp_path, "one0"), _result(tmp_path, "two0"), _result(tmp_path, "two1")
    assert p0["metrics"] == p1["metrics"]  # identical on both processes
    for k in ("top1", "teacher_top1", "agreement", "examples"):
        assert p0["metrics"][k] == one["metrics"][k], (k, p0["metrics"][k], one["metrics"][k])
    assert len(one["loss"]) == 4
    np.testing.assert_allclose(p0["loss"], one["loss"], rtol=0, atol=1e-5)
    for a, b, c in zip(one["params"], p0["params"], p1["params"]):
        np.testing.assert_array_equal(b, c)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "wd2" / "history.jsonl").read_text().splitlines()]
    steps = [(r["step"], tuple(sorted(r))) for r in rows]
    assert len(steps) == len(set(steps)), "history.jsonl has duplicate rows"
    # The 1 x 4 run's step-10 checkpoint resumes on 2 x 2 (the data position is the count of global batches, the
    # same on every topology) and ends where the uninterrupted 1 x 4 run ended.
    shutil.copytree(tmp_path / "wd1", tmp_path / "wd3")
    shutil.rmtree(tmp_path / "wd3" / "checkpoints" / "20")
    errs = _wait(_launch(script, tmp_path, "resumed", 2, 2, tmp_path / "wd3"))
    for code, err in errs:
        assert code == 0, err[-3000:]
    resumed = _result(tmp_path, "resumed0")
    assert resumed["metrics"]["top1"] == one["metrics"]["top1"]
    for a, b in zip(one["params"], resumed["params"]):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    # SIGKILL of both processes after the step-10 checkpoint, then a rerun: bit-identical to the uninterrupted 2 x 2.
    import time

    wd = tmp_path / "wd4"
    procs = _launch(script, tmp_path, "killed", 2, 2, wd, "slow")
    deadline = time.monotonic() + 600
    try:
        while not (wd / "checkpoints" / "10").is_dir():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint at step 10"
            time.sleep(0.2)
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert not (tmp_path / "killed0.npz").exists()  # killed before the end
    for code, err in _wait(_launch(script, tmp_path, "rerun", 2, 2, wd, "slow")):
        assert code == 0, err[-3000:]
    rerun = _result(tmp_path, "rerun0")
    for a, b in zip(p0["params"], rerun["params"]):
        np.testing.assert_array_equal(b, a)


@pytest.mark.slow
def test_a_dead_peer_ends_the_survivor_with_one_line(tmp_path):
    """Kill one of two patient-distill processes mid-run: the other exits non-zero within 120 s with one line."""
    import time

    port, workdir = _free_port(), tmp_path / "wd"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, "-m", "patient.cli.distill", "--teacher", "cifar_resnet20", "--student", "cifar_resnet20",
           "--data", "digits", "--workdir", str(workdir), "--out", str(tmp_path / "s.eqx"), "--coordinator",
           f"localhost:{port}", "--num-processes", "2", "--set", "steps=100000", "--set", "batch_size=32",
           "--set", "student_res=12", "--set", "log_every=5", "--set", "progress=false"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=env) for i in range(2)]
    try:
        deadline = time.monotonic() + 600
        while not ((workdir / "history.jsonl").is_file() and (workdir / "history.jsonl").read_text().strip()):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run never started"
            time.sleep(1)
        procs[1].kill()
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=150)
        took = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
            p.communicate()  # closes the pipes
    assert procs[0].returncode == 3, err[-3000:]
    assert took <= 120, took
    assert "Traceback" not in err
    assert "patient-distill: error: process 0 of 2 lost another process of the run" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("hosts, expect", [
    (("localhost:1234", 2, None), "needs all three of --coordinator"),
    (("localhost", 2, 0), "is not HOST:PORT"),
    (("localhost:70000", 2, 0), "is not HOST:PORT"),
    (("localhost:1234", 0, 0), "--num-processes 0 must be an integer >= 1"),
    (("localhost:1234", 2, 2), "--process-id 2 must be an integer in 0 .. 1"),
])
def test_host_arguments_are_checked_before_anything_starts(hosts, expect):
    from patient.engine.hosts import check_hosts

    with pytest.raises(ValueError, match=expect):
        check_hosts(*hosts)
    check_hosts("10.0.0.1:1234", 2, 1)  # fine
    check_hosts(None, None, None)  # a single-process run
