"""Distillation losses beside plain KL: Hinton KD, Decoupled KD, DeiT's distillation-token loss, FitNets, Attention
Transfer, NST, FSP and the SRD projector loss (CRD, which keeps memory banks in the train state, is in `crd.py`; the
step reaches every method through the table in `methods.py`).

Every loss is a pure function of batched features f32[B, ...] (channels first, as `patient.models.apply` returns
them) and returns a scalar. Teacher inputs pass through `jax.lax.stop_gradient` inside each loss, so gradients reach
only the student's features and the auxiliary modules (`HintRegressor`, `Projector`), whatever the caller does.

The auxiliary modules act on the whole batch (not one example, unlike `patient.models.layers`): they live beside the
loss, are trained and checkpointed with the student, and are never exported. `check_feature_shapes` is run once at
start-up (on `jax.eval_shape` results) so an unusable stage pairing is one clear error, not a crash inside jit.

Spatial resizing (`resize_hw`), used wherever two maps of different H, W meet: an integer-factor reduction is an exact
average pooling; anything else (enlarging, or a non-integer factor) is `jax.image.resize(..., "linear")`, i.e. bilinear
with half-pixel centres (PyTorch's `align_corners=False`, edge values repeated), antialiased when reducing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from patient.models.layers import host_rng

from .losses import cross_entropy, kl_divergence

Array = jax.Array
METHODS = ("kd", "dkd", "deit", "fitnets", "at", "nst", "fsp", "srd", "crd")  # crd: patient.engine.crd
LOGIT_METHODS = ("kd", "dkd", "deit")  # need logits only: no stage pairs, no auxiliary modules
_EPS = 1e-12  # floor on a norm: an all-zero (dead ReLU) channel or map normalises to zeros with finite gradients


def _f32(x) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def _teacher(x) -> Array:
    return jax.lax.stop_gradient(_f32(x))


def _l2_normalise(x: Array, axis: int = -1) -> Array:
    """x / max(||x||, eps) along `axis`; the max is taken before the sqrt so a zero vector has a finite gradient."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _EPS**2))


def resize_hw(f: Array, hw: tuple[int, int]) -> Array:
    """Resize the last two (spatial) axes of `f` to `hw`.

    Exact average pooling when each side shrinks by an integer factor (32x32 -> 16x16), otherwise bilinear
    (`jax.image.resize`, method "linear", antialiased when shrinking). Returns `f` itself when the size already matches.

    **Arguments:** `f`: f32[..., H, W]; `hw`: the target (h, w).
    **Returns:** f32[..., h, w].
    """
    H, W = f.shape[-2:]
    h, w = int(hw[0]), int(hw[1])
    if (H, W) == (h, w):
        return f
    if H % h == 0 and W % w == 0:
        x = f.reshape(*f.shape[:-2], h, H // h, w, W // w)
        return x.mean(axis=(-3, -1))
    return jax.image.resize(f, (*f.shape[:-2], h, w), method="linear")


# ----------------------------------------------------------------------------------------------------- Hinton KD


def hinton_kd(student_logits: Array, teacher_logits: Array, labels: Array, *, alpha: float,
              temperature: float) -> Array:
    """Hinton et al. (2015): `alpha * CE(labels) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))`.

    Both terms are per-example and averaged over the whole batch; an unlabelled example (label -1) contributes zero CE
    but still counts in the mean (as the engine's label term does).

    **Arguments:** `student_logits`, `teacher_logits`: f32[B, K]; `labels`: int[B] (-1 = unlabelled).
    **Returns:** f32[] scalar.
    """
    p_t = jax.nn.softmax(_teacher(teacher_logits) / temperature, axis=-1)
    kl = kl_divergence(p_t, student_logits, temperature)  # already scaled by T^2
    ce = cross_entropy(student_logits, labels)
    return jnp.mean(alpha * ce + (1.0 - alpha) * kl)


def dkd_loss(student_logits: Array, teacher_probs: Array, target: Array, *, alpha: float, beta: float,
             temperature: float) -> Array:
    """Decoupled KD (Zhao et al., CVPR 2022): `T^2 * (alpha * TCKD + beta * NCKD)`, averaged over the batch.

    With `p` the class probabilities at temperature T and `g` the target class: TCKD is the KL divergence between the
    teacher's and the student's binary distributions `[p_g, 1 - p_g]`; NCKD the KL divergence between their
    distributions over the non-target classes (`p_i / (1 - p_g)`, i != g). Classical KD decomposes as
    `KL(p_t || p_s) = TCKD + (1 - p_t,g) * NCKD`; DKD weighs the two parts freely (the paper: alpha 1, beta 8 on
    CIFAR-100, with T = 4 and the loss weight warmed up linearly over its first 20 of 240 epochs).

    **Arguments:** `student_logits`: f32[B, K]; `teacher_probs`: f32[B, K] at the same temperature (an ensemble's
    mean is fine); `target`: int[B], the class g per example (the label, or the teacher's top class when unlabelled).
    **Returns:** f32[] scalar.
    """
    p_t = _teacher(teacher_probs)
    z = _f32(student_logits) / temperature
    g = jax.nn.one_hot(target, z.shape[-1], dtype=bool)
    log_ps = jax.nn.log_softmax(z, axis=-1)
    pt_g = jnp.sum(jnp.where(g, p_t, 0.0), -1)
    log_ps_g = jnp.sum(jnp.where(g, log_ps, 0.0), -1)
    log_ps_rest = jnp.log1p(-jnp.exp(jnp.minimum(log_ps_g, -1e-7)))  # log(1 - p_s,g), stable near p_s,g = 1

    def xlogy_ratio(p, log_q):  # p * (log p - log q) with 0 log 0 = 0
        return jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0)

    tckd = xlogy_ratio(pt_g, log_ps_g) + xlogy_ratio(1.0 - pt_g, log_ps_rest)
    pt_hat = jnp.where(g, 0.0, p_t) / jnp.maximum(1.0 - pt_g, 1e-12)[:, None]
    log_ps_hat = jax.nn.log_softmax(jnp.where(g, -jnp.inf, z), axis=-1)
    nckd = jnp.sum(jnp.where(g, 0.0, xlogy_ratio(pt_hat, jnp.where(g, 0.0, log_ps_hat))), -1)
    return jnp.mean(alpha * tckd + beta * nckd) * temperature ** 2


