"""Training: the loop and the objectives it drives.

The config and the run directory live one layer below (:mod:`vitlab.config`, :mod:`vitlab.runs`);
they are re-exported here because a training script needs them together.
"""

from ..config import DataConfig, TrainConfig, dump_config, load_config
from ..runs import load_weights, read_config, read_metrics
from .trainer import TrainResult, evaluate, train

__all__ = ["DataConfig", "TrainConfig", "TrainResult", "dump_config", "evaluate", "load_config",
           "load_weights", "read_config", "read_metrics", "train"]
