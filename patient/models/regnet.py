"""RegNetY (Radosavovic et al. 2020, "Designing network design spaces"), the network of timm's `regnety_*`.

A RegNet is described by a few numbers (initial width `w0`, slope `wa`, multiplier `wm`, depth, group width); the
per-block widths they generate are quantised into four stages of constant width (`stage_layout`, the same float32
arithmetic as timm). Each block is a bottleneck of ratio 1: 1x1 conv-BN-ReLU, grouped 3x3 conv-BN-ReLU (stride 2 in
a stage's first block), squeeze-excite with a sigmoid gate (reduced to a quarter of the block's INPUT width), 1x1
conv-BN, plus the shortcut (1x1 conv-BN where the shape changes) and a ReLU. The stem is a 3x3/2 conv-BN-ReLU of 32
channels; the head pools and classifies. Parameter names follow the module tree; `timm_name` maps them to timm's keys
(`stages.0.1.conv1.conv.weight` -> `s1.b2.conv1.conv.weight`).
"""

from __future__ import annotations

import math
import re

import equinox as eqx
import jax
import numpy as np

from . import fold as F
from .layers import BatchNorm, Conv2d, Linear, Normalize, State, run_stages, split, to_channels_first, to_channels_last
from .spec import IMAGENET_MEAN, IMAGENET_STD, Family, ModelSpec, register_family, register_variant


class ConvBN(eqx.Module):
    conv: Conv2d
    bn: BatchNorm

    def __init__(self, in_ch: int, out_ch: int, kernel: int, name: str, *, stride: int = 1, groups: int = 1,
                 key: jax.Array | None):
        self.conv = Conv2d(in_ch, out_ch, kernel, stride=stride, groups=groups, channels_last=True, key=key)
        self.bn = BatchNorm(out_ch, f"{name}.bn", channels_last=True)

    def __call__(self, x: jax.Array, state: State, train: bool) -> tuple[jax.Array, State]:
        return self.bn(self.conv(x), state, train)

    def fold(self, state: State) -> F.Conv:
        return F.fold_conv(self.conv, self.bn, state)


