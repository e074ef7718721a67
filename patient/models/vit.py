"""Vision Transformers (Dosovitskiy et al. 2021) and DeiT (Touvron et al. 2021), the networks of timm's `vit_*` and
`deit_*`, distilled DeiT included.

The image is cut into patches by a strided convolution (the patch embedding); a class token (and, for distilled DeiT,
a distillation token) is prepended and learned position embeddings are added; pre-norm blocks follow (LayerNorm ->
multi-head self-attention -> residual, LayerNorm -> MLP with exact GELU -> residual); a final LayerNorm, then the head on
the class token. A distilled DeiT has a second head on the distillation token; its prediction is the mean of the two
(as timm at evaluation), and both heads' logits are also returned as the features `head_cls` and `head_dist`, which
`method="deit"` trains separately.

At another input size the position embeddings are resampled to the new grid of patches, bicubic with antialiasing, as
timm's `resample_abs_pos_embed` (the stored embeddings keep the grid the model was built for). Importing timm weights
made at another grid resamples them the same way.

Features, so feature methods (FitNets, SRD, ...) work on transformers as on CNNs: `stem` is the patch embedding map
(D, h, w); `stage1`..`stage4` are the patch tokens after the blocks at the depth quarters, as (D, h, w) maps;
`pre_logits` is the normalised class token (the mean of class and distillation tokens when distilled, as timm).
Parameter names are timm's state-dict keys exactly.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import fold as F
from .layers import Conv2d, LayerNorm, Linear, Normalize, State, host_rng, resample_positions, split
from .spec import IMAGENET_MEAN, IMAGENET_STD, Family, ModelSpec, register_family, register_variant

INIT_STD = 0.02  # timm's truncated-normal init of tokens, position embeddings and dense layers


def dense(lin: Linear, x: jax.Array) -> jax.Array:
    """A Linear layer on tokens (N, D) -> (N, out)."""
    return x @ lin.weight.astype(x.dtype).T + lin.bias.astype(x.dtype)


def _fold_dense(lin: Linear) -> F.Linear:
    """A dense layer as a folded `x @ W + b`."""
    w = np.ascontiguousarray(np.asarray(lin.weight, np.float32).T)
    return F.Linear(w, np.asarray(lin.bias, np.float32))


def _fold_norm(norm: LayerNorm) -> F.LayerNorm:
    return F.LayerNorm(np.asarray(norm.weight, np.float32), np.asarray(norm.bias, np.float32), float(norm.eps))


class Attention(eqx.Module):
    qkv: Linear
    proj: Linear
    num_heads: int = eqx.field(static=True)

    def __init__(self, dim: int, num_heads: int, *, key: jax.Array | None):
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}; pick a width that is")
        k1, k2 = split(key, 2)
        self.qkv = Linear(dim, 3 * dim, key=k1, std=INIT_STD)
        self.proj = Linear(dim, dim, key=k2, std=INIT_STD)
        self.num_heads = num_heads

    def __call__(self, x: jax.Array) -> jax.Array:
        n, d = x.shape
        h = self.num_heads
        qkv = dense(self.qkv, x).reshape(n, 3, h, d // h)
        q, k, v = (jnp.transpose(qkv[:, i], (1, 0, 2)) for i in range(3))  # (heads, N, head dim)
        attn = jax.nn.softmax((q * (d // h) ** -0.5) @ jnp.swapaxes(k, -1, -2), axis=-1)
        return dense(self.proj, jnp.transpose(attn @ v, (1, 0, 2)).reshape(n, d))

    def fold(self) -> F.Attention:
        d = self.proj.weight.shape[0]
        scale = np.concatenate([np.full(d, (d // self.num_heads) ** -0.5), np.ones(2 * d)])
        qkv = _fold_dense(self.qkv)
        qkv = F.Linear((qkv.weight * scale).astype(np.float32), (qkv.bias * scale).astype(np.float32))
        return F.Attention(qkv, _fold_dense(self.proj), self.num_heads)


class Mlp(eqx.Module):
    fc1: Linear
    fc2: Linear

    def __init__(self, dim: int, hidden: int, *, key: jax.Array | None):
        k1, k2 = split(key, 2)
        self.fc1 = Linear(dim, hidden, key=k1, std=INIT_STD)
        self.fc2 = Linear(hidden, dim, key=k2, std=INIT_STD)

    def __call__(self, x: jax.Array) -> jax.Array:
        return dense(self.fc2, jax.nn.gelu(dense(self.fc1, x), approximate=False))


class Block(eqx.Module):
    norm1: LayerNorm
    attn: Attention
    norm2: LayerNorm
    mlp: Mlp

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, key: jax.Array | None):
        k1, k2 = split(key, 2)
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, key=k1)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def fold(self) -> tuple[F.Residual, F.Residual]:
        attn = F.Residual((), (_fold_norm(self.norm1), self.attn.fold()), None, None)
        mlp = F.Residual((), (_fold_norm(self.norm2), _fold_dense(self.mlp.fc1), F.Act("gelu"),
                              _fold_dense(self.mlp.fc2)), None, None)
        return attn, mlp


def stage_ends(depth: int) -> tuple[int, ...]:
    """How many blocks have run when feature `stage1`..`stage4` is taken: the depth quarters, rounded up (3, 6, 9, 12
    for 12 blocks; a model of fewer than 4 blocks repeats a block's output)."""
    return tuple(max(1, -(-depth * q // 4)) for q in (1, 2, 3, 4))


class PatchEmbed(eqx.Module):
    proj: Conv2d


class VisionTransformer(eqx.Module):
    """ViT / DeiT on one (3, H, W) image in [0, 1] (H and W multiples of the patch size); returns
    (logits, features, state). The state is always empty (no BatchNorm)."""

    normalize: Normalize
    patch_embed: PatchEmbed
    cls_token: jax.Array  # (1, 1, D), timm's shape
    dist_token: jax.Array | None
    pos_embed: jax.Array  # (1, prefix + gh * gw, D)
    blocks: list
    norm: LayerNorm
    head: Linear
    head_dist: Linear | None
    patch_size: int = eqx.field(static=True)
    grid: tuple = eqx.field(static=True)
    spec: ModelSpec = eqx.field(static=True)

    def __init__(self, *, patch_size: int, embed_dim: int, depth: int, num_heads: int, num_classes: int,
                 mlp_ratio: float = 4.0, distilled: bool = False, in_chans: int = 3, spec: ModelSpec,
                 key: jax.Array | None):
        if depth < 1 or patch_size < 1:
            raise ValueError(f"a ViT needs depth >= 1 and patch_size >= 1, got depth={depth}, patch_size={patch_size}")
        if spec.resolution % patch_size:
            raise ValueError(f"resolution {spec.resolution} is not a multiple of the patch size {patch_size}; "
                             "pick a resolution that is")
        keys = split(key, depth + 5)
        self.patch_embed = PatchEmbed(Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, padding=0, bias=True,
                                             key=keys[0]))
        side = spec.resolution // patch_size
        prefix = 2 if distilled else 1
        rng = host_rng(keys[1])
        self.cls_token = _trunc_normal(rng, (1, 1, embed_dim))
        self.dist_token = _trunc_normal(host_rng(keys[2]), (1, 1, embed_dim)) if distilled else None
        self.pos_embed = _trunc_normal(host_rng(keys[3]), (1, prefix + side * side, embed_dim))
        self.blocks = [Block(embed_dim, num_heads, mlp_ratio, key=keys[5 + i]) for i in range(depth)]
        self.norm = LayerNorm(embed_dim)
        hk1, hk2 = split(keys[4], 2)
        self.head = Linear(embed_dim, num_classes, key=hk1, std=INIT_STD)
        self.head_dist = Linear(embed_dim, num_classes, key=hk2, std=INIT_STD) if distilled else None
        self.normalize = Normalize(spec.mean, spec.std)
        self.patch_size = patch_size
        self.grid = (side, side)
        self.spec = spec

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.dist_token is None else 2

    def _positions(self, grid: tuple[int, int]) -> jax.Array:
        p = self.num_prefix_tokens
        pos = self.pos_embed[0]
        return jnp.concatenate([pos[:p], resample_positions(pos[p:], self.grid, grid)])

    def __call__(self, x: jax.Array, state: State, *, train: bool = False,
                 key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array], State]:
        _, hgt, wid = x.shape
        if hgt % self.patch_size or wid % self.patch_size:
            raise ValueError(f"{self.spec.name}: input {hgt}x{wid} is not a multiple of the patch size "
                             f"{self.patch_size}; resize the images to a multiple (the model's default is "
                             f"{self.spec.resolution} px)")
        m = self.patch_embed.proj(self.normalize(x))  # (D, gh, gw)
        d, gh, gw = m.shape
        feats = {"stem": m}
        prefix = [self.cls_token[0]] + ([] if self.dist_token is None else [self.dist_token[0]])
        t = jnp.concatenate([*prefix, m.reshape(d, gh * gw).T]) + self._positions((gh, gw)).astype(m.dtype)
        p = self.num_prefix_tokens
        ends = stage_ends(len(self.blocks))
        for i, block in enumerate(self.blocks):
            t = block(t)
            for q, end in enumerate(ends, 1):
                if end == i + 1:
                    feats[f"stage{q}"] = t[p:].T.reshape(d, gh, gw)
        t = self.norm(t)
        if self.head_dist is None:
            feats["pre_logits"] = t[0]
            return self.head(t[0]), feats, state
        cls_logits, dist_logits = self.head(t[0]), self.head_dist(t[1])
        feats.update(pre_logits=(t[0] + t[1]) / 2, head_cls=cls_logits, head_dist=dist_logits)
        return (cls_logits + dist_logits) / 2, feats, state

    def fold(self, state: State) -> list:
        """The folded ops for export (`patient.models.fold`): the patch convolution (normalisation folded in, it has
        no padding), tokens, blocks as residuals, the final norm, the prefix tokens and one dense head (a distilled
        model's two heads averaged into one, exactly)."""
        ops = F.fold_input(self.normalize, F.fold_conv(self.patch_embed.proj))
        p = self.num_prefix_tokens
        prefix = np.concatenate([np.asarray(self.cls_token[0], np.float32)]
                                + ([] if self.dist_token is None else [np.asarray(self.dist_token[0], np.float32)]))
        ops.append(F.PatchTokens(prefix, np.asarray(self.pos_embed[0], np.float32), self.grid))
        for block in self.blocks:
            ops.extend(block.fold())
        ops += [_fold_norm(self.norm), F.TakeTokens(p), F.Flatten()]  # norm first: on sliced tokens jax2onnx adds Expands
        if self.head_dist is None:
            return ops + [_fold_dense(self.head)]
        w = np.concatenate([np.asarray(self.head.weight, np.float64).T, np.asarray(self.head_dist.weight, np.float64).T])
        b = np.asarray(self.head.bias, np.float64) + np.asarray(self.head_dist.bias, np.float64)
        return ops + [F.Linear((w / 2).astype(np.float32), (b / 2).astype(np.float32))]


def _trunc_normal(rng, shape: tuple) -> jax.Array:
    return jnp.asarray(jnp.clip(rng.standard_normal(shape, dtype=np.float32), -2.0, 2.0) * np.float32(INIT_STD))


def adapt(key: str, value: np.ndarray, shape: tuple) -> np.ndarray | None:
    """Pretrained position embeddings of another grid, resampled to the model's (timm's `checkpoint_filter_fn` does the
    same); the prefix tokens' embeddings are kept. None for anything else."""
    if key != "pos_embed" or value.ndim != 3 or len(shape) != 3 or value.shape[2] != shape[2]:
        return None
    for prefix in (1, 2):
        old, new = value.shape[1] - prefix, shape[1] - prefix
        side, new_side = int(round(old ** 0.5)), int(round(new ** 0.5))
        if old > 0 and new > 0 and side * side == old and new_side * new_side == new:
            grid = resample_positions(value[0, prefix:], (side, side), (new_side, new_side))
            return np.concatenate([value[0, :prefix], np.asarray(grid)])[None]
    return None


register_family(Family("vit", VisionTransformer, mean=IMAGENET_MEAN, std=IMAGENET_STD, head=("head", "head_dist"),
                       adapt=adapt))
_INCEPTION = (0.5, 0.5, 0.5)
for _size, (_dim, _heads) in {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}.items():
    _kw = dict(patch_size=16, embed_dim=_dim, depth=12, num_heads=_heads)
    register_variant(f"vit_{_size}_patch16_224", "vit", 224, f"ViT-{_size[0].upper()}/16 (augreg; inputs in [-1, 1])",
                     mean=_INCEPTION, std=_INCEPTION, **_kw)
    register_variant(f"deit_{_size}_patch16_224", "vit", 224, f"DeiT-{_size[0].upper()}/16", **_kw)
    if _size != "base":
        register_variant(f"deit_{_size}_distilled_patch16_224", "vit", 224,
                         f"DeiT-{_size[0].upper()}/16 distilled (class and distillation tokens, two heads)",
                         distilled=True, **_kw)
