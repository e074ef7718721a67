"""`patient-export`: a patient .eqx model -> verified .onnx or .tflite.

    patient-export --to onnx student.eqx                                  # student.onnx, fp32, batch 1
    patient-export --to onnx student.eqx --quantize int8 --calibration digits
    patient-export --to tflite student.eqx --quantize fp16 -o student_fp16.tflite
    patient-export --to tflite student.eqx --quantize int8 --calibration image_folder:calib/

Every export is checked against the JAX model on real images (`--verify-data`, default digits); above tolerance the
command fails and writes nothing. Bad input gives one line on stderr, exit code 2; failed verification exit code 1.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence

from .common import Parser, check_output, emit_json, fail, run

PROG = "patient-export"


def parser() -> Parser:
    p = Parser(prog=PROG, description="Export a patient .eqx model to ONNX or TFLite, verified against JAX.")
    p.add_argument("model", help="the .eqx file (patient.save)")
    p.add_argument("--to", required=True, help="onnx | tflite")
    p.add_argument("-o", "--output", help="destination (default: next to the model, .onnx / .tflite)")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--batch", type=int, default=1, help="fixed batch size (default 1)")
    b.add_argument("--dynamic-batch", action="store_true", help="symbolic batch dimension")
    p.add_argument("--resolution", type=int, help="input side in pixels (default: the model's)")
    p.add_argument("--quantize", default="none", help="none | fp16 (tflite) | int8")
    p.add_argument("--calibration", help="int8 calibration images: digits | fashion_mnist | image_folder:PATH")
    p.add_argument("--calibration-size", type=int, default=128, help="calibration images (default 128)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 18..23 (default 18)")
    p.add_argument("--verify-data", default="digits", help="digits | fashion_mnist | image_folder:PATH")
    p.add_argument("--verify-size", type=int, default=32, help="verification images (default 32)")
    p.add_argument("--tolerance", type=float, help="max abs logit difference (default: see patient.export.verify)")
    p.add_argument("--min-agreement", type=float, help="minimum top-1 agreement with JAX (default 0.9 for int8)")
    p.add_argument("--keep-int8", action="store_true", help="keep int8 even where it is slower than fp32 on this CPU")
    p.add_argument("--ort-nchwc", action="store_true",
                   help="ONNX graph tuned for onnxruntime on x86 (squeeze-excite as Mul over Resize; slower elsewhere)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.to not in ("onnx", "tflite"):
        return fail(PROG, f"unknown --to {args.to!r}; use onnx or tflite")
    if args.tolerance is not None and not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        return fail(PROG, f"--tolerance {args.tolerance} must be a finite number >= 0 (a max abs logit difference)")
    if args.min_agreement is not None and not (0.0 <= args.min_agreement <= 1.0):
        return fail(PROG, f"--min-agreement {args.min_agreement} must be between 0 and 1 (a fraction of images)")
    if args.quantize not in ("none", "fp16", "int8"):
        return fail(PROG, f"unknown --quantize {args.quantize!r}; use none, fp16 (tflite) or int8")
    if args.quantize == "fp16" and args.to == "onnx":
        return fail(PROG, "--quantize fp16 is a TFLite option; ONNX exports fp32 or int8")
    if args.quantize == "int8" and not args.calibration:
        return fail(PROG, "--quantize int8 needs calibration images: add --calibration digits, fashion_mnist or "
                          "image_folder:PATH")
    if args.ort_nchwc and args.to != "onnx":
        return fail(PROG, "--ort-nchwc shapes ONNX graphs; it does not apply to --to tflite")
    if not 1 <= args.batch <= 4096:
        return fail(PROG, f"--batch must be between 1 and 4096, got {args.batch}")
    return run(PROG, lambda: _export(args))


def _export(args) -> int:
    if args.output:
        if os.path.exists(args.output) and os.path.samefile(args.output, args.model):
            raise ValueError(f"--output {args.output} is the model being exported; writing there would replace it, "
                             "so give another path (default: next to the model with the format's suffix)")
        check_output(args.output, "--output")
    kwargs = dict(batch=args.batch, dynamic_batch=args.dynamic_batch, resolution=args.resolution,
                  quantize=args.quantize, calibration=args.calibration, calibration_size=args.calibration_size,
                  verify_data=args.verify_data, verify_size=args.verify_size, tolerance=args.tolerance,
                  min_agreement=args.min_agreement)
    t0 = time.perf_counter()
    if args.to == "onnx":
        from patient.export.onnx import to_onnx

        report = to_onnx(args.model, args.output, opset=args.opset, keep_int8=args.keep_int8,
                         ort_nchwc=args.ort_nchwc, log=print, **kwargs)
    else:
        from patient.export.tflite import to_tflite

        report = to_tflite(args.model, args.output, keep_int8=args.keep_int8, log=print, **kwargs)
    v = report["verification"]
    print(f"wrote {report['path']} ({report['bytes'] / 1e6:.2f} MB, {report['model']}, {report['resolution']} px, "
          f"batch {report['batch']}, quantization: {report['quantization']})")
    if "int8_decision" in report:
        print(f"int8: {report['int8_decision']}")
    print(f"verified on {v['images']} {v['data']} images against JAX: max abs logit diff {v['max_abs_diff']:.2e}, "
          f"top-1 agreement {v['top1_agreement']:.1%}")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    emit_json(report)
    return 0



if __name__ == "__main__":
    sys.exit(main())
