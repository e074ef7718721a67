"""`FoldedNet.fold_sixths`: a folded network rewritten so that no hard-swish or hard-sigmoid divides by 6.

Each hard-swish becomes `Act("hswish6")` (`x * clip(x + 3, 0, 6)`) and each squeeze-excite hard sigmoid a `relu6` gate
with its + 3 in the expand bias. The tensor after such an op is 6 times the true one; the factor travels with it
through ops that commute with a positive factor (ReLU, pooling, flattening, the squeeze-excite product) until a
convolution or dense layer takes it into its weights. For int8 ONNX: onnxruntime has no quantised HardSwish or
HardSigmoid, and runs each one in float between DequantizeLinear and QuantizeLinear.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .fold_ops import Act, Conv, Flatten, GlobalPool, Linear, MaxPool, Residual, SqueezeExcite


def fold_sixths(ops: tuple, *, keep_first: bool = False) -> tuple | None:
    """`ops` rewritten (see the module docstring), or None when there is nothing to move or some factor would meet an
    op it does not commute with before a linear one. `keep_first` leaves the first activation as it is."""
    walk = {"keep_first": keep_first, "moved": 0}
    try:
        out, scale = _fold_sixths(ops, 1.0, walk)
    except _Unabsorbed:
        return None
    return tuple(out) if scale == 1.0 and walk["moved"] else None


class _Unabsorbed(Exception):
    """A pending scale factor met an op that does not commute with it (see `_fold_sixths`)."""


def _scaled(op, c: float):
    """`op` (Conv or Linear) with its weight multiplied by `c` (bias unchanged): op(c * s) as a function of s."""
    return dataclasses.replace(op, weight=(np.asarray(op.weight, np.float64) * c).astype(np.float32))


def _refactor(ops: list, have: float, want: float) -> list:
    """`ops` ending in a tensor at factor `want` instead of `have`: the last op, a conv or dense layer, scales its
    weight and bias by `have / want`."""
    if have == want:
        return ops
    last = ops[-1] if ops else None
    if not isinstance(last, (Conv, Linear)):
        raise _Unabsorbed
    k = have / want
    bias = None if last.bias is None else (np.asarray(last.bias, np.float64) * k).astype(np.float32)
    return [*ops[:-1], dataclasses.replace(_scaled(last, k), bias=bias)]


def _fold_sixths(ops, c: float, walk: dict) -> tuple[list, float]:
    """Rewrite `ops` for `FoldedNet.fold_sixths`. The tensor flowing in is `true / c`; returns the new ops and the
    factor of the tensor flowing out. Linear ops (conv, dense) absorb the factor into their weights; ReLU, pooling
    and flattening commute with a positive factor; any other op needs factor 1 (else `_Unabsorbed`).
    `walk["keep_first"]`: whether the next activation met is left as it is (cleared by the first activation);
    `walk["moved"]` counts the sixths moved."""
    out = []
    for op in ops:
        act = isinstance(op, Act)
        keep = act and walk["keep_first"]
        if act:
            walk["keep_first"] = False
        if isinstance(op, (Conv, Linear)):
            op, c = (op if c == 1.0 else _scaled(op, c)), 1.0
        elif (act and op.kind == "relu") or isinstance(op, (GlobalPool, Flatten, MaxPool)):
            pass  # f(c * s) = c * f(s) for c > 0 (MaxPool pads with -inf or 0)
        elif act and op.kind == "hswish" and not keep and c == 1.0:
            op, c = Act("hswish6"), 1.0 / 6.0
            walk["moved"] += 1
        elif isinstance(op, SqueezeExcite):  # x * gate(...(mean(x))): the pooled branch starts with a linear reduce
            reduce = op.reduce if c == 1.0 else _scaled(op.reduce, c)
            if op.gate == "hard_sigmoid":  # relu6(s + 3) / 6
                bias = np.zeros(op.expand.weight.shape[0]) if op.expand.bias is None else op.expand.bias
                expand = dataclasses.replace(op.expand, bias=(np.asarray(bias, np.float64) + 3.0).astype(np.float32))
                op, c = SqueezeExcite(reduce, expand, "relu6"), c / 6.0
                walk["moved"] += 1
            else:
                op = SqueezeExcite(reduce, op.expand, op.gate)
        elif isinstance(op, Residual):  # body(pre(x)) + x or + shortcut(pre(x)): both terms must share a factor
            pre, cp = _fold_sixths(op.pre, c, walk)
            body, cb = _fold_sixths(op.body, cp, walk)
            shortcut, target = None, c  # the identity shortcut adds x, at the factor it came with
            if op.shortcut is not None:
                shortcut, cs = _fold_sixths(op.shortcut, cp, walk)
                shortcut, target = _refactor(shortcut, cs, 1.0), 1.0
            if op.post not in (None, "relu") and target != 1.0:
                raise _Unabsorbed
            body = _refactor(body, cb, target)
            op, c = Residual(tuple(pre), tuple(body), None if shortcut is None else tuple(shortcut), op.post), target
        elif c != 1.0:
            raise _Unabsorbed
        out.append(op)
    return out, c
