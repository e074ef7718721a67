"""Sources: fashion_mnist, digits, arrays, image_folder, subset, tfds; and their one-line errors."""

import gzip
import io

import numpy as np
import pytest
from PIL import Image

import patient.data as pd
from patient.data import sources


def one_line(excinfo):
    assert "\n" not in str(excinfo.value), str(excinfo.value)
    return str(excinfo.value)


# ------------------------------------------------------------------------------------------------- fashion_mnist


@pytest.mark.skipif(not (sources.FASHION_MNIST_DIR and __import__("os").path.isdir(sources.FASHION_MNIST_DIR)),
                    reason="apt-get install dataset-fashion-mnist")  # fmt: skip
def test_fashion_mnist_counts():
    train, test = pd.fashion_mnist("train"), pd.fashion_mnist("test")
    assert (len(train), len(test)) == (60000, 10000)
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    ex = train[0]
    assert ex["image"].shape == (28, 28, 1) and ex["image"].dtype == np.uint8
    assert isinstance(ex["label"], int) and ex["label"] == 9  # the first training image is an ankle boot
    assert train.class_names[9] == "Ankle boot" and train.num_classes == 10
    assert 0 < train.images.mean() < 255


def write_idx(path, arr, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_from_path(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 2051)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([4, 0, 9]), 2049)
    src = pd.fashion_mnist("test", path=tmp_path)
    assert len(src) == 3
    np.testing.assert_array_equal(src[1]["image"][..., 0], images[1])
    assert [src[i]["label"] for i in range(3)] == [4, 0, 9]
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, 2049)  # wrong magic
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([4, 0, 9]), 2049)
    with pytest.raises(ValueError, match="magic"):
        pd.fashion_mnist("train", path=tmp_path)


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        pd.fashion_mnist("train", path=tmp_path)
    msg = one_line(e)
    assert "apt-get install dataset-fashion-mnist" in msg and "path=" in msg and "train-images-idx3-ubyte.gz" in msg
    with pytest.raises(ValueError, match="split"):
        pd.fashion_mnist("validation")


# ------------------------------------------------------------------------------------------------- digits, arrays


def test_digits_splits_are_fixed_and_disjoint():
    every, train, test = pd.digits(), pd.digits("train"), pd.digits("test")
    assert len(every) == 1797 and len(train) + len(test) == 1797
    assert (len(train), len(test)) == (1442, 355)
    assert every[0]["image"].shape == (8, 8, 1) and every[0]["image"].dtype == np.uint8
    assert every.images.max() == 255 and every.images.min() == 0
    # The test split is the last 20% of every class in file order.
    for c in range(10):
        where = np.flatnonzero(every.labels == c)
        n_test = int(len(where) * 0.2)
        np.testing.assert_array_equal(test.images[test.labels == c], every.images[where[len(where) - n_test :]])
    np.testing.assert_array_equal(pd.digits("test").images, test.images)


def test_arrays_accepts_layouts_and_floats():
    imgs = np.random.default_rng(0).random((5, 6, 7))
    src = pd.arrays(imgs, [0, 1, 2, 1, 0])
    assert src[2]["image"].shape == (6, 7, 1) and src[2]["image"].dtype == np.uint8
    np.testing.assert_array_equal(src[2]["image"][..., 0], np.round(imgs[2] * 255).astype(np.uint8))
    assert src.class_names == ["0", "1", "2"] and src[2]["label"] == 2
    unlabelled = pd.arrays(np.zeros((4, 5, 5, 3), np.uint8))
    assert unlabelled[3]["label"] == -1 and unlabelled.num_classes == 0
    named = pd.arrays(np.zeros((2, 5, 5, 3), np.uint8), [1, 0], class_names=["cat", "dog"])
    assert named.class_names == ["cat", "dog"]


@pytest.mark.parametrize(
    "images,labels,match",
    [
        (np.zeros((10, 4, 4, 3), np.uint8), np.zeros(9, int), "images has 10 examples but labels has 9"),
        (np.zeros((2, 4, 4, 2), np.uint8), None, r"C = 1 or 3"),
        (np.full((2, 4, 4), 2.0), None, r"\[0, 1\]"),
        (np.zeros((2, 4), np.uint8), None, "shape"),
        (np.zeros((2, 4, 4), np.int32), None, "dtype"),
        (np.zeros((2, 4, 4), np.uint8), np.array([0, -2]), "invalid"),
    ],
)
def test_arrays_errors(images, labels, match):
    with pytest.raises(ValueError, match=match) as e:
        pd.arrays(images, labels)
    one_line(e)


# ------------------------------------------------------------------------------------------------- image_folder


def save(path, array, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt)


