"""The train state, the optimiser, and the one jitted step that distils (or trains) on a device mesh.

The step is `jax.jit` of a `jax.shard_map` over a mesh with one axis, `"data"`: the train state is replicated, the
batch is split along its first axis, and each device runs the teacher forward, the student forward and the backward
pass on its slice. Gradients and metrics are averaged over `"data"` with `lax.pmean`; BatchNorm's batch statistics are
averaged over `"data"` as well (`patient.models.layers.batch_mean`), so they are global-batch statistics. Mixup and
the optimizer update run outside the `shard_map`, on the global batch and the replicated state. The same code runs on
1 CPU, N simulated CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`), a GPU, a TPU slice, or several
hosts after `patient.join_hosts(...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from patient.data.mixing import mixup
from patient.models.layers import MESH_BATCH_AXES
from patient.models.registry import apply

from .config import Config
from .losses import kl_divergence, soft_cross_entropy, teacher_probs
from .methods import METHODS, Term
from .teachers import teacher_logits

if TYPE_CHECKING:
    from .teachers import ModelPair


class TrainState(eqx.Module):
    """Everything that changes during training (and is checkpointed). The teacher is not in it."""

    step: jax.Array  # int32 scalar
    params: object  # (student arrays from eqx.partition of the model, [auxiliary modules])
    model_state: dict  # BatchNorm running statistics
    opt_state: object
    key: jax.Array  # raw uint32 key data (checkpoint-friendly)
    memory: dict | None = None  # CRD's memory banks and normalising constants (patient.engine.crd); None otherwise


def kernel_mask(params: Any) -> Any:
    """True for kernels (ndim >= 2): decoupled weight decay skips biases and norm scales."""
    return jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)


def make_schedule(cfg: Config, total_steps: int) -> optax.Schedule:
    warm = int(cfg.warmup_fraction * total_steps)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warm, max(total_steps, warm + 1), 0.0)
    if warm == 0:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, warm), optax.constant_schedule(cfg.learning_rate)], [warm])


def make_optimizer(cfg: Config, total_steps: int) -> optax.GradientTransformation:
    """Adam / SGD (Nesterov) / Shampoo with warm-up + cosine, global-norm clipping and decoupled decay on kernels."""
    sched = make_schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    if cfg.optimizer == "shampoo":
        from patient.optim import shampoo

        parts.append(shampoo(sched, b1=cfg.b1, b2=cfg.b2, block_size=cfg.shampoo_block_size,
                             precondition_every=cfg.shampoo_precondition_every, graft=cfg.shampoo_graft,
                             weight_decay=cfg.weight_decay, weight_decay_mask=kernel_mask))
        return optax.chain(*parts)
    if cfg.optimizer == "adam":
        parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2))
    else:
        parts.append(optax.trace(decay=cfg.momentum, nesterov=True))
    if cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=kernel_mask))
    parts.append(optax.scale_by_learning_rate(sched))
    return optax.chain(*parts)


DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh, `"data"`, over `devices` (default: every device of every host), built by `jax.make_mesh`.

    The devices are kept in process order (process 0's first): each process then holds one contiguous block of every
    global batch, which is what makes the batch at step k the same examples in the same order on any topology.
    """
    devices = list(jax.devices() if devices is None else devices)
    mesh = jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    owners = [d.process_index for d in mesh.devices.flat]
    if owners != sorted(owners):  # a physical ordering that interleaves hosts: keep the hosts contiguous instead
        mesh = Mesh(np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id))), (DATA_AXIS,),
                    axis_types=(jax.sharding.AxisType.Auto,))
    return mesh


