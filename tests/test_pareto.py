"""benchmarks/pareto.py: the front rule on hand-made rows, and the whole study at toy sizes (train, export five ways,
evaluate, time) with the JSON it promises."""

import json

import pytest
from studies import study


def test_front_is_exactly_the_unbeaten_rows():
    pareto = study("pareto")
    rows = [dict(top1=90.0, p50_ms=2.0), dict(top1=89.0, p50_ms=1.0), dict(top1=88.0, p50_ms=1.5),  # beaten by 2nd
            dict(top1=90.0, p50_ms=3.0),  # beaten by 1st (same top-1, slower)
            dict(top1=91.0, p50_ms=5.0), dict(top1=89.0, p50_ms=1.0)]  # a tie with the 2nd: neither beats the other
    assert pareto.on_front(rows) == [True, True, False, False, True, True]


@pytest.mark.slow
def test_pareto_quick_json(tmp_path):
    pareto = study("pareto")
    out = tmp_path / "out"
    pareto.main(["--quick", "--students", "resnet8", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    doc = json.loads((out / "pareto.json").read_text())
    rows = doc["rows"]
    assert [(r["student"], r["format"], r["quantization"]) for r in rows] == [
        ("resnet8", f, q) for f, q in pareto.ARTIFACTS]
    for r in rows:
        assert set(r) == {"student", "format", "quantization", "top1", "p50_ms", "p90_ms", "size_mb", "on_front"}
        assert 0 <= r["top1"] <= 100 and 0 < r["p50_ms"] <= r["p90_ms"] and r["size_mb"] > 0
    assert [r["on_front"] for r in rows] == pareto.on_front(rows) and any(r["on_front"] for r in rows)
    assert doc["test_images"] == 40 and (out / "pareto.png").stat().st_size > 0
    assert "front" in (out / "pareto.md").read_text()