def test_image_folder_png_and_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for cls, shade in [("zebra", 30), ("ant", 120), ("mole", 220)]:
        for k, (ext, fmt) in enumerate([(".png", "PNG"), (".JPG", "JPEG"), (".jpeg", "JPEG")]):
            arr = np.full((10 + k, 12, 3), shade, np.uint8)
            save(tmp_path / cls / f"{k}{ext}", arr, fmt)
            expected[str(tmp_path / cls / f"{k}{ext}")] = (cls, arr)
    save(tmp_path / "ant" / "gray.png", rng.integers(0, 255, (9, 9), dtype=np.uint8), "PNG")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    src = pd.image_folder(tmp_path)
    assert src.class_names == ["ant", "mole", "zebra"] and src.num_classes == 3
    assert len(src) == 10 and src.skipped == []
    for i, path in enumerate(src.paths):
        ex = src[i]
        assert src.class_names[ex["label"]] == path.split("/")[-2]
        if path.endswith("gray.png"):
            assert ex["image"].shape == (9, 9, 1)
            continue
        cls, arr = expected[path]
        assert ex["image"].shape == arr.shape and ex["image"].dtype == np.uint8
        tol = 0 if path.endswith(".png") else 3  # JPEG is lossy
        assert np.abs(ex["image"].astype(int) - arr).max() <= tol


def corrupt_tree(tmp_path):
    good = np.full((16, 16, 3), 100, np.uint8)
    save(tmp_path / "a" / "ok.jpg", good, "JPEG")
    save(tmp_path / "b" / "ok.png", good, "PNG")
    (tmp_path / "b" / "garbage.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "a" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_image_folder_corrupt_file_raises_naming_it(tmp_path):
    corrupt_tree(tmp_path)
    with pytest.raises(ValueError) as e:
        pd.image_folder(tmp_path)
    msg = one_line(e)
    assert str(tmp_path / "b" / "garbage.jpg") in msg and "on_error='skip'" in msg


def test_image_folder_truncated_file_raises_naming_it_when_decoded(tmp_path):
    corrupt_tree(tmp_path)
    (tmp_path / "b" / "garbage.jpg").unlink()
    src = pd.image_folder(tmp_path)  # header checks pass; the data is cut short
    bad = src.paths.index(str(tmp_path / "a" / "truncated.jpg"))
    with pytest.raises(ValueError) as e:
        src[bad]
    assert str(tmp_path / "a" / "truncated.jpg") in one_line(e)


def test_image_folder_skip_counts_corrupt_files(tmp_path):
    corrupt_tree(tmp_path)
    src = pd.image_folder(tmp_path, on_error="skip")
    assert len(src) == 2 and sorted(src.skipped) == sorted(
        [str(tmp_path / "a" / "truncated.jpg"), str(tmp_path / "b" / "garbage.jpg")]
    )
    assert [src[i]["label"] for i in range(2)] == [0, 1]


def test_image_folder_empty_and_missing(tmp_path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="no .jpg/.jpeg/.png images under") as e:
        pd.image_folder(tmp_path)
    one_line(e)
    with pytest.raises(FileNotFoundError, match="does_not_exist does not exist") as e:
        pd.image_folder(tmp_path / "does_not_exist")
    one_line(e)
    with pytest.raises(ValueError, match="on_error"):
        pd.image_folder(tmp_path, on_error="ignore")


# ------------------------------------------------------------------------------------------------- subset, tfds


def test_subset_per_class_and_size():
    src = pd.digits("train")
    sub = pd.subset(src, per_class=5, seed=1)
    assert len(sub) == 50 and np.all(np.bincount(sub.labels) == 5)
    assert np.all(np.diff(sub.indices) > 0)
    for i in (0, 17, 49):
        assert sub[i]["label"] == src[int(sub.indices[i])]["label"]
        np.testing.assert_array_equal(sub[i]["image"], src[int(sub.indices[i])]["image"])
    np.testing.assert_array_equal(pd.subset(src, per_class=5, seed=1).indices, sub.indices)
    assert not np.array_equal(pd.subset(src, per_class=5, seed=2).indices, sub.indices)
    assert sub.class_names == src.class_names
    unl = pd.subset(pd.arrays(np.zeros((20, 4, 4), np.uint8)), size=7, seed=0)
    assert len(unl) == 7 and len(set(unl.indices.tolist())) == 7
    with pytest.raises(ValueError, match="has only"):
        pd.subset(src, per_class=1000)
    with pytest.raises(ValueError, match="unlabelled"):
        pd.subset(pd.arrays(np.zeros((20, 4, 4), np.uint8)), per_class=2)
    with pytest.raises(ValueError, match="exactly one"):
        pd.subset(src)


def test_tfds_is_optional():
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorflow-datasets") as e:
            pd.tfds("mnist", "train")
        one_line(e)
    else:
        pytest.skip("tensorflow_datasets is installed; the missing-package error cannot be exercised")
