"""Export: folding, ONNX and TFLite parity with JAX on real images for every family, graph contents, metadata,
quantisation, and the bad-input behaviour of `patient-export`.

Models are small (reduced depths, 32-64 px), randomly initialised, with every parameter perturbed and random BatchNorm
running statistics, so BatchNorm folding, weight standardisation and the input normalisation are all exercised; the
classifier is rescaled so logits reach about 5, which makes the 1e-4 tolerance a real test. One export per family and
format is shared by all tests of the module.
"""

import json
import pathlib

import equinox as eqx
import jax
import numpy as np
import onnx
import pytest
from lanes import fast_only

import patient
from patient.export import fold, to_onnx, to_tflite
from patient.io import read_header
from patient.models import apply, create
from patient.models.fold import Act, Attention, LayerNorm, Residual, SqueezeExcite
from patient.runtime.data import open_source, sample
from patient.runtime.models import open_model

FAMILIES = {  # name: (overrides, resolution)
    "bit_r26x1": ({"depths": (1, 1, 1, 1)}, 64),
    "resnet18": ({"depths": (1, 1, 1, 1)}, 64),
    "cifar_resnet20": ({}, 32),
    "mobilenetv3_small_050": ({}, 64),
    "mobilenetv3_large_075": ({}, 64),
    "regnety_002": ({"depths": (1, 1, 1, 1)}, 64),  # grouped convolutions, squeeze-excite with a sigmoid gate
    # attention, LayerNorm, exact GELU, class and distillation tokens, two heads averaged
    "deit_tiny_distilled_patch16_224": ({"depth": 2, "patch_size": 8}, 64),
}
TOL = 1e-4


def _head(model):
    def transformer_head(m):
        assert hasattr(m.head, "weight")
        return m.head

    for path in (lambda m: m.fc, lambda m: m.classifier, lambda m: m.head.fc, transformer_head):
        try:
            path(model)
            return path
        except (AttributeError, AssertionError):
            continue
    raise AssertionError("no classifier found")


_jit_apply = eqx.filter_jit(lambda m, s, x: apply(m, s, x)[0])
_MODELS = {}


def perturbed_model(name, seed=0):
    """A registry model with every float parameter perturbed, random BN statistics and logits of magnitude ~5."""
    if (name, seed) not in _MODELS:
        _MODELS[name, seed] = _perturbed_model(name, seed)
    return _MODELS[name, seed]


def _perturbed_model(name, seed):
    overrides, res = FAMILIES[name]
    model, state = create(name, num_classes=10, key=jax.random.key(seed), resolution=res, **overrides)
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree_util.tree_flatten(model)
    new = []
    for leaf in leaves:
        a = np.asarray(leaf)
        scale = 0.2 * a.std() if a.size > 1 and a.std() > 0 else 0.1  # zero-initialised leaves (BiT) get noise too
        new.append(jax.numpy.asarray((a + scale * rng.standard_normal(a.shape)).astype(np.float32)))
    model = jax.tree_util.tree_unflatten(tree, new)
    state = {k: {"mean": jax.numpy.asarray(rng.normal(0, 0.5, v["mean"].shape).astype(np.float32)),
                 "var": jax.numpy.asarray(rng.uniform(0.3, 3.0, v["var"].shape).astype(np.float32))}
             for k, v in state.items()}
    x = digits_images(res, 8)
    logits = np.asarray(_jit_apply(model, state, x))
    head = _head(model)
    factor = 5.0 / np.abs(logits - logits.mean()).max()
    fc = head(model)
    model = eqx.tree_at(lambda m: (head(m).weight, head(m).bias), model, (fc.weight * factor, fc.bias * factor))
    return model, state


_IMAGES = {}


