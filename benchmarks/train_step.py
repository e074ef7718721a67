"""Images/s of patient's distill step against the same models and loss in PyTorch eager, in one run.

    python benchmarks/train_step.py [--steps 10] [--rounds 2] [--save benchmarks/results/train_step.txt]

Pairs: bit_r50x1 -> mobilenetv3_small_100 at 128 px, batch 32; cifar_resnet56 -> cifar_resnet20 at 32 px, batch 128.
The step: mixup (one lambda, roll by one) on both views, teacher forward without gradient, KL at T=1, student forward
and backward, Adam update. JAX variants: teacher float32 / bfloat16, and both in bfloat16 (the student's forward and
backward with `compute_dtype="bfloat16"`, float32 master weights); the state is donated in all three. PyTorch: timm models
(CIFAR ResNets written here, same architecture), eager, as many threads as cores. Compile time is reported apart.

The split table times the parts of the step one by one, in both frameworks: teacher forward (no gradient), student
forward + backward (KL to fixed teacher probabilities), optimizer update. Parts are jitted separately in JAX, so their
sum can exceed the fused step.

The machine must be quiet (common.Quiet): the result is printed but not saved, exit status 3, when the 1-minute load
was above 1.0 before the run or other processes kept threads runnable during it.
Each child process (three JAX variants, PyTorch) runs `--rounds` times, alternated, and every figure is the median
over its runs (`common.run_children`): on a shared machine a framework measured alone moves by 20-40% between runs.
The "f32 jax/torch" column compares like with like (float32 everywhere); "best" takes the fastest JAX variant.
About 10 minutes per round on 2 cores. Prints two tables and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Quiet, header, json_line, median, report, run_children, table, time_call  # noqa: E402

# child -> (teacher_dtype, compute_dtype) for the JAX variants; "torch" is PyTorch eager
CHILDREN = {"jax_float32": ("float32", "float32"), "jax_bfloat16": ("bfloat16", "float32"),
            "jax_bf16_compute": ("bfloat16", "bfloat16"), "torch": None}

PAIRS = [
    ("bit_r50x1", "mobilenetv3_small_100", 128, 32),
    ("cifar_resnet56", "cifar_resnet20", 32, 128),
]


def child_jax(steps: int, teacher_dtype: str, compute_dtype: str = "float32") -> dict:
    import equinox as eqx
    import jax
    import numpy as np

    from patient.engine.config import Config
    from patient.engine.step import init_state, make_mesh, make_optimizer, make_step
    from patient.engine.teachers import cast_floating
    from patient.models import create
    from patient.models.layers import standardise_kernels

    out = {}
    for t_name, s_name, res, bs in PAIRS:  # noqa: B007  (res and bs are read as globals by the functions above)
        cfg = Config(batch_size=bs, steps=1000, teacher_dtype=teacher_dtype, compute_dtype=compute_dtype)
        t = create(t_name, num_classes=100, key=jax.random.key(0))
        if teacher_dtype == "bfloat16":
            t = cast_floating(t, jax.numpy.bfloat16)
        t = (standardise_kernels(t[0]), t[1])  # as the trainer does with a frozen teacher
        s, ss = create(s_name, num_classes=100, key=jax.random.key(1))
        params, static = eqx.partition(s, eqx.is_array)
        opt = make_optimizer(cfg, 1000)
        mesh = make_mesh()
        step = make_step(cfg, static, opt, mesh=mesh, supervised=False, use_cache=False, mix=True)
        ts = init_state(params, ss, opt, 0)
        rng = np.random.default_rng(0)
        batch = {"student": rng.uniform(0, 1, (bs, 3, res, res)).astype(np.float32),
                 "teacher": rng.uniform(0, 1, (bs, 3, res, res)).astype(np.float32),
                 "label": np.zeros(bs, np.int32)}
        holder = {"ts": ts}
        t0 = time.perf_counter()
        holder["ts"], m = step(holder["ts"], batch, [t])
        m["loss"].block_until_ready()
        compile_s = time.perf_counter() - t0

        def one():
            holder["ts"], m = step(holder["ts"], batch, [t])
            m["loss"].block_until_ready()

        times = time_call(one, warmup=2, runs=steps)
        res_pair = {"images_per_s": bs / median(times), "compile_s": compile_s}
        if teacher_dtype == "float32" and compute_dtype == "float32":
            res_pair["split_ms"] = jax_split(t, holder["ts"], static, opt, batch, steps)
        out[f"{t_name}->{s_name}"] = res_pair
    return out


def jax_split(teacher, ts, static, opt, batch, steps: int) -> dict:
    """Milliseconds of the step's parts, each jitted on its own: teacher forward, student forward + backward,
    optimizer update (on the train state `ts` the full step left; the student's own arrays were donated)."""
    import equinox as eqx
    import jax
    import optax

    from patient.engine.losses import kl_divergence, teacher_probs
    from patient.engine.teachers import teacher_logits
    from patient.models import apply

    params, model_state = ts.params, ts.model_state
    t_fwd = jax.jit(lambda ts, x: teacher_probs(teacher_logits(ts, x), 1.0))

    def loss(p, ms, x, tp):
        logits, _, ms = apply(eqx.combine(p[0], static), ms, x, train=True)
        return kl_divergence(tp, logits, 1.0).mean(), ms

    s_fb = jax.jit(jax.value_and_grad(loss, has_aux=True))

    def update(g, os_, p):
        u, os_ = opt.update(g, os_, p)
        return optax.apply_updates(p, u), os_

    upd = jax.jit(update)
    x_t, x_s = jax.device_put(batch["teacher"]), jax.device_put(batch["student"])
    tp = t_fwd([teacher], x_t)
    (_, _), g = s_fb(params, model_state, x_s, tp)
    os_ = opt.init(params)
    parts = {
        "teacher_fwd": lambda: jax.block_until_ready(t_fwd([teacher], x_t)),
        "student_fwd_bwd": lambda: jax.block_until_ready(s_fb(params, model_state, x_s, tp)),
        "update": lambda: jax.block_until_ready(upd(g, os_, params)),
    }
    return {k: 1e3 * median(time_call(f, warmup=2, runs=steps)) for k, f in parts.items()}


def child_torch(steps: int) -> dict:
    import timm
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count())

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = F.relu(self.b1(self.c1(x)))
            y = self.b2(self.c2(y))
            return F.relu(y + (x if self.down is None else self.down(x)))

    def cifar_resnet(depth, classes=100):
        n = (depth - 2) // 6
        layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
        for i, c in enumerate((16, 32, 64)):
            for j in range(n):
                layers.append(Basic(cin, c, 2 if (i > 0 and j == 0) else 1))
                cin = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes)]
        return nn.Sequential(*layers)

    def build(name):
        if name.startswith("cifar_resnet"):
            return cifar_resnet(int(name[len("cifar_resnet"):]))
        return timm.create_model({"bit_r50x1": "resnetv2_50x1_bit"}.get(name, name), num_classes=100)

    out = {}
    for t_name, s_name, res, bs in PAIRS:  # noqa: B007  (res and bs are read as globals by the functions above)
        teacher, student = build(t_name).eval(), build(s_name).train()
        opt = torch.optim.Adam(student.parameters(), lr=1e-3)
        xs, xt = torch.rand(bs, 3, res, res), torch.rand(bs, 3, res, res)

        def one():
            lam = float(torch.distributions.Beta(1.0, 1.0).sample())
            lam = max(lam, 1 - lam)
            s_in = lam * xs + (1 - lam) * torch.roll(xs, 1, 0)
            t_in = lam * xt + (1 - lam) * torch.roll(xt, 1, 0)
            with torch.no_grad():
                p = F.softmax(teacher(t_in), -1)
            loss = F.kl_div(F.log_softmax(student(s_in), -1), p, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        times = time_call(one, warmup=2, runs=steps)
        with torch.no_grad():
            p = F.softmax(teacher(xt), -1)

        def t_fwd():
            with torch.no_grad():
                teacher(xt)

        def s_fb():
            opt.zero_grad(set_to_none=True)
            F.kl_div(F.log_softmax(student(xs), -1), p, reduction="batchmean").backward()

        s_fb()
        split = {"teacher_fwd": t_fwd, "student_fwd_bwd": s_fb, "update": opt.step}
        out[f"{t_name}->{s_name}"] = {"images_per_s": bs / median(times), "split_ms": {
            k: 1e3 * median(time_call(f, warmup=2, runs=steps)) for k, f in split.items()}}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2, help="runs of every child, alternated (medians are reported)")
    p.add_argument("--child", choices=list(CHILDREN))
    p.add_argument("--save")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.child:
        res = child_torch(args.steps) if args.child == "torch" else child_jax(args.steps, *CHILDREN[args.child])
        print(json.dumps(res))
        return
    t0 = time.perf_counter()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    with Quiet() as quiet:
        results = run_children({c: ([sys.executable, __file__, "--child", c, "--steps", str(args.steps)], env)
                                for c in CHILDREN}, args.rounds)
    rows = []
    for t_name, s_name, res, bs in PAIRS:  # noqa: B007  (res and bs are read as globals by the functions above)
        k = f"{t_name}->{s_name}"
        row = {"pair": k, "res": res, "batch": bs}
        for child in results:
            row[child] = results[child].get(k, {}).get("images_per_s")
        row["compile_s"] = results["jax_float32"].get(k, {}).get("compile_s")
        best = max((row[c] for c in CHILDREN if c != "torch" and row[c]), default=None)
        row["f32_jax_vs_torch"] = row["jax_float32"] / row["torch"] if row["jax_float32"] and row["torch"] else None
        row["best_jax_vs_torch"] = best / row["torch"] if best and row["torch"] else None
        rows.append(row)
    split_rows = []
    for t_name, s_name, res, bs in PAIRS:  # noqa: B007  (res and bs are read as globals by the functions above)
        k = f"{t_name}->{s_name}"
        js = results["jax_float32"].get(k, {}).get("split_ms", {})
        ts = results["torch"].get(k, {}).get("split_ms", {})
        for part in ("teacher_fwd", "student_fwd_bwd", "update"):
            j, t = js.get(part), ts.get(part)
            split_rows.append({"pair": k, "part": part, "jax_ms": j, "torch_ms": t,
                               "jax_speed_vs_torch": t / j if j and t else None})
    wall = time.perf_counter() - t0
    what = (f"distill step images/s (mixup + teacher fwd + student fwd/bwd + Adam), median of {args.steps} steps; "
            f"every figure is the median over {args.rounds} alternated runs of each child process")
    lines = header(f"python benchmarks/train_step.py --steps {args.steps} --rounds {args.rounds}", wall, what,
                   quiet) + [
        table(rows, [("pair", "teacher->student"), ("res", "px"), ("batch", "batch"),
                     ("jax_float32", "jax f32 teacher"), ("jax_bfloat16", "jax bf16 teacher"),
                     ("jax_bf16_compute", "jax bf16 teacher+student"),
                     ("torch", "torch eager"), ("f32_jax_vs_torch", "f32 jax/torch"),
                     ("best_jax_vs_torch", "best jax/torch"),
                     ("compile_s", "compile s")]),
        "",
        "split: each part timed alone (median ms per batch; speed = torch ms / jax ms, > 1 means JAX is faster)",
        table(split_rows, [("pair", "teacher->student"), ("part", "part"), ("jax_ms", "jax f32 ms"),
                           ("torch_ms", "torch ms"), ("jax_speed_vs_torch", "speed vs torch")]),
    ]
    lines.append(json_line("train_step", run_time_s=round(wall, 1), rounds=args.rounds, rows=rows, split=split_rows,
                           **quiet.figures()))
    report(lines, results, args.save, quiet)


if __name__ == "__main__":
    main()
