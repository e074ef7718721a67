"""Which graft should Shampoo default to? Every graft against tuned Adam on Kronecker-structured quadratics.

Run (from the repository root; 22 minutes in the last run, on 2 cores shared with other jobs):

    python benchmarks/shampoo_graft.py                     # print the tables and one JSON line
    python benchmarks/shampoo_graft.py --save benchmarks/results/shampoo_graft.txt

Problems (deterministic, seed 0): loss(W) = 0.5 ||A (W - W*) B||_F^2 / (m n) with W of m x n, A = Q_a diag(a) Q_a^T and
B = Q_b diag(b) Q_b^T for random rotations Q and singular values log-spaced from 1 to sqrt(c), so A^T A and B B^T each
have condition number c and the Hessian (B B^T) x (A^T A) has c^2. Sizes 16 x 8, 64 x 32 and 256 x 128 (the last is
split into blocks of 128 by Shampoo's default block size, so its preconditioner no longer sees the whole Kronecker
factor), c = 1e2 and 1e3, with exact gradients and with noisy ones (Gaussian noise of 0.01 x the root-mean-square of the
gradient at W = 0 on every entry, a fresh draw per step, the same draws for every optimizer). 300 steps from W = 0,
learning rate on a cosine decay to 0 (as the trainer's schedule), the default Shampoo settings otherwise (b1 0.9, b2
0.999, block 128, preconditioning every 10 steps from step 10, eigh roots).

Every optimizer (Adam and Shampoo with each graft) runs the same learning-rate grid, 1e-6 .. 10 in half decades; its
score on a problem is its best final loss (over the grid) divided by the best final loss of Adam, and a graft's overall
score is the geometric mean of its scores over the 12 problems (lower is better). A best learning rate at the edge of
the grid is flagged. Distillation is measured by `benchmarks/shampoo_vs_adam.py --grafts ...`.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small LAPACK calls crawl when BLAS threads fight over few cores

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import Printer, cpu_model, save_with_header, table  # noqa: E402

from patient.optim import shampoo  # noqa: E402
from patient.optim.shampoo import GRAFTS  # noqa: E402

LRS = [10.0 ** (e / 2) for e in range(-12, 3)]  # 1e-6 .. 10
SIZES = [(16, 8), (64, 32), (256, 128)]
CONDITIONS = [1e2, 1e3]
NOISES = [0.0, 0.01]
STEPS = 300


def problem(m: int, n: int, cond: float, noise: float) -> dict:
    rng = np.random.default_rng(0)

    def factor(k):
        q, _ = np.linalg.qr(rng.standard_normal((k, k)))
        return jnp.asarray((q * np.sqrt(np.logspace(0, math.log10(cond), k))) @ q.T, jnp.float32)

    a, b = factor(m), factor(n)
    w_star = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    loss = lambda w: 0.5 * jnp.sum((a @ (w - w_star) @ b) ** 2) / (m * n)  # noqa: E731
    w0 = jnp.zeros((m, n), jnp.float32)
    scale = noise * float(jnp.sqrt(jnp.mean(jax.grad(loss)(w0) ** 2)))
    key = jax.random.key(1)

    def grad(w, i):
        g = jax.grad(loss)(w)
        return g + scale * jax.random.normal(jax.random.fold_in(key, i), g.shape) if noise else g

    return dict(name=f"{m}x{n} c={cond:g}" + (f" noise {noise:g}" if noise else ""), params=w0, grad=grad, loss=loss,
                loss0=float(loss(w0)))


def make(opt_name: str, lr):
    sched = optax.cosine_decay_schedule(lr, STEPS)
    if opt_name == "adam":
        return optax.adam(sched)
    return shampoo(sched, graft=opt_name.split(":")[1])


def final_losses(task: dict, opt_name: str) -> np.ndarray:
    """Final loss / initial loss for every learning rate of the grid (the learning rate is traced: one compilation per
    optimizer; a loop, not a vmap: XLA CPU deadlocked on the vmapped Shampoo scan with 4 or more learning rates)."""

    def run(lr):
        opt = make(opt_name, lr)

        def body(carry, i):
            p, s = carry
            u, s = opt.update(task["grad"](p, i), s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (task["params"], opt.init(task["params"])), jnp.arange(STEPS))
        return task["loss"](p)

    run = jax.jit(run)
    out = np.asarray([float(run(jnp.float32(lr))) for lr in LRS], np.float64) / task["loss0"]
    return np.where(np.isfinite(out), out, np.inf)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--save", type=pathlib.Path, help="also write the output, with a header, to this file")
    args = p.parse_args(argv)
    lines = log = Printer()

    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    optimizers = ["adam"] + [f"shampoo:{g}" for g in GRAFTS]
    results = []
    for (m, n), cond, noise in itertools.product(SIZES, CONDITIONS, NOISES):
        task = problem(m, n, cond, noise)
        best = {}
        for o in optimizers:
            finals = final_losses(task, o)
            i = int(np.argmin(finals))
            best[o] = dict(loss=float(finals[i]), lr=LRS[i], edge=i in (0, len(LRS) - 1) and np.isfinite(finals[i]))
        for o in optimizers:
            best[o]["score"] = best[o]["loss"] / best["adam"]["loss"]
        results.append(dict(problem=task["name"], best=best))
        print(f"  {task['name']}: " + ", ".join(f"{o} {best[o]['loss']:.2e} (lr {best[o]['lr']:.0e})"
                                                 for o in optimizers), flush=True)
    run_time = time.perf_counter() - t0

    log(f"final loss / initial loss after {STEPS} steps at the best learning rate of each optimizer (grid 1e-6 .. 10 "
        "in half decades; '!' = best at the grid's edge); in brackets: that loss / best Adam's")
    rows = []
    for r in results:
        row = {"problem": r["problem"]}
        for o in optimizers:
            b = r["best"][o]
            row[o] = f"{b['loss']:.2e}{'!' if b['edge'] else ''}" + ("" if o == "adam" else f" ({b['score']:.2g})")
        rows.append(row)
    log(table(rows, [("problem", "problem")] + [(o, o.replace("shampoo:", "")) for o in optimizers]))
    log()
    geo = {o: math.exp(statistics.fmean([math.log(r["best"][o]["score"]) for r in results])) for o in optimizers[1:]}
    wins = {o: sum(min(optimizers[1:], key=lambda q: r["best"][q]["loss"]) == o for r in results) for o in optimizers[1:]}
    ranking = sorted(geo, key=geo.get)
    log("graft                 geometric mean of (best loss / best Adam loss)   problems won")
    for o in ranking:
        log(f"{o.replace('shampoo:', ''):20s}  {geo[o]:43.3g}   {wins[o]:12d}")
    winner = ranking[0].replace("shampoo:", "")
    log(f"winner on the quadratics: {winner}")
    summary = dict(benchmark="shampoo_graft", cpu=cpu_model(), cores=os.cpu_count(), run_time_s=round(run_time, 1),
                   steps=STEPS, winner=winner,
                   geometric_mean_vs_adam={o.replace("shampoo:", ""): float(f"{geo[o]:.4g}") for o in ranking},
                   wins={o.replace("shampoo:", ""): wins[o] for o in ranking},
                   problems=[{"problem": r["problem"],
                              **{o.replace("shampoo:", ""): {"loss": float(f"{b['loss']:.4g}"), "lr": b["lr"]}
                                 for o, b in r["best"].items()}} for r in results])
    log(json.dumps(summary))
    if args.save:
        save_with_header(args.save, lines, run_time=run_time, load=load, modules=(jax, optax, np))


if __name__ == "__main__":
    main()
