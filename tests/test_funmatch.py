"""The CPU-scale reproduction study (benchmarks/funmatch.py) in --quick mode, so that it cannot silently rot.

The quick mode runs every row of the study end to end (teacher training, all modes, both budgets, the 2x-resolution,
Shampoo and out-of-domain rows, the figure and the JSON) at toy sizes; here its outputs are checked for shape and
for consistency with each other and with an independent evaluation of the cached teacher.
"""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIELDS = {"row", "mode", "budget", "optimizer", "student_res", "teacher_res", "data", "test_top1", "agreement",
          "steps", "seconds"}


pytestmark = pytest.mark.slow  # trains the study's quick rows (minutes)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    pytest.importorskip("matplotlib", reason="the study draws its figure with matplotlib (the dev extra)")
    spec = importlib.util.spec_from_file_location("funmatch", ROOT / "benchmarks" / "funmatch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("funmatch")
    doc = mod.main(["--quick", "--out", str(out), "--cache", str(out / "cache")])
    return mod, out, doc


def test_every_row_is_measured(study):
    mod, out, doc = study
    on_disk = json.loads((out / "funmatch.json").read_text())
    assert on_disk["rows"] == doc["rows"]
    names = [r["row"] for r in on_disk["rows"]]
    for mode in ["scratch", "fix/rs", "fix/ic_ens", "ind/ic", "same/ic", "fm"]:
        assert f"{mode} short" in names and f"{mode} long" in names
    assert {"fm long, teacher at 2x", "fm short, shampoo", "fm long, out-of-domain"} <= set(names)
    for r in on_disk["rows"]:
        assert set(r) == FIELDS, r["row"]
        assert 0.0 <= r["test_top1"] <= 100.0 and 0.0 <= r["agreement"] <= 100.0
        assert r["seconds"] > 0 and r["budget"] in ("short", "long")
        assert r["mode"] == ("scratch" if r["row"].startswith("scratch") else r["row"].split()[0])
    by = {r["row"]: r for r in on_disk["rows"]}
    assert by["fm long"]["steps"] == 2 * by["fm short"]["steps"]  # quick: long = 2 x short
    assert by["fm long, teacher at 2x"]["teacher_res"] == 2 * by["fm long, teacher at 2x"]["student_res"]
    assert by["fm short, shampoo"]["optimizer"] == "shampoo"
    assert by["fm long, out-of-domain"]["data"] == "out-of-domain"
    for key in ("command", "date", "machine", "run_time_s"):
        assert on_disk[key]
    # Each row's learning curve is evaluated during training and ends at the row's last step.
    assert all(on_disk["curves"][n][-1][0] == by[n]["steps"] for n in names)


def test_teacher_figure_matches_an_independent_evaluation(study):
    mod, out, doc = study
    import patient
    from patient.data import eval_pipeline, fashion_mnist, subset
    from patient.models.registry import apply

    (teacher_path,) = (out / "cache").glob("*.eqx")
    model, state, _ = patient.load(teacher_path)
    test = subset(fashion_mnist("test"), per_class=4, seed=1)
    hits = n = 0
    for b in eval_pipeline(test, resolution=12, batch_size=64, channels=3):
        logits = np.asarray(apply(model, state, b["image"], train=False)[0])
        m = np.asarray(b["mask"])
        hits += int((logits.argmax(-1) == np.asarray(b["label"]))[m].sum())
        n += int(m.sum())
    assert n == 40
    assert doc["teacher_top1"] == pytest.approx(100.0 * hits / n, abs=1e-6)


def test_outputs_written(study):
    mod, out, doc = study
    assert (out / "funmatch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "funmatch.md").read_text()
    assert md.startswith("command: `python benchmarks/funmatch.py --quick")
    assert all(f"| {r['row']} |" in md for r in doc["rows"])
