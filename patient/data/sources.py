"""Random-access image sources (Grain-compatible: `__len__` and `__getitem__`).

Every source returns, for an integer index, `{"image": uint8 (H, W, C) with C in {1, 3}, "label": int}` where
label -1 means unlabelled (distillation needs no labels; out-of-domain distillation uses another data set).
Every source has `name`, `class_names: list[str]` and `num_classes`, and a `labels` int64 array when labels are
known without decoding images (used by `subset`).
"""

from __future__ import annotations

import gzip
import os
import pathlib
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from typing import Protocol

    class DataSource(Protocol):
        """What every source here is (and what the engine and `patient.runtime` read): `len(source)`, and
        `source[i]` is `{"image": uint8 (H, W, C), "label": int}`."""

        def __len__(self) -> int: ...

        def __getitem__(self, index: int) -> dict[str, Any]: ...

__all__ = [
    "ArraySource",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "ImageFolderSource",
    "SubsetSource",
    "arrays",
    "digits",
    "fashion_mnist",
    "image_folder",
    "subset",
    "tfds",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's `dataset-fashion-mnist` puts the files
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DIGITS_TEST_FRACTION = 0.2


class ArraySource:
    """Images and labels held in memory as arrays.

    **Arguments:**

    - `images`: uint8 `(N, H, W, C)`, C in {1, 3}.
    - `labels`: int64 `(N,)`, -1 for unlabelled.
    - `class_names`: one name per class.
    - `name`: shown in reprs and benchmark tables.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: list[str], name: str = "arrays"):
        self.images = images
        self.labels = labels
        self.class_names = list(class_names)
        self.name = name

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": int(self.labels[index])}

    def __repr__(self) -> str:
        return f"ArraySource(name={self.name!r}, n={len(self)}, image={self.images.shape[1:]}, classes={self.num_classes})"


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def arrays(
    images: Any, labels: Any = None, class_names: Sequence[str] | None = None, *, name: str = "arrays"
) -> ArraySource:
    """A source over in-memory images.

    **Arguments:**

    - `images`: `(N, H, W)` or `(N, H, W, C)` (C in {1, 3}), uint8, or float in [0, 1] (rounded to uint8).
    - `labels`: `(N,)` integers, or `None` for unlabelled (every label -1).
    - `class_names`: defaults to `"0" .. str(max label)`.

    **Returns:** an `ArraySource`.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"arrays(): images has shape {images.shape}; pass (N, H, W) or (N, H, W, C) with C = 1 or 3")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"arrays(): images dtype is {images.dtype}; pass uint8, or float in [0, 1]")
        lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0 or not np.isfinite(lo + hi):
            raise ValueError(f"arrays(): float images must lie in [0, 1] but span [{lo}, {hi}]; divide by 255 first")
        images = np.round(images * 255.0).astype(np.uint8)
    n = len(images)
    if labels is None:
        labels = np.full((n,), -1, dtype=np.int64)
    else:
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"arrays(): labels must be a 1-D integer array, got shape {labels.shape} {labels.dtype}")
        if len(labels) != n:
            raise ValueError(f"arrays(): images has {n} examples but labels has {len(labels)}; pass one label per image")
        labels = labels.astype(np.int64)
    if class_names is None:
        top = int(labels.max()) if n else -1
        class_names = [str(i) for i in range(top + 1)]
    class_names = [str(c) for c in class_names]
    if n and labels.max() >= len(class_names):
        raise ValueError(f"arrays(): label {int(labels.max())} has no entry in class_names (len {len(class_names)})")
    if n and labels.min() < -1:
        raise ValueError(f"arrays(): label {int(labels.min())} is invalid; use 0..K-1, or -1 for unlabelled")
    return ArraySource(images, labels, class_names, name)


def digits(split: Literal["train", "test", "all"] = "all") -> ArraySource:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), gray values 0..16 scaled to 0..255.

    Splits are fixed and deterministic: within each class (in the file's order) the last 20% of the examples
    (rounded down) form `"test"` and the rest `"train"` (1442 / 355 images); `"all"` is everything.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"digits(split={split!r}): split must be 'train', 'test' or 'all'")
    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = data.target.astype(np.int64)
    if split != "all":
        is_test = np.zeros(len(labels), dtype=bool)
        for c in np.unique(labels):
            where = np.flatnonzero(labels == c)
            n_test = int(len(where) * DIGITS_TEST_FRACTION)
            is_test[where[len(where) - n_test :]] = True
        keep = is_test if split == "test" else ~is_test
        images, labels = images[keep], labels[keep]
    return ArraySource(_readonly(images), _readonly(labels), [str(i) for i in range(10)], f"digits[{split}]")


