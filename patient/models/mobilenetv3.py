"""MobileNetV3 (Howard et al. 2019), the network of timm's `mobilenetv3_{small,large}_*`.

Blocks are depthwise-separable (`ds`), inverted residual (`ir`) and conv-BN-act (`cn`); activations are ReLU or
hard-swish, squeeze-excite gates are hard-sigmoid, channels are scaled by a width multiplier and rounded to multiples of
8 (timm's `round_channels`). The head pools first, then a 1x1 conv with bias and hard-swish (1024 or 1280 wide), then the
classifier. Attribute names mirror timm's state-dict keys.

Activations are channels-last (H, W, C) inside the network (`Conv2d`'s `channels_last`; the image comes in and the
features go out channels first, like every family's): the 1x1 convolutions are then matrix products over pixel-major
data and the depthwise ones vectorise over channels, with no layout copies between them on CPU.
"""

from __future__ import annotations

import equinox as eqx
import jax

from . import fold as F
from .layers import (
    BatchNorm,
    Conv2d,
    Linear,
    Normalize,
    State,
    hard_sigmoid,
    hard_swish,
    make_divisible,
    split,
    to_channels_first,
    to_channels_last,
)
from .spec import IMAGENET_MEAN, IMAGENET_STD, Family, ModelSpec, register_family, register_variant

# (kind, repeats, kernel, stride, expansion, out channels, squeeze-excite, activation) per block group.
SMALL = [
    [("ds", 1, 3, 2, 1.0, 16, True, "relu")],
    [("ir", 1, 3, 2, 4.5, 24, False, "relu"), ("ir", 1, 3, 1, 3.67, 24, False, "relu")],
    [("ir", 1, 5, 2, 4.0, 40, True, "hswish"), ("ir", 2, 5, 1, 6.0, 40, True, "hswish")],
    [("ir", 2, 5, 1, 3.0, 48, True, "hswish")],
    [("ir", 3, 5, 2, 6.0, 96, True, "hswish")],
    [("cn", 1, 1, 1, 1.0, 576, False, "hswish")],
]
LARGE = [
    [("ds", 1, 3, 1, 1.0, 16, False, "relu")],
    [("ir", 1, 3, 2, 4.0, 24, False, "relu"), ("ir", 1, 3, 1, 3.0, 24, False, "relu")],
    [("ir", 3, 5, 2, 3.0, 40, True, "relu")],
    [("ir", 1, 3, 2, 6.0, 80, False, "hswish"), ("ir", 1, 3, 1, 2.5, 80, False, "hswish"),
     ("ir", 2, 3, 1, 2.3, 80, False, "hswish")],
    [("ir", 2, 3, 1, 6.0, 112, True, "hswish")],
    [("ir", 3, 5, 2, 6.0, 160, True, "hswish")],
    [("cn", 1, 1, 1, 1.0, 960, False, "hswish")],
]
ACTS = {"relu": jax.nn.relu, "hswish": hard_swish}


class SqueezeExcite(eqx.Module):
    conv_reduce: Conv2d
    conv_expand: Conv2d

    def __init__(self, channels: int, *, key: jax.Array | None):
        rd = make_divisible(channels * 0.25, 8)
        k1, k2 = split(key, 2)
        self.conv_reduce = Conv2d(channels, rd, 1, padding=0, bias=True, channels_last=True, key=k1)
        self.conv_expand = Conv2d(rd, channels, 1, padding=0, bias=True, channels_last=True, key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:
        s = x.mean(axis=(0, 1), keepdims=True)
        s = self.conv_expand(jax.nn.relu(self.conv_reduce(s)))
        return x * hard_sigmoid(s)


class DepthwiseSeparable(eqx.Module):
    conv_dw: Conv2d
    bn1: BatchNorm
    se: SqueezeExcite | None
    conv_pw: Conv2d
    bn2: BatchNorm
    act: str = eqx.field(static=True)
    skip: bool = eqx.field(static=True)

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, se: bool, act: str, name: str, *,
                 key: jax.Array | None):
        k1, k2, k3 = split(key, 3)
        self.conv_dw = Conv2d(in_ch, in_ch, kernel, stride=stride, groups=in_ch, channels_last=True, key=k1)
        self.bn1 = BatchNorm(in_ch, f"{name}.bn1", channels_last=True)
        self.se = SqueezeExcite(in_ch, key=k2) if se else None
        self.conv_pw = Conv2d(in_ch, out_ch, 1, padding=0, channels_last=True, key=k3)
        self.bn2 = BatchNorm(out_ch, f"{name}.bn2", channels_last=True)
        self.act = act
        self.skip = stride == 1 and in_ch == out_ch

    def __call__(self, x: jax.Array, state: State, train: bool) -> tuple[jax.Array, State]:
        act = ACTS[self.act]
        y, state = self.bn1(self.conv_dw(x), state, train)
        y = act(y)
        if self.se is not None:
            y = self.se(y)
        y, state = self.bn2(self.conv_pw(y), state, train)
        return (y + x if self.skip else y), state