def digits_images(res, n=16):
    if (res, n) not in _IMAGES:
        _IMAGES[res, n] = sample(open_source("digits"), n, res)
    return _IMAGES[res, n]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> {"eqx", "onnx", "tflite", "onnx_report", "tflite_report", "model", "state", "res"} for every family."""
    tmp = tmp_path_factory.mktemp("export")
    out = {}
    for name, (_, res) in FAMILIES.items():
        model, state = perturbed_model(name)
        path = patient.save(tmp / f"{name}.eqx", model, state, class_names=[f"c{i}" for i in range(10)])
        rep_onnx = to_onnx(path, batch=2, verify_size=16)
        rep_tflite = to_tflite(path, batch=2, verify_size=16)
        out[name] = {"eqx": path, "onnx": pathlib.Path(rep_onnx["path"]), "tflite": pathlib.Path(rep_tflite["path"]),
                     "onnx_report": rep_onnx, "tflite_report": rep_tflite, "model": model, "state": state, "res": res}
    return out


@pytest.mark.parametrize("name", fast_only(FAMILIES, keep=("resnet18", "cifar_resnet20")))
def test_fold_matches_jax(name):
    model, state = perturbed_model(name)
    res = FAMILIES[name][1]
    x = digits_images(res)
    ref = np.asarray(_jit_apply(model, state, x))
    net = fold(model, state)
    assert np.abs(ref).max() > 2  # logits large enough for the tolerance to mean something
    for layout in ("NCHW", "NHWC"):
        got = np.asarray(jax.jit(lambda v: net.forward(v, layout))(x))
        np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


@pytest.mark.slow  # the `exported` fixture converts seven networks twice (a minute)
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_parity_with_jax_on_digits(exported, name, fmt):
    e = exported[name]
    x = digits_images(e["res"])
    ref = np.asarray(_jit_apply(e["model"], e["state"], x))
    got = open_model(e[fmt]).predict(x)
    diff = float(np.abs(got - ref).max())
    print(f"{name} {fmt}: max abs logit diff {diff:.2e} (max |logit| {np.abs(ref).max():.2f})")
    assert diff <= TOL
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))
    assert e[f"{fmt}_report"]["verification"]["max_abs_diff"] <= TOL


def _constant_only_nodes(model):
    inits = {t.name for t in model.graph.initializer}
    return [n.op_type for n in model.graph.node if n.input and all(i in inits or i == "" for i in n.input)]


@pytest.mark.slow  # the `exported` fixture converts seven networks twice (a minute)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_onnx_graph_is_folded(exported, name):
    m = onnx.load(exported[name]["onnx"])
    onnx.checker.check_model(m, full_check=True)
    ops = [n.op_type for n in m.graph.node]
    inits = {t.name for t in m.graph.initializer}
    assert "BatchNormalization" not in ops
    # NCHW throughout; a transformer transposes its patch map into tokens once, and each attention splits and merges
    # its heads with three transposes, as torch.onnx's graph of the same model does
    folded = list(_walk_ops(fold(exported[name]["model"], exported[name]["state"]).ops))
    assert ops.count("Transpose") <= 2 + 3 * sum(isinstance(op, Attention) for op in folded)
    # every LayerNorm is one LayerNormalization node and every GELU has the form onnxruntime fuses (x / sqrt 2)
    assert ops.count("LayerNormalization") == sum(isinstance(op, LayerNorm) for op in folded)
    assert ops.count("Erf") == sum(isinstance(op, Act) and op.kind == "gelu" for op in folded)
    producers = {o: n for n in m.graph.node for o in n.output}
    assert all(producers[n.input[0]].op_type == "Div" for n in m.graph.node if n.op_type == "Erf")
    # No arithmetic on weights (weight standardisation, BN scaling): every Conv / Gemm reads its weight and bias
    # straight from an initializer, and no node computes from initializers alone.
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            assert all(i in inits for i in n.input[1:]), n.name
    assert _constant_only_nodes(m) == []
    assert ops.count("Conv") == sum(1 for _ in _convs(fold(exported[name]["model"], exported[name]["state"]).ops))


def _walk_ops(ops):
    """Every folded op, residual branches and squeeze-excite convolutions included."""
    for op in ops:
        yield op
        if isinstance(op, SqueezeExcite):
            yield from (op.reduce, op.expand)
        elif isinstance(op, Residual):
            yield from _walk_ops(op.pre + op.body + (op.shortcut or ()))


def _convs(ops):
    from patient.models.fold import Conv

    return (op for op in _walk_ops(ops) if isinstance(op, Conv))


@pytest.mark.slow  # the `exported` fixture converts seven networks twice (a minute)
def test_onnx_metadata(exported):
    e = exported["mobilenetv3_small_050"]
    header = read_header(e["eqx"])[0]
    r = open_model(e["onnx"])
    assert r.meta["eqx_payload_sha256"] == header["payload_sha256"]
    assert r.meta["patient_version"] == patient.__version__
    assert r.meta["resolution"] == "64" and r.resolution == 64 and r.batch == 2
    assert r.meta["class_names"] == [f"c{i}" for i in range(10)]
    assert r.meta["preprocessing"]["layout"] == "NCHW" and r.meta["preprocessing"]["input_range"] == [0.0, 1.0]
    assert r.meta["verification"]["images"] == 16
    assert int(r.meta["macs"]) == fold(e["model"], e["state"]).macs(64)
    t = open_model(e["tflite"])
    assert {k: t.meta[k] for k in ("eqx_payload_sha256", "resolution", "class_names")} == \
        {k: r.meta[k] for k in ("eqx_payload_sha256", "resolution", "class_names")}


def test_hard_swish_forms_agree():
    """The int8 TFLite form of hard-swish (relu6(x + 3) * x / 6) computes what jax.nn.hard_swish does."""
    model, state = perturbed_model("mobilenetv3_small_050")
    x = digits_images(FAMILIES["mobilenetv3_small_050"][1])
    net = fold(model, state)
    fused = np.asarray(jax.jit(lambda v: net.forward(v, "NHWC"))(x))
    relu6 = np.asarray(jax.jit(lambda v: net.forward(v, "NHWC", hard_swish="relu6"))(x))
    np.testing.assert_allclose(relu6, fused, rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="hard_swish must be 'fused' or 'relu6'"):
        net.forward(x, hard_swish="exact")


def _kinds(ops):
    """Every activation kind and squeeze-excite gate of a folded op list, in order (residual blocks expanded)."""
    return [op.kind if isinstance(op, Act) else "se:" + op.gate
            for op in _walk_ops(ops) if isinstance(op, (Act, SqueezeExcite))]


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "mobilenetv3_large_075"])
def test_fold_sixths_is_the_same_network(name):
    """Hard-swish and hard-sigmoid written 6x larger, their 1/6 in the next conv's weights (for int8 ONNX): the
    same logits. mobilenetv3_large's first block adds its input (a hard-swish output) back: the block's last conv
    must produce the same 6x scale (bias included) for the sum to be right."""
    model, state = perturbed_model(name)
    x = digits_images(FAMILIES[name][1])
    net = fold(model, state)
    ref = np.asarray(jax.jit(net.forward)(x))
    before = _kinds(net.ops)
    for keep_first in (False, True):
        six = net.fold_sixths(keep_first=keep_first)
        kinds = _kinds(six.ops)
        assert len(kinds) == len(before) and "se:hard_sigmoid" not in kinds and "se:relu6" in kinds
        assert kinds.count("hswish") == (1 if keep_first else 0) and kinds.count("hswish6") > 0
        np.testing.assert_allclose(np.asarray(jax.jit(six.forward)(x)), ref, rtol=0, atol=TOL)


def test_fold_sixths_leaves_other_networks_alone():
    """Nothing to move (ResNet) or nowhere to move it (a hard-swish followed by a GELU): the same object back."""
    from patient.models.fold import Conv, Flatten, FoldedNet, GlobalPool, Linear

    model, state = perturbed_model("resnet18")
    net = fold(model, state)
    assert net.fold_sixths() is net and net.fold_sixths(keep_first=True) is net
    rng = np.random.default_rng(0)
    conv = Conv(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), np.zeros(4, np.float32), 1, ((1, 1), (1, 1)), 1)
    head = Linear(rng.standard_normal((4, 2)).astype(np.float32), np.zeros(2, np.float32))
    blocked = FoldedNet((conv, Act("hswish"), Act("gelu"), GlobalPool(False), Flatten(), head), "toy", 2, 8)
    assert blocked.fold_sixths() is blocked
    ok = FoldedNet((conv, Act("hswish"), GlobalPool(False), Flatten(), head), "toy", 2, 8)
    x = rng.random((2, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(ok.fold_sixths().forward(x)), np.asarray(ok.forward(x)), rtol=1e-6, atol=0)


@pytest.mark.slow  # the `exported` fixture converts seven networks twice (a minute)
def test_onnx_int8_has_no_float_activation_islands(exported, tmp_path):
    """onnxruntime has no quantised HardSwish / HardSigmoid: written as such, each ran in float between a
    DequantizeLinear and a QuantizeLinear (19 islands in MobileNetV3-Small). The int8 export quantises the
    fold_sixths graph instead, where every activation is an int8 Add / Mul or absorbed into a convolution; only a
    float stem (one of the variants timed) keeps its HardSwish, in float, before the first QuantizeLinear."""
    e = exported["mobilenetv3_small_050"]
    fp32 = [n.op_type for n in onnx.load(e["onnx_report"]["path"]).graph.node]
    assert fp32.count("HardSwish") > 1 and fp32.count("HardSigmoid") > 1  # the control: fp32 keeps the fused ops
    rep = to_onnx(e["eqx"], tmp_path / "m.int8.onnx", quantize="int8", calibration="digits", calibration_size=16,
                  verify_size=16, min_agreement=0.5, keep_int8=True)
    assert set(rep["int8"]) == {"fp32", "int8 QDQ U8S8 per-channel", "int8 QDQ U8S8 per-channel, float stem",
                                "int8 QDQ S8S8 per-channel"}
    graph = onnx.load(rep["path"]).graph
    ops = [n.op_type for n in graph.node]
    float_stem = rep["quantization"].endswith("float stem")
    assert "HardSigmoid" not in ops and ops.count("HardSwish") == float_stem
    if "U8S8" in rep["quantization"]:  # (S8S8 leaves depthwise convolutions in float: onnxruntime's choice)
        producer = {o: n.op_type for n in graph.node for o in n.output}
        convs = [n.name for n in graph.node if n.op_type == "Conv"]
        floats = [n.name for n in graph.node if n.op_type == "Conv" and producer.get(n.input[0]) != "DequantizeLinear"]
        assert floats == convs[:len(floats)] and (len(floats) >= 1 if float_stem else not floats)


@pytest.mark.slow  # the `exported` fixture converts seven networks twice (a minute)
def test_float_stem_ends_at_the_first_wider_convolution(exported):
    """The float-stem variant leaves in float the nodes before the first convolution wider or narrower than the stem;
    a network with no such convolution (a transformer: the patch embedding is its only Conv) gets no float stem,
    since its "stem" would be the whole graph."""
    from patient.export.quantize import _stem_nodes

    def widths(graph):
        shapes = {t.name: t.dims[0] for t in graph.initializer}
        return {n.name: shapes[n.input[1]] for n in graph.node if n.op_type == "Conv"}

    for name in ("mobilenetv3_small_050", "mobilenetv3_large_075", "resnet18"):
        graph = onnx.load(exported[name]["onnx_report"]["path"]).graph
        stem, width, names = _stem_nodes(onnx.ModelProto(graph=graph)), widths(graph), [n.name for n in graph.node]
        convs = [n for n in names if n in width]
        assert stem == names[:len(stem)] and convs[0] in stem, name  # a prefix, with the stem convolution
        inside = [c for c in convs if c in stem]
        assert {width[c] for c in inside} == {width[convs[0]]} and width[convs[len(inside)]] != width[convs[0]], name
    deit = onnx.load(exported["deit_tiny_distilled_patch16_224"]["onnx_report"]["path"])
    assert _stem_nodes(deit) == []


@pytest.mark.slow  # the `exported` fixture converts seven networks twice (a minute)
def test_tflite_int8_hard_swish_stays_in_xnnpack(exported, tmp_path):
    """XNNPACK runs HARD_SWISH in float only: an int8 one leaves the delegate and splits the graph (MobileNetV3 int8
    was 3x slower than fp32). The int8 export writes it as ADD + RELU6 + MUL; fp32 keeps the one fused operator."""
    e = exported["mobilenetv3_small_050"]
    fp32 = e["tflite_report"]["ops"]
    assert fp32.get("HARD_SWISH", 0) > 0  # the control: fp32 has them
    rep = to_tflite(e["eqx"], tmp_path / "m.int8.tflite", quantize="int8", calibration="digits", calibration_size=16,
                    verify_size=16, min_agreement=0.5, keep_int8=True)
    # each hard-swish became one ADD (RELU6 fused into it) and a MUL
    assert "HARD_SWISH" not in rep["ops"] and rep["ops"]["ADD"] == fp32["ADD"] + fp32["HARD_SWISH"]
    assert rep["ops"].get("QUANTIZE") == 1 and rep["ops"].get("DEQUANTIZE") == 1  # int8 from input to output


@pytest.mark.slow  # the `exported` fixture converts seven networks twice (a minute)
def test_tflite_is_nhwc_inside(exported):
    ops = exported["resnet18"]["tflite_report"]["ops"]
    assert ops.get("TRANSPOSE", 0) == 1 and ops["CONV_2D"] == 12


@pytest.mark.slow  # the `exported` fixture converts seven networks twice (a minute)
def test_dynamic_batch_onnx(exported, tmp_path):
    e = exported["bit_r26x1"]
    rep = to_onnx(e["eqx"], tmp_path / "dyn.onnx", dynamic_batch=True, verify_size=16)
    r = open_model(rep["path"])
    assert r.batch is None
    x = digits_images(e["res"])[:5]
    np.testing.assert_allclose(r.run_batch(x), np.asarray(_jit_apply(e["model"], e["state"], x)), atol=TOL, rtol=0)


@pytest.mark.slow  # the `exported` fixture converts seven networks twice (a minute)
def test_ort_nchwc_graph_is_exact(exported, tmp_path):
    e = exported["mobilenetv3_small_050"]
    rep = to_onnx(e["eqx"], tmp_path / "nchwc.onnx", ort_nchwc=True, verify_size=16)
    ops = [n.op_type for n in onnx.load(rep["path"]).graph.node]
    assert ops.count("Resize") == ops.count("HardSigmoid") == 9  # one per squeeze-excite block
    x = digits_images(e["res"])
    np.testing.assert_allclose(open_model(rep["path"]).predict(x), np.asarray(_jit_apply(e["model"], e["state"], x)),
                               atol=TOL, rtol=0)


@pytest.mark.slow  # the `exported` fixture converts seven networks twice (a minute)
def test_quantized_exports(exported, tmp_path):
    e = exported["cifar_resnet20"]
    rep = to_onnx(e["eqx"], tmp_path / "q.onnx", quantize="int8", calibration="digits", calibration_size=16,
                  verify_size=16, min_agreement=0.5, keep_int8=True)
    assert rep["quantization"].startswith("int8 QDQ") and set(rep["int8"]) > {"fp32"}
    assert "QuantizeLinear" in [n.op_type for n in onnx.load(rep["path"]).graph.node]
    for q in ("fp16", "int8"):
        rep = to_tflite(e["eqx"], tmp_path / f"{q}.tflite", quantize=q, calibration="digits", calibration_size=16,
                        verify_size=16, min_agreement=0.5, keep_int8=True)
        assert open_model(rep["path"]).meta["quantization"].startswith(q)
    assert rep["ops"].get("QUANTIZE") == 1  # int8: float input quantised once, every operator int8


@pytest.mark.slow  # the `exported` fixture converts seven networks twice (a minute)
def test_resolution_override(exported, tmp_path):
    e = exported["cifar_resnet20"]
    rep = to_tflite(e["eqx"], tmp_path / "r48.tflite", resolution=48, verify_size=8)
    assert open_model(rep["path"]).resolution == 48
    # Below the total stride (32) is fine: the demo student runs at 16 px, on 1-pixel maps from stride 16 on.
    e = exported["mobilenetv3_small_050"]
    assert fold(e["model"], e["state"]).stride() == 32
    rep = to_onnx(e["eqx"], tmp_path / "r16.onnx", resolution=16, verify_size=16)
    x = digits_images(16)
    np.testing.assert_allclose(open_model(rep["path"]).predict(x), np.asarray(_jit_apply(e["model"], e["state"], x)),
                               atol=TOL, rtol=0)


@pytest.mark.slow  # the `exported` fixture converts seven networks twice (a minute)
def test_transformer_at_another_resolution(exported, tmp_path):
    """Position embeddings resampled to the export's grid (8x8 -> 6x6 patches) as the JAX model does at run time;
    a size that is not a multiple of the patch is refused before any work."""
    from patient.export.verify import ExportError

    e = exported["deit_tiny_distilled_patch16_224"]
    x = digits_images(48)
    ref = np.asarray(_jit_apply(e["model"], e["state"], x))
    for fmt, export in (("onnx", to_onnx), ("tflite", to_tflite)):
        rep = export(e["eqx"], tmp_path / f"r48.{fmt}", resolution=48, verify_size=8)
        np.testing.assert_allclose(open_model(rep["path"]).predict(x), ref, atol=TOL, rtol=0)
    with pytest.raises(ExportError, match="cannot take 50 px: a 8x8/8 patch convolution gets a 50x50 map"):
        to_onnx(e["eqx"], tmp_path / "r50.onnx", resolution=50)
    assert not (tmp_path / "r50.onnx").exists()


@pytest.mark.slow  # the `exported` fixture converts seven networks twice (a minute)
def test_tflite_int8_transformer_is_verified_or_refused_never_a_crash(exported, tmp_path):
    """LiteRT 2.3 aborts the process when it loads the int8 attention graph its own converter wrote; export probes
    the file in a child process first, so the caller gets one clear error (or, with a fixed LiteRT, a verified file)."""
    from patient.export.verify import ExportError

    e = exported["deit_tiny_distilled_patch16_224"]
    out = tmp_path / "vit.int8.tflite"
    try:
        rep = to_tflite(e["eqx"], out, quantize="int8", calibration="digits", calibration_size=16, verify_size=16,
                        min_agreement=0.5, keep_int8=True)
    except ExportError as err:
        assert "LiteRT cannot run the int8 model its converter wrote" in str(err)
        assert not out.exists()
    else:
        assert rep["verification"]["top1_agreement"] >= 0.5


def test_resolution_where_a_map_would_vanish():
    from patient.export.verify import ExportError, check_resolution
    from patient.models.fold import Conv, FoldedNet

    w = np.zeros((4, 3, 7, 7), np.float32)
    net = FoldedNet((Conv(w, None, 2, ((0, 0), (0, 0)), 1),), "unpadded", 4, 32)
    assert check_resolution(net, 7) == 7
    with pytest.raises(ExportError, match="unpadded cannot take 6 px: a 7x7/2 convolution gets a 6x6 map"):
        check_resolution(net, 6)


@pytest.mark.slow  # the `exported` fixture converts seven networks twice (a minute)
def test_failed_verification_writes_nothing(exported, tmp_path, capsys):
    from patient.cli.export import main

    out = tmp_path / "never.onnx"
    rc = main(["--to", "onnx", str(exported["cifar_resnet20"]["eqx"]), "-o", str(out), "--tolerance", "1e-30",
               "--verify-size", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "verification failed" in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # the `exported` fixture converts seven networks twice (a minute)
def test_cli_export_writes_and_reports(exported, tmp_path, capsys):
    from patient.cli.export import main

    out = tmp_path / "cli.tflite"
    rc = main(["--to", "tflite", str(exported["cifar_resnet20"]["eqx"]), "-o", str(out), "--verify-size", "8"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and out.is_file()
    assert json.loads(lines[-1])["verification"]["max_abs_diff"] <= TOL


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    model, state = create("mobilenetv3_small_050", num_classes=10, key=jax.random.key(0), resolution=64)
    good = patient.save(tmp / "good.eqx", model, state, class_names=[f"c{i}" for i in range(10)])
    corrupt = tmp / "corrupt.eqx"
    data = bytearray(good.read_bytes())
    data[-100] ^= 0xFF  # one flipped payload byte
    corrupt.write_bytes(bytes(data))
    text = tmp / "notes.txt"
    text.write_text("not a model\n")
    fake = tmp / "fake.eqx"
    fake.write_text("{}\nnothing\n")
    return {"good": good, "corrupt": corrupt, "text": text, "fake": fake, "missing": tmp / "missing.eqx"}


BAD_CASES = {
    "missing file": (["--to", "onnx", "{missing}"], "no such file"),
    "not an .eqx": (["--to", "onnx", "{text}"], "not an .eqx"),
    "foreign .eqx": (["--to", "tflite", "{fake}"], "not a patient .eqx"),
    "corrupt .eqx": (["--to", "onnx", "{corrupt}"], "hash mismatch"),
    "unknown --to": (["--to", "caffe", "{good}"], "unknown --to"),
    "int8 without calibration": (["--to", "onnx", "{good}", "--quantize", "int8"], "needs calibration"),
    "tflite int8 without calibration": (["--to", "tflite", "{good}", "--quantize", "int8"], "needs calibration"),
    "resolution zero": (["--to", "tflite", "{good}", "--resolution", "0"], "positive integer"),
    "resolution negative": (["--to", "onnx", "{good}", "--resolution", "-32"], "positive integer"),
    "resolution too large": (["--to", "onnx", "{good}", "--resolution", "100000"], "up to 4096 px"),
    "resolution not a number": (["--to", "onnx", "{good}", "--resolution", "big"], "invalid int"),
    "fp16 onnx": (["--to", "onnx", "{good}", "--quantize", "fp16"], "TFLite option"),
    "bad calibration source": (["--to", "onnx", "{good}", "--quantize", "int8", "--calibration", "imagenet"],
                               "unknown data"),
    "tolerance nan": (["--to", "onnx", "{good}", "--tolerance", "nan"], "finite number"),
    "tolerance inf": (["--to", "tflite", "{good}", "--tolerance", "inf"], "finite number"),
    "tolerance negative": (["--to", "onnx", "{good}", "--tolerance", "-1"], "finite number"),
    "min agreement above 1": (["--to", "onnx", "{good}", "--min-agreement", "90"], "between 0 and 1"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_cli_bad_input(bad_inputs, tmp_path, capsys, case):
    from patient.cli.export import main

    argv, expect = BAD_CASES[case]
    out = tmp_path / "out" / "model.bin"
    out.parent.mkdir()
    argv = [a.format(**{k: str(v) for k, v in bad_inputs.items()}) for a in argv] + ["-o", str(out)]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("patient-export: error:") and expect in err[0], err
    assert list(out.parent.iterdir()) == []


def test_int8_decision_is_the_export_machines_and_says_so():
    from patient.export.quantize import decide

    kept, why = decide({"fp32": 2.0, "u8s8": 1.0, "s8s8": 1.5})
    assert kept == "u8s8" and "2.00x the speed of fp32" in why and "export" in why and "patient-bench" in why
    kept, why = decide({"fp32": 1.0, "u8s8": 3.0})
    assert kept == "fp32" and "3.00 ms vs 1.00 ms" in why and "--keep-int8" in why
    assert decide({"fp32": 1.0, "u8s8": 3.0}, keep_int8=True)[0] == "u8s8"
