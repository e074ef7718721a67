"""BiT ResNetV2: pre-activation bottlenecks, GroupNorm(32) and weight-standardised convolutions.

Numerically the network of timm's `resnetv2_*_bit` and of the BiT / big_vision `.npz` files: a 7x7 root conv (stride 2),
a zero pad of 1 and a 3x3/2 max-pool ("fixed" stem), four stages whose first unit always has a 1x1 projection, a final
GroupNorm + ReLU, global average pooling and a linear head. Attribute names mirror timm's state-dict keys.
A CIFAR stem (3x3 conv, stride 1, no pool) serves small images.
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp

from . import fold as F
from .layers import (
    Conv2d,
    GroupNorm,
    Linear,
    Normalize,
    State,
    make_divisible,
    max_pool,
    split,
    to_channels_first,
    to_channels_last,
)
from .spec import Family, ModelSpec, register_family, register_variant

WS_EPS = 1e-8  # BiT standardises kernels with this epsilon (timm: StdConv2d(eps=1e-8))


def _gn_relu(norm: GroupNorm, x):
    return jax.nn.relu(norm(x))


class Downsample(eqx.Module):
    conv: Conv2d


class PreActBottleneck(eqx.Module):
    """x -> GN-ReLU -> (projection of the pre-activation | x) + conv3(GN-ReLU(conv2(GN-ReLU(conv1(.)))))."""

    norm1: GroupNorm
    conv1: Conv2d
    norm2: GroupNorm
    conv2: Conv2d
    norm3: GroupNorm
    conv3: Conv2d
    downsample: Downsample | None

    def __init__(self, in_ch: int, out_ch: int, stride: int, project: bool, groups: int, *, key: jax.Array | None):
        mid = make_divisible(out_ch * 0.25)
        k1, k2, k3, k4 = split(key, 4)
        self.norm1 = GroupNorm(in_ch, groups, channels_last=True)
        self.conv1 = Conv2d(in_ch, mid, 1, ws_eps=WS_EPS, channels_last=True, key=k1)
        self.norm2 = GroupNorm(mid, groups, channels_last=True)
        self.conv2 = Conv2d(mid, mid, 3, stride=stride, ws_eps=WS_EPS, channels_last=True, key=k2)
        self.norm3 = GroupNorm(mid, groups, channels_last=True)
        # Not zero-initialised (timm's zero_init_last): weight standardisation rescales any small kernel to unit
        # variance, so a zero kernel is the identity only until the first update and then divides rounding noise by
        # sqrt(1e-8), which makes training needlessly sensitive to the order of floating-point sums.
        self.conv3 = Conv2d(mid, out_ch, 1, ws_eps=WS_EPS, channels_last=True, key=k3)
        self.downsample = None
        if project:
            self.downsample = Downsample(Conv2d(in_ch, out_ch, 1, stride=stride, ws_eps=WS_EPS, channels_last=True, key=k4))

    def __call__(self, x: jax.Array) -> jax.Array:
        pre = _gn_relu(self.norm1, x)
        shortcut = x if self.downsample is None else self.downsample.conv(pre)
        y = self.conv1(pre)
        y = self.conv2(_gn_relu(self.norm2, y))
        y = self.conv3(_gn_relu(self.norm3, y))
        return y + shortcut


class Stage(eqx.Module):
    blocks: list


class Stem(eqx.Module):
    conv: Conv2d
    pool: bool = eqx.field(static=True)


class Head(eqx.Module):
    fc: Linear


class BiTResNetV2(eqx.Module):
    """BiT ResNetV2 on one (3, H, W) image in [0, 1]; returns (logits, features, state)."""

    normalize: Normalize
    stem: Stem
    stages: list
    norm: GroupNorm
    head: Head
    spec: object = eqx.field(static=True)

    def __init__(self, *, depths: Sequence[int], width: float, num_classes: int,
                 channels: Sequence[int] = (256, 512, 1024, 2048), stem: str = "fixed", groups: int = 32,
                 in_chans: int = 3, spec: ModelSpec, key: jax.Array | None):
        keys = split(key, len(depths) + 2)
        stem_ch = make_divisible(64 * width)
        if stem == "fixed":
            self.stem = Stem(Conv2d(in_chans, stem_ch, 7, stride=2, padding=3, ws_eps=WS_EPS, channels_last=True,
                                    key=keys[0]), True)
        elif stem == "cifar":
            self.stem = Stem(Conv2d(in_chans, stem_ch, 3, stride=1, padding=1, ws_eps=WS_EPS, channels_last=True,
                                    key=keys[0]), False)
        else:
            raise ValueError(f"BiT stem must be 'fixed' or 'cifar', got {stem!r}.")
        stages, prev = [], stem_ch
        for i, depth in enumerate(depths):
            out = make_divisible(channels[i] * width)
            bkeys = split(keys[i + 1], depth)
            blocks = [
                PreActBottleneck(prev if j == 0 else out, out, (1 if i == 0 else 2) if j == 0 else 1, j == 0, groups,
                                 key=bkeys[j])
                for j in range(depth)
            ]
            stages.append(Stage(blocks))
            prev = out
        self.stages = stages
        self.norm = GroupNorm(prev, groups, channels_last=True)
        # BiT zero-initialises the head (timm does too), so a fresh model predicts the uniform distribution.
        self.head = Head(Linear(prev, num_classes, key=keys[-1], zero_init=True))
        self.normalize = Normalize(spec.mean, spec.std)
        self.spec = spec

    def __call__(self, x: jax.Array, state: State, *, train: bool = False,
                 key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array], State]:
        feats = {}
        x = self.stem.conv(to_channels_last(self.normalize(x)))
        feats["stem"] = to_channels_first(x)
        if self.stem.pool:
            # BiT's "fixed" padding: an explicit zero pad of one, then a 3x3/2 max-pool without padding.
            x = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
            x = max_pool(x, 3, 2, 0, channels_last=True)
        for i, stage in enumerate(self.stages):
            for block in stage.blocks:
                x = block(x)
            feats[f"stage{i + 1}"] = to_channels_first(x)
        x = _gn_relu(self.norm, x)
        pooled = x.mean(axis=(0, 1))
        feats["pre_logits"] = pooled
        return self.head.fc(pooled), feats, state


    def fold(self, state: State) -> list:
        """The folded ops for export (`patient.models.fold`): weight standardisation applied, GroupNorm kept."""
        ops = F.fold_input(self.normalize, F.fold_conv(self.stem.conv))
        if self.stem.pool:
            ops.append(F.MaxPool(3, 2, 1, pad_value=0.0))  # BiT's "fixed" stem: a zero pad of 1, then a 3x3/2 max-pool
        for stage in self.stages:
            for blk in stage.blocks:
                body = (F.fold_conv(blk.conv1), F.fold_group_norm(blk.norm2), F.Act("relu"), F.fold_conv(blk.conv2),
                        F.fold_group_norm(blk.norm3), F.Act("relu"), F.fold_conv(blk.conv3))
                shortcut = None if blk.downsample is None else (F.fold_conv(blk.downsample.conv),)
                ops.append(F.Residual((F.fold_group_norm(blk.norm1), F.Act("relu")), body, shortcut, None))
        return ops + [F.fold_group_norm(self.norm), F.Act("relu"), F.GlobalPool(False), F.fold_linear(self.head.fc)]


def timm_name(name: str) -> str:
    """patient parameter name -> timm `resnetv2_*_bit` state-dict key (the layouts are the same)."""
    return name


DEPTHS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

register_family(Family("bit", BiTResNetV2, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), head="head.fc", timm_name=timm_name))
for _d, _w in [(26, 1), (50, 1), (101, 1), (152, 1), (50, 3), (101, 3), (152, 2), (152, 4)]:
    register_variant(f"bit_r{_d}x{_w}", "bit", 224, f"BiT ResNetV2-{_d}x{_w} (GroupNorm + WS)", depths=DEPTHS[_d],
                     width=_w)
register_variant("bit_r26x1_cifar", "bit", 32, "BiT ResNetV2-26x1 with a 3x3 stride-1 stem for small images",
                 depths=DEPTHS[26], width=1, stem="cifar")
