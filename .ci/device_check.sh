#!/usr/bin/env bash
# The device path from the built wheel: a fresh virtual environment with only numpy, Pillow, onnxruntime and
# ai-edge-litert (no JAX, no TensorFlow) runs patient-bench and patient-eval on an .onnx and a .tflite file that the
# full install exported. Usage: bash .ci/device_check.sh [WORKDIR]   (needs the full install and PyPI access)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d)}"
mkdir -p "$work"

rm -rf dist
python -m build --outdir dist . >"$work/build.log" 2>&1 || { tail -20 "$work/build.log"; exit 1; }
wheel=$(ls dist/patient_kd-*-py3-none-any.whl)
ls dist/patient_kd-*.tar.gz >/dev/null
echo "built $(ls dist | tr '\n' ' ')"

# A small model, exported with the full install (random weights: this checks the path, not accuracy).
python - "$work" <<'PY'
import sys, pathlib, jax
import patient
from patient.export import to_onnx, to_tflite
from patient.models import create
work = pathlib.Path(sys.argv[1])
model, state = create("mobilenetv3_small_050", num_classes=10, key=jax.random.key(0), resolution=32)
eqx = patient.save(work / "m.eqx", model, state, class_names=[str(i) for i in range(10)])
to_onnx(eqx, work / "m.onnx", verify_size=8)
to_tflite(eqx, work / "m.tflite", verify_size=8)
PY
python - "$work/images" <<'PY'
import sys, pathlib
from PIL import Image
from patient.data import digits
root = pathlib.Path(sys.argv[1])
src = digits("test")
for i in range(20):
    item = src[i]
    (root / str(item["label"])).mkdir(parents=True, exist_ok=True)
    Image.fromarray(item["image"][:, :, 0]).save(root / str(item["label"]) / f"{i:03d}.png")
PY

python -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet numpy pillow onnxruntime ai-edge-litert
"$work/venv/bin/pip" install --quiet --no-deps "$wheel"  # last: pip then has no other install to check it against
cd "$work"  # away from the checkout, so `import patient` can only find the wheel
venv/bin/python - <<'PY'
import importlib.util, sys
missing = [m for m in ("jax", "jaxlib", "tensorflow", "equinox") if importlib.util.find_spec(m) is not None]
assert not missing, f"the device environment must not have {missing}"
import patient
assert "/venv/" in patient.__file__, patient.__file__
print("device env: patient from", patient.__file__)
PY
venv/bin/patient-bench m.onnx m.tflite --runs 20 --warmup 2 --json bench.json
venv/bin/patient-eval m.onnx --data image_folder:images --json eval_onnx.json
venv/bin/patient-eval m.tflite --data image_folder:images --json eval_tflite.json
venv/bin/python - <<'PY'
import json
rows = json.load(open("bench.json"))["results"]
assert [r["format"] for r in rows] == ["onnx", "tflite"], rows
evals = [json.load(open(f)) for f in ("eval_onnx.json", "eval_tflite.json")]
assert all(e["examples"] == 20 for e in evals), evals
assert all(r["p50_ms"] > 0 for r in rows), rows
print("device path OK:", [(r["format"], round(r["p50_ms"], 3)) for r in rows], [e["top1"] for e in evals])
PY
