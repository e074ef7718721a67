"""benchmarks/methods.py at toy sizes: the table and JSON it promises, the convergence row, and a rerun that trains
nothing (every run is read back from its result.json)."""

import json

import pytest
from studies import study


@pytest.mark.slow
def test_methods_quick_table_json_and_rerun(tmp_path, capsys):
    methods = study("methods")
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["--quick", "--steps", "2", "--seeds", "0,1", "--rows", "none,dkd,crd", "--workdir", str(work),
            "--out", str(out)]
    methods.main(argv)
    doc = json.loads((out / "methods.json").read_text())
    assert [(r["method"], r["steps"], r["seeds"]) for r in doc["rows"]] == [
        ("none", 2, 2), ("none 2x", 4, 1), ("dkd", 2, 2), ("crd", 2, 2)]
    for r in doc["rows"]:
        per_seed = [float(x) for x in r["per_seed"].split(" / ")]
        assert r["top1"] == pytest.approx(sum(per_seed) / len(per_seed), abs=0.01)
        assert r["spread"] == pytest.approx((max(per_seed) - min(per_seed)) / 2, abs=0.01)
    assert len(doc["runs"]) == 2 * 3 + 1
    text = (out / "methods.txt").read_text()
    assert text.startswith("command: ") and "KL + 0.8 * CRD(pre_logits)" in text

    capsys.readouterr()
    methods.main(argv)  # a rerun: nothing trains, the figures are the same
    again = json.loads((out / "methods.json").read_text())
    assert again["rows"] == doc["rows"] and again["runs"] == doc["runs"]  # the same seconds: read back, not rerun
    # --report trains nothing: a run whose result is missing is left out, and the seeds column says so
    (work / "runs" / "crd_2steps_seed1" / "result.json").unlink()
    methods.main(argv + ["--report"])
    rep = json.loads((out / "methods.json").read_text())
    assert [(r["method"], r["seeds"]) for r in rep["rows"]] == [("none", 2), ("none 2x", 1), ("dkd", 2), ("crd", 1)]
    assert not (work / "runs" / "crd_2steps_seed1" / "result.json").exists()
    assert (rep["runs_finished"], rep["runs_planned"]) == (6, 7)
    assert "PARTIAL: 6 of 7 runs finished" in (out / "methods.txt").read_text()
    with pytest.raises(SystemExit):
        methods.main(["--quick", "--rows", "none,bogus", "--workdir", str(work), "--out", str(out)])
    assert "unknown rows ['bogus']" in capsys.readouterr().err
