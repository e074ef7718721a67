"""The training loop behind `patient.distill` and `patient.train`: data, step, checkpoints, evaluation, history."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from patient._files import write_atomic
from patient.data.views import mode_info
from patient.models.layers import standardise_kernels
from patient.models.registry import apply, spec_of, with_resolution

from .config import Config, ConfigError
from .evaluation import as_source, check_labels, evaluate_on_mesh, put_batch
from .step import init_state, make_eval_fn, make_mesh, make_optimizer, make_step
from .teachers import cast_floating, fixed_teacher_cache, is_writer, resolve_model, run_inputs
from .workdir import Checkpoints, History, check_no_symlinks, check_same_inputs, check_same_run

if TYPE_CHECKING:
    from .teachers import DataLike, ModelLike, TeacherLike


class PeerLostError(RuntimeError):
    """Another process of a multi-host run died or became unreachable; this one cannot go on alone."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class DistillResult:
    """What a run returns: the trained `student` and its `state`, the `history` of logged metrics (one dict per log
    line), the final `metrics` of the evaluation (empty without eval data) and the `workdir` (or None)."""

    student: object
    state: dict
    history: list
    metrics: dict
    workdir: Path | None


def _non_finite(loss: float, first: int, last: int, ok: dict, ckpt) -> NonFiniteLossError:
    """The error for a non-finite loss found at step `last` (the last check was at `first` - 1), naming its cause."""
    where = f"step {last}" if first == last else f"steps {first}-{last}"
    good = ckpt.latest() if ckpt is not None else None
    restart = f"last good checkpoint: {'step ' + str(good) + ' in ' + str(ckpt.dir) if good is not None else 'none'}"
    if not ok.get("finite_teacher", True):
        cause = ("the teacher's predictions are NaN or infinite (its weights, its input or teacher_dtype), not the "
                 "student's training; check the teacher")
    else:
        cause = "lower learning_rate or raise warmup_fraction, then restart"
    return NonFiniteLossError(f"loss is {loss} at {where}; {restart}; {cause}")


def _num_classes(source):
    k = getattr(source, "num_classes", 0) or 0
    return int(k) if k > 0 else None


