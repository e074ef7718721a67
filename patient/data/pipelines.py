"""Grain pipelines: distillation batches (two views per image), evaluation batches, and fixed-teacher views.

The distillation pipeline, per host:

    source -> attach source index -> shuffle(seed) -> repeat(epochs)            (reshuffled every epoch)
           -> random_map(draw student/teacher ViewParams)                       (Grain's per-index RNG, global index)
           -> slice [shard_index::shard_count]                                  (per-host sharding)
           -> map(render both views) -> batch                                   (all MapDataset: batch i is fixed)
           -> to_iter_dataset (threads) -> mp_prefetch(num_workers)             (optional processes)

Why this order:

- `random_map` comes after `repeat`, so an example gets new crops every epoch (its RNG index grows with the epoch).
- `random_map` comes *before* the per-host slice, so its RNG index is the global position in the stream: hosts get
  distinct crops, and the (example, crop) pairs of a run do not depend on the number of hosts. (Placing it after the
  slice would hand every host the same crop sequence, because each host's local indices restart at 0.)
- Batching happens on the `MapDataset`, so batch `i` is a pure function of `(seed, i)`; `mp_prefetch` hands whole
  batches to workers round-robin, and the batches are identical for any number of workers (0, 1, 2, ...).
- The iterator's `get_state()` / `set_state()` checkpoint the position; restoring replays exactly.

Close iterators when done (`it.close()`, or `contextlib.closing(iter(ds))`): with workers, batches live in shared
memory that is released when the worker processes shut down and the arrays are garbage collected. Workers are
spawned (not forked), so a script that uses `num_workers > 0` needs the usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import ast
import multiprocessing
import os
import sys
import threading
import time
from typing import Any

import grain
import numpy as np

from patient.data import views as _views

__all__ = ["LoaderError", "eval_pipeline", "fixed_teacher_views", "pipeline", "watch_workers"]


def _check_res(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
        return int(value), int(value)
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ValueError(f"{name}={value!r} must be a positive int or a (height, width) pair of positive ints")


def _check_positive_int(name: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


def _check_source(source: Any, fn: str) -> int:
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise ValueError(f"{fn}: source {source!r} is not random-access; pass a patient.data source (e.g. arrays(...))")
    n = len(source)
    if n == 0:
        raise ValueError(f"{fn}: the source {getattr(source, 'name', source)!r} is empty")
    return n


def _check_area(area: Any) -> tuple[float, float]:
    ok = isinstance(area, (tuple, list)) and len(area) == 2 and all(isinstance(a, (int, float)) for a in area)
    if not ok or not 0 < area[0] <= area[1] <= 1:
        raise ValueError(f"crop_area={area!r} must be (min, max) with 0 < min <= max <= 1, e.g. (0.05, 1.0)")
    return (float(area[0]), float(area[1]))


def _check_channels(channels: Any) -> int:
    if channels not in (1, 3):
        raise ValueError(f"channels={channels!r} must be 1 or 3")
    return int(channels)


def _read_options(in_worker: bool = False) -> grain.ReadOptions:
    # Each element here is a whole batch, so a small buffer is plenty (and bounds memory: a batch of 64 views at
    # 224 + 128 px is 50 MB of float32). Pillow releases the GIL while decoding and resampling, so a few threads
    # overlap well even in one process.
    threads = max(1, min(4, os.cpu_count() or 1))
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads if in_worker else 2 * threads)


def _mark_absl_flags_parsed() -> None:
    # grain 0.2.18's mp_prefetch reads absl flags; outside an absl app they are unparsed and reading them raises
    # UnparsedFlagAccessError. Marking them parsed keeps every flag at its default.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _derive_seed(seed: int, salt: int) -> int:
    # Independent 32-bit seeds for shuffle and random_map from one user seed.
    return int(np.random.SeedSequence((seed, salt)).generate_state(1)[0])


# ------------------------------------------------------------------------------------------------- element transforms
# Module-level classes (not closures) so pipelines pickle cleanly into worker processes.


class _AttachIndex(grain.transforms.MapWithIndex):
    def __init__(self, size: int):
        self.size = size

    def map_with_index(self, index: int, element: dict[str, Any]) -> dict[str, Any]:
        # Downstream of repeat, Grain passes indices past the end (epoch * size + i) straight through; the
        # source itself wraps them, so fold them back to the position in the source.
        return {"image": element["image"], "label": element["label"], "index": index % self.size}


class _DrawViews(grain.transforms.RandomMap):
    def __init__(self, mode: str, seed: int, area: tuple[float, float]):
        self.mode, self.seed, self.area = mode, seed, area

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        height, width = element["image"].shape[:2]
        student, teacher = _views.draw_views(self.mode, rng, height, width, index=element["index"], seed=self.seed,
                                             area=self.area)
        return {**element, "student_view": student, "teacher_view": teacher}


class _RenderPair(grain.transforms.Map):
    def __init__(self, student_res: tuple[int, int], teacher_res: tuple[int, int], channels: int):
        self.student_res, self.teacher_res, self.channels = student_res, teacher_res, channels

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        pil = _views._as_pil(element["image"])  # one PIL image, two renders
        return {
            "student": _views.render(pil, element["student_view"], self.student_res, self.channels),
            "teacher": _views.render(pil, element["teacher_view"], self.teacher_res, self.channels),
            "label": np.int32(element["label"]),
            "index": np.int64(element["index"]),
        }


def _host_share(total: int, block: int, index: int, count: int) -> int:
    """How many of `total` stream elements process `index` of `count` reads, in runs of `block` (see `_HostBlocks`)."""
    full, rest = divmod(total, block * count)
    return full * block + min(block, max(0, rest - index * block))


class _HostBlocks(grain.MapDataset):
    """Process `index` of `count`: from every `count * block` consecutive elements of the global stream, the
    `index`-th run of `block`. With `block` the per-process batch size, the processes' batches k, concatenated in
    process order, are exactly the one-process batch k (same examples, same order), whatever `count` is."""

    def __init__(self, parent: grain.MapDataset, block: int, index: int, count: int):
        super().__init__(parent)
        self._block, self._index, self._count = block, index, count
        self._length = _host_share(len(parent), block, index, count)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        group, j = divmod(i, self._block)
        return self._parent[(group * self._count + self._index) * self._block + j]

    def __str__(self) -> str:
        return f"HostBlocks(block={self._block}, index={self._index}, count={self._count})"


class _PaddedEval(grain.transforms.Map):
    """Index -> rendered example, or a masked zero example past the end (`index` -1, `label` -1)."""

    def __init__(self, source: Any, indices: np.ndarray, render_fn: Any, shape: tuple[int, ...], key: str):
        self.source, self.indices, self.render_fn, self.shape, self.key = source, indices, render_fn, shape, key

    def map(self, i: int) -> dict[str, Any]:
        if i >= len(self.indices):
            return {self.key: np.zeros(self.shape, np.float32), "label": np.int32(-1), "index": np.int64(-1),
                    "mask": np.bool_(False)}  # fmt: skip
        index = int(self.indices[i])
        ex = self.source[index]
        return {self.key: self.render_fn(ex["image"], index), "label": np.int32(ex["label"]), "index": np.int64(index),
                "mask": np.bool_(True)}  # fmt: skip


class _RenderPlain:
    def __init__(self, resolution: tuple[int, int], channels: int):
        self.resolution, self.channels = resolution, channels

    def __call__(self, image: np.ndarray, index: int) -> np.ndarray:
        return _views.render(image, _views.plain_resize(), self.resolution, self.channels)


class _RenderFixedTeacher:
    def __init__(self, mode: str, resolution: tuple[int, int], channels: int, crops: int, seed: int,
                 area: tuple[float, float]):
        self.mode, self.resolution, self.channels, self.crops, self.seed = mode, resolution, channels, crops, seed
        self.area = area

    def __call__(self, image: np.ndarray, index: int) -> np.ndarray:
        if self.mode == "fix/ic_ens":
            params = _views.fixed_teacher_crops(self.seed, index, image.shape[0], image.shape[1], self.crops,
                                                self.area)
        else:  # The same deterministic views that `pipeline` renders as "teacher" for these modes.
            params = [_views.plain_resize() if self.mode == "fix/rs" else _views.center_crop()]
        pil = _views._as_pil(image)
        return np.stack([_views.render(pil, p, self.resolution, self.channels) for p in params])


class LoaderError(RuntimeError):
    """The input pipeline cannot deliver batches (a worker process died, or workers cannot start)."""


def _is_main_test(test: ast.expr) -> bool:
    """`__name__ == "__main__"` (either order)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(a, ast.Name) and a.id == "__name__" for a in sides) and any(
        isinstance(a, ast.Constant) and a.value == "__main__" for a in sides)


