"""Data: sources, views and teacher modes, Grain pipelines, and on-device mixup.

    import patient.data as pd
    src = pd.fashion_mnist("train")
    ds = pd.pipeline(src, mode="fm", student_res=28, batch_size=128, seed=0)
    it = iter(ds)               # {"student", "teacher", "label", "index"}; it.get_state() / it.set_state(...)
    ...                         # in the jitted step: student, teacher, lam = pd.mixup(key, student, teacher)
    it.close()
"""

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
    "LoaderError",
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


def __getattr__(name):
    # mixup needs JAX and the pipelines need Grain: import on first use so the sources (numpy only) work on a device.
    # Pinned into globals(). The submodules are `mixing` and `pipelines`, not `mixup` / `pipeline`: importing a
    # submodule binds its name in this package, which would shadow the function of the same name.
    import importlib

    if name == "mixup":
        globals()["mixup"] = importlib.import_module("patient.data.mixing").mixup
    elif name in ("LoaderError", "eval_pipeline", "fixed_teacher_views", "pipeline"):
        module = importlib.import_module("patient.data.pipelines")
        globals().update(LoaderError=module.LoaderError, eval_pipeline=module.eval_pipeline,
                         fixed_teacher_views=module.fixed_teacher_views, pipeline=module.pipeline)
    else:
        raise AttributeError(f"module 'patient.data' has no attribute {name!r}")
    return globals()[name]
