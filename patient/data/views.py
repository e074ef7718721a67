"""Views: where each model looks at an image, and the teacher modes of Beyer et al. (2022) by name.

A view is drawn once per example as `ViewParams` (a crop box in coordinates relative to the source image, plus a flip)
and then rendered at any resolution. Drawing and rendering are separate so that the student view and the teacher view of
the "consistent" modes (`same/*`, `fm`) come from *one* box, each rendered at its own resolution: the teacher sees
exactly the pixels the student sees, only sharper or blurrier.

Relative coordinates: the source image spans [0, 1] x [0, 1]; pixel `i` of a side of `n` pixels covers [i/n, (i+1)/n].
A box may reach outside [0, 1] only for padded random crops (CIFAR style); the outside is black (zeros).

Teacher modes (paper, section 3.2):

| mode         | student view                    | teacher view                                   | notes                     |
|--------------|---------------------------------|------------------------------------------------|---------------------------|
| `fix/rs`     | plain resize                    | plain resize                                   | no augmentation at all    |
| `fix/cc`     | mild random crop (0.875) + flip | centre crop (0.875)                            | teacher fixed             |
| `fix/ic_ens` | inception crop + flip           | K fixed inception crops, predictions averaged  | engine caches the teacher |
| `ind/rc`     | padded random crop + flip       | its own padded random crop + flip              | independent noise         |
| `ind/ic`     | inception crop + flip           | its own inception crop + flip                  | independent noise         |
| `same/rc`    | padded random crop + flip       | the same box and flip                          | consistent                |
| `same/ic`    | inception crop + flip           | the same box and flip                          | consistent                |
| `fm`         | inception crop + flip           | the same box and flip, then mixup (on device)  | "function matching"       |
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
from PIL import Image

__all__ = [
    "MODES",
    "ModeInfo",
    "ViewParams",
    "center_crop",
    "draw_views",
    "fixed_teacher_crops",
    "inception_crop",
    "mode_info",
    "plain_resize",
    "random_crop",
    "render",
]

# Defaults from the paper / big_vision's `inception_crop` and the usual CIFAR recipe.
INCEPTION_AREA = (0.05, 1.0)
INCEPTION_ASPECT = (3 / 4, 4 / 3)
CENTER_CROP_FRACTION = 0.875
CIFAR_PAD = 4 / 32


@dataclasses.dataclass(frozen=True)
class ViewParams:
    """One view of one image: a crop box in relative coordinates and a horizontal flip.

    **Arguments:**

    - `y0`, `x0`: top-left corner of the box, relative to the image height / width.
    - `h`, `w`: box height / width, relative to the image height / width (> 0).
    - `flip`: mirror the rendered view left-right.
    """

    y0: float
    x0: float
    h: float
    w: float
    flip: bool = False

    def pixel_box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """The box as Pillow wants it: `(left, upper, right, lower)` in (float) pixels of a `height x width` image."""
        return (self.x0 * width, self.y0 * height, (self.x0 + self.w) * width, (self.y0 + self.h) * height)


def plain_resize(flip: bool = False) -> ViewParams:
    """The whole image (resized, never cropped)."""
    return ViewParams(0.0, 0.0, 1.0, 1.0, bool(flip))


def center_crop(fraction: float = CENTER_CROP_FRACTION, flip: bool = False) -> ViewParams:
    """A centred box of `fraction` of each side (0.875 = the usual 224-of-256 evaluation crop)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"center_crop(fraction={fraction}): fraction must be in (0, 1]")
    off = (1.0 - fraction) / 2.0
    return ViewParams(off, off, fraction, fraction, bool(flip))


def random_crop(
    rng: np.random.Generator, *, size: float = 1.0, pad: float = CIFAR_PAD, flip: bool = True
) -> ViewParams:
    """A box of relative side `size` placed uniformly inside the image padded by `pad` on every side.

    `size=1, pad=4/32` is the CIFAR recipe (pad 4 pixels of 32, crop 32); `size=0.875, pad=0` is the "mild random crop"
    of `fix/cc`. The padded border renders black. With `flip`, the view is mirrored with probability 1/2.
    """
    if not 0.0 < size <= 1.0 + 2 * pad:
        raise ValueError(f"random_crop(size={size}, pad={pad}): size must be in (0, 1 + 2*pad]")
    lo, hi = -pad, 1.0 + pad - size
    y0, x0 = rng.uniform(lo, hi), rng.uniform(lo, hi)
    do_flip = bool(rng.random() < 0.5) if flip else False
    return ViewParams(float(y0), float(x0), float(size), float(size), do_flip)


