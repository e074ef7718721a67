"""Model zoo: BiT ResNetV2, ResNet (ImageNet and CIFAR depths) and MobileNetV3 as pure-functional Equinox modules."""

from .registry import ModelSpec, apply, create, describe, init_state, list_models, param_count, spec_of

__all__ = ["ModelSpec", "apply", "create", "describe", "init_state", "list_models", "param_count", "spec_of"]
