"""Data: sources, views and teacher modes, Grain pipelines, and on-device mixup.

    import patient.data as pd
    src = pd.fashion_mnist("train")
    ds = pd.pipeline(src, mode="fm", student_res=28, batch_size=128, seed=0)
    it = iter(ds)               # {"student", "teacher", "label", "index"}; it.get_state() / it.set_state(...)
    ...                         # in the jitted step: student, teacher, lam = pd.mixup(key, student, teacher)
    it.close()
"""

from patient.data.mixup import mixup
from patient.data.pipeline import eval_pipeline, fixed_teacher_views, pipeline
from patient.data.sources import (
    ArraySource,
    ImageFolderSource,
    SubsetSource,
    arrays,
    digits,
    fashion_mnist,
    image_folder,
    subset,
    tfds,
)
from patient.data.views import (
    MODES,
    ModeInfo,
    ViewParams,
    center_crop,
    draw_views,
    fixed_teacher_crops,
    inception_crop,
    mode_info,
    plain_resize,
    random_crop,
    render,
)

__all__ = [
    "MODES",
    "ArraySource",
    "ImageFolderSource",
    "ModeInfo",
    "SubsetSource",
    "ViewParams",
    "arrays",
    "center_crop",
    "digits",
    "draw_views",
    "eval_pipeline",
    "fashion_mnist",
    "fixed_teacher_crops",
    "fixed_teacher_views",
    "image_folder",
    "inception_crop",
    "mixup",
    "mode_info",
    "pipeline",
    "plain_resize",
    "random_crop",
    "render",
    "subset",
    "tfds",
]

