"""The bad-input catalogue: mistakes a user makes, across the CLIs, the Python API, files and configs.

Every case must end in ONE clear line before any work: a CLI exits non-zero and prints exactly one line,
`<prog>: error: <what and how to fix it>`, on stderr (no traceback); an API call raises the named exception with a
one-line message. Nothing may be written: the case's output folder is unchanged afterwards.

CLIs are called in-process through their `main(argv)` (the console scripts call the same function), so the whole
catalogue costs one JAX import.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import patient
from patient.cli import bench, distill, export, train
from patient.cli import eval as eval_cli
from patient.models import create

RES = 12
PROGS = {bench: "patient-bench", distill: "patient-distill", eval_cli: "patient-eval", export: "patient-export",
         train: "patient-train"}


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def _rehash(header: dict, payload: bytes) -> bytes:
    """A header edited and re-hashed, as anyone can (the hash is integrity, not authenticity)."""
    header = dict(header)
    header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    header["payload_bytes"] = len(payload)
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    header["header_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()
    return json.dumps(header, sort_keys=True).encode() + b"\n" + payload


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    model, state = create("cifar_resnet20", num_classes=10, key=jax.random.key(0), resolution=RES, depths=(1, 1, 1))
    patient.save(d / "teacher.eqx", model, state, class_names=[str(i) for i in range(10)])
    raw = (d / "teacher.eqx").read_bytes()
    line, payload = raw.split(b"\n", 1)
    header = json.loads(line)
    (d / "garbage.eqx").write_bytes(os.urandom(5000))
    (d / "truncated.eqx").write_bytes(raw[: len(raw) // 2])
    huge = json.loads(json.dumps(header))
    huge["spec"]["kwargs"]["channels"] = [16, 32, 1 << 20]
    (d / "huge.eqx").write_bytes(_rehash(huge, payload))
    unknown = json.loads(json.dumps(header))
    unknown["spec"]["name"] = "resnet_9000"
    (d / "unknown.eqx").write_bytes(_rehash(unknown, payload))
    (d / "fake.onnx").write_bytes(b"not an onnx model at all")
    (d / "onnx_as.eqx").write_bytes(b"\x08\x07\x12\x07pytorch" + os.urandom(200))
    (d / "empty").mkdir()
    _png(d / "one_class" / "cat" / "a.png", 10)
    _png(d / "one_class" / "cat" / "b.png", 200)
    for i, name in enumerate(["apple", "pear", "plum"]):
        _png(d / "other_names" / name / "x.png", 60 * i)
    (d / "not_images" / "a").mkdir(parents=True)
    (d / "not_images" / "a" / "notes.txt").write_text("hello")
    _png(d / "corrupt" / "a" / "ok.png", 5)
    (d / "corrupt" / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    _png(d / "corrupt" / "b" / "ok.png", 90)
    (d / "not_toml.toml").write_text("learning_rate = = 3")
    (d / "file").write_text("a file, not a folder")
    (d / "link.eqx").symlink_to(d / "nowhere.eqx")
    (d / "deadlink").symlink_to(d / "nowhere")
    return d


def _cli(module, argv, out: Path, capsys):
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    try:
        rc = module.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    after = sorted(p.relative_to(out) for p in out.rglob("*"))
    return rc, lines, err, before, after


CLI_CASES = [  # (id, module, argv, expected text in the error line); {in} inputs, {out} the case's output folder
    # patient-eval
    ("eval-missing-file", eval_cli, ["{in}/nope.eqx", "--data", "digits"], "no such file"),
    ("eval-random-bytes", eval_cli, ["{in}/garbage.eqx", "--data", "digits"], "not a patient .eqx file"),
    ("eval-truncated", eval_cli, ["{in}/truncated.eqx", "--data", "digits"], "truncated"),
    ("eval-huge-declared-shape", eval_cli, ["{in}/huge.eqx", "--data", "digits"], "huge.eqx"),
    ("eval-unknown-model-in-header", eval_cli, ["{in}/unknown.eqx", "--data", "digits"], "unknown model"),
    ("eval-onnx-renamed-eqx", eval_cli, ["{in}/onnx_as.eqx", "--data", "digits"], "not a patient .eqx file"),
    ("eval-fake-onnx", eval_cli, ["{in}/fake.onnx", "--data", "digits"], "fake.onnx"),
    ("eval-unknown-data", eval_cli, ["{in}/teacher.eqx", "--data", "imagenet"], "imagenet"),
    ("eval-missing-folder", eval_cli, ["{in}/teacher.eqx", "--data", "image_folder:{in}/nowhere"], "nowhere"),
    ("eval-empty-folder", eval_cli, ["{in}/teacher.eqx", "--data", "image_folder:{in}/empty"], "empty"),
    ("eval-no-images", eval_cli, ["{in}/teacher.eqx", "--data", "image_folder:{in}/not_images"], "not_images"),
    ("eval-other-class-names", eval_cli, ["{in}/teacher.eqx", "--data", "image_folder:{in}/other_names"], "class"),
    ("eval-batch-zero", eval_cli, ["{in}/teacher.eqx", "--data", "digits", "--batch", "0"], "--batch"),
    ("eval-limit-negative", eval_cli, ["{in}/teacher.eqx", "--data", "digits", "--limit", "-5"], "--limit"),
    ("eval-bad-split", eval_cli, ["{in}/teacher.eqx", "--data", "digits", "--split", "validation"], "validation"),
    ("eval-resolution-zero", eval_cli, ["{in}/teacher.eqx", "--data", "digits", "--resolution", "0"], "resolution"),
    ("eval-json-missing-dir", eval_cli, ["{in}/teacher.eqx", "--data", "digits", "--json", "{out}/no/r.json"],
     "does not exist"),
    ("eval-model-is-a-folder", eval_cli, ["{in}/empty", "--data", "digits"], "is a folder"),
    ("eval-threads-huge", eval_cli, ["{in}/teacher.eqx", "--data", "digits", "--threads", "100000"], "--threads"),
    ("eval-json-unwritable", eval_cli, ["{in}/teacher.eqx", "--data", "digits", "--json", "/proc/r.json"],
     "cannot create files"),
    # patient-train
    ("train-out-missing-dir", train, ["--model", "cifar_resnet20", "--out", "{out}/no/m.eqx"], "does not exist"),
    ("train-out-is-dir", train, ["--model", "cifar_resnet20", "--out", "{out}"], "is a directory"),
    ("train-out-parent-is-file", train, ["--model", "cifar_resnet20", "--out", "{in}/file/m.eqx"], "not a directory"),
    ("train-unknown-model", train, ["--model", "resnet_9000", "--out", "{out}/m.eqx"], "resnet_9000"),
    ("train-unknown-key", train, ["--model", "cifar_resnet20", "--set", "learnig_rate=0.1", "--out", "{out}/m.eqx"],
     "learnig_rate"),
    ("train-nan-lr", train, ["--model", "cifar_resnet20", "--set", "learning_rate=nan", "--out", "{out}/m.eqx"],
     "learning_rate"),
    ("train-inf-epochs", train, ["--model", "cifar_resnet20", "--set", "epochs=inf", "--out", "{out}/m.eqx"], "epochs"),
    ("train-negative-clip", train, ["--model", "cifar_resnet20", "--set", "grad_clip=-1", "--out", "{out}/m.eqx"],
     "grad_clip"),
    ("train-nan-clip", train, ["--model", "cifar_resnet20", "--set", "grad_clip=nan", "--out", "{out}/m.eqx"],
     "grad_clip"),
    ("train-negative-decay", train, ["--model", "cifar_resnet20", "--set", "weight_decay=-0.1", "--out",
                                     "{out}/m.eqx"], "weight_decay"),
    ("train-steps-not-int", train, ["--model", "cifar_resnet20", "--set", "steps=abc", "--out", "{out}/m.eqx"],
     "steps"),
    ("train-batch-zero", train, ["--model", "cifar_resnet20", "--set", "batch_size=0", "--out", "{out}/m.eqx"],
     "batch_size"),
    ("train-huge-resolution", train, ["--model", "cifar_resnet20", "--resolution", "1000000", "--out", "{out}/m.eqx"],
     "resolution"),
    ("train-set-without-equals", train, ["--model", "cifar_resnet20", "--set", "steps", "--out", "{out}/m.eqx"],
     "KEY=VALUE"),
    ("train-config-not-toml", train, ["--model", "cifar_resnet20", "--config", "{in}/not_toml.toml", "--out",
                                      "{out}/m.eqx"], "not_toml.toml"),
    ("train-config-missing", train, ["--model", "cifar_resnet20", "--config", "{in}/none.toml", "--out",
                                     "{out}/m.eqx"], "none.toml"),
    ("train-one-class-folder", train, ["--model", "cifar_resnet20", "--data", "image_folder:{in}/one_class",
                                       "--set", "steps=2", "--out", "{out}/m.eqx"], "class"),
    ("train-corrupt-image", train, ["--model", "cifar_resnet20", "--data", "image_folder:{in}/corrupt", "--resolution",
                                    "12", "--set", "steps=2", "--set", "batch_size=2", "--out", "{out}/m.eqx"],
     "bad.png"),
    ("train-workdir-is-file", train, ["--model", "cifar_resnet20", "--workdir", "{in}/file", "--set", "steps=2",
                                      "--out", "{out}/m.eqx"], "file"),
    ("train-out-is-a-link", train, ["--model", "cifar_resnet20", "--out", "{in}/link.eqx"], "symbolic link"),
    ("train-out-unwritable", train, ["--model", "cifar_resnet20", "--out", "/proc/m.eqx"], "cannot create files"),
    ("train-config-is-a-folder", train, ["--model", "cifar_resnet20", "--config", "{in}/empty", "--out",
                                         "{out}/m.eqx"], "is a folder"),
    ("train-config-is-binary", train, ["--model", "cifar_resnet20", "--config", "{in}/teacher.eqx", "--out",
                                       "{out}/m.eqx"], "not a text file"),
    ("train-workdir-dead-link", train, ["--model", "cifar_resnet20", "--workdir", "{in}/deadlink", "--set",
                                        "steps=2", "--out", "{out}/m.eqx"], "symbolic link to nothing"),
    # patient-distill
    ("distill-teacher-of-other-classes", distill, ["--teacher", "{in}/teacher.eqx", "--student", "cifar_resnet20",
                                                   "--data", "image_folder:{in}/other_names", "--out", "{out}/s.eqx"],
     "predicts classes"),
    ("distill-missing-teacher", distill, ["--teacher", "{in}/nope.eqx", "--student", "cifar_resnet20", "--out",
                                          "{out}/s.eqx"], "nope.eqx"),
    ("distill-no-student", distill, ["--teacher", "{in}/teacher.eqx", "--out", "{out}/s.eqx"], "--student"),
    ("distill-bad-mode", distill, ["--teacher", "{in}/teacher.eqx", "--student", "cifar_resnet20", "--set",
                                   "mode=fixed", "--out", "{out}/s.eqx"], "mode"),
    ("distill-bad-method", distill, ["--teacher", "{in}/teacher.eqx", "--student", "cifar_resnet20", "--set",
                                     "method=magic", "--out", "{out}/s.eqx"], "method"),
    ("distill-teacher-garbage", distill, ["--teacher", "{in}/garbage.eqx", "--student", "cifar_resnet20", "--out",
                                          "{out}/s.eqx"], "garbage.eqx"),
    ("distill-negative-temperature", distill, ["--teacher", "{in}/teacher.eqx", "--student", "cifar_resnet20",
                                               "--set", "temperature=-1", "--out", "{out}/s.eqx"], "temperature"),
    # patient-export
    ("export-unknown-format", export, ["{in}/teacher.eqx", "--to", "coreml", "-o", "{out}/m.x"], "coreml"),
    ("export-missing-file", export, ["{in}/nope.eqx", "--to", "onnx", "-o", "{out}/m.onnx"], "no such file"),
    ("export-garbage", export, ["{in}/garbage.eqx", "--to", "onnx", "-o", "{out}/m.onnx"], "not a patient .eqx file"),
    ("export-out-missing-dir", export, ["{in}/teacher.eqx", "--to", "onnx", "-o", "{out}/no/m.onnx"],
     "does not exist"),
    ("export-nan-tolerance", export, ["{in}/teacher.eqx", "--to", "onnx", "-o", "{out}/m.onnx", "--tolerance", "nan"],
     "tolerance"),
    ("export-bad-quantize", export, ["{in}/teacher.eqx", "--to", "onnx", "-o", "{out}/m.onnx", "--quantize", "int4"],
     "int4"),
    ("export-fp16-onnx", export, ["{in}/teacher.eqx", "--to", "onnx", "-o", "{out}/m.onnx", "--quantize", "fp16"],
     "fp16"),
    ("export-bad-opset", export, ["{in}/teacher.eqx", "--to", "onnx", "-o", "{out}/m.onnx", "--opset", "7"], "opset"),
    ("export-batch-zero", export, ["{in}/teacher.eqx", "--to", "onnx", "-o", "{out}/m.onnx", "--batch", "0"],
     "batch"),
    ("export-onto-itself", export, ["{in}/teacher.eqx", "--to", "onnx", "-o", "{in}/teacher.eqx"],
     "is the model being exported"),
    ("export-batch-huge", export, ["{in}/teacher.eqx", "--to", "onnx", "-o", "{out}/m.onnx", "--batch", "100000000"],
     "between 1 and 4096"),
    # patient-bench
    ("bench-runs-huge", bench, ["{in}/teacher.eqx", "--runs", "100000000000"], "--runs"),
    ("bench-missing-file", bench, ["{in}/nope.onnx"], "nope.onnx"),
    ("bench-fake-onnx", bench, ["{in}/fake.onnx", "--runs", "2", "--warmup", "0"], "fake.onnx"),
    ("bench-threads-zero", bench, ["{in}/teacher.eqx", "--threads", "0"], "threads"),
    ("bench-threads-huge", bench, ["{in}/teacher.eqx", "--threads", "100000"], "threads"),
    ("bench-runs-zero", bench, ["{in}/teacher.eqx", "--runs", "0"], "runs"),
    ("bench-plot-missing-dir", bench, ["{in}/teacher.eqx", "--plot", "{out}/no/p.png"], "does not exist"),
]


@pytest.mark.parametrize("module, argv, expect", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_mistake_is_one_line_and_writes_nothing(module, argv, expect, inputs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)  # default outputs (model.eqx, student.eqx) would land here
    argv = [a.format(**{"in": inputs, "out": out}) for a in argv]
    rc, lines, err, before, after = _cli(module, argv, out, capsys)
    assert rc not in (0, None), f"exit status {rc}; stderr: {err[-500:]}"
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"{PROGS[module]}: error: "), lines[0]
    assert expect.lower() in lines[0].lower(), lines[0]
    assert after == before, f"written: {set(after) - set(before)}"


def _teacher(inputs):
    return patient.load(inputs / "teacher.eqx")[:2]


def _student():
    return create("cifar_resnet20", num_classes=10, key=jax.random.key(1), resolution=RES, depths=(1, 1, 1))


def _labels_out_of_range():
    from patient.data import arrays

    images = np.zeros((8, 8, 8), np.uint8)
    return arrays(images, np.arange(8) + 5, name="labels5to12")


API_CASES = [  # (id, call(inputs, out), exception, text)
    ("api-teacher-is-a-string", lambda i, o: patient.distill("a teacher", _student(), _digits(), steps=1,
                                                            progress=False), (TypeError, ValueError), "teacher"),
    ("api-data-is-a-name", lambda i, o: patient.distill(_teacher(i), _student(), "digits", steps=1,
                                                        progress=False), TypeError, "is a name, not a source"),
    ("api-batch-zero", lambda i, o: patient.distill(_teacher(i), _student(), "digits", steps=1, batch_size=0,
                                                    progress=False), ValueError, "batch_size"),
    ("api-unknown-config-key", lambda i, o: patient.distill(_teacher(i), _student(), "digits", steps=1,
                                                            learnig_rate=0.1, progress=False),
     (TypeError, ValueError), "learnig_rate"),
    ("api-labels-out-of-range", lambda i, o: patient.train(_student(), _labels_out_of_range(), steps=1,
                                                           batch_size=4, progress=False), ValueError, "label"),
    ("api-evaluate-labels-out-of-range", lambda i, o: patient.evaluate(_student(), _labels_out_of_range()),
     ValueError, "label"),
    ("api-load-garbage", lambda i, o: patient.load(i / "garbage.eqx"), patient.io.PatientFileError, "garbage.eqx"),
    ("api-load-huge", lambda i, o: patient.load(i / "huge.eqx"), patient.io.PatientFileError, "huge.eqx"),
    ("api-save-nan", lambda i, o: patient.save(o / "m.eqx", *_nan_model()), ValueError, "NaN"),
    ("api-save-wrong-class-names", lambda i, o: patient.save(o / "m.eqx", *_student(), class_names=["a", "b"]),
     ValueError, "class_names"),
    ("api-create-unknown", lambda i, o: create("resnet_9000", num_classes=10, key=None), ValueError, "resnet_9000"),
    ("api-create-zero-classes", lambda i, o: create("cifar_resnet20", num_classes=0, key=None), ValueError, "num_classes"),
    ("api-workdir-symlinked-history", lambda i, o: patient.train(_student(), _digits(), steps=1, batch_size=8,
                                                                 progress=False, workdir=_linked_workdir(o)),
     ValueError, "symbolic link"),
    ("api-evaluate-batch-zero", lambda i, o: patient.evaluate(_student(), _digits(), batch_size=0), ValueError,
     "batch_size"),
    ("api-workdir-is-a-file", lambda i, o: patient.train(_student(), _digits(), steps=1, progress=False,
                                                         workdir=i / "file"), ValueError, "is a file"),
    ("api-pipeline-negative-workers", lambda i, o: _pipeline(num_workers=-1), ValueError, "num_workers"),
    ("api-pipeline-bad-crop", lambda i, o: _pipeline(crop_area=(0.0, 1.0)), ValueError, "crop_area"),
]


def _nan_model():
    model, state = _student()
    return jax.tree_util.tree_map(lambda x: x * np.nan if hasattr(x, "dtype") and x.dtype == np.float32 else x,
                                  model), state


def _linked_workdir(out: Path) -> Path:
    target = out / "elsewhere.txt"
    target.write_text("")
    work = out / "work"
    work.mkdir()
    (work / "history.jsonl").symlink_to(target)
    return work


def _digits():
    from patient.data import digits

    return digits("train")


def _pipeline(**kw):
    from patient.data import digits, pipeline

    args = dict(mode="fix/rs", student_res=8, batch_size=4, seed=0)
    return pipeline(digits("test"), **{**args, **kw})


@pytest.mark.parametrize("call, exc, expect", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_mistake_raises_one_line_and_writes_nothing(call, exc, expect, inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    before = None
    with pytest.raises(exc) as info:
        # cases that prepare files in `out` do so inside the call; compare against what they prepared
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        call(inputs, out)
    message = str(info.value)
    assert "\n" not in message.strip(), message
    assert expect.lower() in message.lower(), message
    after = sorted(p.relative_to(out) for p in out.rglob("*"))
    prepared = {Path("elsewhere.txt"), Path("work"), Path("work/history.jsonl")}
    assert set(after) - set(before) <= prepared, f"written: {set(after) - set(before)}"
    if (out / "elsewhere.txt").exists():
        assert (out / "elsewhere.txt").read_text() == "", "the run wrote through a symbolic link"


@pytest.mark.parametrize("raised, code, expect", [
    (MemoryError("Unable to allocate 286. GiB"), 2, "out of memory"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_interrupts_and_memory_end_in_one_line(raised, code, expect, inputs, capsys, monkeypatch):
    """Ctrl-C during a command and an allocation that cannot succeed print one line, not a traceback."""
    def boom(args):
        raise raised

    monkeypatch.setattr(eval_cli, "_eval", boom)
    rc = eval_cli.main([str(inputs / "teacher.eqx"), "--data", "digits"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == code and len(lines) == 1 and lines[0].startswith("patient-eval: ") and expect in lines[0], lines


def test_ctrl_c_during_a_checkpoint_lands_after_it():
    """Regression: Ctrl-C inside an Orbax save printed the library's traceback and left a half-written checkpoint;
    the signal is now held until the save is complete, then delivered."""
    import signal

    from patient._files import deferred_interrupts

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the save finished")
    assert done == ["the save finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, before)
