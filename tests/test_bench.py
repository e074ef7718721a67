"""patient-bench / patient-eval and the no-JAX runtime path (.onnx and .tflite where jax and tensorflow cannot load)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import patient
from patient.bench.latency import bench, machine_info, table
from patient.export import to_onnx, to_tflite
from patient.models import create
from patient.runtime import data as bdata
from patient.runtime.models import ModelError, open_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One small model as .eqx, .onnx (batch 2), .tflite (batch 1), plus a folder of digit PNGs in two classes."""
    tmp = tmp_path_factory.mktemp("bench")
    model, state = create("cifar_resnet20", num_classes=10, key=jax.random.key(3))
    eqx_path = patient.save(tmp / "m.eqx", model, state, class_names=[str(i) for i in range(10)])
    onnx_path = to_onnx(eqx_path, tmp / "m.onnx", batch=2, verify_size=8)["path"]
    tflite_path = to_tflite(eqx_path, tmp / "m.tflite", verify_size=8)["path"]
    src = bdata.open_source("digits")
    folder = tmp / "folder"
    for i in range(12):
        item = src[i]
        d = folder / str(item["label"])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(item["image"][:, :, 0]).save(d / f"{i:03d}.png")
    return {"eqx": eqx_path, "onnx": pathlib.Path(onnx_path), "tflite": pathlib.Path(tflite_path), "folder": folder}


def test_render_plain_is_the_eval_pipeline_rendering():
    from patient.data import views

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), rng.integers(0, 256, (37, 23, 3), dtype=np.uint8),
              rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)]
    for image in images:
        for res in (16, 32, 64):
            want = views.render(image, views.plain_resize(), res, 3)
            np.testing.assert_array_equal(bdata.render_plain(image, res), want)


def test_predict_pads_and_splits_fixed_batches(files):
    x = bdata.sample(bdata.open_source("digits"), 5, 32)
    runners = [open_model(files[f]) for f in ("eqx", "onnx", "tflite")]
    assert [r.batch for r in runners] == [None, 2, 1]
    outs = [r.predict(x) for r in runners]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], atol=1e-4, rtol=0)


def test_bench_reports_every_figure(files):
    rows = [bench(files[f], threads=1, runs=5, warmup=1) for f in ("eqx", "onnx", "tflite")]
    for r in rows:
        for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "init_s", "first_ms", "peak_rss_mb", "file_mb"):
            assert r[key] >= 0, key
        assert r["params"] == 272474 and r["macs"] == rows[0]["macs"] > 0
    assert rows[1]["batch"] == 2 and rows[2]["threads"] == 1
    assert len(table(rows).splitlines()) == 4
    info = machine_info()
    assert info["cores"] >= 1 and isinstance(info["isa"], list) and info["cpu"]


