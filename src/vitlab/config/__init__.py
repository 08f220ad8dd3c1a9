"""Configuration: what a training run depends on (:class:`TrainConfig`), read from and written to
YAML, and the shipped recipes."""

from ..data import DataConfig
from .train import TrainConfig, dump_config, load_config

__all__ = ["DataConfig", "TrainConfig", "dump_config", "load_config"]
