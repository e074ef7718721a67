"""Run configuration: one frozen dataclass, readable from TOML, checked field by field.

    [distill]                    # or top-level keys
    mode = "fm"
    steps = 2000
    optimizer = "adam"

Unknown keys, wrong types and out-of-range values are one clear `ConfigError` each. The resolved config (every field,
defaults filled in) is written to `<workdir>/config.toml` so a run can be reproduced from its folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from pathlib import Path
from typing import Any

from patient.data.views import MODES


class ConfigError(ValueError):
    """A configuration that cannot run (unknown key, wrong type, bad value)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that shapes a distillation (or supervised) run. Defaults follow the paper's function matching at
    CPU scale: mode `fm`, KL at temperature 1, Adam with linear warm-up and cosine decay."""

    # what the teacher sees
    mode: str = "fm"
    temperature: float = 1.0
    student_res: int = 0  # 0: the student's spec resolution
    teacher_res: int = 0  # 0: same as student_res
    teacher_resolutions: tuple = ()  # one teacher at several resolutions: mean of their probabilities
    teacher_dtype: str = "float32"  # or "bfloat16"
    # "bfloat16": the student's forward and backward run in bfloat16; its weights, the optimizer state, BatchNorm
    # statistics and the loss stay float32 (mixed precision)
    compute_dtype: str = "float32"
    fix_crops: int = 8  # K inception crops averaged by fix/ic_ens
    crop_area_min: float = 0.05  # inception crops cover (crop_area_min, 1] of the image (the paper: 0.05)
    mixup_alpha: float = 1.0
    label_weight: float = 0.0  # weight of cross-entropy on labels added to the KL
    label_smoothing: float = 0.0  # supervised training (patient.train)
    # what is matched: "kl" (logits; function matching), "kd" (alpha * CE + (1 - alpha) * T^2 KL), or a method added
    # to the KL: "dkd" (logits), "fitnets", "at", "nst", "fsp", "srd", "crd" (features; see
    # patient.engine.feature_losses and patient.engine.crd);
    # "deit" (a distilled DeiT student: labels on its class head, the teacher on its distillation head; replaces the KL)
    method: str = "kl"
    method_weight: float = 1.0
    method_pairs: tuple = ()  # feature names; "student_name:teacher_name" when they differ; fsp: "first:second"
    kd_alpha: float = 0.5
    dkd_alpha: float = 1.0  # DKD: weight of the target-class part (TCKD)
    dkd_beta: float = 8.0  # DKD: weight of the non-target part (NCKD)
    dkd_warmup_fraction: float = 20 / 240  # DKD's loss weight rises linearly over this fraction of the steps
    crd_feat_dim: int = 128  # CRD: embedding width
    crd_negatives: int = 16384  # CRD: negatives per example, drawn uniformly from the whole dataset
    crd_temperature: float = 0.07  # CRD: temperature of the scores
    crd_momentum: float = 0.5  # CRD: the memory banks keep this much of a row at each update
    deit_kind: str = "hard"  # DeiT: "hard" (CE on the teacher's top class) or "soft" (T^2 KL at `temperature`)
    deit_alpha: float = 0.5  # DeiT: weight of the distillation head's term; the class head's is 1 - deit_alpha
    # how long
    batch_size: int = 64
    steps: int = 0  # 0: derived from epochs
    epochs: float = 20.0
    # optimiser
    optimizer: str = "adam"  # "adam" | "sgd" | "shampoo"
    learning_rate: float = 3e-3
    warmup_fraction: float = 0.05
    schedule: str = "cosine"  # "cosine" | "constant"
    weight_decay: float = 0.0  # decoupled, on kernels (ndim >= 2) only
    b1: float = 0.9
    b2: float = 0.999
    momentum: float = 0.9  # sgd
    grad_clip: float = 1.0  # global norm; 0 disables
    shampoo_block_size: int = 128
    shampoo_precondition_every: int = 10
    shampoo_graft: str = "rmsprop_normalized"
    # bookkeeping
    seed: int = 0
    num_workers: int = 0
    channels: int = 3
    eval_every: int = 0  # steps; 0: evaluate at the end only
    eval_batch_size: int = 256
    checkpoint_every: int = 200  # steps (needs a workdir)
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True

    def __post_init__(self):
        _check(self)

    def replace(self, **changes: Any) -> Config:
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; known keys: {', '.join(FIELDS)}")
        return dataclasses.replace(self, **{k: _coerce(k, v) for k, v in changes.items()})

    def to_toml(self) -> str:
        lines = ["# resolved patient config (every field, defaults filled in)", "[distill]"]
        for f in dataclasses.fields(self):
            lines.append(f"{f.name} = {_toml_value(getattr(self, f.name))}")
        return "\n".join(lines) + "\n"


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _coerce(key: str, value: Any):
    want = _TYPES[key]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is tuple and isinstance(value, list):
        value = tuple(value)
    ok = isinstance(value, want) and not (want in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"config key {key!r} must be {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check(c: Config) -> None:
    for k in FIELDS:
        _coerce(k, getattr(c, k))

    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    bad = [k for k in FIELDS if isinstance(getattr(c, k), float) and not math.isfinite(getattr(c, k))]
    need(not bad, f"{', '.join(f'{k}={getattr(c, k)}' for k in bad)}: config values must be finite numbers")
    need(c.mode in MODES or c.mode == "supervised", f"mode={c.mode!r} is not a teacher mode; use one of {', '.join(MODES)}")
    from .methods import METHODS

    need(c.method in METHODS, f"method={c.method!r}; use one of {', '.join(METHODS)}")
    need(c.crd_feat_dim > 0 and c.crd_negatives > 0 and c.crd_temperature > 0 and 0 <= c.crd_momentum < 1,
         f"crd_feat_dim={c.crd_feat_dim}, crd_negatives={c.crd_negatives}, crd_temperature={c.crd_temperature}, "
         f"crd_momentum={c.crd_momentum}: use sizes > 0, a temperature > 0 and a momentum in [0, 1)")
    need(c.deit_kind in ("hard", "soft") and 0 <= c.deit_alpha <= 1,
         f"deit_kind={c.deit_kind!r}, deit_alpha={c.deit_alpha}: use hard or soft, and an alpha in [0, 1]")
    need(c.dkd_alpha >= 0 and c.dkd_beta >= 0 and 0 <= c.dkd_warmup_fraction <= 1,
         "dkd_alpha and dkd_beta must be >= 0 and dkd_warmup_fraction in [0, 1]")
    need(all(isinstance(p, str) for p in c.method_pairs), f"method_pairs={c.method_pairs!r} must be strings")
    need(0 <= c.kd_alpha <= 1 and c.method_weight >= 0, "kd_alpha must be in [0, 1] and method_weight >= 0")
    need(c.temperature > 0, f"temperature={c.temperature} must be > 0")
    need(c.batch_size > 0, f"batch_size={c.batch_size} must be > 0")
    need(c.steps >= 0 and c.epochs >= 0 and (c.steps > 0 or c.epochs > 0), "set steps > 0 or epochs > 0")
    need(c.optimizer in ("adam", "sgd", "shampoo"), f"optimizer={c.optimizer!r}; use 'adam', 'sgd' or 'shampoo'")
    need(c.schedule in ("cosine", "constant"), f"schedule={c.schedule!r}; use 'cosine' or 'constant'")
    need(c.learning_rate > 0, f"learning_rate={c.learning_rate} must be > 0")
    need(0 <= c.warmup_fraction < 1, f"warmup_fraction={c.warmup_fraction} must be in [0, 1)")
    need(c.teacher_dtype in ("float32", "bfloat16"), f"teacher_dtype={c.teacher_dtype!r}; use 'float32' or 'bfloat16'")
    need(c.compute_dtype in ("float32", "bfloat16"), f"compute_dtype={c.compute_dtype!r}; use 'float32' or 'bfloat16'")
    need(c.student_res >= 0 and c.teacher_res >= 0, "resolutions must be >= 0 (0 = from the model's spec)")
    need(all(isinstance(r, int) and r > 0 for r in c.teacher_resolutions),
         f"teacher_resolutions={c.teacher_resolutions!r} must be positive integers")
    need(c.fix_crops > 0, f"fix_crops={c.fix_crops} must be > 0")
    need(0 < c.crop_area_min <= 1, f"crop_area_min={c.crop_area_min} must be in (0, 1]")
    need(c.mixup_alpha > 0, f"mixup_alpha={c.mixup_alpha} must be > 0")
    need(c.label_weight >= 0 and 0 <= c.label_smoothing < 1, "label_weight must be >= 0 and label_smoothing in [0, 1)")
    need(c.checkpoint_every >= 0 and c.keep_checkpoints > 0, "checkpoint_every >= 0 and keep_checkpoints > 0")
    need(c.log_every > 0 and c.eval_every >= 0 and c.eval_batch_size > 0, "log_every and eval_batch_size must be > 0")
    need(c.channels in (1, 3), f"channels={c.channels} must be 1 or 3")
    need(c.seed >= 0 and c.num_workers >= 0, "seed and num_workers must be >= 0")
    need(c.weight_decay >= 0, f"weight_decay={c.weight_decay} must be >= 0 (0 disables it)")
    need(c.grad_clip >= 0, f"grad_clip={c.grad_clip} must be >= 0 (0 disables clipping)")
    need(0 <= c.b1 < 1 and 0 <= c.b2 < 1 and 0 <= c.momentum < 1, "b1, b2 and momentum must be in [0, 1)")
    need(c.shampoo_block_size > 0 and c.shampoo_precondition_every > 0,
         "shampoo_block_size and shampoo_precondition_every must be > 0")
    # Bounds that keep memory and time sane: a typo here should be an error, not an out-of-memory or a year-long run.
    need(c.student_res <= 4096 and c.teacher_res <= 4096 and all(r <= 4096 for r in c.teacher_resolutions),
         "resolutions must be at most 4096 px")
    need(c.batch_size <= 1 << 20 and c.eval_batch_size <= 1 << 20, "batch sizes must be at most 1048576")
    need(c.steps <= 10 ** 9 and c.epochs <= 10 ** 6, "steps must be at most 1e9 and epochs at most 1e6")
    need(c.fix_crops <= 1024 and c.num_workers <= 256, "fix_crops must be at most 1024 and num_workers at most 256")


def load_config(path: str | os.PathLike, **overrides: Any) -> Config:
    """Read a TOML file (keys at top level or under `[distill]`), apply `overrides`, and check everything."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give the TOML config file inside it")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; a config is TOML (key = value lines)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    table = raw.get("distill", raw) if isinstance(raw.get("distill"), dict) else raw
    extra = sorted(set(raw) - {"distill"}) if table is not raw else []
    if extra:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(extra)}; put settings under [distill]")
    try:
        return Config().replace(**{**table, **overrides})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_set(items: list[str]) -> dict:
    """`--set key=value` pairs -> typed overrides (values parsed as TOML, bare words as strings)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        k = k.strip()
        if k not in FIELDS:
            raise ConfigError(f"--set {k}: unknown config key; known keys: {', '.join(FIELDS)}")
        try:
            out[k] = tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError:
            out[k] = v  # a bare word such as fm or adam
    return out