def inception_crop(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    area: tuple[float, float] = INCEPTION_AREA,
    aspect: tuple[float, float] = INCEPTION_ASPECT,
    attempts: int = 10,
    flip: bool = True,
) -> ViewParams:
    """Inception-style random resized crop (Szegedy et al. 2015; TF's `sample_distorted_bounding_box`).

    Each attempt draws an area fraction uniformly from `area` and an aspect ratio (width / height, in pixels)
    log-uniformly from `aspect`; the first box that fits inside the `height x width` image is placed uniformly.
    Boxes are continuous (not rounded to pixels). After `attempts` misses, the fallback is the largest centred box
    whose aspect ratio is clamped into `aspect` (the whole image when its own aspect is in range), as in torchvision;
    its area may then fall below `area[0]` only for images more elongated than the aspect range allows.

    **Returns:** a `ViewParams` inside [0, 1]^2; flipped with probability 1/2 when `flip`.
    """
    if not 0.0 < area[0] <= area[1] <= 1.0:
        raise ValueError(f"inception_crop(area={area}): need 0 < min <= max <= 1")
    if not 0.0 < aspect[0] <= aspect[1]:
        raise ValueError(f"inception_crop(aspect={aspect}): need 0 < min <= max")
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    box = None
    for _ in range(attempts):
        target = rng.uniform(area[0], area[1]) * height * width
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w_px, h_px = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if w_px <= width and h_px <= height:
            h, w = h_px / height, w_px / width
            y0, x0 = rng.uniform(0.0, 1.0 - h), rng.uniform(0.0, 1.0 - w)
            box = (float(y0), float(x0), float(h), float(w))
            break
    if box is None:  # Fallback: centred box with the aspect ratio clamped into range.
        image_ratio = width / height
        if image_ratio < aspect[0]:
            h, w = image_ratio / aspect[0], 1.0
        elif image_ratio > aspect[1]:
            h, w = 1.0, aspect[1] / image_ratio
        else:
            h, w = 1.0, 1.0
        box = ((1.0 - h) / 2, (1.0 - w) / 2, h, w)
    do_flip = bool(rng.random() < 0.5) if flip else False
    return ViewParams(*box, do_flip)


# ------------------------------------------------------------------------------------------------- teacher modes


@dataclasses.dataclass(frozen=True)
class ModeInfo:
    """What a teacher mode asks of the data pipeline and of the distillation engine.

    - `student`, `teacher`: view kinds, one of `"rs"` (plain resize), `"cc"` (centre crop), `"mrc"` (mild random
      crop), `"rc"` (padded random crop), `"ic"` (inception crop).
    - `shared`: the teacher view uses the student's params (the consistent teacher).
    - `fixed`: the teacher's view of an example never changes, so its predictions can be precomputed once
      (`fixed_teacher_views`) and looked up by `"index"`.
    - `ensemble`: the teacher's prediction is the mean over K fixed inception crops (only `fix/ic_ens`).
    - `mixup`: the train step applies `patient.data.mixup` to both views (only `fm`).
    """

    name: str
    student: str
    teacher: str
    shared: bool
    fixed: bool
    mixup: bool
    ensemble: bool


MODES: dict[str, ModeInfo] = {
    m.name: m
    for m in [
        ModeInfo("fix/rs", "rs", "rs", shared=False, fixed=True, mixup=False, ensemble=False),
        ModeInfo("fix/cc", "mrc", "cc", shared=False, fixed=True, mixup=False, ensemble=False),
        ModeInfo("fix/ic_ens", "ic", "ic", shared=False, fixed=True, mixup=False, ensemble=True),
        ModeInfo("ind/rc", "rc", "rc", shared=False, fixed=False, mixup=False, ensemble=False),
        ModeInfo("ind/ic", "ic", "ic", shared=False, fixed=False, mixup=False, ensemble=False),
        ModeInfo("same/rc", "rc", "rc", shared=True, fixed=False, mixup=False, ensemble=False),
        ModeInfo("same/ic", "ic", "ic", shared=True, fixed=False, mixup=False, ensemble=False),
        ModeInfo("fm", "ic", "ic", shared=True, fixed=False, mixup=True, ensemble=False),
    ]
}


def mode_info(mode: str) -> ModeInfo:
    """Look up a teacher mode by name; one clear error for anything else."""
    try:
        return MODES[mode]
    except (KeyError, TypeError):
        raise ValueError(f"mode={mode!r} is not a teacher mode; use one of {', '.join(MODES)}") from None


def _draw(kind: str, rng: np.random.Generator, height: int, width: int, area=INCEPTION_AREA) -> ViewParams:
    if kind == "rs":
        return plain_resize()
    if kind == "cc":
        return center_crop()
    if kind == "mrc":
        return random_crop(rng, size=CENTER_CROP_FRACTION, pad=0.0)
    if kind == "rc":
        return random_crop(rng)
    if kind == "ic":
        return inception_crop(rng, height, width, area=area)
    raise AssertionError(kind)