# ---------------------------------------------------------------------------------------------------------- DeiT


def deit_loss(cls_logits: Array, dist_logits: Array, targets: Array, teacher_probs: Array, *, kind: str,
              alpha: float, temperature: float) -> Array:
    """DeiT's distillation through a distillation token (Touvron et al., ICML 2021, section 4): the class head learns
    the labels, the distillation head the teacher, `(1 - alpha) * CE(cls, labels) + alpha * distillation`.

    - `kind="hard"`: distillation = CE(dist, argmax of the teacher), alpha 1/2 in the paper (the two terms halved).
    - `kind="soft"`: distillation = `T^2 * KL(teacher || softmax(dist / T))` per example (the paper's equation; its
      code divides the summed KL by batch x classes instead, a K times smaller weight).

    Averaged over the batch; an unlabelled example (all-zero target row) contributes no label term but still counts.

    **Arguments:** `cls_logits`, `dist_logits`: f32[B, K], the two heads of a distilled student; `targets`: f32[B, K]
    label distributions (one-hot, mixed under mixup); `teacher_probs`: f32[B, K] at `temperature` (an ensemble's mean
    is fine). **Returns:** f32[] scalar.
    """
    ce = -jnp.sum(targets * jax.nn.log_softmax(_f32(cls_logits), axis=-1), axis=-1)
    p_t = _teacher(teacher_probs)
    z = _f32(dist_logits)
    if kind == "hard":
        hard = jax.nn.one_hot(jnp.argmax(p_t, axis=-1), z.shape[-1])
        dist = -jnp.sum(hard * jax.nn.log_softmax(z, axis=-1), axis=-1)
    elif kind == "soft":
        log_q = jax.nn.log_softmax(z / temperature, axis=-1)
        dist = jnp.sum(jnp.where(p_t > 0, p_t * (jnp.log(jnp.where(p_t > 0, p_t, 1.0)) - log_q), 0.0), axis=-1)
        dist = dist * temperature ** 2
    else:
        raise ValueError(f"deit kind must be 'hard' or 'soft', got {kind!r}")
    return jnp.mean((1.0 - alpha) * ce + alpha * dist)


# ------------------------------------------------------------------------------------------------------- FitNets


def torch_linear_init(in_features: int, out_features: int, key: Array | None) -> tuple[Array, Array]:
    """PyTorch's `Linear` / 1x1 `Conv2d` initialisation: weight f32[out, in], then bias f32[out], both uniform in
    +-1/sqrt(in), drawn in that order from `host_rng(key)`."""
    rng = host_rng(key)
    bound = 1.0 / math.sqrt(in_features)
    weight = rng.uniform(-bound, bound, (out_features, in_features)).astype(np.float32)
    return jnp.asarray(weight), jnp.asarray(rng.uniform(-bound, bound, (out_features,)).astype(np.float32))