def test_bench_cli_json_and_plot(files, tmp_path, capsys):
    from patient.cli.bench import main

    plot, out = tmp_path / "lat.png", tmp_path / "lat.json"
    rc = main([str(files["onnx"]), str(files["tflite"]), "--threads", "1,2", "--runs", "5", "--warmup", "1",
               "--plot", str(plot), "--json", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert rc == 0 and plot.stat().st_size > 1000 and json.loads(out.read_text()) == result
    assert [(r["format"], r["threads"]) for r in result["results"]] == [("onnx", 1), ("onnx", 2), ("tflite", 1),
                                                                       ("tflite", 2)]
    assert {"cpu", "cores", "isa"} <= set(result["machine"]) and "onnxruntime" in result["libraries"]


def test_eval_same_top1_for_every_format(files, capsys):
    from patient.cli.eval import main

    results = []
    for f in ("eqx", "onnx", "tflite"):
        assert main([str(files[f]), "--data", "digits", "--limit", "64"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert len({r["top1"] for r in results}) == 1 and len({r["top5"] for r in results}) == 1
    assert results[0]["examples"] == 64


@pytest.mark.parametrize("argv, expect", [
    (["{missing}", "--data", "digits"], "no such file"),
    (["{folder}", "--data", "digits"], "is a folder, not a model file"),
    (["{text}", "--data", "digits"], "unknown model format"),
    (["{onnx}", "--data", "digits", "--resolution", "64"], "fixed shape"),
    (["{eqx}", "--data", "digits", "--resolution", "0"], "positive integer"),
    (["{eqx}", "--data", "digits", "--resolution", "5000"], "up to 4096 px"),
    (["{onnx}", "--data", "cifar100"], "unknown data"),
    (["{onnx}", "--data", "image_folder:{missing}"], "does not exist"),
])
def test_eval_bad_input(files, tmp_path, capsys, argv, expect):
    from patient.cli.eval import main

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    names = {"missing": tmp_path / "missing.onnx", "text": text, **files}
    rc = main([a.format(**{k: str(v) for k, v in names.items()}) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and expect in err[0], err


@pytest.mark.parametrize("threads, expect", [("100000", "more than 256"), ("0", "positive numbers"),
                                             ("1,x", "numbers like 1,2")])
def test_bench_threads_are_bounded(files, capsys, threads, expect):
    """--threads 100000 used to allocate 16 GB and hang; now it is one line before any work."""
    from patient.cli.bench import main

    with pytest.raises(SystemExit) as e:
        main([str(files["onnx"]), "--threads", threads])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and expect in err[0], err


NO_JAX = """
import sys
for name in ("jax", "jaxlib", "tensorflow", "equinox", "grain"):
    sys.modules[name] = None  # any import of these now raises ImportError
from patient.cli.bench import main as bench
from patient.cli.eval import main as evaluate
rc = bench([{onnx!r}, {tflite!r}, "--runs", "5", "--warmup", "1"])
rc += evaluate([{onnx!r}, "--data", "image_folder:" + {folder!r}])
rc += evaluate([{tflite!r}, "--data", "image_folder:" + {folder!r}])
loaded = [m for m in ("jax", "tensorflow") if sys.modules.get(m) is not None]
print("LOADED", loaded)
sys.exit(rc)
"""


def test_bench_and_eval_without_jax_or_tensorflow(files):
    code = NO_JAX.format(onnx=str(files["onnx"]), tflite=str(files["tflite"]), folder=str(files["folder"]))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.splitlines()
    assert "LOADED []" in out
    bench_json = json.loads(next(line for line in out if line.startswith('{"benchmark"')))
    assert [r["format"] for r in bench_json["results"]] == ["onnx", "tflite"]
    assert "jax" not in bench_json["libraries"]
    evals = [json.loads(line) for line in out if line.startswith('{"data"')]
    assert [e["examples"] for e in evals] == [12, 12] and evals[0]["top1"] == evals[1]["top1"]


def test_missing_runtime_file_is_one_line():
    with pytest.raises(ModelError, match="no such file"):
        open_model("/nonexistent/model.tflite")


def test_eval_maps_a_folder_of_some_classes_by_name():
    """A folder holding a few of the model's classes is scored against the model's indices of those names (its own
    labels 0, 1, ... would mean the model's first classes); a class the model does not know is refused."""
    import types

    from patient.cli.eval import class_map
    from patient.runtime.data import DataError

    names = [str(i) for i in range(10)]
    folder = types.SimpleNamespace(class_names=["2", "5", "9"], name="folder")
    assert class_map(names, folder, relabel=False).tolist() == [2, 5, 9]
    assert class_map(names, types.SimpleNamespace(class_names=names, name="all"), relabel=False) is None
    assert class_map(names, folder, relabel=True) is None
    with pytest.raises(DataError, match=r"classes \[cat\] that the model does not know"):
        class_map(names, types.SimpleNamespace(class_names=["2", "cat"], name="pets"), relabel=False)


def test_profile_onnx_by_operator_and_tflite_by_delegate(files, capsys):
    import onnx

    from patient.cli.bench import main
    from patient.export.tflite import _op_counts

    assert main([str(files["onnx"]), str(files["tflite"]), "--profile", "--runs", "5"]) == 0
    out = capsys.readouterr().out
    o, t = json.loads(out.strip().splitlines()[-1])["results"]
    assert o["format"] == "onnx" and o["runs"] == 5 and abs(sum(r["share"] for r in o["ops"]) - 1) < 1e-3
    convs = [n for n in onnx.load(files["onnx"]).graph.node if n.op_type == "Conv"]
    assert sum(r["count"] for r in o["ops"] if r["op"] in ("Conv", "FusedConv")) == len(convs)  # every conv timed
    assert o["ops"][0]["op"] in ("Conv", "FusedConv")  # a ResNet's time is in its convolutions
    counts = _op_counts(files["tflite"].read_bytes())
    assert t["format"] == "tflite" and {r["op"]: r["count"] for r in t["ops"]} == counts
    # fp32: XNNPACK takes the whole graph in one partition
    assert t["in_xnnpack"] == t["operators"] == sum(counts.values()) and t["partitions"] == 1
    assert all(r["outside"] == 0 for r in t["ops"]) and 0 < t["p50_ms_xnnpack"]
    assert "in XNNPACK (1 partition), 0 on LiteRT's own kernels" in out and "kernel time by operator" in out
    assert main([str(files["eqx"]), "--profile"]) == 2
    assert "--profile reads .onnx and .tflite files" in capsys.readouterr().err
    assert main([str(files["onnx"]), "--profile", "--data", "digits"]) == 2
    assert "--data goes with the latency table; leave it out with --profile" in capsys.readouterr().err


def test_bench_data_adds_top1_and_names_the_fastest_within_the_budget(files, capsys):
    from patient.cli.bench import main
    from patient.cli.eval import evaluate

    paths = [str(files["onnx"]), str(files["tflite"])]
    assert main(paths + ["--runs", "5", "--warmup", "0", "--data", "digits", "--budget", "0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    src = bdata.open_source("digits")
    want = {p: round(100 * evaluate(open_model(p), src)["top1"], 2) for p in paths}
    assert {r["path"]: r["top1"] for r in out["results"]} == want
    pick = out["fastest_within_budget"]
    assert pick["top1"] == max(want.values()) == pick["best_top1"]  # budget 0: only the most accurate files qualify
    assert pick["p50_ms"] == min(r["p50_ms"] for r in out["results"] if r["top1"] == pick["top1"])
    assert main(paths + ["--data", "imagenet"]) == 2  # refused before any timing
    assert main(paths + ["--data", "digits", "--budget", "nan"]) == 2
    assert "--budget nan must be a number" in capsys.readouterr().err
