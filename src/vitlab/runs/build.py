"""Build a run's model from its config: the one place a config becomes a network.

Training, fine-tuning, analysis and the report all rebuild models through :func:`build_model`,
so a run directory's ``config.yaml`` always describes the network its weights belong to,
architecture changes made by training options (convolutional initialisation, the removed last
attention skip) included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn
from timm.models import get_pretrained_cfg

from ..config import TrainConfig
from ..data import DatasetInfo
from ..errors import UnknownOptionError, VitlabError
from ..io import timestamp
from ..models import create_model
from ..models.conv_init import apply_conv_init
from ..models.layers import remove_last_attention_skip

__all__ = ["ARCHITECTURE_FIELDS", "build_model", "default_run_dir", "model_args_for"]


def default_run_dir(cfg: TrainConfig, root: str | Path = "runs") -> Path:
    """``runs/<model>-<data>-<timestamp>``."""
    data = cfg.data.name.replace("imagefolder:", "folder-").rstrip("/").replace("/", "_").replace(":", "_")
    return Path(root) / f"{cfg.model}-{data}-{timestamp()}"


#: The config fields, besides ``model_args``, that :func:`build_model` reads: what a fine-tuned run
#: takes from its source to rebuild the same network (conv init adds the bias tables; without the last
#: attention skip the head sees other features).
ARCHITECTURE_FIELDS = ("model", "conv_init", "conv_init_strength", "last_attention_skip")


def build_model(cfg: TrainConfig) -> nn.Module:
    """The run's model, as ``cfg`` describes it (architecture changes of training options included)."""
    try:
        model = create_model(cfg.model, **cfg.model_args)
    except UnknownOptionError as e:
        if cfg.progressive_resize and e.option == "dynamic_img_size":
            raise VitlabError(f"--progressive-resize trains on smaller images and {cfg.model} takes only the size it "
                              "was built for; use a model that takes any size (CCT, vit_*, a CNN) "
                              "or leave it off") from None
        raise
    if cfg.conv_init:  # new parameters (the bias tables): saved weights load back into this model
        apply_conv_init(model, cfg.conv_init, cfg.conv_init_strength, cfg.model)
    if not cfg.last_attention_skip:
        remove_last_attention_skip(model)
    return model


def model_args_for(cfg: TrainConfig, info: DatasetInfo) -> dict[str, Any]:
    """The keyword arguments that build the run's model: classes and image size from the data."""
    args: dict[str, Any] = {"num_classes": info.num_classes}
    pretrained_cfg = get_pretrained_cfg(cfg.model)
    if pretrained_cfg is None or pretrained_cfg.fixed_input_size:
        args["img_size"] = info.image_size  # ViTs and Mixers size their token grid from it
        if cfg.progressive_resize:
            args["dynamic_img_size"] = True  # smaller stages: the position embedding resampled to their grid
    if cfg.drop_path > 0:
        args["drop_path_rate"] = cfg.drop_path
    return {**args, **cfg.model_args}  # explicit model_args win
