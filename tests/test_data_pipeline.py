"""Pipelines: consistent views (decoded from coordinate images), determinism, resumption, sharding, eval padding."""

import contextlib
import multiprocessing

import numpy as np
import pytest
from test_data_views import coord_image, decode_box

import patient.data as pd

H, W = 192, 256


@pytest.fixture(scope="module")
def coords():
    """16 copies of one coordinate-encoded image (R = x, G = y), given as floats in [0, 1] through arrays()."""
    image = coord_image(H, W).astype(np.float64) / 255.0
    return pd.arrays(np.repeat(image[None], 16, axis=0), np.arange(16) % 4)


def take(ds, n, *, state=None):
    """The first n batches as plain numpy arrays (copied out of shared memory), and the iterator state after them."""
    with contextlib.closing(iter(ds)) as it:
        if state is not None:
            it.set_state(state)
        out = [{k: np.array(v) for k, v in next(it).items()} for _ in range(n)]
        return out, it.get_state()


def boxes(batch, key):
    return [decode_box(v, H, W) for v in batch[key]]


# ------------------------------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("mode", ["same/ic", "same/rc", "fm"])
@pytest.mark.parametrize("res", [(32, 32), (32, 64)])
def test_consistent_modes_share_one_box(coords, mode, res):
    (batch,), _ = take(pd.pipeline(coords, mode=mode, student_res=res[0], teacher_res=res[1], batch_size=16, seed=3), 1)
    assert batch["student"].shape == (16, 3, res[0], res[0]) and batch["teacher"].shape == (16, 3, res[1], res[1])
    flips = []
    for (s_box, s_flip), (t_box, t_flip) in zip(boxes(batch, "student"), boxes(batch, "teacher")):
        # Tolerance from resampling and uint8 rounding only: < 1 source pixel.
        np.testing.assert_allclose(s_box, t_box, atol=1.0 / H)
        assert s_flip == t_flip
        flips.append(s_flip)
    assert 0 < sum(flips) < 16  # flips are random, and shared
    # And the boxes really vary between examples (not, say, all the full image).
    assert np.ptp([b for b, _ in boxes(batch, "student")], axis=0).max() > 0.05


@pytest.mark.parametrize("mode", ["ind/ic", "ind/rc"])
def test_independent_modes_draw_two_boxes(coords, mode):
    (batch,), _ = take(pd.pipeline(coords, mode=mode, student_res=32, teacher_res=48, batch_size=16, seed=3), 1)
    diffs = [np.abs(s - t).max() for (s, _), (t, _) in zip(boxes(batch, "student"), boxes(batch, "teacher"))]
    assert sum(d > 2.0 / H for d in diffs) >= 14


def by_index(batch, key):
    order = np.argsort(batch["index"])
    return batch["index"][order], batch[key][order]


@pytest.mark.parametrize("mode", ["fix/rs", "fix/cc", "fix/ic_ens"])
def test_fixed_teacher_is_identical_across_epochs(coords, mode):
    (e0, e1), _ = take(pd.pipeline(coords, mode=mode, student_res=24, teacher_res=32, batch_size=16, seed=0, epochs=2), 2)
    i0, t0 = by_index(e0, "teacher")
    i1, t1 = by_index(e1, "teacher")
    np.testing.assert_array_equal(i0, np.arange(16))
    np.testing.assert_array_equal(i1, np.arange(16))
    np.testing.assert_array_equal(t0, t1)
    s0, s1 = by_index(e0, "student")[1], by_index(e1, "student")[1]
    if mode == "fix/rs":
        np.testing.assert_array_equal(s0, s1)  # no augmentation at all
        for view in (s0[0], t0[0]):
            box, flip = decode_box(view, H, W)
            np.testing.assert_allclose(box, [0, 0, 1, 1], atol=1.0 / H)
            assert not flip
    else:
        assert not np.array_equal(s0, s1)  # the student is still augmented
    if mode == "fix/cc":
        box, flip = decode_box(t0[0], H, W)
        np.testing.assert_allclose(box, [0.0625, 0.0625, 0.875, 0.875], atol=1.0 / H)
        assert not flip