class SqueezeExcite(eqx.Module):
    fc1: Conv2d
    fc2: Conv2d

    def __init__(self, channels: int, reduced: int, *, key: jax.Array | None):
        k1, k2 = split(key, 2)
        self.fc1 = Conv2d(channels, reduced, 1, padding=0, bias=True, channels_last=True, key=k1)
        self.fc2 = Conv2d(reduced, channels, 1, padding=0, bias=True, channels_last=True, key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.fc2(jax.nn.relu(self.fc1(x.mean(axis=(0, 1), keepdims=True))))
        return x * jax.nn.sigmoid(s)


class Block(eqx.Module):
    conv1: ConvBN
    conv2: ConvBN
    se: SqueezeExcite | None
    conv3: ConvBN
    downsample: ConvBN | None

    def __init__(self, in_ch: int, out_ch: int, stride: int, group_size: int, se_ratio: float, name: str, *,
                 key: jax.Array | None):
        k1, k2, k3, k4, k5 = split(key, 5)
        self.conv1 = ConvBN(in_ch, out_ch, 1, f"{name}.conv1", key=k1)
        self.conv2 = ConvBN(out_ch, out_ch, 3, f"{name}.conv2", stride=stride, groups=out_ch // group_size, key=k2)
        self.se = SqueezeExcite(out_ch, int(round(in_ch * se_ratio)), key=k3) if se_ratio else None
        self.conv3 = ConvBN(out_ch, out_ch, 1, f"{name}.conv3", key=k4)
        self.downsample = None
        if in_ch != out_ch or stride != 1:
            self.downsample = ConvBN(in_ch, out_ch, 1, f"{name}.downsample", stride=stride, key=k5)

    def __call__(self, x: jax.Array, state: State, train: bool) -> tuple[jax.Array, State]:
        y, state = self.conv1(x, state, train)
        y, state = self.conv2(jax.nn.relu(y), state, train)
        y = jax.nn.relu(y)
        if self.se is not None:
            y = self.se(y)
        y, state = self.conv3(y, state, train)
        shortcut = x
        if self.downsample is not None:
            shortcut, state = self.downsample(x, state, train)
        return jax.nn.relu(y + shortcut), state

    def fold(self, state: State) -> F.Residual:
        body = [self.conv1.fold(state), F.Act("relu"), self.conv2.fold(state), F.Act("relu")]
        if self.se is not None:
            body.append(F.SqueezeExcite(F.fold_conv(self.se.fc1), F.fold_conv(self.se.fc2), gate="sigmoid"))
        body.append(self.conv3.fold(state))
        shortcut = None if self.downsample is None else (self.downsample.fold(state),)
        return F.Residual((), tuple(body), shortcut, "relu")


class Head(eqx.Module):
    fc: Linear


class RegNet(eqx.Module):
    """RegNetY on one (3, H, W) image in [0, 1]; returns (logits, features, state)."""

    normalize: Normalize
    stem: ConvBN
    stages: list
    head: Head
    spec: ModelSpec = eqx.field(static=True)

    def __init__(self, *, widths: tuple, depths: tuple, group_sizes: tuple, num_classes: int, se_ratio: float = 0.25,
                 stem_width: int = 32, in_chans: int = 3, spec: ModelSpec, key: jax.Array | None):
        if not len(widths) == len(depths) == len(group_sizes):
            raise ValueError(f"RegNet needs one width, depth and group size per stage, got {widths}, {depths}, "
                             f"{group_sizes}")
        keys = split(key, len(depths) + 2)
        self.stem = ConvBN(in_chans, stem_width, 3, "stem", stride=2, key=keys[0])
        stages, prev = [], stem_width
        for i, (width, depth, group) in enumerate(zip(widths, depths, group_sizes)):
            bkeys = split(keys[i + 1], depth)
            stage = []
            for j in range(depth):
                stage.append(Block(prev, width, 2 if j == 0 else 1, group, se_ratio, f"stages.{i}.{j}", key=bkeys[j]))
                prev = width
            stages.append(stage)
        self.stages = stages
        self.head = Head(Linear(prev, num_classes, key=keys[-1]))
        self.normalize = Normalize(spec.mean, spec.std)
        self.spec = spec

    def __call__(self, x: jax.Array, state: State, *, train: bool = False,
                 key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array], State]:
        feats = {}
        x, state = self.stem(to_channels_last(self.normalize(x)), state, train)
        x = jax.nn.relu(x)
        feats["stem"] = to_channels_first(x)
        _, state, pooled = run_stages(self.stages, x, state, train, feats, channels_last=True)
        return self.head.fc(pooled), feats, state

    def fold(self, state: State) -> list:
        """The folded ops for export (`patient.models.fold`): BatchNorm into each convolution, blocks as residuals."""
        ops = [*F.fold_input(self.normalize, self.stem.fold(state)), F.Act("relu")]
        ops += [block.fold(state) for stage in self.stages for block in stage]
        return ops + [F.GlobalPool(False), F.fold_linear(self.head.fc)]


def timm_name(name: str) -> str:
    """patient parameter / statistic name -> timm `regnety_*` state-dict key (`stages.0.1.` -> `s1.b2.`)."""
    return re.sub(r"^stages\.(\d+)\.(\d+)\.", lambda m: f"s{int(m.group(1)) + 1}.b{int(m.group(2)) + 1}.", name)


def stage_layout(w0: int, wa: float, wm: float, depth: int, group_size: int,
                 quant: int = 8) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(widths, depths, group sizes) per stage from the RegNet parameters, in timm's float32 arithmetic: block widths
    `w0 * wm ** round(log((i * wa + w0) / w0) / log(wm))` quantised to multiples of 8, grouped into stages of equal
    width; each group size is capped at its stage's width and the width rounded to a multiple of the group size."""
    cont = np.arange(depth, dtype=np.float32) * np.float32(wa) + np.float32(w0)
    exps = np.round(np.log(cont / np.float32(w0)) / np.float32(math.log(wm)))
    block_widths = (np.round(np.float32(w0) * np.power(np.float32(wm), exps) / np.float32(quant)) * quant).astype(int)
    widths, depths = np.unique(block_widths, return_counts=True)
    groups = [min(group_size, int(w)) for w in widths]
    widths = [int(round(int(w) / g) * g) for w, g in zip(widths, groups)]
    return tuple(widths), tuple(int(d) for d in depths), tuple(groups)


# name: (w0, wa, wm, depth, group width), timm's regnety_* configurations
CONFIGS = {
    "regnety_002": (24, 36.44, 2.49, 13, 8), "regnety_004": (48, 27.89, 2.09, 16, 8),
    "regnety_006": (48, 32.54, 2.32, 15, 16), "regnety_008": (56, 38.84, 2.4, 14, 16),
    "regnety_016": (48, 20.71, 2.65, 27, 24), "regnety_032": (80, 42.63, 2.66, 21, 24),
    "regnety_040": (96, 31.41, 2.24, 22, 64), "regnety_064": (112, 33.22, 2.27, 25, 72),
    "regnety_080": (192, 76.82, 2.19, 17, 56), "regnety_120": (168, 73.36, 2.37, 19, 112),
    "regnety_160": (200, 106.23, 2.48, 18, 112), "regnety_320": (232, 115.89, 2.53, 20, 232),
}

register_family(Family("regnety", RegNet, mean=IMAGENET_MEAN, std=IMAGENET_STD, head="head.fc", timm_name=timm_name))
for _name, _cfg in CONFIGS.items():
    _w, _d, _g = stage_layout(*_cfg)
    register_variant(_name, "regnety", 224, f"RegNetY-{int(_name[-3:]) / 10:.1f}GF (squeeze-excite, BatchNorm)",
                     widths=_w, depths=_d, group_sizes=_g)