def _unguarded_script() -> str | None:
    """The path of the `__main__` script when this call comes from its top-level code outside an
    `if __name__ == "__main__":` block (spawned workers re-run that code, start workers of their own and die);
    None otherwise (guarded, interactive, `python -c`, a test runner, a worker process)."""
    if multiprocessing.parent_process() is not None:
        return None
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path or not str(path).endswith(".py") or not os.path.isfile(path):
        return None
    frame = sys._getframe()
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__"
                                     and frame.f_code.co_filename == path):
        frame = frame.f_back
    if frame is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    line = frame.f_lineno
    guarded = any(isinstance(n, ast.If) and _is_main_test(n.test) and n.lineno <= line <= (n.end_lineno or n.lineno)
                  for n in ast.walk(tree))
    return None if guarded else str(path)


def _check_workers_can_start(num_workers: int) -> None:
    script = _unguarded_script() if num_workers > 0 else None
    if script is not None:
        raise LoaderError(f"num_workers={num_workers} starts worker processes that re-run {script}; put the code that "
                          f"calls patient under `if __name__ == \"__main__\":` or use num_workers=0")


def _quiet_worker(index: int, count: int) -> None:
    """Loader workers ignore Ctrl-C (it reaches the whole process group): the parent stops them, so the user sees
    one line instead of a traceback per worker."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class watch_workers:
    """Wrap a pipeline iterator so that a dead loader worker ends the run with `LoaderError` instead of a wait that
    never ends: each batch is awaited in a helper thread while this thread checks, every `poll` seconds, that the
    worker processes started for it are alive. With `num_workers == 0` it is the iterator itself, unchanged.
    `get_state`, `set_state` and `close` pass through (call them between batches, as the trainer does)."""

    def __new__(cls, it, num_workers: int, *, poll: float = 1.0, start_timeout: float = 60.0):
        if num_workers == 0:
            return it
        self = super().__new__(cls)
        self._it, self._poll, self._start_timeout = it, poll, start_timeout
        self._seen: dict[int, multiprocessing.process.BaseProcess] = {}
        return self

    def __iter__(self):
        return self

    def __getattr__(self, name):
        return getattr(self._it, name)

    def __next__(self):
        box: dict[str, Any] = {}

        def fetch():
            try:
                box["value"] = next(self._it)
            except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
                box["error"] = e

        t = threading.Thread(target=fetch, name="patient-batch", daemon=True)
        t0 = time.monotonic()
        t.start()
        while True:
            t.join(self._poll)
            if not t.is_alive():
                err = box.get("error")
                if isinstance(err, RuntimeError) and "Worker process was terminated" in str(err):
                    # Grain noticed the death first: the same one line as when the watch does
                    raise LoaderError(self._died(str(err).splitlines()[0].rstrip("."))) from None
                if err is not None:
                    raise err
                return box["value"]
            self._check(time.monotonic() - t0)

    @staticmethod
    def _died(what: str) -> str:
        return (f"a data loader worker process died ({what}); a worker that is killed (out of memory?) or fails at "
                "start cannot deliver batches; lower num_workers or batch_size, or use num_workers=0 to load in this "
                "process")

    def _check(self, waited: float) -> None:
        for proc in multiprocessing.active_children():
            self._seen.setdefault(proc.pid, proc)
        dead = [p for p in self._seen.values() if p.exitcode not in (None, 0)]
        if dead:
            raise LoaderError(self._died(", ".join(f"pid {p.pid} exit code {p.exitcode}" for p in dead)))
        if waited > self._start_timeout and not any(p.is_alive() for p in self._seen.values()):
            raise LoaderError(f"no data loader worker process is running and no batch arrived in {waited:.0f} s; "
                              "use num_workers=0 to load in this process")


# ------------------------------------------------------------------------------------------------- public pipelines


def pipeline(
    source: Any,
    *,
    mode: str,
    student_res: int | tuple[int, int],
    teacher_res: int | tuple[int, int] | None = None,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    shard: tuple[int, int] = (0, 1),
    epochs: int | None = None,
    channels: int = 3,
    drop_remainder: bool = True,
    crop_area: tuple[float, float] = _views.INCEPTION_AREA,
) -> grain.IterDataset:
    """The distillation input pipeline: two views of every image under a teacher `mode`.

    **Arguments:**

    - `source`: a random-access source (`digits()`, `fashion_mnist(...)`, `image_folder(...)`, `arrays(...)`, ...).
    - `mode`: teacher mode, one of `patient.data.MODES` (`fix/rs`, `fix/cc`, `fix/ic_ens`, `ind/rc`, `ind/ic`,
      `same/rc`, `same/ic`, `fm`). For `fm` the pipeline yields `same/ic` views; mixup is applied on device in the
      train step with `patient.data.mixup`. For `fix/*` the `"teacher"` view is fixed per example (plain resize,
      centre crop, or crop 0 of `fixed_teacher_views(..., seed=seed)` for `fix/ic_ens`).
    - `student_res`, `teacher_res`: output sizes (int or (height, width)); `teacher_res=None` means `student_res`.
    - `batch_size`: examples per batch on this host.
    - `seed`: drives shuffling and every crop and flip; the same seed gives the same batches.
    - `num_workers`: 0 renders in threads of this process; N > 0 adds N worker processes (`mp_prefetch`).
    - `shard`: `(index, count)` of this host; hosts see disjoint examples and distinct crops. Host `index` reads the
      `index`-th block of `batch_size` examples of every global batch of `count * batch_size`, so the hosts' batches
      concatenated in host order are the batches of one host with `count * batch_size` (views and order included).
    - `epochs`: `None` repeats forever; every epoch is reshuffled and re-cropped.
    - `channels`: 3 (grayscale repeated) or 1 (RGB converted to luma).
    - `drop_remainder`: drop the final partial batch (only matters when `epochs` is finite).
    - `crop_area`: relative area range of inception crops (the paper's (0.05, 1.0); raise the minimum for tiny
      images such as 8x8 digits).

    **Returns:** a Grain `IterDataset`; `iter(ds)` yields `{"student": f32[B, C, Hs, Ws], "teacher": f32[B, C, Ht, Wt],
    "label": i32[B] (-1 unlabelled), "index": i64[B] (position in source)}` with pixels in [0, 1], and the iterator
    has `get_state()` / `set_state()` for checkpointing. Close it when done.
    """
    n = _check_source(source, "pipeline")
    _views.mode_info(mode)
    s_res = _check_res("student_res", student_res)
    t_res = s_res if teacher_res is None else _check_res("teacher_res", teacher_res)
    batch_size = _check_positive_int("batch_size", batch_size)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    if not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise ValueError(f"num_workers={num_workers!r} must be an integer >= 0 (0 = no worker processes)")
    _check_workers_can_start(int(num_workers))
    if (
        not isinstance(shard, (tuple, list))
        or len(shard) != 2
        or not all(isinstance(v, (int, np.integer)) for v in shard)
        or not 0 <= shard[0] < shard[1]
    ):
        raise ValueError(
            f"shard={shard!r} must be (index, count) with 0 <= index < count, "
            "e.g. (jax.process_index(), jax.process_count())"
        )
    if epochs is not None:
        epochs = _check_positive_int("epochs", epochs)
        per_shard = _host_share(n * epochs, batch_size, shard[0], shard[1])
        if drop_remainder and per_shard < batch_size:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {per_shard} examples this shard sees in {epochs} epoch(s); "
                "lower batch_size, raise epochs, or pass drop_remainder=False"
            )
    channels = _check_channels(channels)
    crop_area = _check_area(crop_area)

    ds = grain.MapDataset.source(source).map_with_index(_AttachIndex(n))
    ds = ds.shuffle(seed=_derive_seed(seed, 1)).repeat(epochs)  # repeat reseeds the shuffle every epoch
    ds = ds.random_map(_DrawViews(mode, seed, crop_area), seed=_derive_seed(seed, 2))
    if shard[1] > 1:
        ds = _HostBlocks(ds, batch_size, shard[0], shard[1])
    ds = ds.map(_RenderPair(s_res, t_res, channels))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    out = ds.to_iter_dataset(_read_options(in_worker=num_workers > 0))
    if num_workers > 0:
        _mark_absl_flags_parsed()
        options = grain.multiprocessing.MultiprocessingOptions(num_workers=int(num_workers), per_worker_buffer_size=1)
        out = out.mp_prefetch(options, worker_init_fn=_quiet_worker)
    return out


def _padded_batches(
    source: Any, indices: np.ndarray, render_fn: Any, shape: tuple[int, ...], key: str, batch_size: int
) -> grain.IterDataset:
    padded = -(-len(indices) // batch_size) * batch_size
    ds = grain.MapDataset.range(padded).map(_PaddedEval(source, indices, render_fn, shape, key))
    return ds.batch(batch_size, drop_remainder=True).to_iter_dataset(_read_options())


def eval_pipeline(
    source: Any,
    *,
    resolution: int | tuple[int, int],
    batch_size: int,
    channels: int = 3,
    shard: tuple[int, int] = (0, 1),
) -> grain.IterDataset:
    """Deterministic evaluation batches: every example once, in source order, plain resize, no augmentation.

    The last batch is padded to `batch_size` with zero images; `"mask"` is True for real examples, so
    `sum(correct * mask)` / `sum(mask)` counts every example exactly once. `shard=(i, k)` evaluates examples
    `i, i+k, ...` (each host pads its own last batch).

    **Returns:** a Grain `IterDataset` of `{"image": f32[B, C, H, W], "label": i32[B], "index": i64[B] (-1 for padding),
    "mask": bool[B]}`.
    """
    n = _check_source(source, "eval_pipeline")
    res = _check_res("resolution", resolution)
    batch_size = _check_positive_int("batch_size", batch_size)
    channels = _check_channels(channels)
    if not (isinstance(shard, (tuple, list)) and len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard={shard!r} must be (index, count) with 0 <= index < count")
    indices = np.arange(shard[0], n, shard[1], dtype=np.int64)
    return _padded_batches(source, indices, _RenderPlain(res, channels), (channels, *res), "image", batch_size)


def fixed_teacher_views(
    source: Any,
    *,
    mode: str,
    resolution: int | tuple[int, int],
    crops: int = 8,
    seed: int = 0,
    batch_size: int = 64,
    channels: int = 3,
    crop_area: tuple[float, float] = _views.INCEPTION_AREA,
) -> grain.DatasetIterator:
    """The teacher's fixed views of every example once, in source order, for precomputing a `fix/*` logit cache.

    `fix/rs`: K=1 plain resize. `fix/cc`: K=1 centre crop (0.875). `fix/ic_ens`: K=`crops` inception crops with
    random flips that depend only on `(seed, index)` (pass the pipeline's seed: crop 0 is its `"teacher"` view).
    The last batch is padded and masked as in `eval_pipeline`.

    **Returns:** an iterator (also iterable) of `{"teacher": f32[B, K, C, H, W], "label": i32[B], "index": i64[B],
    "mask": bool[B]}`; close it when done.
    """
    n = _check_source(source, "fixed_teacher_views")
    info = _views.mode_info(mode)
    if not info.fixed:
        fixed = ", ".join(m for m, i in _views.MODES.items() if i.fixed)
        raise ValueError(f"fixed_teacher_views(mode={mode!r}): only fix/* modes have a fixed teacher; use {fixed}")
    res = _check_res("resolution", resolution)
    crops = _check_positive_int("crops", crops) if info.ensemble else 1
    batch_size = _check_positive_int("batch_size", batch_size)
    channels = _check_channels(channels)
    render_fn = _RenderFixedTeacher(mode, res, channels, crops, int(seed), _check_area(crop_area))
    indices = np.arange(n, dtype=np.int64)
    return iter(_padded_batches(source, indices, render_fn, (crops, channels, *res), "teacher", batch_size))