class HintRegressor(eqx.Module):
    """FitNets' regressor: a learned 1x1 convolution (with bias) from the student's channels to the teacher's.

    `weight` is the OIHW kernel of a 1x1 conv without its trailing 1x1 axes. Initialised like PyTorch's `Conv2d`
    (uniform in +-1/sqrt(C_s) for weight and bias). Acts on a batch, f32[B, C_s, H, W] -> f32[B, C_t, H, W].
    """

    weight: Array  # (C_t, C_s)
    bias: Array  # (C_t,)

    def __init__(self, in_channels: int, out_channels: int, *, key: Array | None):
        self.weight, self.bias = torch_linear_init(in_channels, out_channels, key)

    def __call__(self, f: Array) -> Array:
        return jnp.einsum("oc,bchw->bohw", self.weight, _f32(f)) + self.bias[None, :, None, None]


def fitnets_loss(regressor: HintRegressor, f_s: Array, f_t: Array) -> Array:
    """FitNets hint loss (Romero et al. 2015): mean squared error between `regressor(f_s)` and `f_t`.

    The paper's `1/2 * ||u_h - r(v_g)||^2` summed per example becomes a mean over every element (B * C_t * H * W),
    so the weight does not depend on the stage's size. When resolutions differ the STUDENT is resized to the teacher's
    H, W (`resize_hw`) before the regressor; the teacher map is never altered.

    **Arguments:** `f_s`: f32[B, C_s, H_s, W_s]; `f_t`: f32[B, C_t, H_t, W_t].
    **Returns:** f32[] scalar.
    """
    f_t = _teacher(f_t)
    pred = regressor(resize_hw(_f32(f_s), f_t.shape[-2:]))
    return jnp.mean(jnp.square(pred - f_t))


# -------------------------------------------------------------------------------------------- Attention Transfer


def _attention_raw(f: Array, p: float) -> Array:
    return jnp.sum(jnp.abs(_f32(f)) ** p, axis=1)  # [B, H, W]


def attention_map(f: Array, p: float = 2) -> Array:
    """Spatial attention map of Zagoruyko & Komodakis (2017): `sum_c |f_c|^p`, flattened, L2-normalised per example.

    **Arguments:** `f`: f32[B, C, H, W].
    **Returns:** f32[B, H * W], each row of unit L2 norm (zero for an all-zero map).
    """
    a = _attention_raw(f, p)
    return _l2_normalise(a.reshape(a.shape[0], -1))


def at_loss(f_s: Array, f_t: Array, p: float = 2) -> Array:
    """Attention Transfer: `mean_b || a_s(b) - a_t(b) ||_2^2` over unit-norm attention maps.

    Constant: the squared L2 distance summed over positions, averaged over the batch, no 1/2 (the paper's beta/2 is
    the config weight). It equals the authors' code `(a_s - a_t).pow(2).mean()` times H*W, and lies in [0, 2].
    Channel counts may differ. When resolutions differ both un-normalised maps `sum_c |f|^p` are resized to the smaller
    H and the smaller W (`resize_hw`), then normalised. Invariant to scaling either feature map by a positive
    constant (per example), to permuting or sign-flipping its channels.

    **Arguments:** `f_s`: f32[B, C_s, H_s, W_s]; `f_t`: f32[B, C_t, H_t, W_t].
    **Returns:** f32[] scalar.
    """
    a_s, a_t = _attention_raw(f_s, p), _attention_raw(_teacher(f_t), p)
    hw = (min(a_s.shape[-2], a_t.shape[-2]), min(a_s.shape[-1], a_t.shape[-1]))
    a_s, a_t = resize_hw(a_s, hw), resize_hw(a_t, hw)
    a_s = _l2_normalise(a_s.reshape(a_s.shape[0], -1))
    a_t = _l2_normalise(a_t.reshape(a_t.shape[0], -1))
    return jnp.mean(jnp.sum(jnp.square(a_s - a_t), axis=-1))


# ---------------------------------------------------------------------------------------------------------- NST