def fixed_teacher_crops(seed: int, index: int, height: int, width: int, crops: int,
                        area: tuple[float, float] = INCEPTION_AREA) -> list[ViewParams]:
    """The `crops` inception crops (with random flips) of `fix/ic_ens` for example `index` of the source.

    They depend only on `(seed, index)`, never on epoch, shuffling or sharding, so the precomputed cache and the
    pipeline's `"teacher"` view (crop 0) agree whenever they are given the same seed.
    """
    rng = np.random.default_rng((int(seed), int(index), 0x1CE5))
    return [inception_crop(rng, height, width, area=area) for _ in range(crops)]


def draw_views(
    mode: str, rng: np.random.Generator, height: int, width: int, *, index: int = 0, seed: int = 0,
    area: tuple[float, float] | None = None,
) -> tuple[ViewParams, ViewParams]:
    """Draw `(student, teacher)` view params for one `height x width` image under `mode`.

    `rng` is the per-example generator (Grain's `random_map`); `index` (position in the source) and `seed` are only used
    by `fix/ic_ens`, whose teacher view is crop 0 of `fixed_teacher_crops(seed, index, ...)` so that it stays fixed.
    `area` is the inception crop's relative area range (default the paper's (0.05, 1.0)).
    """
    area = INCEPTION_AREA if area is None else tuple(area)
    info = mode_info(mode)
    student = _draw(info.student, rng, height, width, area)
    if info.shared:
        teacher = student
    elif info.ensemble:
        teacher = fixed_teacher_crops(seed, index, height, width, 1, area)[0]
    else:
        teacher = _draw(info.teacher, rng, height, width, area)
    return student, teacher


# ------------------------------------------------------------------------------------------------- rendering


def _as_pil(image: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"render: image dtype is {arr.dtype}; sources hand out uint8 HWC images")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3):
        return Image.fromarray(arr)  # uint8 (H, W) -> mode L, (H, W, 3) -> mode RGB
    raise ValueError(f"render: image shape is {arr.shape}; expected (H, W), (H, W, 1) or (H, W, 3)")


def render(
    image: np.ndarray | Image.Image,
    params: ViewParams,
    resolution: int | tuple[int, int],
    channels: Literal[1, 3] = 3,
) -> np.ndarray:
    """Render one view: crop `params`' box, resize with antialiasing, flip, fix the channel count.

    Pillow's `resize(..., box=...)` resamples straight from the (float) box with a bilinear filter whose support
    widens when downsampling (antialiased), so a view is one resampling of the source, not crop-then-resize.

    **Arguments:**

    - `image`: uint8 `(H, W)`, `(H, W, 1)` or `(H, W, 3)` array, or a PIL image (mode `L` or `RGB`).
    - `params`: the view.
    - `resolution`: output side `S`, or `(height, width)`.
    - `channels`: 3 repeats grayscale; 1 converts RGB to luma (ITU-R 601).

    **Returns:** float32 `(channels, height, width)` in [0, 1].
    """
    out_h, out_w = (resolution, resolution) if isinstance(resolution, int) else resolution
    pil = _as_pil(image)
    if pil.mode not in ("L", "RGB"):
        pil = pil.convert("RGB")
    if channels == 1 and pil.mode == "RGB":
        pil = pil.convert("L")
    width, height = pil.size
    left, upper, right, lower = params.pixel_box(height, width)
    # Padded random crops reach outside the image: pad with black so Pillow's box stays inside.
    pad_x = max(0, math.ceil(max(-left, right - width, 0.0) - 1e-9))
    pad_y = max(0, math.ceil(max(-upper, lower - height, 0.0) - 1e-9))
    if pad_x or pad_y:
        canvas = Image.new(pil.mode, (width + 2 * pad_x, height + 2 * pad_y))
        canvas.paste(pil, (pad_x, pad_y))
        pil, left, right, upper, lower = canvas, left + pad_x, right + pad_x, upper + pad_y, lower + pad_y
    # Guard float round-off at the borders (Pillow rejects a box even 1e-12 outside the image).
    box = (max(left, 0.0), max(upper, 0.0), min(right, pil.size[0]), min(lower, pil.size[1]))
    view = pil.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
    if params.flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(view, dtype=np.float32) / np.float32(255)
    if arr.ndim == 2:
        arr = arr[None]
        if channels == 3:
            arr = np.repeat(arr, 3, axis=0)
    else:
        arr = np.ascontiguousarray(arr.transpose(2, 0, 1))
    return arr
