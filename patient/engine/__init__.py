"""The distillation engine: `distill(teacher, student, data)` and `train(model, data)`."""

from .config import Config, ConfigError, load_config
from .trainer import DistillResult, NonFiniteLossError, distill, train

__all__ = ["Config", "ConfigError", "DistillResult", "NonFiniteLossError", "distill", "load_config", "train"]