def make_step(cfg: Config, student_static: eqx.Module, optimizer: optax.GradientTransformation, *, mesh: Mesh,
              supervised: bool, use_cache: bool, mix: bool, resolutions: Sequence[int] = (),
              total_steps: int | None = None,
              ) -> Callable[[TrainState, dict[str, Any], list[ModelPair]], tuple[TrainState, dict[str, jax.Array]]]:
    """Build `step(train_state, batch, teachers) -> (train_state, metrics)`, jitted for `mesh`.

    `batch` holds `"student"`, `"teacher"` (omitted with a cache), `"label"` and, for fixed teachers,
    `"teacher_probs"`. `teachers` is a list of `(model, state)` (empty for supervised training or with a cache).
    """
    T = cfg.temperature
    replicated = NamedSharding(mesh, P())

    def loss_fn(params, model_state, batch, targets, t_probs, t_feats, warm, memory):
        student_params, aux = params
        images = batch["student"]
        if cfg.compute_dtype == "bfloat16":  # mixed precision: float32 master weights, bfloat16 forward and backward
            student_params = jax.tree_util.tree_map(
                lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, student_params)
            images = images.astype(jnp.bfloat16)
        model = eqx.combine(student_params, student_static)
        logits, feats, new_state = apply(model, model_state, images, train=True)
        logits = logits.astype(jnp.float32)  # every loss is computed in float32
        metrics, crd_out = {}, None
        if supervised:
            loss = soft_cross_entropy(logits, targets).mean()
            metrics["ce"] = loss
        else:
            kl = kl_divergence(t_probs, logits, T).mean()
            metrics["kl"] = kl
            metrics["agreement"] = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(t_probs, -1))
            term = Term(cfg, logits, feats, t_probs, t_feats, targets, batch["label"], kl, aux, batch, memory, warm,
                        lambda x: _pmean(x, axes))
            loss, extra, crd_out = METHODS[cfg.method](term)
            metrics.update(extra)
            if cfg.label_weight > 0:
                ce = (soft_cross_entropy(logits, targets) * (batch["label"] >= 0)).mean()
                loss = loss + cfg.label_weight * ce
                metrics["ce"] = ce
        metrics["loss"] = loss
        return loss, (new_state, metrics, crd_out)

    # A Keras student (`batched`) normalises with Keras's own BatchNorm, which cannot reduce over a mesh axis: its part
    # of the step stays a plain sharded jit over the global batch (XLA partitions it), so its statistics stay global.
    axes = () if getattr(type(student_static), "batched", False) else (DATA_AXIS,)

    def per_device(params, model_state, batch, targets, teachers, warm, memory):
        """One device's share of the step: its slice of the batch in, gradients and metrics averaged over the mesh's
        data axis out (so every device leaves with the same values, those of the whole global batch)."""
        token = MESH_BATCH_AXES.set(axes)  # BatchNorm statistics over the global batch (read while tracing)
        try:
            t_probs = t_feats = None
            if use_cache:
                t_probs = batch["teacher_probs"]
            elif not supervised:
                t_logits, t_feats = teacher_logits(teachers, batch["teacher"], resolutions, with_features=True)
                t_probs = teacher_probs(t_logits, T)
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (_, (new_state, metrics, crd_out)), grads = grad_fn(params, model_state, batch, targets, t_probs, t_feats,
                                                                 warm, memory)
        finally:
            MESH_BATCH_AXES.reset(token)
        # Where a non-finite loss comes from (images are rendered from uint8, so they are always finite): a broken
        # teacher is reported as such, not as a learning rate to lower.
        if t_probs is not None:
            metrics["finite_teacher"] = jnp.all(jnp.isfinite(t_probs)).astype(jnp.float32)
        grads, metrics = _pmean((grads, metrics), axes)  # equal shards: the mean of the shards' means is global
        if crd_out is not None:  # every device moves its copy of the banks with the whole global batch's embeddings
            from .crd import update_memory

            e_s, e_t, z = crd_out
            e_s, e_t, index = (_gather(x, axes) for x in (e_s, e_t, batch["index"]))
            memory = update_memory(memory, e_s, e_t, index, z, momentum=cfg.crd_momentum)
        return grads, new_state, metrics, memory

    sharded = per_device if not axes else jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS), P(DATA_AXIS), P(), P(), P()),
        out_specs=(P(), P(), P(), P()),
        check_vma=False)

    def step(ts: TrainState, batch, teachers):
        key = jax.random.wrap_key_data(ts.key)
        key, mkey = jax.random.split(key)
        num_classes = student_static.spec.num_classes
        labels = batch["label"]
        onehot = jax.nn.one_hot(jnp.maximum(labels, 0), num_classes) * (labels >= 0)[:, None]
        if supervised and cfg.label_smoothing > 0:
            onehot = onehot * (1 - cfg.label_smoothing) + cfg.label_smoothing / num_classes
        batch = dict(batch)
        if mix:  # on the global batch, before it is split: the partners are those of a one-device run
            if "teacher" in batch:
                batch["student"], batch["teacher"], onehot, lam = mixup(
                    mkey, batch["student"], batch["teacher"], onehot, alpha=cfg.mixup_alpha)
            else:
                batch["student"], onehot, lam = mixup(mkey, batch["student"], onehot, alpha=cfg.mixup_alpha)
        # DKD's loss weight warms up linearly over dkd_warmup_fraction of the run (the paper: 20 of 240 epochs).
        warm_steps = cfg.dkd_warmup_fraction * (total_steps or cfg.steps or 1)
        warm = jnp.minimum(1.0, (ts.step + 1) / warm_steps) if warm_steps > 0 else jnp.float32(1.0)
        if cfg.method == "crd":  # the positive (the example's own row) and the negatives, drawn for the global batch
            from .crd import contrast_indices

            batch["contrast"] = contrast_indices(jax.random.fold_in(mkey, 0xC4D), batch["index"],
                                                 ts.memory["student"].shape[0], cfg.crd_negatives)
        grads, new_state, metrics, memory = sharded(ts.params, ts.model_state, batch, onehot, teachers, warm,
                                                    ts.memory)
        if "finite_teacher" in metrics:  # 1.0 only if every device's teacher output was finite
            metrics["finite_teacher"] = metrics["finite_teacher"] == 1.0
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        new = TrainState(ts.step + 1, params, new_state, opt_state, jax.random.key_data(key), memory)
        return new, metrics

    return jax.jit(step, donate_argnums=(0,), out_shardings=(replicated, replicated))