class InvertedResidual(eqx.Module):
    conv_pw: Conv2d
    bn1: BatchNorm
    conv_dw: Conv2d
    bn2: BatchNorm
    se: SqueezeExcite | None
    conv_pwl: Conv2d
    bn3: BatchNorm
    act: str = eqx.field(static=True)
    skip: bool = eqx.field(static=True)

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, exp: float, se: bool, act: str, name: str,
                 *, key: jax.Array | None):
        mid = make_divisible(in_ch * exp)
        k1, k2, k3, k4 = split(key, 4)
        self.conv_pw = Conv2d(in_ch, mid, 1, padding=0, channels_last=True, key=k1)
        self.bn1 = BatchNorm(mid, f"{name}.bn1", channels_last=True)
        self.conv_dw = Conv2d(mid, mid, kernel, stride=stride, groups=mid, channels_last=True, key=k2)
        self.bn2 = BatchNorm(mid, f"{name}.bn2", channels_last=True)
        self.se = SqueezeExcite(mid, key=k3) if se else None
        self.conv_pwl = Conv2d(mid, out_ch, 1, padding=0, channels_last=True, key=k4)
        self.bn3 = BatchNorm(out_ch, f"{name}.bn3", channels_last=True)
        self.act = act
        self.skip = stride == 1 and in_ch == out_ch

    def __call__(self, x: jax.Array, state: State, train: bool) -> tuple[jax.Array, State]:
        act = ACTS[self.act]
        y, state = self.bn1(self.conv_pw(x), state, train)
        y, state = self.bn2(self.conv_dw(act(y)), state, train)
        y = act(y)
        if self.se is not None:
            y = self.se(y)
        y, state = self.bn3(self.conv_pwl(y), state, train)
        return (y + x if self.skip else y), state


class ConvBnAct(eqx.Module):
    conv: Conv2d
    bn1: BatchNorm
    act: str = eqx.field(static=True)

    def __init__(self, in_ch: int, out_ch: int, act: str, name: str, *, key: jax.Array | None):
        self.conv = Conv2d(in_ch, out_ch, 1, padding=0, channels_last=True, key=key)
        self.bn1 = BatchNorm(out_ch, f"{name}.bn1", channels_last=True)
        self.act = act

    def __call__(self, x: jax.Array, state: State, train: bool) -> tuple[jax.Array, State]:
        y, state = self.bn1(self.conv(x), state, train)
        return ACTS[self.act](y), state


