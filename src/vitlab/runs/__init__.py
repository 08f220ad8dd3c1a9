"""The run directory: reading and writing a run's config, weights, metrics and checkpoints, and
rebuilding its model (:func:`build_model`). Everything above (training, analysis, the report)
passes runs around through this package."""

from .build import ARCHITECTURE_FIELDS, build_model, default_run_dir, model_args_for
from .rundir import (
    CONFIG,
    EMA_WEIGHTS,
    INIT_WEIGHTS,
    METRICS,
    WEIGHTS,
    list_checkpoints,
    load_state,
    load_weights,
    read_config,
    read_metrics,
)

__all__ = ["ARCHITECTURE_FIELDS", "CONFIG", "EMA_WEIGHTS", "INIT_WEIGHTS", "METRICS", "WEIGHTS", "build_model",
           "default_run_dir", "list_checkpoints", "load_state", "load_weights", "model_args_for", "read_config",
           "read_metrics"]
