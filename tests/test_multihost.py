"""Two processes on one machine (gloo collectives over loopback), as several hosts would run: evaluation and a
distillation with eval data finish on both, with identical figures, equal to one process."""

import json
import os
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
