"""The folded network's operations: plain constant-weight ops (convolution, activation, normalisations, pooling,
residual, dense, transformer tokens and attention) with numpy weights. A leaf module: `patient.models.fold` builds,
runs and measures networks of these, and re-exports them, so families write `F.Conv(...)` with `from . import fold as F`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

Pads = tuple  # ((top, bottom), (left, right))


@dataclasses.dataclass(frozen=True, eq=False)
class Conv:
    weight: np.ndarray  # f32 (O, I // groups, kh, kw)
    bias: np.ndarray | None  # f32 (O,)
    stride: int
    padding: Pads
    groups: int


@dataclasses.dataclass(frozen=True)
class Act:
    # "relu" | "hswish" | "gelu" (exact, erf-based: PyTorch's and timm's nn.GELU) | "hswish6": six times a hard-swish,
    # x * clip(x + 3, 0, 6), whose 1/6 the next linear op carries (`FoldedNet.fold_sixths`)
    kind: str

    def __post_init__(self):
        if self.kind not in ("relu", "hswish", "gelu", "hswish6"):
            raise ValueError(f"folded activation must be 'relu', 'hswish', 'gelu' or 'hswish6', got {self.kind!r}; add "
                             "the kind to patient.models.fold (Act, _apply) and to the exporters' checks")


@dataclasses.dataclass(frozen=True)
class Sub:
    mean: tuple  # per input channel


@dataclasses.dataclass(frozen=True, eq=False)
class GroupNorm:
    weight: np.ndarray
    bias: np.ndarray
    groups: int
    eps: float


@dataclasses.dataclass(frozen=True)
class MaxPool:
    """Max-pooling with `padding` on every side; PyTorch pads with -inf, BiT's "fixed" stem pads with zeros."""

    kernel: int
    stride: int
    padding: int
    pad_value: float = float("-inf")
    nonneg_input: bool = False  # after a ReLU: -inf and zero padding give the same result


@dataclasses.dataclass(frozen=True, eq=False)
class SqueezeExcite:
    """`x * gate(expand(relu(reduce(mean(x)))))`; the gate is MobileNetV3's hard sigmoid, RegNetY's sigmoid, or
    `relu6`: six times a hard sigmoid, with its + 3 in `expand`'s bias and its 1/6 in the next linear op
    (`FoldedNet.fold_sixths`)."""

    reduce: Conv
    expand: Conv
    gate: str = "hard_sigmoid"

    def __post_init__(self):
        if self.gate not in ("hard_sigmoid", "sigmoid", "relu6"):
            raise ValueError(f"squeeze-excite gate must be 'hard_sigmoid', 'sigmoid' or 'relu6', got {self.gate!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Residual:
    """`pre = pre_ops(x)`; `out = body(pre) + (x if shortcut is None else shortcut(pre))`; then `post` activation."""

    pre: tuple
    body: tuple
    shortcut: tuple | None
    post: str | None


@dataclasses.dataclass(frozen=True)
class GlobalPool:
    keepdims: bool


@dataclasses.dataclass(frozen=True)
class Flatten:
    pass


@dataclasses.dataclass(frozen=True, eq=False)
class Linear:
    weight: np.ndarray  # f32 (in, out): x @ weight, no transpose in the graph
    bias: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class PatchTokens:
    """A (C, h, w) map of patch embeddings becomes tokens `(P + h * w, C)`: the `prefix` tokens (class, distillation)
    first, then the patches in row-major order, plus the position embeddings `pos` `(P + gh * gw, C)` of a `grid` of
    (gh, gw) patches, resampled when the map has another size (`layers.resample_positions`, once, at trace time)."""

    prefix: np.ndarray  # f32 (P, C)
    pos: np.ndarray  # f32 (P + gh * gw, C)
    grid: tuple


@dataclasses.dataclass(frozen=True, eq=False)
class LayerNorm:
    """Normalisation over the last (feature) axis of tokens."""

    weight: np.ndarray
    bias: np.ndarray
    eps: float


@dataclasses.dataclass(frozen=True, eq=False)
class Attention:
    """Multi-head self-attention over tokens: `q, k, v` from one dense `qkv` (C -> 3C, in that order), `softmax(q k^T)
    v` per head, then `proj`. The 1/sqrt(head dim) scale is folded into the q part of `qkv` (exact for the
    power-of-two head dims of every registered ViT)."""

    qkv: Linear
    proj: Linear
    heads: int


@dataclasses.dataclass(frozen=True)
class TakeTokens:
    """The first `count` tokens: `(N, C)` -> `(count, C)` (class token, and DeiT's distillation token)."""

    count: int