class MobileNetV3(eqx.Module):
    """MobileNetV3 on one (3, H, W) image in [0, 1]; returns (logits, features, state)."""

    normalize: Normalize
    conv_stem: Conv2d
    bn1: BatchNorm
    blocks: list
    conv_head: Conv2d
    classifier: Linear
    reductions: tuple = eqx.field(static=True)
    spec: object = eqx.field(static=True)

    def __init__(self, *, size: str, width: float, num_classes: int, in_chans: int = 3, spec: ModelSpec,
                 key: jax.Array | None):
        arch = {"small": SMALL, "large": LARGE}[size]
        num_features = 1024 if size == "small" else 1280
        stem = 16 if width < 0.75 else make_divisible(16 * width)  # timm keeps the stem at 16 below 0.75x
        keys = split(key, len(arch) + 3)
        self.conv_stem = Conv2d(in_chans, stem, 3, stride=2, padding=1, channels_last=True, key=keys[0])
        self.bn1 = BatchNorm(stem, "bn1", channels_last=True)
        blocks, prev, stride_so_far, reductions = [], stem, 2, []
        for s, group in enumerate(arch):
            stage, j = [], 0
            gkeys = split(keys[s + 1], sum(r for _, r, *_ in group))
            for kind, repeats, kernel, stride, exp, out, se, act in group:
                out = make_divisible(out * width)
                for r in range(repeats):
                    name, st = f"blocks.{s}.{j}", stride if r == 0 else 1
                    if kind == "ds":
                        stage.append(DepthwiseSeparable(prev, out, kernel, st, se, act, name, key=gkeys[j]))
                    elif kind == "ir":
                        stage.append(InvertedResidual(prev, out, kernel, st, exp, se, act, name, key=gkeys[j]))
                    else:
                        stage.append(ConvBnAct(prev, out, act, name, key=gkeys[j]))
                    prev, stride_so_far, j = out, stride_so_far * st, j + 1
            blocks.append(stage)
            reductions.append(stride_so_far)
        self.blocks = blocks
        self.reductions = tuple(reductions)
        self.conv_head = Conv2d(prev, num_features, 1, padding=0, bias=True, channels_last=True, key=keys[-2])
        self.classifier = Linear(num_features, num_classes, key=keys[-1])
        self.normalize = Normalize(spec.mean, spec.std)
        self.spec = spec

    def __call__(self, x: jax.Array, state: State, *, train: bool = False,
                 key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array], State]:
        feats = {}
        x, state = self.bn1(self.conv_stem(to_channels_last(self.normalize(x))), state, train)
        x = hard_swish(x)
        feats["stem"] = to_channels_first(x)
        # stage1..stage4 = the last block group output at reductions 4, 8, 16 and 32.
        names = {4: "stage1", 8: "stage2", 16: "stage3", 32: "stage4"}
        for stage, red in zip(self.blocks, self.reductions):
            for block in stage:
                x, state = block(x, state, train)
            if red in names:
                feats[names[red]] = to_channels_first(x)
        pooled = x.mean(axis=(0, 1), keepdims=True)
        head = hard_swish(self.conv_head(pooled)).reshape(-1)
        feats["pre_logits"] = head
        return self.classifier(head), feats, state


    def fold(self, state: State) -> list:
        """The folded ops for export (`patient.models.fold`): BatchNorm into each convolution, skips as residuals."""
        ops = [*F.fold_input(self.normalize, F.fold_conv(self.conv_stem, self.bn1, state)), F.Act("hswish")]
        for stage in self.blocks:
            for blk in stage:
                if isinstance(blk, DepthwiseSeparable):
                    body = [F.fold_conv(blk.conv_dw, blk.bn1, state), F.Act(blk.act)]
                    body += [] if blk.se is None else [F.fold_squeeze_excite(blk.se)]
                    body += [F.fold_conv(blk.conv_pw, blk.bn2, state)]
                elif isinstance(blk, InvertedResidual):
                    body = [F.fold_conv(blk.conv_pw, blk.bn1, state), F.Act(blk.act),
                            F.fold_conv(blk.conv_dw, blk.bn2, state), F.Act(blk.act)]
                    body += [] if blk.se is None else [F.fold_squeeze_excite(blk.se)]
                    body += [F.fold_conv(blk.conv_pwl, blk.bn3, state)]
                else:
                    body = [F.fold_conv(blk.conv, blk.bn1, state), F.Act(blk.act)]
                if getattr(blk, "skip", False):
                    ops.append(F.Residual((), tuple(body), None, None))
                else:
                    ops += body
        return ops + [F.GlobalPool(True), F.fold_conv(self.conv_head), F.Act("hswish"), F.Flatten(),
                      F.fold_linear(self.classifier)]


def timm_name(name: str) -> str:
    """patient parameter / statistic name -> timm `mobilenetv3_*` state-dict key (the layouts are the same)."""
    return name


register_family(Family("mobilenetv3", MobileNetV3, mean=IMAGENET_MEAN, std=IMAGENET_STD, head="classifier",
                       timm_name=timm_name))
for _size, _widths in [("small", (0.5, 0.75, 1.0)), ("large", (0.75, 1.0))]:
    for _w in _widths:
        register_variant(f"mobilenetv3_{_size}_{int(_w * 100):03d}", "mobilenetv3", 224,
                         f"MobileNetV3-{_size.capitalize()} {_w}x", size=_size, width=_w)