def _read_idx(path: pathlib.Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    got, = struct.unpack(">I", data[:4])
    if got != magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic {got}, expected {magic})")
    ndim = magic & 0xFF
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file ({arr.size} bytes of data, header says {shape})")
    return arr.reshape(shape)


_FASHION_CACHE: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


def fashion_mnist(split: Literal["train", "test"] = "train", path: str | os.PathLike | None = None) -> ArraySource:
    """Fashion-MNIST (Xiao et al. 2017): 28x28 grayscale, 10 classes, 60000 train / 10000 test images.

    Reads `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz` from `path` (default `/usr/share/datasets/fashion-mnist`,
    where the Debian package `dataset-fashion-mnist` installs them) with the standard library and numpy.
    Parsed arrays are cached per process (read-only).
    """
    if split not in ("train", "test"):
        raise ValueError(f"fashion_mnist(split={split!r}): split must be 'train' or 'test'")
    root = pathlib.Path(path if path is not None else FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    files = (root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(
                f"fashion_mnist: {f} not found; run `apt-get install dataset-fashion-mnist` or pass path= to the "
                "folder holding the four *-ubyte.gz files"
            )
    key = (str(root.resolve()), split)
    if key not in _FASHION_CACHE:
        images = _read_idx(files[0], 2051)[..., None]
        labels = _read_idx(files[1], 2049).astype(np.int64)
        if len(images) != len(labels):
            raise ValueError(f"fashion_mnist: {files[0]} has {len(images)} images but {files[1]} {len(labels)} labels")
        _FASHION_CACHE[key] = (_readonly(images), _readonly(labels))
    images, labels = _FASHION_CACHE[key]
    return ArraySource(images, labels, FASHION_MNIST_CLASSES, f"fashion_mnist[{split}]")


# ------------------------------------------------------------------------------------------------- image folders


def _decode(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L") if im.mode in ("1", "L", "I;16", "I", "F") else im.convert("RGB")
        arr = np.asarray(im)
    return arr[..., None] if arr.ndim == 2 else arr


class ImageFolderSource:
    """Images on disk, one sub-folder per class, decoded lazily with Pillow on every access.

    Attributes: `root`, `paths`, `labels`, `class_names`, `name`, and `skipped` (files dropped by `on_error="skip"`).
    """

    def __init__(self, root: pathlib.Path, paths: list[str], labels: np.ndarray, class_names: list[str], skipped: list[str]):
        self.root = root
        self.paths = paths
        self.labels = labels
        self.class_names = class_names
        self.skipped = skipped
        self.name = f"image_folder[{root.name}]"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            image = _decode(path)
        except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError...).
            raise ValueError(
                f"image_folder: cannot decode {path} ({type(e).__name__}: {e}); delete it or pass on_error='skip'"
            ) from e
        return {"image": image, "label": int(self.labels[index])}

    def __repr__(self) -> str:
        return (
            f"ImageFolderSource(root={str(self.root)!r}, n={len(self)}, classes={self.num_classes}, "
            f"skipped={len(self.skipped)})"
        )


def image_folder(root: str | os.PathLike, *, on_error: Literal["raise", "skip"] = "raise") -> ImageFolderSource:
    """A labelled source over `root/<class name>/<image>.{jpg,jpeg,png}` (case-insensitive extensions).

    Class names are the sub-folder names, sorted; labels index into them. Images are decoded lazily (one file per
    access), converted to RGB (or kept grayscale as 1 channel). Files are checked when the source is built:

    - `on_error="raise"` (default): every file's header is read (cheap); an unreadable file raises one error naming it.
      A file whose header is fine but whose data is truncated raises, naming the file, when it is first decoded.
    - `on_error="skip"`: every file is fully decoded once (slower); failures are dropped and listed in `.skipped`.
    """
    from PIL import Image

    if on_error not in ("raise", "skip"):
        raise ValueError(f"image_folder(on_error={on_error!r}): use 'raise' or 'skip'")
    root = pathlib.Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image_folder: {root} does not exist; pass the folder holding one sub-folder per class")
    if not root.is_dir():
        raise NotADirectoryError(f"image_folder: {root} is not a directory; pass the folder holding one sub-folder per class")
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths: list[str] = []
    labels: list[int] = []
    skipped: list[str] = []
    for label, cls in enumerate(class_names):
        for f in sorted((root / cls).iterdir()):
            if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                with Image.open(f) as im:
                    if on_error == "skip":
                        im.load()
            except Exception as e:
                if on_error == "skip":
                    skipped.append(str(f))
                    continue
                raise ValueError(
                    f"image_folder: cannot read {f} ({type(e).__name__}: {e}); delete it or pass on_error='skip'"
                ) from None
            paths.append(str(f))
            labels.append(label)
    if not paths:
        raise ValueError(
            f"image_folder: no {'/'.join(IMAGE_EXTENSIONS)} images under {root}"
            f"{f' ({len(skipped)} unreadable skipped)' if skipped else ''}; expected root/<class>/<image> files"
        )
    return ImageFolderSource(root, paths, np.asarray(labels, dtype=np.int64), class_names, skipped)


# ------------------------------------------------------------------------------------------------- tfds and subsets


class _TfdsSource:
    def __init__(self, data_source: Any, class_names: list[str], name: str, image_key: str, label_key: str):
        self._ds = data_source
        self.class_names = class_names
        self.name = name
        self._image_key, self._label_key = image_key, label_key

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self._ds[index]
        image = np.asarray(ex[self._image_key], dtype=np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        label = int(ex[self._label_key]) if self._label_key in ex else -1
        return {"image": image, "label": label}


def tfds(name: str, split: str, *, data_dir: str | None = None, image_key: str = "image",
         label_key: str = "label") -> _TfdsSource:
    """A TensorFlow Datasets data set as a random-access source (`tfds.data_source`, needs the ArrayRecord format).

    `tensorflow_datasets` is imported only here; install it with `pip install tensorflow-datasets` and prepare the
    data set beforehand (`tfds build <name>`; this library never downloads).
    """
    try:
        import tensorflow_datasets as tf_datasets
    except ImportError:
        raise ImportError(
            f"tfds({name!r}) needs tensorflow_datasets: `pip install tensorflow-datasets array_record`, "
            "or use image_folder() / arrays() instead"
        ) from None
    builder = tf_datasets.builder(name, data_dir=data_dir)
    data_source = tf_datasets.data_source(name, split=split, data_dir=data_dir)
    feature = builder.info.features[label_key] if label_key in builder.info.features else None
    class_names = list(getattr(feature, "names", None) or [])
    return _TfdsSource(data_source, class_names, f"tfds[{name}:{split}]", image_key, label_key)


class SubsetSource:
    """A view of `parent` restricted to `indices` (class names and labels carried over)."""

    def __init__(self, parent: Any, indices: np.ndarray, name: str):
        self.parent = parent
        self.indices = indices
        self.class_names = list(parent.class_names)
        self.name = name
        parent_labels = getattr(parent, "labels", None)
        self.labels = None if parent_labels is None else np.asarray(parent_labels)[indices]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.parent[int(self.indices[index])]

    def __repr__(self) -> str:
        return f"SubsetSource(name={self.name!r}, n={len(self)})"


def _all_labels(source: Any) -> np.ndarray:
    labels = getattr(source, "labels", None)
    if labels is not None:
        return np.asarray(labels, dtype=np.int64)
    return np.asarray([source[i]["label"] for i in range(len(source))], dtype=np.int64)  # decodes every image


def subset(source: Any, per_class: int | None = None, *, size: int | None = None, seed: int = 0) -> SubsetSource:
    """A random, reproducible subset: `per_class` examples of every class, or `size` examples regardless of label.

    Indices are drawn without replacement by `seed` and kept in source order. `per_class` asks for labels; a class
    with fewer examples than `per_class` is an error (the subset would silently be unbalanced otherwise).
    """
    if (per_class is None) == (size is None):
        raise ValueError("subset(): pass exactly one of per_class=N or size=N")
    n = len(source)
    rng = np.random.default_rng(seed)
    if size is not None:
        if not 0 < size <= n:
            raise ValueError(f"subset(size={size}): size must be in 1..{n} (the source's length)")
        idx = np.sort(rng.choice(n, size=size, replace=False))
        return SubsetSource(source, idx, f"{getattr(source, 'name', 'source')}[size={size},seed={seed}]")
    if per_class <= 0:
        raise ValueError(f"subset(per_class={per_class}): per_class must be a positive integer")
    labels = _all_labels(source)
    if (labels < 0).all():
        raise ValueError("subset(per_class=...): the source is unlabelled (all labels -1); use size= instead")
    chosen = []
    for c in range(len(source.class_names)):
        where = np.flatnonzero(labels == c)
        if len(where) < per_class:
            raise ValueError(
                f"subset(per_class={per_class}): class {source.class_names[c]!r} has only {len(where)} examples; "
                "lower per_class"
            )
        chosen.append(rng.choice(where, size=per_class, replace=False))
    idx = np.sort(np.concatenate(chosen))
    return SubsetSource(source, idx, f"{getattr(source, 'name', 'source')}[{per_class}/class,seed={seed}]")