def _config(config, overrides) -> Config:
    if config is None:
        config = Config()
    elif isinstance(config, (str, Path)):
        from .config import load_config

        config = load_config(config)
    elif not isinstance(config, Config):
        raise TypeError(f"config must be a patient Config, a TOML path or None, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config


def distill(teacher: TeacherLike, student: ModelLike, data: DataLike, *, eval_data: DataLike | None = None,
            config: Config | str | Path | None = None, workdir: str | os.PathLike | None = None,
            devices: Sequence[jax.Device] | None = None, **overrides: Any) -> DistillResult:
    """Distil `teacher` into `student` on `data` with the paper's function matching (by default).

    **Arguments:**

    - `teacher`: a `(model, state)` pair, an `.eqx` path or a registry name; a list of those is an ensemble (the mean
      of their probabilities).
    - `student`: the same kinds (a registry name builds a fresh model with the data's class count).
    - `data`: a `patient.data` source (labels optional: distillation needs none) or `(images, labels)` arrays.
    - `eval_data`: optional labelled source for top-1/top-5, teacher top-1, agreement and KL at the end (and every
      `eval_every` steps).
    - `config`: a `Config`, a TOML path or None (defaults: mode `fm`, T=1, Adam with warm-up + cosine).
    - `workdir`: folder for checkpoints, the resolved config, history and the fixed-teacher cache; a run restarted
      with the same workdir resumes where it stopped. None keeps everything in memory.
    - `devices`: the devices of the `"data"` mesh (default: all of them, on every host).
    - `**overrides`: any `Config` field, e.g. `steps=2000, mode="fix/rs", optimizer="shampoo"`.

    **Returns:** a `DistillResult` (`student`, `state`, `history`, `metrics`, `workdir`).
    """
    cfg = _config(config, overrides)
    if cfg.mode == "supervised":
        raise ConfigError("mode='supervised' is for patient.train; distill needs a teacher mode such as 'fm'")
    return _run_hosts(cfg, teacher=teacher, student=student, data=data, eval_data=eval_data, workdir=workdir,
                      devices=devices)


def train(model: ModelLike, data: DataLike, *, eval_data: DataLike | None = None,
          config: Config | str | Path | None = None, workdir: str | os.PathLike | None = None,
          devices: Sequence[jax.Device] | None = None, **overrides: Any) -> DistillResult:
    """Supervised training (cross-entropy with optional label smoothing; mixup when `mode="fm"`), with the same loop,
    checkpoints and evaluation as `distill`. The augmentation is the student view of `mode` (default `fm`: inception
    crop, flip and mixup). Use it for teachers and for no-distillation baselines."""
    cfg = _config(config, overrides)
    return _run_hosts(cfg, teacher=None, student=model, data=data, eval_data=eval_data, workdir=workdir,
                      devices=devices)


# What XLA / gloo / the coordination service say when another process of the run has gone.
_PEER_SIGNS = ("Gloo", "Connection reset by peer", "Connection refused", "heartbeat timeout", "Barrier failed",
               "task is set to ERROR", "UNAVAILABLE")


def _run_hosts(cfg: Config, **kw) -> DistillResult:
    """`_run`, with the loss of another process of a multi-host run turned into one `PeerLostError`."""
    try:
        return _run(cfg, **kw)
    except Exception as e:
        if jax.process_count() > 1 and type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and any(
                sign in str(e) for sign in _PEER_SIGNS):
            first = str(e).strip().splitlines()[0]
            raise PeerLostError(
                f"process {jax.process_index()} of {jax.process_count()} lost another process of the run "
                f"({first[-160:]}); restart every process with the same command (a workdir run resumes from its "
                "last checkpoint)") from None
        raise


class _Prefetch:
    """The batches of the next `depth` steps, read, prepared and already sent to the mesh, so their transfer overlaps
    the step that runs. Each comes with the data-iterator state just after it: what a checkpoint at that step saves
    (the iterator itself is `depth` batches ahead)."""

    def __init__(self, it, prepare, *, steps: int, depth: int = 2):
        self.it, self.prepare, self.depth, self.left = it, prepare, depth, steps  # never reads past the last step
        self.queue: collections.deque = collections.deque()

    def __next__(self):
        while len(self.queue) < self.depth and self.left > 0:
            self.left -= 1
            self.queue.append((self.prepare(next(self.it)), self.it.get_state()))
        return self.queue.popleft()


def _run(cfg: Config, *, teacher, student, data, eval_data, workdir, devices=None) -> DistillResult:
    supervised = teacher is None
    source = as_source(data)
    eval_source = as_source(eval_data) if eval_data is not None else None
    info = mode_info("same/ic" if cfg.mode == "supervised" else cfg.mode)
    key = jax.random.key(cfg.seed)
    k = _num_classes(source) or (_num_classes(eval_source) if eval_source is not None else None)
    s_model, s_state = resolve_model(student, role="student", num_classes=k, key=jax.random.fold_in(key, 1))
    s_spec = spec_of(s_model)
    if supervised or cfg.method in ("kd", "dkd", "deit") or cfg.label_weight > 0:  # distillation alone never reads labels:
        check_labels(source, s_spec.num_classes, "data", supervised=supervised)  # out-of-domain data is fine
    if eval_source is not None:
        check_labels(eval_source, s_spec.num_classes, "eval_data")
    teachers = []
    if not supervised:
        for i, t in enumerate(teacher if isinstance(teacher, list) else [teacher]):
            tm, ts_ = resolve_model(t, role="teacher", num_classes=s_spec.num_classes, key=jax.random.fold_in(key, 2 + i))
            if spec_of(tm).num_classes != s_spec.num_classes:
                raise ValueError(f"teacher {spec_of(tm).name} predicts {spec_of(tm).num_classes} classes but student "
                                 f"{s_spec.name} predicts {s_spec.num_classes}; build the student with "
                                 f"num_classes={spec_of(tm).num_classes}")
            teachers.append((tm, ts_))
        if cfg.teacher_dtype == "bfloat16":
            teachers = [cast_floating(t, jnp.bfloat16) for t in teachers]
    if supervised and k is None:
        raise ValueError("patient.train needs labelled data (every label is -1)")
    s_res = cfg.student_res or s_spec.resolution
    t_res = cfg.teacher_res or s_res
    mesh = make_mesh(devices)
    n_dev, n_proc = mesh.size, jax.process_count()
    if cfg.batch_size % n_dev:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {n_dev} devices of the mesh; "
                         f"use a multiple of {n_dev}")
    per_host = cfg.batch_size // n_proc
    total = cfg.steps or max(1, math.ceil(cfg.epochs * len(source) / cfg.batch_size))
    optimizer = make_optimizer(cfg, total)
    params, static = eqx.partition(s_model, eqx.is_array)
    workdir = Path(workdir) if workdir is not None else None
    if workdir is not None:
        if workdir.exists() and not workdir.is_dir():
            raise ConfigError(f"workdir {workdir} is a file; give a folder (it is created if missing)")
        if workdir.is_symlink() and not workdir.exists():
            raise ConfigError(f"workdir {workdir} is a symbolic link to nothing; remove it or give another folder")
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create workdir {workdir} ({e.strerror or e}); give a folder you can write") from None
        check_no_symlinks(workdir)
        check_same_run(workdir, cfg)
        inputs = run_inputs((s_model, s_state), teachers, source, s_res)
        check_same_inputs(workdir, inputs)
        if is_writer():  # one writer; every process checks the run it resumes
            write_atomic(workdir / "config.toml", cfg.to_toml())
            write_atomic(workdir / "run.json", json.dumps(inputs, indent=1) + "\n")
    use_cache = info.fixed and not supervised
    cache = None
    if use_cache:
        cache = fixed_teacher_cache(teachers, source, mode=cfg.mode, resolution=t_res,
                                    crops=cfg.fix_crops if info.ensemble else 1, seed=cfg.seed,
                                    temperature=cfg.temperature, batch_size=cfg.eval_batch_size,
                                    channels=cfg.channels, resolutions=cfg.teacher_resolutions, workdir=workdir,
                                    progress=cfg.progress, crop_area=(cfg.crop_area_min, 1.0))
    step_fn = make_step(cfg, static, optimizer, mesh=mesh, supervised=supervised, use_cache=use_cache,
                        mix=info.mixup, resolutions=cfg.teacher_resolutions, total_steps=total)
    replicated = NamedSharding(mesh, P())
    # Frozen from here: BiT's weight-standardised kernels are standardised once, not in every step (the same
    # function; the run's identity and the teacher cache above were taken from the teachers as given).
    teachers = [(standardise_kernels(m), s) for m, s in teachers]
    teachers = jax.device_put(teachers, replicated)  # on the mesh once, not transferred again at every step
    # The step donates its state; copy so the caller's model arrays are never the buffers that get donated.
    aux = _aux_modules(cfg, s_model, s_state, teachers, s_res, t_res, use_cache, key)
    memory = None
    if cfg.method == "crd":  # one bank row per training example (the pipeline's example index picks it)
        from .crd import init_memory

        memory = init_memory(len(source), cfg.crd_feat_dim, cfg.seed)
    ts = init_state(params, s_state, optimizer, cfg.seed, aux, memory)
    ts = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), ts)
    ts = jax.device_put(ts, replicated)

    from patient.data.pipelines import pipeline, watch_workers

    ds = pipeline(source, mode=info.name, student_res=s_res, teacher_res=t_res, batch_size=per_host, seed=cfg.seed,
                  num_workers=cfg.num_workers, shard=(jax.process_index(), n_proc), channels=cfg.channels,
                  crop_area=(cfg.crop_area_min, 1.0))
    it = watch_workers(iter(ds), cfg.num_workers)
    ckpt = Checkpoints(workdir, cfg) if workdir is not None else None
    if ckpt is not None and ckpt.latest() is not None:
        ts, data_state = ckpt.restore(ts)
        ts = jax.device_put(ts, replicated)
        it.set_state(data_state)
    start = int(ts.step)
    history = History(workdir)
    history.start(start)
    student_eval, teacher_eval = make_eval_fn(static, resolutions=cfg.teacher_resolutions)
    bar = _progress(total, start, cfg.progress, "distill" if not supervised else "train")
    t0, metrics = time.perf_counter(), {}
    window_t, window_n = t0, 0  # throughput over the last log window (excludes compilation after the first)
    ok, checked, loss = None, start, float("nan")
    try:
        def prepare(raw):
            batch = {"student": raw["student"], "label": raw["label"].astype(np.int32)}
            if use_cache:
                batch["teacher_probs"] = cache[np.asarray(raw["index"])]
            elif not supervised:
                batch["teacher"] = raw["teacher"]
            if cfg.method == "crd":
                batch["index"] = raw["index"].astype(np.int32)
            return put_batch(mesh, batch)

        feed = _Prefetch(it, prepare, steps=total - start, depth=2)
        for step in range(start, total):
            batch, data_state = next(feed)
            ts, m = step_fn(ts, batch, teachers)
            # The host reads the loss only at log and checkpoint steps, so it never waits for the device in between
            # (it prepares the next batch while the step runs); the finiteness flags are folded on device meanwhile.
            flags = {k_: m.pop(k_) for k_ in ("finite_teacher",) if k_ in m}
            ok = flags if ok is None else {k_: ok[k_] & v for k_, v in flags.items()}
            done = step + 1
            checkpointing = ckpt is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0
            if done % cfg.log_every == 0 or done == total or checkpointing:
                loss = float(m["loss"])
                if not math.isfinite(loss):
                    raise _non_finite(loss, checked + 1, done, {k_: bool(v) for k_, v in ok.items()}, ckpt)
                checked, ok = done, None
            window_n += cfg.batch_size
            if done % cfg.log_every == 0 or done == total:
                now = time.perf_counter()
                rate = window_n / (now - window_t)
                window_t, window_n = now, 0
                row = {"step": done, **{k_: float(v) for k_, v in m.items()}, "images_per_s": rate}
                history.append(row)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}")
            bar.update(1)
            paused = time.perf_counter()  # evaluation and checkpoint time stay out of images_per_s
            if eval_source is not None and cfg.eval_every and done % cfg.eval_every == 0 and done != total:
                ev = evaluate_on_mesh(cfg, mesh, ts, student_eval, teacher_eval, teachers, eval_source, s_res, t_res)
                history.append({"step": done, **{f"eval_{k_}": v for k_, v in ev.items()}})
            if checkpointing:
                ckpt.save(done, ts, data_state)
            window_t += time.perf_counter() - paused
        if ckpt is not None and ckpt.latest() != total:
            ckpt.save(total, ts, data_state if total > start else it.get_state())
    except BaseException:
        history.close()
        raise
    finally:
        bar.close()
        if hasattr(it, "close"):
            it.close()
        if ckpt is not None:
            ckpt.close()
    if eval_source is not None:
        metrics = evaluate_on_mesh(cfg, mesh, ts, student_eval, teacher_eval, teachers, eval_source, s_res, t_res)
        history.append({"step": total, **{f"eval_{k_}": v for k_, v in metrics.items()}})
        if cfg.progress:
            print(_summary(metrics, total, time.perf_counter() - t0, supervised))
    history.close()
    model = eqx.combine(jax.device_get(ts.params[0]), static)  # auxiliary modules stay behind: never exported
    model = with_resolution(model, s_res)  # files written from it default to the size it was trained at
    return DistillResult(model, jax.device_get(ts.model_state), history.rows, metrics, workdir)


