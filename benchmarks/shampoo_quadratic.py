"""Shampoo vs Adam (learning-rate sweeps) on two small problems, in plain JAX: steps to a target loss and time per step.

Run (from the repository root; about 2-3 minutes on 2 cores, mostly compilation):

    python benchmarks/shampoo_quadratic.py                     # print the table and one JSON line
    python benchmarks/shampoo_quadratic.py --save benchmarks/results/shampoo_quadratic.txt

Tasks (deterministic, seed 0):

- `quadratic`: loss = 0.5 ||A (W - W*) B||_F^2 with W of 16 x 8, A^T A and B B^T each of condition number 100
  (Hessian (B B^T) x (A^T A), condition 1e4), full-batch gradients, 200 steps from W = 0.
- `mlp`: regression of a fixed random teacher MLP (16-32-1, tanh) by a student MLP (16-64-64-1, tanh) on 4096
  inputs with ill-conditioned covariance (scales 1 .. 0.1), batches of 256, 1000 steps; loss on all 4096 inputs.

For each task the target is the best final loss of the Adam sweep; "steps to target" counts the updates until the loss
first reaches it (so the best Adam needs all its steps, or nearly). Shampoo runs with its defaults (block 128,
precondition_every 10, start_preconditioning_step 10, precise eigh roots) and graft "adam" or the default
"rmsprop_normalized" (whose learning rates are ~10x smaller: heavy-ball momentum). "ms/step" is the median over 3
timed runs of a jitted 200-step scan without loss evaluation, compilation excluded; Shampoo's includes its root
recomputation every 10 steps.

Last run (benchmarks/results/shampoo_quadratic.txt; 2 shared Xeon cores, load average 2.4; best learning rates):

    quadratic: 200 steps, target = best Adam final loss 0.186 (lr 1)
    optimizer                            lr  final loss  steps to target  ms/step
    adam *                            1e+00   1.856e-01              200    0.003
    shampoo[adam] *                   1e+00   1.203e-06               79    0.041  (0.010 with precise_roots=False)
    shampoo[rmsprop_normalized] *     1e-03   1.139e-02              163    0.047  (0.012 with precise_roots=False)
    mlp: 1000 steps, target = best Adam final loss 9.21e-05 (lr 0.003)
    adam *                            3e-03   9.207e-05              631    0.146
    shampoo[adam] *                   1e-02   2.625e-05              214    0.539  (0.249 with precise_roots=False)
    shampoo[rmsprop_normalized] *     1e-04   2.266e-05              166    0.525  (0.237 with precise_roots=False)

Shampoo needs 2.5x (quadratic) and 3-3.8x (MLP) fewer steps to reach Adam's best loss and ends 3-10^5x lower, but on
models this small its time per step is dominated by the root recomputation (3.6x Adam's on the MLP): the per-step
comparison that matters is on a real student, in the distillation benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small LAPACK calls crawl when BLAS threads fight over few cores

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import Printer, cpu_model, save_with_header  # noqa: E402

from patient.optim import shampoo  # noqa: E402

ADAM_LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0]
SHAMPOO_LRS = {"adam": [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0], "rmsprop_normalized": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]}


# ----------------------------------------------------------------------------------------------------------------
# Tasks: each gives initial parameters, a gradient for step i, the loss to report, and a step count.


def quadratic_task():
    rng = np.random.default_rng(0)

    def factor(n):
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        return jnp.asarray((q * np.sqrt(np.logspace(0, 2, n))) @ q.T, jnp.float32)

    a, b, w_star = factor(16), factor(8), jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    loss = lambda w: 0.5 * jnp.sum((a @ (w - w_star) @ b) ** 2)  # noqa: E731
    return dict(params=jnp.zeros((16, 8)), grad=lambda w, i: jax.grad(loss)(w), loss=loss, steps=200)


def mlp_task():
    def init(key, sizes):
        keys = jax.random.split(key, len(sizes) - 1)
        return [(jax.random.normal(k, (m, n)) / np.sqrt(m), jnp.zeros(n)) for k, m, n in zip(keys, sizes, sizes[1:])]

    def mlp(params, x):
        for i, (w, b) in enumerate(params):
            x = x @ w + b
            x = jnp.tanh(x) if i < len(params) - 1 else x
        return x

    k_rot, k_x, k_teacher, k_student, k_batch = jax.random.split(jax.random.key(0), 5)
    rot, _ = jnp.linalg.qr(jax.random.normal(k_rot, (16, 16)))
    x = (jax.random.normal(k_x, (4096, 16)) * jnp.logspace(0, -1, 16)) @ rot.T
    y = mlp(init(k_teacher, [16, 32, 1]), x)
    loss_on = lambda p, xb, yb: 0.5 * jnp.mean((mlp(p, xb) - yb) ** 2)  # noqa: E731

    def grad(p, i):
        idx = jax.random.randint(jax.random.fold_in(k_batch, i), (256,), 0, x.shape[0])
        return jax.grad(loss_on)(p, x[idx], y[idx])

    return dict(params=init(k_student, [16, 64, 64, 1]), grad=grad, loss=lambda p: loss_on(p, x, y), steps=1000)


def losses(task, opt):
    """Loss after every step (jit-able; `opt` may close over a traced learning rate)."""

    def body(carry, i):
        p, s = carry
        u, s = opt.update(task["grad"](p, i), s, p)
        p = optax.apply_updates(p, u)
        return (p, s), task["loss"](p)

    _, ls = jax.lax.scan(body, (task["params"], opt.init(task["params"])), jnp.arange(task["steps"]))
    return ls


def ms_per_step(task, opt, steps=200, repeats=3):
    def run(p):
        def body(carry, i):
            p, s = carry
            u, s = opt.update(task["grad"](p, i), s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (p, opt.init(p)), jnp.arange(steps))
        return p

    run = jax.jit(run)
    jax.block_until_ready(run(task["params"]))  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(run(task["params"]))
        times.append((time.perf_counter() - t) / steps * 1e3)
    return statistics.median(times)


def steps_to(curve, target):
    hit = np.nonzero(np.asarray(curve) <= target)[0]
    return int(hit[0]) + 1 if hit.size else None


def bench(name, task, log):
    rows = []
    adam_curves = jax.jit(jax.vmap(lambda lr: losses(task, optax.adam(lr))))(jnp.asarray(ADAM_LRS))
    finals = np.asarray(adam_curves[:, -1])
    finals = np.where(np.isfinite(finals), finals, np.inf)
    best = int(np.argmin(finals))
    target = float(finals[best])
    for lr, curve in zip(ADAM_LRS, adam_curves):
        rows.append(dict(task=name, optimizer="adam", lr=lr, final_loss=float(curve[-1]), curve=curve))
    for graft, lrs in SHAMPOO_LRS.items():
        run = jax.jit(lambda lr: losses(task, shampoo(lr, graft=graft)))  # lr traced: one compilation per graft
        for lr in lrs:
            curve = run(jnp.float32(lr))
            rows.append(dict(task=name, optimizer=f"shampoo[{graft}]", lr=lr, final_loss=float(curve[-1]), curve=curve))
    for r in rows:
        r["steps_to_target"] = steps_to(r.pop("curve"), target)
    # Time per step for the best learning rate of each optimizer (and Shampoo without the precise roots).
    best_of = {}
    for r in rows:
        incumbent = best_of.get(r["optimizer"], {"final_loss": np.inf})["final_loss"]
        if np.isfinite(r["final_loss"]) and r["final_loss"] < incumbent:
            best_of[r["optimizer"]] = r
    for opt_name, r in best_of.items():
        if opt_name == "adam":
            r["ms_per_step"] = ms_per_step(task, optax.adam(r["lr"]))
        else:
            graft = opt_name[len("shampoo[") : -1]
            r["ms_per_step"] = ms_per_step(task, shampoo(r["lr"], graft=graft))
            r["ms_per_step_plain_roots"] = ms_per_step(task, shampoo(r["lr"], graft=graft, precise_roots=False))
        r["best"] = True
    log(f"\n{name}: {task['steps']} steps, target = best Adam final loss {target:.3g} (lr {ADAM_LRS[best]:g})")
    log(f"{'optimizer':30s} {'lr':>8s} {'final loss':>11s} {'steps to target':>16s} {'ms/step':>8s}")
    for r in rows:
        ms = f"{r['ms_per_step']:8.3f}" if "ms_per_step" in r else " " * 8
        if "ms_per_step_plain_roots" in r:
            ms += f"  ({r['ms_per_step_plain_roots']:.3f} with precise_roots=False)"
        steps = "-" if r["steps_to_target"] is None else str(r["steps_to_target"])
        mark = " *" if r.get("best") else ""
        log(f"{r['optimizer'] + mark:30s} {r['lr']:8.0e} {r['final_loss']:11.3e} {steps:>16s} {ms}".rstrip())
    return dict(task=name, steps=task["steps"], target=target, rows=rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save", type=pathlib.Path, help="also write the output, with a header, to this file")
    args = parser.parse_args()
    lines = log = Printer()

    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    log("* = best learning rate of each optimizer (timed); steps to target = first step with loss <= target")
    results = [bench("quadratic", quadratic_task(), log), bench("mlp", mlp_task(), log)]
    run_time = time.perf_counter() - t0

    summary = dict(benchmark="shampoo_quadratic", cpu=cpu_model(), cores=os.cpu_count(), run_time_s=round(run_time, 1))
    for res in results:
        best = {r["optimizer"]: r for r in res["rows"] if r.get("best")}
        keys = ("lr", "final_loss", "steps_to_target", "ms_per_step", "ms_per_step_plain_roots")
        summary[res["task"]] = {"target_loss": res["target"]}
        for name, r in best.items():
            summary[res["task"]][name] = {k: round(r[k], 4) if k.startswith("ms") else r[k] for k in keys if k in r}
    log()
    log(json.dumps(summary))
    if args.save:
        save_with_header(args.save, lines, run_time=run_time, load=load, modules=(jax, optax, np))


if __name__ == "__main__":
    main()
