"""Evaluation images without JAX: data specs, an image-folder reader and the plain-resize rendering.

Export verification, int8 calibration, `patient-eval` and `patient-bench` all feed models through this module, so every
format sees the same pixels. It needs numpy and Pillow only (no JAX, no Grain), so it runs on a device:

- `image_folder:PATH` is read here (the layout and order of `patient.data.image_folder`: sorted class folders, sorted
  `.jpg/.jpeg/.png` files).
- `digits` and `fashion_mnist` come from `patient.data` (scikit-learn's digits, Debian's Fashion-MNIST files), which
  needs the full install.
- `render_plain` calls `patient.data.views.render(image, plain_resize(), resolution)` (numpy and Pillow only):
  Pillow's antialiased bilinear resize of the whole image, grayscale repeated to 3 channels, float32 in [0, 1],
  channels first.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DATA_HELP = "digits, fashion_mnist or image_folder:PATH"


class DataError(ValueError):
    """A data spec that cannot be opened (unknown name, missing folder, no images, ...)."""


class Folder:
    """Labelled images under `root/<class>/<image>`, decoded on access (uint8 HWC, grayscale kept as one channel)."""

    def __init__(self, root: pathlib.Path, paths: list[str], labels: np.ndarray, class_names: list[str]):
        self.root, self.paths, self.labels, self.class_names = root, paths, labels, class_names
        self.name = f"image_folder[{root.name}]"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        try:
            with Image.open(self.paths[index]) as im:
                im = im.convert("L") if im.mode in ("1", "L", "I;16", "I", "F") else im.convert("RGB")
                arr = np.asarray(im)
        except Exception as e:  # Pillow raises many types
            raise DataError(f"image_folder: cannot decode {self.paths[index]} ({type(e).__name__}: {e})") from None
        return {"image": arr[..., None] if arr.ndim == 2 else arr, "label": int(self.labels[index])}


def image_folder(root: str | os.PathLike) -> Folder:
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"image_folder: {root} is not a directory; pass a folder holding one sub-folder per class")
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for label, cls in enumerate(class_names):
        for f in sorted((root / cls).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(f))
                labels.append(label)
    if not paths:
        raise DataError(f"image_folder: no {'/'.join(IMAGE_EXTENSIONS)} images under {root}/<class>/")
    return Folder(root, paths, np.asarray(labels, np.int64), class_names)


def open_source(spec: str, split: str = "test"):
    """A labelled source from a data spec: `digits`, `fashion_mnist` (the `split`, default test) or
    `image_folder:PATH`. Sources have `len`, `[i] -> {"image": uint8 HWC, "label": int}`, `class_names` and `name`."""
    if not isinstance(spec, str) or not spec:
        raise DataError(f"no data given; use {DATA_HELP}")
    if spec.startswith("image_folder:"):
        return image_folder(spec.split(":", 1)[1])
    name, _, sub = spec.partition(":")
    if name not in ("digits", "fashion_mnist"):
        raise DataError(f"unknown data {spec!r}; use {DATA_HELP}")
    try:
        from patient.data import sources
    except ImportError as e:
        raise DataError(f"{name} needs the full patient install ({e}); on a device use image_folder:PATH") from None
    try:
        return getattr(sources, name)(sub or split)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from None


def render_plain(image: np.ndarray, resolution: int, channels: int = 3) -> np.ndarray:
    """The whole uint8 (H, W, C) image resized to `resolution` (antialiased bilinear): float32 (C, R, R) in [0, 1].

    This is exactly the evaluation pipeline's rendering (`patient.data.views`, numpy and Pillow only)."""
    from patient.data import views

    return views.render(image, views.plain_resize(), resolution, channels)


def batches(source, resolution: int, batch_size: int,
            limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`(images f32[b, 3, R, R], labels i64[b])` over the first `limit` examples (all by default), in order."""
    n = len(source) if limit is None else min(limit, len(source))
    for start in range(0, n, batch_size):
        items = [source[i] for i in range(start, min(start + batch_size, n))]
        yield (np.stack([render_plain(it["image"], resolution) for it in items]),
               np.asarray([it["label"] for it in items], np.int64))


def sample(source, n: int, resolution: int) -> np.ndarray:
    """`n` images spread evenly over the source (every class of a sorted folder shows up), f32[n, 3, R, R]."""
    if n < 1:
        raise DataError(f"need at least one image, asked for {n}")
    idx = np.unique(np.linspace(0, len(source) - 1, num=min(n, len(source))).round().astype(int))
    return np.stack([render_plain(source[int(i)]["image"], resolution) for i in idx])
