"""The distillation methods as one table: `METHODS[name](term) -> (loss, metrics, carry)`.

Every entry receives the step's `Term` (the student's logits and features, the teacher's probabilities and features,
the targets, the KL already computed) and returns the whole distillation loss, the metrics it adds, and what the
step must carry out of the gradient computation (CRD's embeddings and normalising constants, else None). The loss
definitions themselves, with their references and reference tests, are in `feature_losses.py` (and `crd.py`);
the train step (`step.py`) adds the optional label term and does everything else. Adding a method is one entry here,
one loss function there, and its reference test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from . import feature_losses as fl
from .losses import soft_cross_entropy

Config = Any  # a patient.engine.config.Config; config.py checks method names against METHODS, so no import back

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Term:
    """What a method sees at one step (on one device: its slice of the batch)."""

    cfg: Config
    logits: Array  # f32[B, K], the student's
    feats: Mapping[str, Array]  # the student's named features
    t_probs: Array  # f32[B, K], the teacher's (ensemble's) probabilities at cfg.temperature
    t_feats: Mapping[str, Array] | None  # the teacher's named features (None with a fixed-teacher cache)
    targets: Array  # f32[B, K], label distributions (mixed under mixup; all-zero rows when unlabelled)
    labels: Array  # int[B], -1 = unlabelled
    kl: Array  # f32[], KL(teacher || student) at cfg.temperature, times T^2, averaged over the batch
    aux: Sequence[Any]  # the method's trained auxiliary modules (regressors, projector, embeddings)
    batch: Mapping[str, Array]  # the batch slice (CRD reads "contrast")
    memory: Any  # CRD's banks (train state), else None
    warm: Array  # DKD's loss-weight warm-up factor in [0, 1]
    mean: Callable[[Array], Array]  # average a per-device mean over the mesh (identity on one device)


def pair_names(cfg: Config) -> list[tuple[str, str]]:
    """The configured (student_name, teacher_name) feature pairs; CRD defaults to `pre_logits`."""
    pairs = cfg.method_pairs or (("pre_logits",) if cfg.method == "crd" else ())
    return [tuple(p.split(":", 1)) if ":" in p else (p, p) for p in pairs]


def _labelled_ce(t: Term) -> Array:
    return (soft_cross_entropy(t.logits, t.targets) * (t.labels >= 0)).mean()


def _kl(t: Term):
    return t.kl, {}, None


def _kd(t: Term):  # Hinton et al.: alpha * CE(labels) + (1 - alpha) * T^2 KL (soft CE: the labels may be mixed)
    ce = _labelled_ce(t)
    return t.cfg.kd_alpha * ce + (1 - t.cfg.kd_alpha) * t.kl, {"ce": ce}, None


def _dkd(t: Term):  # Zhao et al.: target = the label, or the teacher's top class when unlabelled
    target = jnp.where(t.labels >= 0, t.labels, jnp.argmax(t.t_probs, -1))
    dkd = fl.dkd_loss(t.logits, t.t_probs, target, alpha=t.cfg.dkd_alpha, beta=t.cfg.dkd_beta,
                      temperature=t.cfg.temperature)
    return t.kl + t.cfg.method_weight * t.warm * dkd, {"dkd": dkd}, None


def _deit(t: Term):  # Touvron et al.: labels on the class head, the teacher on the distillation head; no KL
    loss = fl.deit_loss(t.feats["head_cls"], t.feats["head_dist"], t.targets, t.t_probs, kind=t.cfg.deit_kind,
                        alpha=t.cfg.deit_alpha, temperature=t.cfg.temperature)
    return loss, {"deit": loss}, None


def _crd(t: Term):  # Tian et al.: NCE against the memory banks; the step updates the banks with the carry
    from .crd import crd_loss

    a, b = pair_names(t.cfg)[0]
    e_s, e_t = t.aux[0](t.feats[a]), t.aux[1](lax.stop_gradient(t.t_feats[b]))
    crd, z = crd_loss(e_s, e_t, t.memory, t.batch["contrast"], temperature=t.cfg.crd_temperature, mean=t.mean)
    return t.kl + t.cfg.method_weight * crd, {"crd": crd}, (lax.stop_gradient(e_s), lax.stop_gradient(e_t), z)


def _feature(loss_of_pair: Callable[[Term, int, Array, Array], Array]):
    """A feature method: KL + method_weight * the sum of its loss over the configured pairs."""

    def term(t: Term):
        total = sum(loss_of_pair(t, i, t.feats[a], t.t_feats[b]) for i, (a, b) in enumerate(pair_names(t.cfg)))
        return t.kl + t.cfg.method_weight * total, {t.cfg.method: total}, None

    return term


def _fsp(t: Term):  # pairs of stages taken from both networks
    names = pair_names(t.cfg)
    loss = fl.fsp_loss([(t.feats[a], t.feats[b]) for a, b in names], [(t.t_feats[a], t.t_feats[b]) for a, b in names])
    return t.kl + t.cfg.method_weight * loss, {"fsp": loss}, None


METHODS: dict[str, Callable[[Term], tuple[Array, dict[str, Array], Any]]] = {
    "kl": _kl,
    "kd": _kd,
    "dkd": _dkd,
    "deit": _deit,
    "fitnets": _feature(lambda t, i, s, f: fl.fitnets_loss(t.aux[i], s, f)),
    "at": _feature(lambda t, i, s, f: fl.at_loss(s, f)),
    "nst": _feature(lambda t, i, s, f: fl.nst_loss(s, f)),
    "fsp": _fsp,
    "srd": _feature(lambda t, i, s, f: fl.srd_loss(t.aux[i], s, f)),
    "crd": _crd,
}
