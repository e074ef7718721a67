"""ResNet v1.5 with BatchNorm (torchvision / timm `resnet*`) and the CIFAR ResNets of the distillation literature.

ImageNet ResNets: 7x7/2 conv stem + BN-ReLU + 3x3/2 max-pool, four stages of basic or bottleneck blocks with the stride on
the 3x3 conv (v1.5), 1x1 conv + BN projections, average pooling, a linear head.
CIFAR ResNets (`cifar_resnet20` .. `cifar_resnet110`, `resnet8x4`, `resnet32x4`): a 3x3 stem, three stages of basic
blocks with (depth - 2) / 6 blocks each, 1x1 conv + BN projections where the shape changes (as in the CRD / RepDistiller
benchmark code), no max-pool.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import equinox as eqx
import jax

from . import fold as F
from .layers import (
    BatchNorm,
    Conv2d,
    Linear,
    Normalize,
    State,
    max_pool,
    run_stages,
    split,
    to_channels_first,
    to_channels_last,
)
from .spec import IMAGENET_MEAN, IMAGENET_STD, Family, ModelSpec, register_family, register_variant


class BasicBlock(eqx.Module):
    conv1: Conv2d
    bn1: BatchNorm
    conv2: Conv2d
    bn2: BatchNorm
    downsample: tuple | None
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, name: str, *, key: jax.Array | None):
        k1, k2, k3 = split(key, 3)
        self.conv1 = Conv2d(in_ch, planes, 3, stride=stride, padding=1, channels_last=True, key=k1)
        self.bn1 = BatchNorm(planes, f"{name}.bn1", channels_last=True)
        self.conv2 = Conv2d(planes, planes, 3, padding=1, channels_last=True, key=k2)
        self.bn2 = BatchNorm(planes, f"{name}.bn2", channels_last=True)
        out = planes
        self.downsample = None
        if stride != 1 or in_ch != out:
            self.downsample = (Conv2d(in_ch, out, 1, stride=stride, padding=0, channels_last=True, key=k3),
                               BatchNorm(out, f"{name}.downsample.1", channels_last=True))

    def __call__(self, x: jax.Array, state: State, train: bool) -> tuple[jax.Array, State]:
        y, state = self.bn1(self.conv1(x), state, train)
        y, state = self.bn2(self.conv2(jax.nn.relu(y)), state, train)
        shortcut = x
        if self.downsample is not None:
            shortcut, state = self.downsample[1](self.downsample[0](x), state, train)
        return jax.nn.relu(y + shortcut), state


class Bottleneck(eqx.Module):
    conv1: Conv2d
    bn1: BatchNorm
    conv2: Conv2d
    bn2: BatchNorm
    conv3: Conv2d
    bn3: BatchNorm
    downsample: tuple | None
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, name: str, *, key: jax.Array | None):
        k1, k2, k3, k4 = split(key, 4)
        out = planes * 4
        self.conv1 = Conv2d(in_ch, planes, 1, padding=0, channels_last=True, key=k1)
        self.bn1 = BatchNorm(planes, f"{name}.bn1", channels_last=True)
        self.conv2 = Conv2d(planes, planes, 3, stride=stride, padding=1, channels_last=True, key=k2)
        self.bn2 = BatchNorm(planes, f"{name}.bn2", channels_last=True)
        self.conv3 = Conv2d(planes, out, 1, padding=0, channels_last=True, key=k3)
        self.bn3 = BatchNorm(out, f"{name}.bn3", channels_last=True)
        self.downsample = None
        if stride != 1 or in_ch != out:
            self.downsample = (Conv2d(in_ch, out, 1, stride=stride, padding=0, channels_last=True, key=k4),
                               BatchNorm(out, f"{name}.downsample.1", channels_last=True))

    def __call__(self, x: jax.Array, state: State, train: bool) -> tuple[jax.Array, State]:
        y, state = self.bn1(self.conv1(x), state, train)
        y, state = self.bn2(self.conv2(jax.nn.relu(y)), state, train)
        y, state = self.bn3(self.conv3(jax.nn.relu(y)), state, train)
        shortcut = x
        if self.downsample is not None:
            shortcut, state = self.downsample[1](self.downsample[0](x), state, train)
        return jax.nn.relu(y + shortcut), state


class ResNet(eqx.Module):
    """ResNet on one (3, H, W) image in [0, 1]; returns (logits, features, state)."""

    normalize: Normalize
    conv1: Conv2d
    bn1: BatchNorm
    layers: list
    fc: Linear
    pool: bool = eqx.field(static=True)
    spec: object = eqx.field(static=True)

    def __init__(self, *, depths: Sequence[int], channels: Sequence[int], block: str, num_classes: int,
                 stem: str = "imagenet", stem_width: int = 64, in_chans: int = 3, spec: ModelSpec,
                 key: jax.Array | None):
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        keys = split(key, len(depths) + 2)
        if stem == "imagenet":
            self.conv1 = Conv2d(in_chans, stem_width, 7, stride=2, padding=3, channels_last=True, key=keys[0])
            self.pool = True
        elif stem == "cifar":
            self.conv1 = Conv2d(in_chans, stem_width, 3, stride=1, padding=1, channels_last=True, key=keys[0])
            self.pool = False
        else:
            raise ValueError(f"ResNet stem must be 'imagenet' or 'cifar', got {stem!r}.")
        self.bn1 = BatchNorm(stem_width, "bn1", channels_last=True)
        layers, prev = [], stem_width
        for i, (depth, planes) in enumerate(zip(depths, channels)):
            bkeys = split(keys[i + 1], depth)
            blocks = []
            for j in range(depth):
                stride = (1 if i == 0 else 2) if j == 0 else 1
                blocks.append(block_cls(prev, planes, stride, f"layers.{i}.{j}", key=bkeys[j]))
                prev = planes * block_cls.expansion
            layers.append(blocks)
        self.layers = layers
        self.fc = Linear(prev, num_classes, key=keys[-1])
        self.normalize = Normalize(spec.mean, spec.std)
        self.spec = spec

    def __call__(self, x: jax.Array, state: State, *, train: bool = False,
                 key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array], State]:
        feats = {}
        x, state = self.bn1(self.conv1(to_channels_last(self.normalize(x))), state, train)
        x = jax.nn.relu(x)
        feats["stem"] = to_channels_first(x)
        if self.pool:
            x = max_pool(x, 3, 2, 1, channels_last=True)
        _, state, pooled = run_stages(self.layers, x, state, train, feats, channels_last=True)
        return self.fc(pooled), feats, state


    def fold(self, state: State) -> list:
        """The folded ops for export (`patient.models.fold`): BatchNorm into each convolution, blocks as residuals."""
        ops = [*F.fold_input(self.normalize, F.fold_conv(self.conv1, self.bn1, state)), F.Act("relu")]
        if self.pool:
            ops.append(F.MaxPool(3, 2, 1, nonneg_input=True))
        for blocks in self.layers:
            for blk in blocks:
                body = [F.fold_conv(blk.conv1, blk.bn1, state), F.Act("relu"), F.fold_conv(blk.conv2, blk.bn2, state)]
                if isinstance(blk, Bottleneck):
                    body += [F.Act("relu"), F.fold_conv(blk.conv3, blk.bn3, state)]
                shortcut = None if blk.downsample is None else (F.fold_conv(*blk.downsample, state),)
                ops.append(F.Residual((), tuple(body), shortcut, "relu"))
        return ops + [F.GlobalPool(False), F.fold_linear(self.fc)]


def timm_name(name: str) -> str:
    """patient parameter / statistic name -> timm `resnet*` state-dict key (`layers.0.1.conv1` -> `layer1.1.conv1`)."""
    return re.sub(r"^layers\.(\d+)\.", lambda m: f"layer{int(m.group(1)) + 1}.", name)


IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}

register_family(Family("resnet", ResNet, mean=IMAGENET_MEAN, std=IMAGENET_STD, head="fc", timm_name=timm_name))
for _d, (_block, _depths) in IMAGENET_DEPTHS.items():
    register_variant(f"resnet{_d}", "resnet", 224, f"ResNet-{_d} v1.5 (BatchNorm)", depths=_depths,
                     channels=(64, 128, 256, 512), block=_block)
for _d in (20, 32, 44, 56, 110):
    register_variant(f"cifar_resnet{_d}", "resnet", 32, f"CIFAR ResNet-{_d} (16/32/64 channels)",
                     depths=((_d - 2) // 6,) * 3, channels=(16, 32, 64), block="basic", stem="cifar", stem_width=16)
for _d in (8, 32):
    register_variant(f"resnet{_d}x4", "resnet", 32, f"CIFAR ResNet-{_d}x4 (64/128/256 channels, CRD benchmark)",
                     depths=((_d - 2) // 6,) * 3, channels=(64, 128, 256), block="basic", stem="cifar", stem_width=32)
