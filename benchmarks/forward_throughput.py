"""Inference throughput (images/s) of patient models under XLA CPU settings, against timm in PyTorch eager.

    python benchmarks/forward_throughput.py [--runs 20] [--rounds 2] [--save benchmarks/results/forward_throughput.txt]

Models: bit_r50x1, resnet50, mobilenetv3_small_100 at 128 px, batch 32, inference. Each XLA setting runs in its own
process (XLA_FLAGS are read once at start-up); PyTorch runs in another, with as many threads as cores. The machine
must be quiet (common.Quiet): otherwise the result is printed, not saved, and the exit status is 3. Every child runs
`--rounds` times, alternated, and each figure is the median over its runs (`common.run_children`). About 4 minutes
per round on 2 cores. Prints a table and ends with one JSON line.
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

MODELS = {"bit_r50x1": "resnetv2_50x1_bit", "resnet50": "resnet50", "mobilenetv3_small_100": "mobilenetv3_small_100"}
SETTINGS = {
    "default": "",
    "xnn_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "onednn": "--xla_cpu_experimental_onednn_custom_call=true",
}
RES, BATCH = 128, 32


def child_jax(runs: int) -> dict:
    import equinox as eqx
    import jax
    import numpy as np

    from patient.models import apply, create

    out = {}
    x = np.random.default_rng(0).uniform(0, 1, (BATCH, 3, RES, RES)).astype(np.float32)
    for name in MODELS:
        model, state = create(name, num_classes=1000, key=jax.random.key(0))
        fwd = eqx.filter_jit(lambda m, s, x: apply(m, s, x, train=False)[0])
        t = time.perf_counter()
        fwd(model, state, x).block_until_ready()
        compile_s = time.perf_counter() - t
        times = time_call(lambda: fwd(model, state, x).block_until_ready(), warmup=3, runs=runs)
        out[name] = {"images_per_s": BATCH / median(times), "compile_s": compile_s}
    return out


def child_torch(runs: int) -> dict:
    import timm
    import torch

    torch.set_num_threads(os.cpu_count())
    out = {}
    x = torch.rand(BATCH, 3, RES, RES)
    for name, timm_name in MODELS.items():
        model = timm.create_model(timm_name, pretrained=False, num_classes=1000).eval()
        with torch.inference_mode():
            times = time_call(lambda: model(x), warmup=3, runs=runs)
        out[name] = {"images_per_s": BATCH / median(times)}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="runs of every child, alternated (medians are reported)")
    p.add_argument("--child", choices=["jax", "torch"])
    p.add_argument("--save")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.child:
        print(json.dumps(child_jax(args.runs) if args.child == "jax" else child_torch(args.runs)))
        return
    t0 = time.perf_counter()
    argv = [sys.executable, __file__, "--runs", str(args.runs), "--child"]
    children = {setting: (argv + ["jax"], {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"})
                for setting, flags in SETTINGS.items()}
    children["torch"] = (argv + ["torch"], dict(os.environ))
    with Quiet() as quiet:
        results = run_children(children, args.rounds)
    errors = dict(results)
    torch_res = results.pop("torch")
    torch_res = None if "error" in torch_res else torch_res
    rows = []
    for name in MODELS:
        row = {"model": name}
        for setting in SETTINGS:
            res = results[setting]
            row[setting] = res[name]["images_per_s"] if name in res else None
        row["torch_eager"] = torch_res[name]["images_per_s"] if torch_res else None
        ok = {s: row[s] for s in SETTINGS if row[s]}
        row["best"] = max(ok, key=ok.get) if ok else None
        row["best_vs_torch"] = (ok[row["best"]] / row["torch_eager"]) if ok and row["torch_eager"] else None
        rows.append(row)
    wall = time.perf_counter() - t0
    what = (f"inference images/s, {RES} px, batch {BATCH}, median of {args.runs} runs after 3 warm-up calls; every "
            f"figure is the median over {args.rounds} alternated runs of each child process")
    lines = header(f"python benchmarks/forward_throughput.py --runs {args.runs} --rounds {args.rounds}", wall, what,
                   quiet) + [
        table(rows, [("model", "model")] + [(s, s) for s in SETTINGS] + [("torch_eager", "torch eager"),
                                                                         ("best", "best"),
                                                                         ("best_vs_torch", "best/torch")]),
    ]
    lines.append(json_line("forward_throughput", run_time_s=round(wall, 1), rounds=args.rounds, rows=rows,
                           settings=SETTINGS,
                           **quiet.figures()))
    report(lines, errors, args.save, quiet)


if __name__ == "__main__":
    main()
