"""int8 exports of a trained student keep its accuracy: top-1 on the whole digits test split within 1 point of the
float32 model, in onnxruntime and in LiteRT (the edge student of the README, MobileNetV3-Small 0.5 at 16 px).

Measured when written (2026-11-30): fp32 88.17%, ONNX int8 87.61%, TFLite int8 87.32% (355 images, so one image is
0.28 points). With the int8 ONNX graph of `FoldedNet.fold_sixths` and its float-stem variant (kept), on a Xeon with
AVX-512 VNNI: fp32 87.04%, ONNX int8 87.32%, TFLite int8 87.89%."""

import jax
import pytest

import patient
from patient.cli.eval import evaluate
from patient.data import digits
from patient.export import to_onnx, to_tflite
from patient.models import create
from patient.runtime.data import open_source
from patient.runtime.models import open_model


@pytest.mark.slow  # trains a student (about a minute) and exports it twice as int8
def test_int8_exports_of_a_trained_student_keep_top1_within_one_point(tmp_path):
    model = create("mobilenetv3_small_050", num_classes=10, key=jax.random.key(0), resolution=16)
    r = patient.train(model, digits("train"), steps=600, batch_size=64, learning_rate=5e-3, progress=False,
                      mode="same/ic", crop_area_min=0.5)
    path = tmp_path / "student.eqx"
    patient.save(path, r.student, r.state)
    test = open_source("digits", split="test")
    fp32 = evaluate(open_model(path), test)
    assert fp32["examples"] == 355 and fp32["top1"] > 0.8  # a trained student, not a near-random one
    for fmt, export in (("onnx", to_onnx), ("tflite", to_tflite)):
        rep = export(path, tmp_path / f"student.int8.{fmt}", quantize="int8", calibration="digits", keep_int8=True)
        assert rep["quantization"].startswith("int8"), rep["quantization"]
        got = evaluate(open_model(rep["path"], threads=1), test)
        assert abs(got["top1"] - fp32["top1"]) <= 0.01, (fmt, got["top1"], fp32["top1"])
