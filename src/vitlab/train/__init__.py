"""Training: configuration, the loop, and the run directory."""

from .config import DataConfig, TrainConfig, dump_config, load_config
from .rundir import load_weights, read_config, read_metrics
from .trainer import TrainResult, evaluate, train

__all__ = ["DataConfig", "TrainConfig", "TrainResult", "dump_config", "evaluate", "load_config",
           "load_weights", "read_config", "read_metrics", "train"]