def _aux_modules(cfg, s_model, s_state, teachers, s_res, t_res, use_cache, key) -> list:
    """Check the feature method's stage pairs against both networks (before compiling anything) and build the
    auxiliary modules it trains: FitNets regressors or the SRD projector."""
    from . import feature_losses as fl

    def shapes(model, state, res):
        x = jax.ShapeDtypeStruct((2, cfg.channels, res, res), jnp.float32)
        return jax.eval_shape(lambda m, s, x: apply(m, s, x, train=False)[1], model, state, x)

    if cfg.method == "deit":
        if not {"head_cls", "head_dist"} <= set(shapes(s_model, s_state, s_res)):
            raise ConfigError(f"method='deit' needs a student with a distillation token and head "
                              f"(deit_tiny_distilled_patch16_224, deit_small_distilled_patch16_224); "
                              f"{spec_of(s_model).name} has none")
    if cfg.method == "kl" or cfg.method in fl.LOGIT_METHODS:
        return []
    from .methods import pair_names

    if use_cache:
        raise ConfigError(f"method={cfg.method!r} needs the teacher's features at every step, but mode={cfg.mode!r} "
                          "caches the teacher's predictions; use ind/*, same/* or fm")
    if not teachers:
        raise ConfigError(f"method={cfg.method!r} needs a teacher")

    t_model, t_state = teachers[0]
    sizes = fl.check_feature_shapes(shapes(s_model, s_state, s_res), shapes(t_model, t_state, t_res),
                                    pair_names(cfg), cfg.method)
    if cfg.method == "crd":  # one embedding head per side, both trained
        from .crd import Embed

        return [Embed(d, cfg.crd_feat_dim, key=jax.random.fold_in(key, 100 + n)) for n, d in enumerate(sizes[0])]
    cls = fl.HintRegressor if cfg.method == "fitnets" else fl.Projector
    return [cls(i, o, key=jax.random.fold_in(key, 100 + n)) for n, (i, o) in enumerate(sizes)]


def _summary(m: dict, steps: int, seconds: float, supervised: bool) -> str:
    rows = [("steps", f"{steps}"), ("wall time", f"{seconds:.1f} s")]
    for k, label in [("top1", "student top-1 %"), ("top5", "student top-5 %"), ("teacher_top1", "teacher top-1 %"),
                     ("agreement", "agreement %"), ("kl", "KL(teacher||student)")]:
        if k in m:
            rows.append((label, f"{m[k]:.2f}" if k != "kl" else f"{m[k]:.4f}"))
    w = max(len(r[0]) for r in rows)
    title = "training summary" if supervised else "distillation summary"
    return "\n".join([title, "-" * (w + 12)] + [f"{a:<{w}}  {b:>9}" for a, b in rows])


def _progress(total, start, enabled, desc):
    import sys

    from tqdm.auto import tqdm

    # In a log file (no terminal) redraw rarely, so CI output stays readable.
    return tqdm(total=total, initial=start, desc=desc, disable=not enabled, dynamic_ncols=True, unit="step",
                mininterval=0.1 if sys.stderr.isatty() else 10.0)
