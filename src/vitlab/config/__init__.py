"""Configuration: what a training run depends on (:class:`TrainConfig` and its sections), read from
and written to YAML, and the shipped recipes."""

from ..data import DataConfig
from .train import (
    DINO,
    MAE,
    MP3,
    OBJECTIVES,
    Accel,
    Checkpoints,
    Finetune,
    Optim,
    TrainConfig,
    dump_config,
    load_config,
)

__all__ = ["DINO", "MAE", "MP3", "OBJECTIVES", "Accel", "Checkpoints", "DataConfig", "Finetune", "Optim",
           "TrainConfig", "dump_config", "load_config"]
