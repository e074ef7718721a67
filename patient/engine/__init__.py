"""The distillation engine: `distill(teacher, student, data)` and `train(model, data)`."""

from .config import Config, ConfigError, load_config
from .trainer import DistillResult, NonFiniteLossError, distill, evaluate, train

__all__ = ["Config", "ConfigError", "DistillResult", "NonFiniteLossError", "distill", "evaluate", "load_config", "train"]