def test_fixed_teacher_views_match_the_pipeline(coords):
    it = pd.fixed_teacher_views(coords, mode="fix/ic_ens", resolution=32, crops=3, seed=7, batch_size=5)
    batches = [{k: np.array(v) for k, v in b.items()} for b in it]
    it.close()
    assert len(batches) == 4 and batches[0]["teacher"].shape == (5, 3, 3, 32, 32)
    assert batches[-1]["mask"].tolist() == [True, False, False, False, False]
    views = np.concatenate([b["teacher"] for b in batches])[:16]
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches])[:16], np.arange(16))
    assert not np.array_equal(views[:, 0], views[:, 1])  # K distinct crops
    # Crop 0 is the pipeline's teacher view for the same seed; other seeds give other crops.
    (batch,), _ = take(pd.pipeline(coords, mode="fix/ic_ens", student_res=16, teacher_res=32, batch_size=16, seed=7), 1)
    idx, teacher = by_index(batch, "teacher")
    np.testing.assert_array_equal(teacher, views[idx, 0])
    again = next(pd.fixed_teacher_views(coords, mode="fix/ic_ens", resolution=32, crops=3, seed=7, batch_size=5))
    np.testing.assert_array_equal(np.array(again["teacher"]), batches[0]["teacher"])
    other = next(pd.fixed_teacher_views(coords, mode="fix/ic_ens", resolution=32, crops=3, seed=8, batch_size=5))
    assert not np.array_equal(np.array(other["teacher"]), batches[0]["teacher"])
    rs = next(pd.fixed_teacher_views(coords, mode="fix/rs", resolution=32, crops=3, batch_size=4))
    assert rs["teacher"].shape == (4, 1, 3, 32, 32)
    with pytest.raises(ValueError, match="only fix/\\* modes"):
        pd.fixed_teacher_views(coords, mode="same/ic", resolution=32)


# ------------------------------------------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(0)
    return pd.arrays(rng.integers(0, 256, (40, 20, 24, 3), dtype=np.uint8), rng.integers(0, 5, 40))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() == {"student", "teacher", "label", "index"}
        for k in x:
            assert x[k].dtype == y[k].dtype
            np.testing.assert_array_equal(x[k], y[k])


def test_same_seed_same_batches_and_dtypes(small):
    kw = dict(mode="fm", student_res=16, teacher_res=24, batch_size=8, seed=11)
    a, _ = take(pd.pipeline(small, **kw), 6)
    b, _ = take(pd.pipeline(small, **kw), 6)
    assert_same_batches(a, b)
    x = a[0]
    assert x["student"].dtype == np.float32 and x["label"].dtype == np.int32 and x["index"].dtype == np.int64
    assert 0.0 <= x["student"].min() and x["student"].max() <= 1.0
    np.testing.assert_array_equal(x["label"], small.labels[x["index"]])
    c, _ = take(pd.pipeline(small, **{**kw, "seed": 12}), 1)
    assert not np.array_equal(c[0]["student"], a[0]["student"])


def test_workers_resume_and_match_in_process(small):
    kw = dict(mode="fm", student_res=16, teacher_res=24, batch_size=8, seed=5)
    reference, _ = take(pd.pipeline(small, **kw), 9)
    # Two worker processes: identical batches, in the same order.
    parallel, _ = take(pd.pipeline(small, **kw, num_workers=2), 9)
    assert_same_batches(reference, parallel)
    # Resuming a worker pipeline from its state after 3 batches replays batches 3..8.
    _, state = take(pd.pipeline(small, **kw, num_workers=2), 3)
    resumed, _ = take(pd.pipeline(small, **kw, num_workers=2), 6, state=state)
    assert_same_batches(reference[3:9], resumed)
    # Closing the iterators (take() does) shuts the worker processes down, which frees their shared memory.
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("grain")]


@pytest.mark.parametrize("k", [0, 4, 7])
def test_restoring_state_replays_the_next_batches(small, k):
    kw = dict(mode="same/ic", student_res=12, batch_size=8, seed=2)
    reference, _ = take(pd.pipeline(small, **kw), k + 6)
    _, state = take(pd.pipeline(small, **kw), k)
    resumed, _ = take(pd.pipeline(small, **kw), 6, state=state)
    assert_same_batches(reference[k:], resumed)


def test_every_epoch_is_reshuffled_and_recropped(small):
    batches, _ = take(pd.pipeline(small, mode="fm", student_res=16, batch_size=40, seed=0, epochs=3), 3)
    orders = [b["index"] for b in batches]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(40))
    assert not np.array_equal(orders[0], orders[1])
    views = [by_index(b, "student")[1] for b in batches]
    for a, b in [(0, 1), (1, 2), (0, 2)]:
        differs = [not np.array_equal(views[a][i], views[b][i]) for i in range(40)]
        assert all(differs)


