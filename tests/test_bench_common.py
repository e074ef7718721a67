"""The speed benchmarks' shared helpers (benchmarks/common.py): alternated child runs and their medians."""

import json
import sys

from studies import study


def test_children_alternate_and_every_number_is_the_median_over_rounds(tmp_path):
    common = study("common")
    log = tmp_path / "order.txt"
    script = tmp_path / "child.py"
    # Each run appends its name to the log and reports a number that grows with the run count.
    script.write_text(
        "import json, sys, pathlib\n"
        f"log = pathlib.Path({str(log)!r})\n"
        "name = sys.argv[1]\n"
        "with log.open('a') as f: f.write(name + '\\n')\n"
        "n = log.read_text().split().count(name)\n"
        "print('noise')\n"
        "print(json.dumps({'m': {'images_per_s': {'a': 10.0, 'b': 100.0}[name] * n, 'label': name}}))\n")
    children = {n: ([sys.executable, str(script), n], None) for n in ("a", "b")}
    out = common.run_children(children, rounds=3)
    assert log.read_text().split() == ["a", "b", "b", "a", "a", "b"]  # the order rotates every round
    assert out == {"a": {"m": {"images_per_s": 20.0, "label": "a"}}, "b": {"m": {"images_per_s": 200.0, "label": "b"}}}
    assert common._median_tree([{"x": 1, "y": [0]}, {"x": 5, "y": [1]}]) == {"x": 3.0, "y": [0]}


def test_a_child_that_fails_in_any_round_is_reported_with_its_last_error_line(tmp_path):
    common = study("common")
    flag = tmp_path / "ran"
    script = tmp_path / "child.py"
    script.write_text(
        "import json, pathlib, sys\n"
        f"flag = pathlib.Path({str(flag)!r})\n"
        "if flag.exists(): sys.exit('second run broke')\n"
        "flag.write_text('1')\n"
        f"print({json.dumps(json.dumps({'v': 1.0}))})\n")
    out = common.run_children({"c": ([sys.executable, str(script)], None)}, rounds=2)
    assert out == {"c": {"error": "second run broke"}}