def _pmean(x: Any, axes: Sequence[str]) -> Any:
    for axis in axes:  # one axis at a time (jax rejects a tuple of axes here)
        x = lax.pmean(x, axis)
    return x


def _gather(x: jax.Array, axes: Sequence[str]) -> jax.Array:
    """The global batch's rows of a per-device array, in mesh order (that of the global batch)."""
    for axis in axes:
        x = lax.all_gather(x, axis, tiled=True)
    return x


def make_eval_fn(student_static: eqx.Module, *, resolutions: Sequence[int] = (),
                 ) -> tuple[Callable[[Any, dict[str, Any], jax.Array], jax.Array],
                            Callable[[Sequence[ModelPair], jax.Array], jax.Array]]:
    """Jitted evaluation forwards: student logits on its view, teacher probabilities (T=1) on the teacher's view."""

    @jax.jit
    def student_logits(params, model_state, images):
        return apply(eqx.combine(params, student_static), model_state, images, train=False)[0]

    @jax.jit
    def teacher_p(teachers, images):
        return teacher_probs(teacher_logits(teachers, images, resolutions), 1.0)

    return student_logits, teacher_p


def init_state(params: Any, model_state: dict[str, Any], optimizer: optax.GradientTransformation, seed: int,
               aux: Sequence[eqx.Module] = (), memory: dict | None = None) -> TrainState:
    """Step 0. `params` are the student's arrays; `aux` the auxiliary modules (regressors, projectors, embeddings)
    trained with it; `memory` CRD's banks (`patient.engine.crd.init_memory`)."""
    params = (params, list(aux))
    return TrainState(jnp.asarray(0, jnp.int32), params, model_state, optimizer.init(params),
                      jax.random.key_data(jax.random.key(seed)), memory)
