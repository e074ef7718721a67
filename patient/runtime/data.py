"""Data specs and evaluation images without JAX.

One parser for the data specs every command takes (`digits`, `fashion_mnist`, `image_folder:PATH`): `open_source`
gives the labelled source of a spec; the training commands call it with split "train", export verification, int8
calibration, `patient-eval` and `patient-bench` with split "test". The rendering (`render_plain`) is the evaluation
pipeline's, so every format sees the same pixels. It needs numpy and Pillow only (`patient.data.sources` and
`patient.data.views` import no JAX), so it runs on a device:

- `image_folder:PATH`: sorted class folders, sorted `.jpg/.jpeg/.png` files (`patient.data.image_folder`).
- `digits`, `fashion_mnist`: scikit-learn's digits and Debian's Fashion-MNIST files (the full install).
- `render_plain`: Pillow's antialiased bilinear resize of the whole image, grayscale repeated to 3 channels, float32 in
  [0, 1], channels first.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from patient.data.sources import ArraySource, DataSource, ImageFolderSource

DATA_HELP = "digits, fashion_mnist or image_folder:PATH"
NAMES = ("digits", "fashion_mnist")


class DataError(ValueError):
    """A data spec that cannot be opened (unknown name, missing folder, no images, ...)."""


def open_source(spec: str, split: str = "test") -> ArraySource | ImageFolderSource:
    """A labelled source from a data spec: `digits`, `fashion_mnist` (the `split`, default test) or
    `image_folder:PATH`. Sources have `len`, `[i] -> {"image": uint8 HWC, "label": int}`, `class_names` and `name`."""
    if not isinstance(spec, str) or not spec:
        raise DataError(f"no data given; use {DATA_HELP}")
    from patient.data import sources

    name, _, arg = spec.partition(":")
    if not ((name == "image_folder" and arg) or (name in NAMES and arg in ("", "train", "test"))):
        raise DataError(f"unknown data {spec!r}; use {DATA_HELP}")
    try:
        return sources.image_folder(arg) if name == "image_folder" else getattr(sources, name)(arg or split)
    except ImportError as e:
        raise DataError(f"{name} needs the full patient install ({e}); on a device use image_folder:PATH") from None
    except (OSError, ValueError) as e:
        raise DataError(str(e)) from None


def render_plain(image: np.ndarray, resolution: int, channels: int = 3) -> np.ndarray:
    """The whole uint8 (H, W, C) image resized to `resolution` (antialiased bilinear): float32 (C, R, R) in [0, 1].

    This is exactly the evaluation pipeline's rendering (`patient.data.views`, numpy and Pillow only)."""
    from patient.data import views

    return views.render(image, views.plain_resize(), resolution, channels)


def batches(source: DataSource, resolution: int, batch_size: int,
            limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`(images f32[b, 3, R, R], labels i64[b])` over the first `limit` examples (all by default), in order."""
    n = len(source) if limit is None else min(limit, len(source))
    for start in range(0, n, batch_size):
        items = [source[i] for i in range(start, min(start + batch_size, n))]
        yield (np.stack([render_plain(it["image"], resolution) for it in items]),
               np.asarray([it["label"] for it in items], np.int64))


def sample(source: DataSource, n: int, resolution: int) -> np.ndarray:
    """`n` images spread evenly over the source (every class of a sorted folder shows up), f32[n, 3, R, R]."""
    if n < 1:
        raise DataError(f"need at least one image, asked for {n}")
    idx = np.unique(np.linspace(0, len(source) - 1, num=min(n, len(source))).round().astype(int))
    return np.stack([render_plain(source[int(i)]["image"], resolution) for i in idx])
