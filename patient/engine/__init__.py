"""The distillation engine: `distill(teacher, student, data)` and `train(model, data)`."""

from .config import Config, ConfigError, load_config
from .evaluation import evaluate
from .hosts import join_hosts
from .trainer import DistillResult, NonFiniteLossError, PeerLostError, distill, train

__all__ = ["Config", "ConfigError", "DistillResult", "NonFiniteLossError", "PeerLostError", "distill", "evaluate",
           "join_hosts", "load_config", "train"]
