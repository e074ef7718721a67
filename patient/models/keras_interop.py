"""Keras 3 models as patient models: `from_keras` wraps one (JAX backend) for `distill`, `train` and `apply`, and
`to_keras` writes the trained values back so Keras's own tooling (`save("student.keras")`, `export(...)`) takes over.

    import os; os.environ["KERAS_BACKEND"] = "jax"     # before the first `import keras`
    import keras, patient
    from patient.models import from_keras, to_keras
    net = keras.applications.MobileNetV3Small(weights=None, classes=10, input_shape=(32, 32, 3),
                                              classifier_activation=None)   # logits, not probabilities
    student = from_keras(net)                      # (KerasModel, state); preprocessing "auto" -> "0_255" here
    result = patient.distill(teacher, student, data)
    to_keras(result.student, result.state).save("student.keras")

The wrapper is pure: its forward is `keras_model.stateless_call(trainable, non_trainable, x, training=...)`, so the
Keras model's own variables are never read after wrapping nor written before `to_keras`. Trainable variables are the
wrapper's array leaves (what optax updates), non-trainable ones (BatchNorm moving statistics, dropout seed state) are
the `state`; both are dicts keyed by Keras variable path (`"conv_bn/gamma"`). keras is imported only by the two
functions here that need it, never by `import patient` or `patient.models`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec

if TYPE_CHECKING:
    import keras

CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)  # keras.applications "caffe" mode: BGR pixels in [0, 255] minus these

# name -> (per-channel scale, per-channel offset, RGB->BGR) applied to patient's [0, 1] RGB input: x * scale + offset.
PREPROCESSING = {
    "unit": ((1.0,) * 3, (0.0,) * 3, False),  # [0, 1] unchanged: your own models trained on patient's input
    "0_255": ((255.0,) * 3, (0.0,) * 3, False),  # keras.applications built with include_preprocessing=True
    "-1_1": ((2.0,) * 3, (-1.0,) * 3, False),  # preprocess_input "tf": ResNetV2, MobileNet(V2), Inception, Xception
    "torch": (tuple(1 / s for s in IMAGENET_STD), tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)), False),
    "caffe": ((255.0,) * 3, tuple(-m for m in CAFFE_BGR_MEAN), True),  # ResNet50/101/152 (v1), VGG16/19
}
LAYOUTS = ("auto", "NHWC", "NCHW")


def _keras():
    """Import keras and insist on the JAX backend (the wrapper traces Keras's ops inside patient's jitted step)."""
    try:
        import keras
    except ImportError:
        raise ImportError('Keras interop needs keras 3: pip install -e ".[keras]" (or "keras>=3.8")') from None
    backend = keras.backend.backend()
    if backend != "jax":
        raise RuntimeError(
            f"patient's Keras interop needs Keras's JAX backend, but keras runs on {backend!r}; set "
            "os.environ['KERAS_BACKEND'] = 'jax' before the first `import keras` (or export KERAS_BACKEND=jax) and "
            "restart Python: the backend cannot change once keras is imported")
    return keras


def is_keras_model(obj: object) -> bool:
    """True for a Keras model object (checked without importing keras)."""
    return hasattr(obj, "stateless_call") and any(c.__module__.split(".")[0] == "keras" for c in type(obj).__mro__)


class KerasModel(eqx.Module):
    """A Keras model as a patient model. Build it with `from_keras`; batch it with `patient.models.apply`.

    Unlike the registry's models it is batched by nature (Keras layers see the whole batch), so `apply` calls
    `forward` directly instead of vmapping; BatchNorm statistics are then statistics of the whole (global) batch.
    """

    batched = True  # `patient.models.apply` calls `forward` on the whole batch instead of vmapping `__call__`

    params: dict  # trainable values, {variable path: array}
    spec: Any = eqx.field(static=True)  # a ModelSpec with family "keras"
    keras_model: Any = eqx.field(static=True)  # the wrapped model (hashed by identity)
    forward_model: Any = eqx.field(static=True)  # keras_model, or a functional view of it that also returns taps
    trainable_keys: tuple = eqx.field(static=True)  # forward_model.trainable_variables order
    state_keys: tuple = eqx.field(static=True)  # forward_model.non_trainable_variables order
    dtypes: tuple = eqx.field(static=True)  # Keras variable dtypes, trainable then non-trainable
    feature_names: tuple = eqx.field(static=True)  # patient names of the tapped layers, in output order
    layout: str = eqx.field(static=True)  # "NHWC" or "NCHW": what the Keras model takes
    scale: tuple = eqx.field(static=True)
    offset: tuple = eqx.field(static=True)
    bgr: bool = eqx.field(static=True)

    def prepare(self, images: jax.Array | np.ndarray) -> jax.Array:
        """patient's input f32[B, C, H, W] in [0, 1] -> what the Keras model takes (its layout and value range).

        Use it to call the Keras model yourself: `keras_model(model.prepare(x), training=False)`."""
        images = jnp.asarray(images)
        channels = dict(self.spec.kwargs)["channels"]
        if images.ndim != 4 or images.shape[1] != channels:
            raise ValueError(f"{self.spec.name} takes images f32[B, {channels}, H, W] (channels first, in [0, 1]), got "
                             f"shape {tuple(images.shape)}; set channels={channels} in the config to match the model")
        x = images[:, ::-1] if self.bgr else images
        if self.scale != (1.0,) * 3 or self.offset != (0.0,) * 3:
            scale = jnp.asarray(self.scale[:channels], x.dtype)[:, None, None]
            offset = jnp.asarray(self.offset[:channels], x.dtype)[:, None, None]
            x = x * scale + offset
        return jnp.transpose(x, (0, 2, 3, 1)) if self.layout == "NHWC" else x

    def forward(self, state: Mapping[str, Any], images: jax.Array | np.ndarray, *, train: bool = False,
                key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
        """The batched forward (what `patient.models.apply` calls).

        **Arguments:** `state` (the non-trainable variables), `images` f32[B, C, H, W] in [0, 1], `train` (Keras's
        `training=`: BatchNorm batch statistics, dropout), `key` (unused: dropout draws from Keras's seed state, which
        lives in `state`, so a run is reproducible from its state alone).

        **Returns:** `(logits f32[B, K], features {name: f32[B, C, H, W] or f32[B, D]}, new_state)`; features are
        channels first whatever the Keras layout, so the feature losses see patient's convention.
        """
        del key
        missing = [k for k in self.state_keys if k not in state]
        if missing:
            raise ValueError(f"state lacks {len(missing)} Keras non-trainable variable(s) (e.g. {missing[0]!r}); pass "
                             "the state that patient.models.from_keras returned with this model")
        n = len(self.trainable_keys)
        # Keras computes in its own dtype policy; a bfloat16 copy (teacher_dtype) keeps its rounded values.
        trainable = [jnp.asarray(self.params[k]).astype(d) for k, d in zip(self.trainable_keys, self.dtypes[:n])]
        non_trainable = [jnp.asarray(state[k]).astype(d) for k, d in zip(self.state_keys, self.dtypes[n:])]
        x = self.prepare(images)
        outputs, new_values = self.forward_model.stateless_call(trainable, non_trainable, x, training=bool(train))
        if self.feature_names:
            logits, taps = outputs[0], outputs[1:]
        else:
            logits, taps = outputs, []
        features = {}
        for name, f in zip(self.feature_names, taps):
            features[name] = jnp.transpose(f, (0, 3, 1, 2)) if (f.ndim == 4 and self.layout == "NHWC") else f
        new_state = dict(zip(self.state_keys, new_values)) if train else state
        return logits, features, new_state

    def __call__(self, x: jax.Array, state: Mapping[str, Any], *, train: bool = False,
                 key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
        """One example f32[C, H, W] (patient's per-example convention), inference only: in training, BatchNorm needs
        the whole batch, so train through `patient.models.apply`."""
        if train:
            raise ValueError(f"{self.spec.name} is a batched Keras model: train it through patient.models.apply "
                             "(or distill/train), which passes the whole batch")
        logits, features, state = self.forward(state, x[None], train=False)
        return logits[0], {k: v[0] for k, v in features.items()}, state


def _resolve_layout(keras_model, input_layout: str) -> str:
    if input_layout not in LAYOUTS:
        raise ValueError(f"input_layout={input_layout!r}: use 'auto', 'NHWC' (channels_last) or 'NCHW' "
                         "(channels_first)")
    if input_layout != "auto":
        return input_layout
    import keras

    for layer in _layers(keras_model):
        fmt = getattr(layer, "data_format", None)
        if fmt in ("channels_last", "channels_first"):
            return "NHWC" if fmt == "channels_last" else "NCHW"
    return "NHWC" if keras.config.image_data_format() == "channels_last" else "NCHW"


def _layers(keras_model):
    """Layers in order, looking into nested models (a Sequential wrapping a keras.applications model)."""
    for layer in getattr(keras_model, "layers", []):
        if hasattr(layer, "layers") and layer.layers:
            yield from _layers(layer)
        else:
            yield layer


def _resolve_preprocessing(keras_model, preprocessing) -> tuple[str, tuple, tuple, bool]:
    if isinstance(preprocessing, str):
        if preprocessing == "auto":
            # keras.applications models built with include_preprocessing=True start with Rescaling (MobileNetV3,
            # EfficientNet(V2), RegNet) or Normalization (ConvNeXt) and expect raw [0, 255] pixels.
            first = next((ly for ly in _layers(keras_model) if type(ly).__name__ != "InputLayer"), None)
            preprocessing = "0_255" if type(first).__name__ in ("Rescaling", "Normalization") else "unit"
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing={preprocessing!r}: use 'auto', one of {', '.join(PREPROCESSING)}, or a "
                             "(mean, std) pair applied to [0, 1] input")
        return (preprocessing, *PREPROCESSING[preprocessing])
    try:
        mean, std = (tuple(float(v) for v in np.broadcast_to(np.asarray(a, np.float64), (3,))) for a in preprocessing)
    except (TypeError, ValueError):
        raise ValueError(f"preprocessing={preprocessing!r}: use a name ({', '.join(PREPROCESSING)}, 'auto') or a "
                         "(mean, std) pair of numbers or 3-tuples") from None
    if any(s == 0 for s in std):
        raise ValueError(f"preprocessing std {std} has a zero; every std must be non-zero")
    return "mean_std", tuple(1 / s for s in std), tuple(-m / s for m, s in zip(mean, std)), False


def _input_shape(keras_model, layout):
    """(channels, H, W) of the Keras model's input (None where unknown, e.g. an unbuilt subclassed model)."""
    try:
        shape = tuple(keras_model.inputs[0].shape)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None, None, None
    if len(shape) != 4:
        raise ValueError(f"{keras_model.name} takes inputs of shape {shape}; from_keras wraps image models with one "
                         "4-D input (B, H, W, C) or (B, C, H, W)")
    return (shape[3], shape[1], shape[2]) if layout == "NHWC" else (shape[1], shape[2], shape[3])


def _check_logits(keras_model) -> None:
    layers = list(_layers(keras_model))
    last = layers[-1] if layers else None
    act = getattr(last, "activation", None)
    if type(last).__name__ == "Softmax" or getattr(act, "__name__", "") == "softmax":
        raise ValueError(f"{keras_model.name} ends in a softmax ({last.name}), but patient's losses need logits; build "
                         "keras.applications models with classifier_activation=None (or drop the final softmax)")


def _unique_keys(variables) -> list[str]:
    keys, seen = [], {}
    for v in variables:
        k = v.path
        if k in seen:  # two variables with one path (shared layer names across nested models): number the repeats
            seen[k] += 1
            k = f"{k}#{seen[k]}"
        else:
            seen[k] = 0
        keys.append(k)
    return keys


def from_keras(keras_model: keras.Model, *, input_layout: str = "auto",
               preprocessing: str | tuple[float | Sequence[float], float | Sequence[float]] = "auto",
               resolution: int | None = None, features: Mapping[str, str] | Sequence[str] | None = None,
               ) -> tuple[KerasModel, dict[str, jax.Array]]:
    """Wrap a built Keras 3 model (JAX backend) as a patient model.

    **Arguments:**

    - `keras_model`: a built `keras.Model` with one image input and one output of **logits** f32[B, K]
      (keras.applications classifiers end in softmax unless built with `classifier_activation=None`).
    - `input_layout`: what the Keras model takes: `"NHWC"` (channels_last), `"NCHW"`, or `"auto"` (the `data_format`
      of its first convolution/pooling layer, else `keras.config.image_data_format()`). patient's input is always
      f32[B, C, H, W] in [0, 1]; the wrapper transposes.
    - `preprocessing`: how patient's [0, 1] RGB becomes the Keras model's input: `"unit"` (unchanged), `"0_255"`
      (x * 255: keras.applications models with include_preprocessing=True, which rescale inside: MobileNetV3,
      EfficientNet(V2), ConvNeXt, RegNet), `"-1_1"` (2x - 1: the "tf" `preprocess_input` of ResNetV2, MobileNet(V2),
      InceptionV3, Xception, NASNet and MobileNetV3 built with include_preprocessing=False), `"torch"` (ImageNet
      mean/std: DenseNet), `"caffe"` (RGB->BGR, x * 255 minus the ImageNet BGR means: ResNet50 v1, VGG), a
      `(mean, std)` pair (`(x - mean) / std`), or `"auto"`: `"0_255"` when the model's first layer is `Rescaling`
      or `Normalization` (how keras.applications embed their preprocessing), otherwise `"unit"`. For pretrained
      weights pass what they were trained with: "auto" cannot know.
    - `resolution`: the default input side recorded in the spec (default: the model's input height).
    - `features`: Keras layer names to tap for the feature-based losses, either `{"stage2": "block_2_add", ...}`
      (patient names) or a list of layer names (used as the names). Needs a functional or Sequential model.

    **Returns:** `(model, state)`: a `KerasModel` whose array leaves are the trainable variables, and the
    non-trainable ones (BatchNorm moving statistics, Keras's dropout seed state) as a dict keyed by variable path.
    """
    keras = _keras()

    if not is_keras_model(keras_model):
        raise TypeError(f"from_keras takes a keras.Model, got {type(keras_model).__name__}")
    if not keras_model.built:
        raise ValueError(f"{keras_model.name} is not built; give it an input shape (keras.Input or input_shape=...) "
                         "or call it once on a batch before from_keras")
    _check_logits(keras_model)
    layout = _resolve_layout(keras_model, input_layout)
    pre_name, scale, offset, bgr = _resolve_preprocessing(keras_model, preprocessing)
    channels, height, width = _input_shape(keras_model, layout)
    if channels is None:
        channels = 3
    if channels not in (1, 3):
        raise ValueError(f"{keras_model.name} takes {channels} input channels; patient's images have 1 or 3")
    if (bgr or pre_name in ("torch",)) and channels != 3:
        raise ValueError(f"preprocessing={pre_name!r} is defined for RGB input; {keras_model.name} takes "
                         f"{channels} channel")
    resolution = resolution or (height if height == width else None)
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"{keras_model.name} has no fixed square input size ({height}x{width}); pass resolution=R "
                         "(the side patient renders its views at)")

    names, pairs, forward_model = (), [], keras_model
    if features:
        pairs = list(features.items()) if isinstance(features, Mapping) else [(n, n) for n in features]
        if len(getattr(keras_model, "inputs", None) or ()) != 1 or not getattr(keras_model, "outputs", None):
            raise ValueError(f"feature taps need a functional or Sequential model with one input; {keras_model.name} "
                             "is subclassed or takes several inputs")
        known = {layer.name: layer for layer in keras_model.layers}
        unknown = [lname for _, lname in pairs if lname not in known]
        if unknown:
            raise ValueError(f"{keras_model.name} has no layer {unknown[0]!r} to tap; its layers include "
                             f"{', '.join(list(known)[-8:])} (see keras_model.summary())")
        names = tuple(str(n) for n, _ in pairs)
        # One input tensor, not a one-element list: Keras warns when the call's structure differs from the graph's.
        forward_model = keras.Model(inputs=keras_model.inputs[0],
                                    outputs=[keras_model.outputs[0]] + [known[lname].output for _, lname in pairs],
                                    name=f"{keras_model.name}_taps")
    trainable = forward_model.trainable_variables
    non_trainable = forward_model.non_trainable_variables
    t_keys, s_keys = _unique_keys(trainable), _unique_keys(non_trainable)
    params = {k: jnp.asarray(v.value) for k, v in zip(t_keys, trainable)}
    state = {k: jnp.asarray(v.value) for k, v in zip(s_keys, non_trainable)}
    dtypes = tuple(jnp.dtype(v.dtype) for v in (*trainable, *non_trainable))

    def build(num_classes):
        mean = tuple(-o / s + 0.0 for o, s in zip(offset, scale))  # + 0.0: no -0.0 in the spec
        std = tuple(1 / s for s in scale)
        spec = ModelSpec(
            name=f"keras:{keras_model.name}", family="keras",
            kwargs=(("channels", channels), ("features", tuple((str(n), str(layer)) for n, layer in pairs)),
                    ("input_layout", layout), ("preprocessing", pre_name)),
            num_classes=num_classes, mean=mean, std=std, resolution=resolution)
        return KerasModel(params, spec, keras_model, forward_model, tuple(t_keys), tuple(s_keys), dtypes, names,
                          layout, tuple(scale), tuple(offset), bool(bgr))

    probe = build(0)
    x = jax.ShapeDtypeStruct((2, channels, resolution, resolution), jnp.float32)
    logits = jax.eval_shape(lambda m, s, x: m.forward(s, x, train=False)[0], probe, state, x)
    if not hasattr(logits, "shape") or len(logits.shape) != 2:
        raise ValueError(f"{keras_model.name} returns {jax.tree_util.tree_map(lambda a: a.shape, logits)}; from_keras "
                         "needs one output of logits f32[B, K]")
    return build(int(logits.shape[1])), state