def nst_loss(f_s: Array, f_t: Array) -> Array:
    """Neuron Selectivity Transfer (Huang & Wang 2017): squared MMD with the polynomial kernel `k(x, y) = (x . y)^2`
    (d = 2, c = 0) between the channels of student and teacher, each channel's H*W activations L2-normalised.

    Per example, with s_i (i < C_s) and t_j (j < C_t) the normalised channels:
    `mean_{i,i'} k(s_i, s_i') + mean_{j,j'} k(t_j, t_j') - 2 mean_{i,j} k(s_i, t_j)`; averaged over the batch. The
    paper's lambda/2 is the config weight. Exactly 0 for identical inputs, > 0 otherwise (the kernel is positive
    definite; rounding can leave a value of order 1e-8 either side of 0 for nearly identical inputs). Channel counts
    may differ; when resolutions differ the STUDENT is resized to the teacher's H, W (`resize_hw`).

    **Arguments:** `f_s`: f32[B, C_s, H_s, W_s]; `f_t`: f32[B, C_t, H_t, W_t].
    **Returns:** f32[] scalar.
    """
    f_t = _teacher(f_t)
    f_s = resize_hw(_f32(f_s), f_t.shape[-2:])
    s = _l2_normalise(f_s.reshape(*f_s.shape[:2], -1))
    t = _l2_normalise(f_t.reshape(*f_t.shape[:2], -1))

    def kmean(x, y):
        return jnp.mean(jnp.square(jnp.einsum("bin,bjn->bij", x, y)), axis=(1, 2))

    return jnp.mean(kmean(s, s) + kmean(t, t) - 2.0 * kmean(s, t))


# ---------------------------------------------------------------------------------------------------------- FSP


def fsp_matrix(f1: Array, f2: Array) -> Array:
    """Flow of solution procedure (Yim et al. 2017): `G[i, j] = sum_n f1[i, n] f2[j, n] / (H * W)` over positions n.

    When resolutions differ `f1` is resized to `f2`'s H, W (`resize_hw`: average pooling for an integer factor, so
    an earlier, larger stage is pooled onto the later one). Dividing by H*W makes G invariant to repeating every
    position (nearest-neighbour upsampling of both maps) and to permuting positions jointly in both maps.

    **Arguments:** `f1`: f32[B, C1, H1, W1]; `f2`: f32[B, C2, H, W].
    **Returns:** f32[B, C1, C2].
    """
    f1 = resize_hw(_f32(f1), f2.shape[-2:])
    f2 = _f32(f2)
    b, n = f2.shape[0], f2.shape[-2] * f2.shape[-1]
    return jnp.einsum("bin,bjn->bij", f1.reshape(b, f1.shape[1], n), f2.reshape(b, f2.shape[1], n)) / n


def fsp_loss(pairs_s: Sequence[tuple[Array, Array]], pairs_t: Sequence[tuple[Array, Array]]) -> Array:
    """FSP loss: mean over pairs of `mean((G_s - G_t)^2)` over (B, C1, C2).

    The paper sums squared differences over matrix entries with equal weights per pair; we average over entries so
    pairs of different widths weigh the same. Channel counts must agree between student and teacher in each pair.

    **Arguments:** `pairs_s`: [(f1_s, f2_s), ...] student features; `pairs_t`: the teacher's at the same stages.
    **Returns:** f32[] scalar.
    """
    if len(pairs_s) != len(pairs_t) or not pairs_s:
        raise ValueError(f"fsp_loss: {len(pairs_s)} student pairs vs {len(pairs_t)} teacher pairs; need the same, > 0")
    total = 0.0
    for k, ((s1, s2), (t1, t2)) in enumerate(zip(pairs_s, pairs_t)):
        g_s, g_t = fsp_matrix(s1, s2), fsp_matrix(_teacher(t1), _teacher(t2))
        if g_s.shape != g_t.shape:
            raise ValueError(f"fsp_loss: pair {k} gives student flow {g_s.shape} but teacher flow {g_t.shape}; "
                             "FSP needs equal channel counts at both stages")
        total = total + jnp.mean(jnp.square(g_s - g_t))
    return total / len(pairs_s)


# ---------------------------------------------------------------------------------------------------------- SRD


class Projector(eqx.Module):
    """SRD's linear projector from the student's `pre_logits` width to the teacher's, acting on a batch
    f32[B, D_s] -> f32[B, D_t]. No bias: the batch normalisation in `srd_loss` subtracts the batch mean, which cancels
    any bias exactly (it would get zero gradient). Initialised like PyTorch's `Linear` weight (uniform +-1/sqrt(D_s)).
    """

    weight: Array  # (D_t, D_s)

    def __init__(self, in_features: int, out_features: int, *, key: Array | None):
        self.weight = torch_linear_init(in_features, out_features, key)[0]

    def __call__(self, x: Array) -> Array:
        return jnp.einsum("od,bd->bo", self.weight, _f32(x))


SRD_BN_EPS = 1e-4


def _batch_norm(x: Array) -> Array:
    """BatchNorm without affine on the current batch: per feature, biased batch variance, eps = 1e-4."""
    mean = jnp.mean(x, axis=0, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=0, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + SRD_BN_EPS)


