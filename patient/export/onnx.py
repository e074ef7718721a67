"""ONNX export: fold, convert with jax2onnx, tidy the graph, check it, add metadata, verify, (quantise,) write.

The folded network is traced in NCHW, ONNX's own layout, so convolutions map to `Conv` with no Transpose at all.
jax2onnx 0.17.1 emits patterns that `tidy` rewrites into their plain ONNX forms (all exact):

- `reduce_window` max-pooling becomes `Unsqueeze -> Unsqueeze -> MaxPool(rank-4 kernel) -> Squeeze`, which
  onnxruntime rejects ("Unsupported pooling size"); it becomes one `MaxPool` over the two spatial axes.
- A convolution's bias is a separate `Add` of a (1, O, 1, 1) constant; it moves into `Conv`'s bias input. Likewise
  the classifier's bias moves into `Gemm`.
- Global average pooling is `ReduceMean` over axes (2, 3); it becomes `GlobalAveragePool` (+ `Flatten`), which
  onnxruntime's x86 NCHWc layout keeps blocked where a `ReduceMean` forces a reorder.

`ort_nchwc=True` (opt-in, `patient-export --ort-nchwc`) also rewrites squeeze-excite products for onnxruntime on x86;
see `tidy` for what it buys and costs.

Opset 18 or later: jax2onnx writes reductions with axes as an input, which `ReduceMean` accepts from opset 18.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from patient._files import write_atomic

from . import verify as V

if TYPE_CHECKING:
    import onnx

    from patient.models.fold import FoldedNet

    from .verify import SourceLike

DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 18, 23


def convert(net: FoldedNet, *, batch: int | None, resolution: int, opset: int = DEFAULT_OPSET,
            ort_nchwc: bool = False) -> onnx.ModelProto:
    """The folded network as a checked `onnx.ModelProto`: input `images` f32[B, 3, R, R], output `logits` f32[B, K].

    `ort_nchwc=True` writes squeeze-excite products as `Mul(x, Resize(s))` (see `tidy`)."""
    import onnx
    from jax2onnx import to_onnx as j2o

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # jax2onnx's IR logs a warning per untyped shape constant
    spec = [("batch" if batch is None else batch, net.in_chans, resolution, resolution)]
    model = j2o(lambda x: net.forward(x, "NCHW"), spec, model_name=net.name, opset=opset, input_names=["images"],
                output_names=["logits"])
    model = onnx.shape_inference.infer_shapes(model)  # ranks for the rewrites
    tidy(model, ort_nchwc=ort_nchwc)
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def add_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    import onnx

    from patient._version import __version__

    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    model.producer_name = "patient"
    model.producer_version = __version__
    model.doc_string = (f"{meta.get('model')} exported by patient {__version__}: images f32[B, 3, R, R] in [0, 1] "
                        f"(NCHW) -> logits; see metadata_props")


def to_onnx(src: SourceLike, output: str | os.PathLike | None = None, *, batch: int = 1,
            dynamic_batch: bool = False, resolution: int | None = None,
            quantize: str = "none", calibration: str | None = None, calibration_size: int = 128,
            opset: int = DEFAULT_OPSET, verify_data: str = "digits", verify_size: int = 32,
            tolerance: float | None = None, min_agreement: float | None = None, keep_int8: bool = False,
            ort_nchwc: bool = False, class_names: list[str] | None = None,
            log: Callable[[str], object] | None = None) -> dict[str, Any]:
    """Export a patient model to ONNX, verified against JAX.

    **Arguments:**

    - `src`: path to a `.eqx` file, or a `(model, state)` pair.
    - `output`: destination (default: next to `src`, `.onnx`, `.int8.onnx` for int8).
    - `batch` / `dynamic_batch`: fixed batch size (default 1), or a symbolic batch dimension.
    - `resolution`: input side (default: the model's own).
    - `quantize`: `"none"` or `"int8"` (onnxruntime static QDQ quantisation, calibrated on `calibration`).
    - `calibration`: data spec for int8 (`digits`, `fashion_mnist`, `image_folder:PATH`); `calibration_size` images.
    - `opset`: ONNX opset, 18..23.
    - `verify_data`, `verify_size`: the real images verification runs on; `tolerance`, `min_agreement` override the
      defaults in `patient.export.verify`.
    - `keep_int8`: keep the int8 model even when it is slower than fp32 on this CPU (by default the faster one is kept).
    - `ort_nchwc`: shape squeeze-excite products for onnxruntime's x86 NCHWc kernels (see `tidy`; off by default).

    **Returns:** a report dict (path, bytes, verification figures, quantisation decision and timings).
    **Raises:** `ExportError` (one-line message) for bad input or failed verification; no file is left behind.
    """
    log = log or (lambda msg: None)
    quantize = quantize or "none"
    if quantize not in ("none", "int8"):
        raise V.ExportError(f"ONNX export quantises to none or int8, not {quantize!r} (fp16 is a TFLite option)")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise V.ExportError(f"opset must be {MIN_OPSET}..{MAX_OPSET} (jax2onnx writes ReduceMean with axes as an "
                            f"input, an opset-18 form), got {opset!r}")
    job = V.prepare(src, class_names=class_names, batch=batch, dynamic_batch=dynamic_batch, resolution=resolution,
                    quantize=quantize, calibration=calibration, calibration_size=calibration_size,
                    verify_data=verify_data, verify_size=verify_size)
    source, net, res, fixed, x, calib = (job.source, job.net, job.resolution, job.batch, job.images, job.calibration)
    model = convert(net, batch=fixed, resolution=res, opset=opset, ort_nchwc=ort_nchwc)
    ref = V.reference_logits(source, x)
    report: dict[str, Any] = {"format": "onnx", "model": net.name, "resolution": res,
                              "batch": fixed or "dynamic", "opset": opset, "ops": op_counts(model)}
    kind, quant_label = "fp32", "none"
    if quantize == "int8":
        from .quantize import quantize_onnx

        sources: dict[bool, onnx.ModelProto] = {}

        def int8_graph(float_stem: bool) -> onnx.ModelProto:
            """The graph to quantise: hard-swish's 1/6 in the next layer's weights (`FoldedNet.fold_sixths`)."""
            if float_stem not in sources:
                folded = net.fold_sixths(keep_first=float_stem)
                sources[float_stem] = model if folded is net else convert(
                    folded, batch=fixed, resolution=res, opset=opset, ort_nchwc=ort_nchwc)
            return sources[float_stem]

        choice = quantize_onnx(model, calib, batch=fixed, keep_int8=keep_int8, source=int8_graph, log=log)
        report["int8"] = choice["timings"]
        report["int8_decision"] = choice["decision"]
        if choice["kept"] != "fp32":
            model, kind, quant_label = choice["model"], "int8", choice["kept"]
        else:
            quant_label = f"none ({choice['decision']})"
    # Named after what is written: a default name never says int8 for an fp32 model.
    written = "int8" if kind == "int8" else "none"
    out = pathlib.Path(output) if output is not None else V.default_output(source, ".onnx", written)
    meta = V.metadata(source, net, resolution=res, batch=fixed, quantization=quant_label, fmt="onnx")
    meta["graph"] = "ort-nchwc (squeeze-excite Mul over Resize)" if ort_nchwc else "portable"
    add_metadata(model, meta)
    data = model.SerializeToString()
    from patient.runtime.models import OnnxRunner

    got = OnnxRunner(content=data).predict(x)
    result = V.compare(ref, got, kind=kind, tolerance=tolerance, min_agreement=min_agreement)
    result["data"] = verify_data
    model.metadata_props.add(key="verification", value=json.dumps(result, sort_keys=True))
    data = model.SerializeToString()
    write_atomic(out, data)
    report.update(path=str(out), bytes=len(data), quantization=quant_label, verification=result)
    return report


# ------------------------------------------------------------------------------------------------- graph tidying


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def _const(graph, producers, name):
    from onnx import numpy_helper

    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
    return None


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def tidy(model: onnx.ModelProto, ort_nchwc: bool = False) -> None:
    """Rewrite jax2onnx's patterns into plain ONNX (see the module docstring), in place.

    With `ort_nchwc`, every `Mul(x f32[N, C, H, W], s f32[N, C, 1, 1])` (MobileNetV3's squeeze-excite) becomes
    `Mul(x, Resize(s, nearest, to H x W))`, which is exact. onnxruntime's x86 NCHWc layout transformer keeps an
    equal-shape Mul in its blocked layout but reorders both tensors back to NCHW around a broadcasting one; with the
    Resize the whole network stays blocked (measured on a Xeon: mobilenetv3_small_100 5% faster). Runtimes without
    that transformer (onnxruntime on ARM, others) pay for the materialised Resize instead (measured with the
    transformer disabled: 5% slower), hence opt-in.
    """
    graph = model.graph
    while _rewrite_once(graph):
        pass
    if ort_nchwc:
        _se_resize(model)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.value_info[:]  # stale entries of removed values; shape inference rebuilds them


def _rewrite_once(graph) -> bool:
    import onnx
    from onnx import numpy_helper

    producers = {o: n for n in graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    outputs = {o.name for o in graph.output}

    def only_feeds(name, node):
        return name not in outputs and len(consumers[name]) == 1 and consumers[name][0] is node

    def fed_by(add, op_type):
        """(producer, constant) for each way `add` sums a constant with the output of an `op_type` it alone reads."""
        for a, b in ((0, 1), (1, 0)):
            prod = producers.get(add.input[a])
            if prod is not None and prod.op_type == op_type and only_feeds(prod.output[0], add):
                c = _const(graph, producers, add.input[b])
                if c is not None:
                    yield prod, c

    nodes = list(graph.node)
    for n in nodes:
        if n.op_type == "Div" and _layer_norm(graph, n, producers, consumers, only_feeds):
            return True
        if n.op_type == "Erf" and _gelu(graph, n, producers, consumers, only_feeds):
            return True
        # ReduceMean over the spatial axes of an NCHW tensor  ==>  GlobalAveragePool (+ Flatten without keepdims)
        if n.op_type == "ReduceMean":
            axes = _const(graph, producers, n.input[1]) if len(n.input) > 1 and n.input[1] else _attr(n, "axes")
            rank = _rank(graph, n.input[0])
            if axes is None or rank != 4 or sorted(int(a) % 4 for a in np.ravel(axes)) != [2, 3]:
                continue
            if _attr(n, "keepdims", 1):
                new = [onnx.helper.make_node("GlobalAveragePool", [n.input[0]], [n.output[0]], name=n.name)]
            else:
                mid = f"{n.output[0]}__gap"
                new = [onnx.helper.make_node("GlobalAveragePool", [n.input[0]], [mid], name=n.name),
                       onnx.helper.make_node("Flatten", [mid], [n.output[0]], name=f"{n.name}__flatten", axis=1)]
            _replace(graph, remove=[n], insert_at=n, new=new)
            return True
        # Unsqueeze(0) -> Unsqueeze(1) -> MaxPool(1, 1, k, k) -> Squeeze(0, 1)  ==>  MaxPool(k, k)
        if n.op_type == "Squeeze":
            pool = producers.get(n.input[0])
            u1 = producers.get(pool.input[0]) if pool is not None and pool.op_type == "MaxPool" else None
            u0 = producers.get(u1.input[0]) if u1 is not None and u1.op_type == "Unsqueeze" else None
            if u0 is None or u0.op_type != "Unsqueeze":
                continue
            axes = [_const(graph, producers, u.input[1]) if len(u.input) > 1 else _attr(u, "axes") for u in (u0, u1)]
            sq = _const(graph, producers, n.input[1]) if len(n.input) > 1 else _attr(n, "axes")
            kernel, strides = list(_attr(pool, "kernel_shape")), list(_attr(pool, "strides", [1] * 4))
            pads = list(_attr(pool, "pads", [0] * 8))
            dil = list(_attr(pool, "dilations", [1] * 4))
            k = len(kernel)
            if (k != 4 or any(a is None for a in axes) or sq is None or list(np.ravel(axes[0])) != [0]
                    or list(np.ravel(axes[1])) != [1] or sorted(np.ravel(sq).tolist()) != [0, 1]
                    or kernel[:2] != [1, 1] or strides[:2] != [1, 1] or dil[:2] != [1, 1]
                    or pads[0] or pads[1] or pads[k] or pads[k + 1]
                    or not (only_feeds(u0.output[0], u1) and only_feeds(u1.output[0], pool)
                            and only_feeds(pool.output[0], n))):
                continue
            new = onnx.helper.make_node("MaxPool", [u0.input[0]], [n.output[0]], name=pool.name,
                                        kernel_shape=kernel[2:], strides=strides[2:], pads=pads[2:k] + pads[k + 2:],
                                        **({"dilations": dil[2:]} if any(d != 1 for d in dil) else {}))
            _replace(graph, remove=[u0, u1, pool, n], insert_at=n, new=[new])
            return True
        # Conv(x, w) -> Add(., c) with c of shape (1, O, 1, 1)  ==>  Conv(x, w, c.reshape(O))
        if n.op_type == "Add":
            for conv, c in fed_by(n, "Conv"):
                w = _const(graph, producers, conv.input[1])
                if w is None or c.ndim not in (3, 4) or c.size != w.shape[0]:
                    continue
                if c.shape[-2:] != (1, 1) or (c.ndim == 4 and c.shape[0] != 1):
                    continue
                bias = c.reshape(-1).astype(np.float32)
                if len(conv.input) > 2 and conv.input[2]:
                    old = _const(graph, producers, conv.input[2])
                    if old is None:
                        continue
                    bias = bias + old
                name = f"{conv.output[0]}__bias"
                graph.initializer.append(numpy_helper.from_array(bias, name))
                new = onnx.helper.make_node("Conv", [conv.input[0], conv.input[1], name], [n.output[0]],
                                            name=conv.name)
                new.attribute.extend(conv.attribute)
                _replace(graph, remove=[conv, n], insert_at=n, new=[new])
                return True
            # Gemm(x, w, 0, beta=0) -> Add(., b)  ==>  Gemm(x, w, b, beta=1)
            for gemm, c in fed_by(n, "Gemm"):
                w = _const(graph, producers, gemm.input[1])
                old = _const(graph, producers, gemm.input[2]) if len(gemm.input) > 2 and gemm.input[2] else None
                beta = _attr(gemm, "beta", 1.0)
                cols = None if w is None else w.shape[0 if _attr(gemm, "transB", 0) else 1]
                if (cols is None or c.size != cols or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1)
                        or (old is not None and beta != 0.0 and np.any(old))):
                    continue
                name = f"{gemm.output[0]}__bias"
                graph.initializer.append(numpy_helper.from_array(c.reshape(-1).astype(np.float32), name))
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
                attrs["beta"] = 1.0
                new = onnx.helper.make_node("Gemm", [gemm.input[0], gemm.input[1], name], [n.output[0]],
                                            name=gemm.name, **attrs)
                _replace(graph, remove=[gemm, n], insert_at=n, new=[new])
                return True
    return False


def _single(consumers, name):
    c = consumers.get(name, [])
    return c[0] if len(c) == 1 else None


def _scalar(graph, producers, name):
    c = _const(graph, producers, name)
    return None if c is None or c.size != 1 else float(np.ravel(c)[0])


def _other(node, name):
    """The other input of a two-input node, given one of them."""
    return node.input[1] if node.input[0] == name else node.input[0]


def _layer_norm(graph, div, producers, consumers, only_feeds) -> bool:
    """`(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * gamma + beta` over the last axis  ==>  one
    `LayerNormalization` (opset 17), which onnxruntime runs as one fused kernel. Exact in real arithmetic."""
    import onnx
    from onnx import numpy_helper

    sub, sqrt = producers.get(div.input[0]), producers.get(div.input[1])
    if sub is None or sqrt is None or sub.op_type != "Sub" or sqrt.op_type != "Sqrt":
        return False
    add_eps = producers.get(sqrt.input[0])
    if add_eps is None or add_eps.op_type != "Add":
        return False
    var = next((producers.get(i) for i in add_eps.input if _scalar(graph, producers, i) is None), None)
    eps = next((_scalar(graph, producers, i) for i in add_eps.input if _scalar(graph, producers, i) is not None), None)
    sq = producers.get(var.input[0]) if var is not None and var.op_type == "ReduceMean" else None
    mean = producers.get(sub.input[1])
    x = sub.input[0]
    if (eps is None or sq is None or sq.op_type != "Mul" or list(sq.input) != [sub.output[0]] * 2 or mean is None
            or mean.op_type != "ReduceMean" or mean.input[0] != x):
        return False
    rank = _rank(graph, x)
    for rm in (mean, var):
        axes = _const(graph, producers, rm.input[1]) if len(rm.input) > 1 and rm.input[1] else _attr(rm, "axes")
        last = rank is not None and axes is not None and [int(a) % rank for a in np.ravel(axes)] == [rank - 1]
        if not last or not _attr(rm, "keepdims", 1):
            return False
    scale = _single(consumers, div.output[0])
    shift = _single(consumers, scale.output[0]) if scale is not None and scale.op_type == "Mul" else None
    if shift is None or shift.op_type != "Add":
        return False
    gamma = _const(graph, producers, _other(scale, div.output[0]))
    beta = _const(graph, producers, _other(shift, scale.output[0]))
    if gamma is None or beta is None or not gamma.size == beta.size == gamma.shape[-1] == beta.shape[-1]:
        return False
    if not (sorted(n.name for n in consumers[sub.output[0]]) == sorted([sq.name, sq.name, div.name])
            and only_feeds(sq.output[0], var) and only_feeds(var.output[0], add_eps)
            and only_feeds(add_eps.output[0], sqrt) and only_feeds(sqrt.output[0], div) and only_feeds(mean.output[0], sub)):
        return False
    names = [f"{shift.output[0]}__gamma", f"{shift.output[0]}__beta"]
    graph.initializer.extend([numpy_helper.from_array(gamma.reshape(-1).astype(np.float32), names[0]),
                              numpy_helper.from_array(beta.reshape(-1).astype(np.float32), names[1])])
    new = onnx.helper.make_node("LayerNormalization", [x, *names], [shift.output[0]], name=f"{div.name}__layer_norm",
                                axis=-1, epsilon=eps)
    _replace(graph, remove=[mean, sub, sq, var, add_eps, sqrt, div, scale, shift], insert_at=shift, new=[new])
    return True


def _gelu(graph, erf, producers, consumers, only_feeds) -> bool:
    """jax2onnx's exact GELU, `(x * 0.5) * (erf(x * 0.70710677) + 1)`, rewritten as `((erf(x / sqrt 2) + 1) * x)
    * 0.5`: the form onnxruntime's GeluFusion turns into one Gelu kernel (as for torch.onnx graphs). Exact up to
    the rounding of x / sqrt 2 against x * (1 / sqrt 2)."""
    import onnx
    from onnx import numpy_helper

    pre = producers.get(erf.input[0])
    if pre is None or pre.op_type != "Mul":
        return False
    x = next((i for i in pre.input if _scalar(graph, producers, i) is None), None)
    c = next((_scalar(graph, producers, i) for i in pre.input if _scalar(graph, producers, i) is not None), None)
    add = _single(consumers, erf.output[0])
    if x is None or c is None or abs(c - 0.5 ** 0.5) > 1e-6 or add is None or add.op_type != "Add":
        return False
    if _scalar(graph, producers, _other(add, erf.output[0])) != 1.0:
        return False
    out = _single(consumers, add.output[0])
    half = producers.get(_other(out, add.output[0])) if out is not None and out.op_type == "Mul" else None
    if (half is None or half.op_type != "Mul" or x not in half.input
            or _scalar(graph, producers, _other(half, x)) != 0.5 or not only_feeds(half.output[0], out)
            or not only_feeds(pre.output[0], erf)):
        return False
    base = out.output[0]
    consts = {"sqrt2": np.float32(2 ** 0.5), "one": np.float32(1.0), "half": np.float32(0.5)}
    graph.initializer.extend(numpy_helper.from_array(np.array(v), f"{base}__{k}") for k, v in consts.items())
    new = [onnx.helper.make_node("Div", [x, f"{base}__sqrt2"], [f"{base}__div"], name=f"{base}__gelu_div"),
           onnx.helper.make_node("Erf", [f"{base}__div"], [f"{base}__erf"], name=f"{base}__gelu_erf"),
           onnx.helper.make_node("Add", [f"{base}__erf", f"{base}__one"], [f"{base}__add"], name=f"{base}__gelu_add"),
           onnx.helper.make_node("Mul", [x, f"{base}__add"], [f"{base}__mul"], name=f"{base}__gelu_mul"),
           onnx.helper.make_node("Mul", [f"{base}__mul", f"{base}__half"], [base], name=f"{base}__gelu_half")]
    _replace(graph, remove=[pre, erf, add, half, out], insert_at=out, new=new)
    return True


def _se_resize(model) -> None:
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in list(graph.input) + list(onnx.shape_inference.infer_shapes(model).graph.value_info)}
    nodes = []
    for n in graph.node:
        if n.op_type == "Mul":
            for a, b in ((0, 1), (1, 0)):
                sa, sb = shapes.get(n.input[a]), shapes.get(n.input[b])
                if (sa and sb and len(sa) == 4 and len(sb) == 4 and sb[2:] == [1, 1] and None not in sa[1:]
                        and sa[1] == sb[1] and sa[2] * sa[3] > 1):
                    scales = numpy_helper.from_array(np.array([1, 1, sa[2], sa[3]], np.float32),
                                                     f"{n.output[0]}__scales")
                    graph.initializer.append(scales)
                    up = f"{n.output[0]}__up"
                    nodes.append(onnx.helper.make_node(
                        "Resize", [n.input[b], "", scales.name], [up], name=f"{n.name}__resize", mode="nearest",
                        coordinate_transformation_mode="asymmetric", nearest_mode="floor"))
                    n.input[b] = up
                    break
        nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)


def _rank(graph, name) -> int | None:
    for v in list(graph.input) + list(graph.value_info) + list(graph.output):
        if v.name == name and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    return None


def _replace(graph, *, remove, insert_at, new) -> None:
    nodes = list(graph.node)
    at = next(i for i, m in enumerate(nodes) if m is insert_at)
    out = []
    for i, m in enumerate(nodes):
        if i == at:
            out.extend(new)
        if not any(m is r for r in remove):
            out.append(m)
    del graph.node[:]
    graph.node.extend(out)