def to_keras(model: KerasModel, state: Mapping[str, Any] | None = None, *, clone: bool = False) -> keras.Model:
    """Write `model`'s trained values (and `state`'s moving statistics) into its Keras model, and return that model.

    **Arguments:** `model`, `state` as returned by `distill`/`train` (`result.student`, `result.state`); `clone`:
    write into a fresh `keras.models.clone_model` copy instead of the original Keras model.

    **Returns:** the Keras model, ready for `save("student.keras")` or `export("student.onnx", format="onnx")` (a
    model never called before is called once on zeros, which Keras's `export` needs).
    Its output for `model.prepare(x)` equals `patient.models.apply(model, state, x)` logits.
    """
    keras = _keras()
    if not isinstance(model, KerasModel):
        raise TypeError(f"to_keras takes a model made by patient.models.from_keras, got {type(model).__name__}; "
                        "patient's own models are saved with patient.save")
    state = {} if state is None else state
    missing = [k for k in model.state_keys if k not in state]
    if missing:
        raise ValueError(f"state lacks {len(missing)} Keras non-trainable variable(s) (e.g. {missing[0]!r}); pass the "
                         "state returned with the model (result.state)")
    variables = [*model.forward_model.trainable_variables, *model.forward_model.non_trainable_variables]
    values = [model.params[k] for k in model.trainable_keys] + [state[k] for k in model.state_keys]
    target = model.keras_model
    if clone:
        target = keras.models.clone_model(model.keras_model)
        position = {id(v): i for i, v in enumerate(model.keras_model.variables)}
        copies = target.variables
        if len(copies) != len(position):
            raise ValueError(f"clone of {model.keras_model.name} has {len(copies)} variables, the original "
                             f"{len(position)}; use clone=False")
        variables = [copies[position[id(v)]] for v in variables]
    for v, value in zip(variables, values):
        value = np.asarray(jax.device_get(value)).astype(v.dtype)
        if tuple(value.shape) != tuple(v.shape):
            raise ValueError(f"{v.path}: trained value has shape {value.shape}, the Keras variable {tuple(v.shape)}")
        v.assign(value)
    if not getattr(target, "_called", True) and getattr(target, "inputs", None):
        # Keras's export() refuses a model that was never called; one call on zeros records its input signature.
        shape = [1 if d is None else d for d in target.inputs[0].shape]
        target(np.zeros(shape, target.inputs[0].dtype), training=False)
    return target
