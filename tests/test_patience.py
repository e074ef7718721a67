"""benchmarks/patience.py at toy sizes: the JSON it promises, skipping finished rows, and continuing from a committed
patience.json on a machine whose workdir is empty."""

import json
import shutil

import pytest
from studies import study


@pytest.mark.slow
def test_patience_quick_json_resume_and_adopt(tmp_path, capsys):
    patience = study("patience")
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["--quick", "--budgets", "2,3", "--seeds", "1", "--lrs", "1e-2", "--workdir", str(work), "--out", str(out)]
    patience.main(argv)
    doc = json.loads((out / "patience.json").read_text())
    assert set(doc) >= {"teacher_top1", "crop_area_min", "mixup_alpha", "rows", "lr_tuning", "runs", "settings"}
    assert doc["crop_area_min"] == 0.05 and doc["mixup_alpha"] == 1.0
    assert [(r["mode"], r["steps"]) for r in doc["rows"]] == [(m, s) for s in (2, 3) for m in patience.MODES]
    for r in doc["rows"]:
        assert set(r) == {"mode", "steps", "epochs", "seed", "test_top1", "agreement", "seconds", "lr"}
        assert 0 <= r["test_top1"] <= 100 and r["epochs"] == round(r["steps"] * 16 / 40, 1)
    assert [t["chosen"] for t in doc["lr_tuning"]] == [1e-2] * 4
    assert (out / "patience.png").stat().st_size > 0 and (out / "patience_teacher.eqx").is_file()

    # A rerun trains nothing: every row is read back from its result.json, the figures are the same.
    capsys.readouterr()
    patience.main(argv)
    again = json.loads((out / "patience.json").read_text())
    assert again["rows"] == doc["rows"]
    assert "lr 0.01" in capsys.readouterr().out

    # Another machine: an empty workdir, the committed results and teacher. Nothing is trained again.
    shutil.rmtree(work)
    patience.main(argv)
    third = json.loads((out / "patience.json").read_text())
    assert third["rows"] == doc["rows"] and third["teacher_top1"] == doc["teacher_top1"]
    assert not list((work / "rows").glob("*/checkpoints"))  # no row trained: none has checkpoints

    # --report trains nothing, even where runs are missing: it writes what is finished.
    for done in (work / "rows").glob("fm_3steps*/result.json"):
        done.unlink()
    third["runs"] = [r for r in third["runs"] if (r["mode"], r["steps"]) != ("fm", 3)]
    (out / "patience.json").write_text(json.dumps(third))  # ... and from the committed results
    patience.main(argv + ["--report"])
    partial = json.loads((out / "patience.json").read_text())
    assert partial["rows"] == [r for r in doc["rows"] if (r["mode"], r["steps"]) != ("fm", 3)]
    assert not list((work / "rows").glob("*/checkpoints"))
