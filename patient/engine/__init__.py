"""The distillation engine: `distill(teacher, student, data)` and `train(model, data)`."""

from .config import Config, ConfigError, load_config
from .hosts import join_hosts
from .trainer import DistillResult, NonFiniteLossError, distill, evaluate, train

__all__ = ["Config", "ConfigError", "DistillResult", "NonFiniteLossError", "distill", "evaluate", "join_hosts", "load_config",
           "train"]
