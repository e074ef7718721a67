"""Model zoo: BiT ResNetV2, ResNet (ImageNet and CIFAR depths) and MobileNetV3 as pure-functional Equinox modules,
and Keras 3 models wrapped by `from_keras` (keras itself is imported only when `from_keras`/`to_keras` run)."""

from .keras_interop import KerasModel, from_keras, to_keras
from .registry import ModelSpec, apply, create, describe, init_state, list_models, param_count, spec_of

__all__ = ["KerasModel", "ModelSpec", "apply", "create", "describe", "from_keras", "init_state", "list_models",
           "param_count", "spec_of", "to_keras"]