def srd_loss(projector: Projector, f_s: Array, f_t: Array) -> Array:
    """Projector loss of Miles & Mikolajczyk (AAAI 2024): `2 * log(sum_{b,d} |bn(P f_s) - bn(f_t)|^4)`.

    `bn` is BatchNorm without affine parameters, eps 1e-4, normalising each feature with the current batch's mean and
    biased variance (PyTorch `BatchNorm1d(affine=False, eps=1e-4)` in training mode). The log is of the SUM over batch
    and feature dims, as in the authors' code (roymiles/Simple-Recipe-Distillation, `OurDistillationLoss`); a mean
    would only shift the value by 2*log(B*D_t), not the gradients. Needs B >= 2 (with B = 1 both sides normalise to
    zeros and the loss is -inf). The paper adds it to a KL term at T = 1; that is the caller's job.

    **Arguments:** `f_s`: f32[B, D_s] student pre_logits; `f_t`: f32[B, D_t] teacher pre_logits.
    **Returns:** f32[] scalar.
    """
    z_s = _batch_norm(projector(f_s))
    z_t = _batch_norm(_teacher(f_t))
    return 2.0 * jnp.log(jnp.sum(jnp.square(jnp.square(z_s - z_t))))


# ------------------------------------------------------------------------------------------------ shape checking


def _shape(x) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(x)


def check_feature_shapes(student_feats_shapes: Mapping, teacher_feats_shapes: Mapping, pairs: Sequence,
                         method: str) -> list[tuple[int, int]]:
    """Validate a method's stage pairing before anything is compiled; raise one ValueError listing every problem.

    **Arguments:**

    - `student_feats_shapes`, `teacher_feats_shapes`: `{name: shape}` including the batch axis (tuples, or the
      `ShapeDtypeStruct`s of `jax.eval_shape` over `patient.models.apply`).
    - `pairs`: for "fitnets", "at", "nst", "srd", "crd" a list of `(student_name, teacher_name)` (a bare name means the same
      name on both sides); for "fsp" a list of `(first_name, second_name)` stages, taken from both networks.
    - `method`: one of `METHODS`.

    **Returns:** the `(in, out)` sizes of the auxiliary modules to build, one per pair: `HintRegressor(C_s, C_t)` for
    "fitnets", `Projector(D_s, D_t)` for "srd", the two `crd.Embed` input widths (D_s, D_t) for "crd"; `[]` for
    the others.
    """
    if method not in METHODS:
        raise ValueError(f"unknown distillation method {method!r}; choose one of {', '.join(METHODS)}")
    if method in LOGIT_METHODS:
        return []
    S = {k: _shape(v) for k, v in student_feats_shapes.items()}
    T = {k: _shape(v) for k, v in teacher_feats_shapes.items()}
    problems, aux = [], []
    if not pairs:
        problems.append("no stage pairs are configured")
    if method == "crd" and len(pairs or ()) > 1:
        problems.append(f"crd takes one feature pair (it keeps one memory bank per side), got {len(pairs)}")
    want = 2 if method in ("srd", "crd") else 4
    kind = "f32[B, D] (e.g. 'pre_logits')" if want == 2 else "f32[B, C, H, W] (e.g. 'stage2')"

    def get(side, table, name):
        if name not in table:
            problems.append(f"{side} has no feature {name!r} (it has: {', '.join(sorted(table))})")
            return None
        if len(table[name]) != want:
            problems.append(f"{method}: {side} feature {name!r} has shape {table[name]}; {method} needs {kind}")
            return None
        return table[name]

    for pair in pairs or ():
        a, b = (pair, pair) if isinstance(pair, str) else tuple(pair)
        if method == "fsp":
            s1, s2 = get("student", S, a), get("student", S, b)
            t1, t2 = get("teacher", T, a), get("teacher", T, b)
            if None in (s1, s2, t1, t2):
                continue
            if (s1[1], s2[1]) != (t1[1], t2[1]):
                problems.append(f"fsp: pair ({a!r}, {b!r}) gives a student flow matrix {s1[1]}x{s2[1]} "
                                f"(shapes {s1}, {s2}) but a teacher one {t1[1]}x{t2[1]} (shapes {t1}, {t2}); "
                                "FSP needs equal channel counts")
            continue
        s, t = get("student", S, a), get("teacher", T, b)
        if s is None or t is None:
            continue
        if s[0] != t[0]:
            problems.append(f"{method}: batch sizes differ, student {a!r} {s} vs teacher {b!r} {t}")
        if method in ("fitnets", "srd", "crd"):
            aux.append((s[1], t[1]))
    if problems:
        raise ValueError(f"{method} distillation cannot run with pairs {list(pairs or ())}: " + "; ".join(problems))
    return aux
