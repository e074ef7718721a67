"""A run's working directory: the resolved config, checkpoints (Orbax), the history and TensorBoard events.

    workdir/config.toml         the run's config; a rerun with another config is refused (`check_same_run`)
    workdir/checkpoints/<step>  train state by tree path + the Grain iterator state, last `keep_checkpoints` kept
    workdir/history.jsonl       one JSON row per log / evaluation step
    workdir/tensorboard/        scalar events (tensorboardX); a resumed run purges the steps it replays

Process 0 alone writes the config, history and events (`teachers.is_writer`); every process restores checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from patient._files import deferred_interrupts, write_atomic

from .config import Config, ConfigError
from .step import TrainState
from .teachers import is_writer

# Keys a rerun may change and still resume the same run: the length of the run (cosine then ends later) and how it is
# observed or read (Grain's per-index randomness makes the batches independent of the worker count).
RESUMABLE_KEYS = ("steps", "epochs", "log_every", "eval_every", "eval_batch_size", "checkpoint_every",
                  "keep_checkpoints", "progress", "num_workers")


def _has_checkpoints(workdir: Path) -> bool:
    ckpts = workdir / "checkpoints"
    return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())


def check_same_inputs(workdir: Path, inputs: dict) -> None:
    """A resumed run must continue with the same student, teachers and data (`teachers.run_inputs`), recorded in
    `run.json`; with another model, teacher or data set the old weights would come back under the new names."""
    path = workdir / "run.json"
    if not path.is_file() or not _has_checkpoints(workdir):
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise ConfigError(f"workdir {workdir} holds a run whose run.json cannot be read; use a new workdir or delete "
                          f"{workdir} to start over") from None
    names = {"student_sha": "student", "teachers_sha": "teachers", "data_sha": "data"}
    differ = []
    for key, name in names.items():
        if old.get(key) != inputs[key]:
            was, now = old.get(name), inputs.get(name)
            if was is not None and was != now:  # the readable description differs: show both
                differ.append(f"{name} ({was} -> {now})")
            elif name == "data":
                differ.append(f"{name} (other examples or labels)")
            else:
                differ.append(f"{name} (other weights)")
    if differ:
        raise ConfigError(f"workdir {workdir} holds a run with other inputs: {', '.join(differ)}; resume with the same "
                          f"models and data, or use a new workdir, or delete {workdir} to start over")


def check_same_run(workdir: Path, cfg: Config) -> None:
    """A workdir with checkpoints belongs to one run: resuming it with another config would silently return the old
    run's weights under the new config's name. Refuse, naming the keys that differ, before any work."""
    from .config import load_config

    old_path = workdir / "config.toml"
    if not old_path.is_file() or not _has_checkpoints(workdir):
        return
    try:
        old = load_config(old_path)
    except ConfigError as e:
        raise ConfigError(f"workdir {workdir} holds a run whose config.toml cannot be read ({e}); use a new workdir "
                          f"or delete {workdir} to start over") from None
    differ = [f"{f.name} ({getattr(old, f.name)!r} -> {getattr(cfg, f.name)!r})" for f in dataclasses.fields(cfg)
              if f.name not in RESUMABLE_KEYS and getattr(old, f.name) != getattr(cfg, f.name)]
    if differ:
        raise ConfigError(f"workdir {workdir} holds a run with another config: {', '.join(differ)}; resume with the "
                          f"same config (only {', '.join(RESUMABLE_KEYS)} may change), or use a new workdir, or "
                          f"delete {workdir} to start over")


# What a run writes in its workdir. None of it may be a symbolic link: a link planted there (or left by a copy) would
# send the run's writes to wherever it points.
WRITTEN = ("config.toml", "run.json", "history.jsonl", "checkpoints", "tensorboard", "teacher_cache-*.npy")


def check_no_symlinks(workdir: Path) -> None:
    """Refuse, before any work, a workdir whose files or folders that the run writes are symbolic links (the
    workdir itself may be one: that is where the user chose to put the run)."""
    links = sorted({p.name for pattern in WRITTEN for p in workdir.glob(pattern) if p.is_symlink()})
    if links:
        raise ConfigError(f"workdir {workdir} has symbolic links where the run writes ({', '.join(links)}); a run "
                          f"never writes through links: remove them or use a new workdir")


def _append_no_follow(path: Path, text: str) -> None:
    """Append to `path`, refusing (OSError ELOOP) to open it through a symbolic link."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "a") as f:
        f.write(text)


class History:
    """`history.jsonl` and the TensorBoard events of a run (in memory only when there is no workdir).

    `start(step)` reads the rows up to `step` (a resumed run replays the steps after its checkpoint, so later rows
    are dropped from the file) and opens the event writer with `purge_step=step + 1`, so TensorBoard discards the
    replayed steps' old events instead of showing each step twice."""

    def __init__(self, workdir: Path | None):
        self.workdir = workdir
        self.rows: list[dict] = []
        self._tb = None
        self._write = workdir is not None and is_writer()

    def start(self, step: int) -> None:
        path = None if self.workdir is None else self.workdir / "history.jsonl"
        if path is not None and path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.rows = [r for r in rows if r["step"] <= step]
            if self._write:  # one writer: every process reads, process 0 alone rewrites
                write_atomic(path, "".join(json.dumps(r) + "\n" for r in self.rows))
        if self._write:
            from tensorboardX import SummaryWriter

            # tensorboardX names the file by the second and the host; the suffix keeps a quick resume from replacing it.
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=step + 1 if step else None,
                                     flush_secs=10, filename_suffix=f".{os.getpid()}.{time.time_ns()}")

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if not self._write:
            return
        _append_no_follow(self.workdir / "history.jsonl", json.dumps(row) + "\n")
        if self._tb is not None:
            for tag, value in row.items():
                if tag != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(tag, value, row["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Checkpoints:
    """Orbax checkpoints of the train state (by tree path) and the Grain iterator state, atomic, last K kept."""

    def __init__(self, workdir: Path, cfg: Config):
        import orbax.checkpoint as ocp

        self.dir = (workdir / "checkpoints").absolute()
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True))

    @staticmethod
    def _flat(ts):
        return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(ts)[0]}

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, ts: TrainState, data_state: dict | bytes) -> None:
        ocp = self._ocp
        state = {"data": data_state if isinstance(data_state, dict) else {"bytes": data_state.decode("latin1")}}
        with deferred_interrupts():  # Ctrl-C lands after the checkpoint, not inside it
            self.manager.save(step, args=ocp.args.Composite(
                train=ocp.args.StandardSave(self._flat(jax.device_get(ts))), data=ocp.args.JsonSave(state)))
            self.manager.wait_until_finished()

    def restore(self, ts: TrainState) -> tuple[TrainState, dict | bytes]:
        ocp = self._ocp
        step = self.manager.latest_step()
        target = self._flat(jax.device_get(ts))
        out = self.manager.restore(step, args=ocp.args.Composite(
            train=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        flat, treedef = jax.tree_util.tree_flatten_with_path(ts)
        leaves = [np.asarray(out["train"][jax.tree_util.keystr(p)]) for p, _ in flat]
        data = out["data"]["data"]
        if isinstance(data, dict) and set(data) == {"bytes"}:
            data = data["bytes"].encode("latin1")
        return jax.tree_util.tree_unflatten(treedef, leaves), data

    def close(self) -> None:
        self.manager.close()