def test_finite_epochs_end(small):
    with contextlib.closing(iter(pd.pipeline(small, mode="ind/rc", student_res=8, batch_size=16, seed=0, epochs=1))) as it:
        assert len(list(it)) == 2  # 40 examples, remainder dropped
    with contextlib.closing(
        iter(pd.pipeline(small, mode="ind/rc", student_res=8, batch_size=16, seed=0, epochs=1, drop_remainder=False))
    ) as it:
        assert [len(b["index"]) for b in it] == [16, 16, 8]


def test_shards_are_disjoint_with_distinct_crops(coords):
    kw = dict(mode="same/ic", student_res=16, batch_size=4, seed=9, epochs=1)
    whole, _ = take(pd.pipeline(coords, **kw, shard=(0, 1)), 4)
    s0, _ = take(pd.pipeline(coords, **kw, shard=(0, 2)), 2)
    s1, _ = take(pd.pipeline(coords, **kw, shard=(1, 2)), 2)
    i0 = np.concatenate([b["index"] for b in s0])
    i1 = np.concatenate([b["index"] for b in s1])
    assert set(i0).isdisjoint(i1) and sorted([*i0, *i1]) == list(range(16))
    # All 16 images are identical, so different views can only come from different crops.
    v0 = np.concatenate([b["student"] for b in s0])
    v1 = np.concatenate([b["student"] for b in s1])
    assert all(not np.array_equal(v0[i], v1[i]) for i in range(8))
    # The crops are drawn from the global stream position: two hosts see exactly what one host would.
    one_host = {int(i): v for b in whole for i, v in zip(b["index"], b["student"])}
    for i, v in zip([*i0, *i1], [*v0, *v1]):
        np.testing.assert_array_equal(one_host[int(i)], v)


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_batches_concatenate_to_the_one_host_batch(coords, hosts):
    """Topology independence: batch k of every host, concatenated in host order, is batch k of one host reading the
    global batch (same examples, same order, same pixels), over an epoch boundary and with a ragged last batch."""
    kw = dict(mode="same/ic", student_res=8, seed=3, epochs=2, drop_remainder=False)
    one, _ = take(pd.pipeline(coords, **kw, batch_size=8), 4)
    per_host = [take(pd.pipeline(coords, **kw, batch_size=8 // hosts, shard=(i, hosts)), 4)[0] for i in range(hosts)]
    assert [len(b["index"]) for b in one] == [8, 8, 8, 8]
    for k, whole in enumerate(one):
        for key in ("index", "student", "teacher", "label"):
            np.testing.assert_array_equal(np.concatenate([h[k][key] for h in per_host]), whole[key])
    # A ragged end (drop_remainder=False): 16 examples in global batches of 6 end with 4, split 3 + 1 over 2 hosts.
    ragged = dict(kw, epochs=1)
    one = iter_all(pd.pipeline(coords, **ragged, batch_size=6))
    two = [iter_all(pd.pipeline(coords, **ragged, batch_size=3, shard=(i, 2))) for i in range(2)]
    assert [len(b["index"]) for b in one] == [6, 6, 4] and [len(b["index"]) for b in two[1]] == [3, 3, 1]
    for k, whole in enumerate(one):
        np.testing.assert_array_equal(np.concatenate([h[k]["student"] for h in two]), whole["student"])


def iter_all(ds):
    with contextlib.closing(iter(ds)) as it:
        return [{k: np.array(v) for k, v in b.items()} for b in it]


# ------------------------------------------------------------------------------------------------- eval


def test_eval_pipeline_counts_every_example_once():
    rng = np.random.default_rng(0)
    src = pd.arrays(rng.integers(0, 256, (1001, 6, 6), dtype=np.uint8), rng.integers(0, 10, 1001))
    with contextlib.closing(iter(pd.eval_pipeline(src, resolution=6, batch_size=64, channels=1))) as it:
        batches = list(it)
    assert len(batches) == 16 and all(b["image"].shape == (64, 1, 6, 6) for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    label = np.concatenate([b["label"] for b in batches])
    assert mask.dtype == bool and mask.sum() == 1001 and mask[:1001].all()
    np.testing.assert_array_equal(index[mask], np.arange(1001))
    np.testing.assert_array_equal(label[mask], src.labels)
    assert (index[~mask] == -1).all() and (label[~mask] == -1).all()
    assert (batches[-1]["image"][~batches[-1]["mask"]] == 0).all()
    # Plain resize at the source's own size is the identity: no augmentation.
    np.testing.assert_array_equal(batches[3]["image"][:, 0] * 255, src.images[192:256, :, :, 0])
    # Sharded evaluation also covers everything exactly once.
    seen = []
    for i in range(3):
        with contextlib.closing(iter(pd.eval_pipeline(src, resolution=6, batch_size=64, shard=(i, 3)))) as it:
            seen += [int(j) for b in it for j, m in zip(b["index"], b["mask"]) if m]
    assert sorted(seen) == list(range(1001))


# ------------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"mode": "same/cc"}, r"mode='same/cc' is not a teacher mode; use one of fix/rs"),
        ({"batch_size": 0}, r"batch_size=0 must be a positive integer"),
        ({"batch_size": -3}, r"batch_size=-3 must be a positive integer"),
        ({"student_res": 0}, r"student_res=0 must be a positive int"),
        ({"teacher_res": (32, -1)}, r"teacher_res=\(32, -1\) must be"),
        ({"shard": (2, 2)}, r"shard=\(2, 2\) must be \(index, count\) with 0 <= index < count"),
        ({"shard": (0, 0)}, r"shard=\(0, 0\)"),
        ({"num_workers": -1}, r"num_workers=-1"),
        ({"epochs": 0}, r"epochs=0 must be a positive integer"),
        ({"seed": -1}, r"seed=-1"),
        ({"channels": 2}, r"channels=2 must be 1 or 3"),
        ({"batch_size": 64, "epochs": 1}, r"batch_size=64 exceeds the 40 examples"),
    ],
)
def test_pipeline_argument_errors(small, kw, match):
    args = dict(mode="fm", student_res=16, batch_size=8, seed=0) | kw
    with pytest.raises(ValueError, match=match) as e:
        pd.pipeline(small, **args)
    assert "\n" not in str(e.value)


def test_eval_argument_errors(small):
    for kw, match in [({"batch_size": 0}, "batch_size=0"), ({"resolution": -1}, "resolution=-1")]:
        with pytest.raises(ValueError, match=match) as e:
            pd.eval_pipeline(small, **({"resolution": 8, "batch_size": 4} | kw))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="is empty"):
        pd.eval_pipeline(pd.arrays(np.zeros((0, 4, 4), np.uint8)), resolution=4, batch_size=2)


# ----------------------------------------------------------------------------------------- dead loader workers

DYING_SOURCE = '''
import multiprocessing, os
import numpy as np

class Dying:
    """Every read in a worker process kills that process, as the kernel's out-of-memory killer would."""
    name = "dying"
    class_names = [str(i) for i in range(10)]
    labels = np.arange(64) % 10
    num_classes = 10
    def __len__(self):
        return 64
    def __getitem__(self, i):
        if multiprocessing.parent_process() is not None:
            os.kill(os.getpid(), 9)
        return {"image": np.zeros((8, 8), np.uint8), "label": int(i) % 10}
'''

GUARDED_RUN = '''
import sys, time
sys.path.insert(0, sys.argv[1])
import jax
import patient
from dying import Dying
from patient.models import create
if __name__ == "__main__":
    model = create("cifar_resnet20", num_classes=10, key=jax.random.key(0), resolution=8, depths=(1, 1, 1))
    t0 = time.time()
    try:
        patient.train(model, Dying(), steps=2, batch_size=4, num_workers=2, progress=False)
    except patient.data.LoaderError as e:
        print("LOADER-ERROR", round(time.time() - t0), e)
'''

UNGUARDED_RUN = '''
import jax
import patient
from patient.data import digits
from patient.models import create
model = create("cifar_resnet20", num_classes=10, key=jax.random.key(0), resolution=8, depths=(1, 1, 1))
patient.train(model, digits("test"), steps=2, batch_size=4, num_workers=2, progress=False)
'''


def _run_script(tmp_path, name, text, *args, timeout=170):
    import subprocess
    import sys

    script = tmp_path / name
    script.write_text(text)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path)


@pytest.mark.slow
def test_a_dead_worker_ends_the_run_within_a_minute(tmp_path):
    """Regression: a loader worker that died left `distill`/`train` waiting for its batch forever."""
    (tmp_path / "dying.py").write_text(DYING_SOURCE)
    r = _run_script(tmp_path, "run.py", GUARDED_RUN, str(tmp_path))
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("LOADER-ERROR")), None)
    assert line is not None, (r.stdout + r.stderr)[-3000:]
    seconds = int(line.split()[1])
    assert seconds <= 60 and "worker process died" in line and "exit code -9" in line, line


@pytest.mark.slow
def test_workers_from_an_unguarded_script_are_refused_before_any_work(tmp_path):
    """Regression: spawned workers re-ran a script without the `__main__` guard, died, and the parent hung."""
    r = _run_script(tmp_path, "unguarded.py", UNGUARDED_RUN)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("patient.data.pipelines.LoaderError: num_workers=2") and "__main__" in last, r.stderr[-2000:]

