"""`patient-eval`: top-1 / top-5 accuracy of a .eqx, .onnx or .tflite model on a labelled data set.

    patient-eval student.eqx    --data digits                       # the test split
    patient-eval student.onnx   --data fashion_mnist --limit 2000
    patient-eval student.tflite --data image_folder:photos/         # works without JAX / TensorFlow

Every format is fed the same pixels (`patient.runtime.data.render_plain`: the whole image, antialiased bilinear resize to
the model's resolution, [0, 1], NCHW). Prints one summary line, then one JSON line.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .common import Parser, check_output, emit_json, fail, run

if TYPE_CHECKING:
    from patient.data.sources import ArraySource, ImageFolderSource, SubsetSource
    from patient.runtime.models import Runner

PROG = "patient-eval"


def parser() -> Parser:
    p = Parser(prog=PROG, description="Top-1/top-5 accuracy of a .eqx, .onnx or .tflite model.")
    p.add_argument("model", help=".eqx / .onnx / .tflite file")
    p.add_argument("--data", required=True, help="digits | fashion_mnist | image_folder:PATH")
    p.add_argument("--split", default="test", help="split of digits / fashion_mnist (default test)")
    p.add_argument("--resolution", type=int, help="input side (default: the model's; exported files are fixed)")
    p.add_argument("--batch", type=int, default=64, help="images per step for .eqx / dynamic-batch files (default 64)")
    p.add_argument("--limit", type=int, help="evaluate the first N examples only")
    p.add_argument("--threads", type=int, help="intra-op threads for onnxruntime / LiteRT")
    p.add_argument("--json", help="also write the JSON result here")
    p.add_argument("--relabel", action="store_true",
                   help="the data's class names differ from the model's, yet its label i is the model's class i")
    return p


def evaluate(runner: Runner, source: ArraySource | ImageFolderSource | SubsetSource, *, batch: int = 64,
             limit: int | None = None, classes: np.ndarray | None = None) -> dict:
    """Top-1 / top-5 of `runner` (a `patient.runtime.models.Runner`) over `source`; `classes[i]` is the model's class
    of the data's label i (`class_map`; None: the same)."""
    from patient.runtime.data import DataError, batches

    k = runner.num_classes
    correct1 = correct5 = n = 0
    for images, labels in batches(source, runner.resolution, batch, limit):
        if k is not None and labels.max(initial=-1) >= k:
            raise DataError(f"{source.name} has label {int(labels.max())} but the model has {k} classes")
        keep = labels >= 0  # unlabelled examples (-1) do not count
        if classes is not None:
            labels = np.where(keep, classes[np.maximum(labels, 0)], labels)
        logits = runner.predict(images, batch_size=batch)[keep]
        labels = labels[keep]
        top = np.argsort(-logits, axis=1)[:, :5]
        correct1 += int(np.sum(top[:, 0] == labels))
        correct5 += int(np.sum(np.any(top == labels[:, None], axis=1)))
        n += int(len(labels))
    if n == 0:
        raise DataError(f"{source.name}: no labelled examples to evaluate")
    return {"examples": n, "top1": correct1 / n, "top5": correct5 / n}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.batch < 1 or (args.limit is not None and args.limit < 1):
        return fail(PROG, "--batch and --limit must be at least 1")
    if args.resolution is not None and args.resolution < 1:
        return fail(PROG, f"--resolution must be a positive integer, got {args.resolution}")
    if args.threads is not None and not 1 <= args.threads <= 256:
        return fail(PROG, f"--threads {args.threads} must be between 1 and 256 (this machine has {os.cpu_count()} cores)")
    return run(PROG, lambda: _eval(args))


def class_map(model_names: Sequence[str] | None, source: object, relabel: bool) -> np.ndarray | None:
    """The model's class index of each of the data's labels, by class name: None when the names agree (or either side
    has none, or `relabel` says label i is class i); an index array when the data holds some of the model's classes (a
    folder of a few classes). Data with a class the model does not know is refused: its labels would mean other
    classes and the top-1 would be a plausible-looking number of nothing."""
    from patient.runtime.data import DataError

    data_names = [str(n) for n in (getattr(source, "class_names", None) or [])]
    model_names = [str(n) for n in (model_names or [])]
    if relabel or not model_names or not data_names or data_names == model_names:
        return None
    unknown = [n for n in data_names if n not in model_names]
    if unknown:
        raise DataError(f"{source.name} has classes {_few(unknown)} that the model does not know (it was trained on "
                        f"{_few(model_names)}); evaluate on data with the model's classes, or pass --relabel if the "
                        "data's label i really is the model's class i")
    return np.asarray([model_names.index(n) for n in data_names])


def _few(names: Sequence[str]) -> str:
    names = [str(n) for n in names]
    return "[" + ", ".join(names[:4]) + (f", ... {len(names)} in all]" if len(names) > 4 else "]")


def _eval(args) -> int:
    if args.json:
        check_output(args.json, "--json")
    from patient.runtime import open_model, open_source

    t0 = time.perf_counter()
    runner = open_model(args.model, threads=args.threads, resolution=args.resolution, batch=None)
    source = open_source(args.data, args.split)
    classes = class_map(runner.class_names, source, args.relabel)
    if runner.format == "eqx" and args.resolution is not None:
        _check_eqx_resolution(runner, args.resolution)
    result = evaluate(runner, source, batch=args.batch, limit=args.limit, classes=classes)
    result = {"model": args.model, "format": runner.format, "quantization": runner.meta.get("quantization", "none"),
              "data": args.data, "split": args.split if not args.data.startswith("image_folder:") else None,
              "resolution": runner.resolution, **result, "seconds": round(time.perf_counter() - t0, 1)}
    trained = (runner.meta.get("preprocessing") or {}).get("resolution")
    if isinstance(trained, int) and trained != runner.resolution:  # a deliberate --resolution: say what it departs from
        result["trained_resolution"] = trained
    note = f" (trained at {trained} px)" if "trained_resolution" in result else ""
    print(f"{args.model} ({runner.format}, {result['quantization']}) on {source.name}: {result['examples']} images at "
          f"{runner.resolution} px{note}, top-1 {100 * result['top1']:.2f}%, top-5 {100 * result['top5']:.2f}%")
    emit_json(result, args.json)
    return 0


def _check_eqx_resolution(runner, resolution: int) -> None:
    from patient.export.verify import ExportError, check_resolution
    from patient.models.fold import fold
    from patient.runtime.models import ModelError

    try:
        check_resolution(fold(runner.model, runner.state), resolution)
    except ExportError as e:
        raise ModelError(str(e)) from None



if __name__ == "__main__":
    sys.exit(main())
