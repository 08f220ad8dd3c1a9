"""Training configuration: one dataclass, loaded from and saved to YAML.

A run's ``config.yaml`` holds every value the run used, so the run can be rebuilt or resumed
from it alone. Unknown keys are refused with the list of valid ones (a typo must not silently
fall back to a default).
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..data import DataConfig
from ..errors import VitlabError, closest_names


@dataclass
class TrainConfig:
    """Everything a training run depends on."""

    #: Registered model name (``vitlab models`` lists them) and keyword overrides for it.
    model: str = "vit_nano_patch8_sincos_32"
    model_args: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    epochs: int = 10
    batch_size: int = 128
    #: The recipe (``vitlab recipes``) these values started from; informational once loaded.
    recipe: str | None = None
    #: ``adamw`` or ``sgd`` (with Nesterov momentum), both timm's.
    optimizer: str = "adamw"
    momentum: float = 0.9
    #: Peak learning rate (reached after the warm-up), and the floor of the cosine decay.
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    #: Linear warm-up from ``warmup_lr`` to ``lr``, in epochs (fractions allowed).
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    label_smoothing: float = 0.1
    #: Stochastic depth rate (timm's ``drop_path_rate``), for models that have it.
    drop_path: float = 0.0
    #: Mixup and CutMix (timm's): their Beta alphas (0: off), the probability that a batch is
    #: mixed, and that CutMix is used when both are on. Labels are smoothed inside the mix.
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    #: Exponential moving average of the weights (timm's ModelEmaV3, with warm-up), evaluated
    #: beside the model every epoch and saved as ``model_ema.safetensors``; 0 turns it off.
    ema_decay: float = 0.0
    #: ``supervised`` (labels), or self-supervised pretraining (``vitlab pretrain --method X``):
    #: ``mp3``, masked patch position prediction (Zhai et al.), keys from a random ``mp3_keep`` of
    #: the patches; ``mae``, masked autoencoding (He et al.); ``dino``, self-distillation (Caron et al.).
    objective: str = "supervised"
    mp3_keep: float = 0.25
    #: MAE: the fraction of patches hidden from the encoder; the light decoder's width, depth and
    #: heads (sized for 32x32 ViTs); targets normalised per patch (the paper's default).
    mae_mask_ratio: float = 0.75
    mae_decoder_dim: int = 128
    mae_decoder_depth: int = 2
    mae_decoder_heads: int = 4
    mae_norm_pix: bool = True
    #: DINO: the head's prototypes (K), hidden width and bottleneck; student and teacher
    #: temperatures, the teacher's warmed up linearly from 0.04 over ``dino_teacher_temp_warmup``
    #: epochs; the teacher's EMA momentum (rising on a cosine to 1) and the centre's; the smallest
    #: area fraction of the two random crops.
    dino_prototypes: int = 1024
    dino_hidden_dim: int = 256
    dino_bottleneck_dim: int = 64
    dino_student_temp: float = 0.1
    dino_teacher_temp: float = 0.04
    dino_teacher_temp_warmup: float = 0.0
    dino_momentum: float = 0.996
    dino_center_momentum: float = 0.9
    dino_crop_scale: float = 0.4
    #: Early-exit models: ``joint`` (every head learns from the labels), ``branches`` (the backbone
    #: frozen, the exit branches learn from the labels) or ``copycat`` (the backbone frozen, each
    #: branch learns to copy the final head's predictions; Bakhtiarnia et al.'s second stage).
    exit_training: str = "joint"
    #: Transfer (``vitlab finetune``): start from this run directory's trained weights with a new
    #: classifier; ``full`` trains every weight, ``linear`` only the classifier (a linear probe);
    #: ``reinit_blocks`` re-initialises the top k blocks first (Matsoukas et al.'s feature reuse).
    finetune_from: str | None = None
    finetune_mode: str = "full"
    reinit_blocks: int = 0
    #: Spatial entropy regulariser (Peruzzo et al.): its peak weight (0: off; the paper's is
    #: 0.01), reached after a linear warm-up of this many epochs, then a cosine decay to zero.
    spatial_entropy: float = 0.0
    spatial_entropy_warmup: float = 10.0
    #: False: the paper's variant without the last block's attention skip connection (timm blocks).
    last_attention_skip: bool = True
    #: Convolutional initialisation of attention (:mod:`vitlab.models.conv_init`): every timm
    #: attention gets a learnable relative position bias that starts with head h attending to one
    #: offset of a ``conv_init`` x ``conv_init`` kernel (odd; 0: off); ``conv_init_strength`` is
    #: the bias at that offset (5: about 97% of a patch's attention there at initialisation).
    conv_init: int = 0
    conv_init_strength: float = 5.0
    #: Clip the gradient norm to this value (``None``: no clipping).
    grad_clip: float | None = None
    seed: int = 0
    eval_batch_size: int = 256
    #: Also evaluate with horizontal-flip test-time augmentation (the mean of the logits of each
    #: validation image and its mirror), logged as ``val_loss_flip`` / ``val_acc_flip`` beside the
    #: plain ``val_acc``, which it never replaces.
    eval_flip: bool = False
    #: Progressive resizing: ``"SIZE:EPOCHS[,SIZE:EPOCHS...]"`` trains the first EPOCHS epochs on
    #: batches downscaled to SIZE x SIZE (antialiased bilinear, after augmentation), stage after
    #: stage, and the remaining epochs at the data's own size; validation is always at full size.
    #: Smaller images are cheaper steps: more epochs in the same time. ``None``: off.
    progressive_resize: str | None = None
    #: Start from these weights (safetensors, or a trusted pickle) instead of a fresh initialisation;
    #: matched by name, a classifier of another size kept as initialised (:mod:`vitlab.weights`).
    init_weights: str | None = None
    #: Also checkpoint every this many steps within an epoch (0: at the end of every epoch only),
    #: keeping the newest ``keep_checkpoints``; a killed run resumes from the newest.
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    #: ``fp32``, ``bf16`` (autocast; refused where bf16 is not native) or ``auto`` (bf16 where native).
    precision: str = "fp32"
    #: torch.compile the model; channels-last memory layout: ``auto`` (CNNs), ``on`` or ``off``.
    compile: bool = False
    channels_last: str = "off"
    #: ``auto`` (this rank's GPU if there is one), ``cpu`` or ``cuda``.
    device: str = "auto"

    def validate(self) -> None:
        """Refuse values that cannot work, with a message naming the fix (before any work starts)."""
        from ..data.datasets import parse_name
        from ..models import check_model_name

        check_model_name(self.model)
        parse_name(self.data.name)
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, not {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, not {self.batch_size}"),
            (self.lr > 0, f"learning rate must be positive, not {self.lr}"),
            (self.warmup_epochs >= 0, f"warm-up must be non-negative, not {self.warmup_epochs}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), not {self.label_smoothing}"),
            (self.optimizer in ("adamw", "sgd"), f"optimizer must be adamw or sgd, not '{self.optimizer}'"),
            (self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix alphas must be non-negative"),
            (0 <= self.mix_prob <= 1 and 0 <= self.mix_switch_prob <= 1, "mix_prob and mix_switch_prob must be in [0, 1]"),
            (not (self.mixup or self.cutmix) or self.batch_size % 2 == 0,
             f"Mixup and CutMix pair images within a batch: use an even batch size, not {self.batch_size}"),
            (self.spatial_entropy >= 0 and self.spatial_entropy_warmup >= 0,
             "spatial_entropy and spatial_entropy_warmup must be non-negative"),
            (self.conv_init == 0 or (self.conv_init >= 1 and self.conv_init % 2 == 1),
             f"conv_init is an odd kernel size such as 3 (a kernel has a centre patch; 0: off), not {self.conv_init}"),
            (math.isfinite(self.conv_init_strength) and self.conv_init_strength > 0,
             f"conv_init_strength must be a positive number, not {self.conv_init_strength}"),
            (self.finetune_mode in ("full", "linear"), f"finetune_mode must be full or linear, not '{self.finetune_mode}'"),
            (self.reinit_blocks >= 0, f"reinit_blocks must be non-negative, not {self.reinit_blocks}"),
            (self.objective in ("supervised", "mp3", "mae", "dino"),
             f"objective must be supervised, mp3, mae or dino, not '{self.objective}'"),
            (self.objective == "supervised" or not (self.mixup or self.cutmix),
             f"Mixup/CutMix mix labels; self-supervised pretraining has none to mix: turn them off for "
             f"--method {self.objective}"),
            (self.objective == "supervised" or not self.eval_flip,
             f"--eval-flip averages a classifier's logits; --method {self.objective}'s validation is its own "
             f"objective (or a k-NN monitor): leave it off, and use it when fine-tuning"),
            (self.objective == "supervised" or not self.progressive_resize,
             f"--progressive-resize is for supervised training; --method {self.objective}'s targets are sized to the "
             f"full token grid: leave it off, and use it when fine-tuning"),
            (0 < self.mp3_keep <= 1, f"mp3_keep (the fraction of patches used as keys) must be in (0, 1], not {self.mp3_keep}"),
            (0 < self.mae_mask_ratio < 1, f"mae_mask_ratio (the fraction of patches hidden) must be in (0, 1), "
                                          f"not {self.mae_mask_ratio}"),
            (min(self.mae_decoder_dim, self.mae_decoder_depth, self.mae_decoder_heads) >= 1,
             "mae_decoder_dim, mae_decoder_depth and mae_decoder_heads must be at least 1"),
            (self.mae_decoder_dim % 4 == 0 and self.mae_decoder_dim % max(self.mae_decoder_heads, 1) == 0,
             f"mae_decoder_dim must be a multiple of 4 (its sin-cos embedding) and of mae_decoder_heads, "
             f"not {self.mae_decoder_dim} with {self.mae_decoder_heads} heads"),
            (min(self.dino_prototypes, self.dino_hidden_dim, self.dino_bottleneck_dim) >= 1,
             "dino_prototypes, dino_hidden_dim and dino_bottleneck_dim must be at least 1"),
            (self.dino_student_temp > 0 and self.dino_teacher_temp > 0,
             "dino_student_temp and dino_teacher_temp must be positive"),
            (self.dino_teacher_temp_warmup >= 0,
             f"dino_teacher_temp_warmup must be a non-negative number of epochs, not {self.dino_teacher_temp_warmup}"),
            (0 <= self.dino_momentum <= 1 and 0 <= self.dino_center_momentum <= 1,
             "dino_momentum and dino_center_momentum must be in [0, 1]"),
            (0 < self.dino_crop_scale <= 1, f"dino_crop_scale (the smallest crop's area fraction) must be in (0, 1], "
                                            f"not {self.dino_crop_scale}"),
            (self.exit_training in ("joint", "branches", "copycat"),
             f"exit_training must be joint, branches or copycat, not '{self.exit_training}'"),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), not {self.ema_decay}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be 0 or a number of steps, not {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be at least 1, not {self.keep_checkpoints}"),
            (self.precision in ("fp32", "bf16", "auto"), f"precision must be fp32, bf16 or auto, not '{self.precision}'"),
            (self.channels_last in ("auto", "on", "off"), f"channels_last must be auto, on or off, not '{self.channels_last}'"),
            (self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, not '{self.device}'"),
        ]
        for ok, message in checks:
            if not ok:
                raise VitlabError(message)
        resized = sum(epochs for _, epochs in self.resize_stages())
        if resized >= self.epochs:
            raise VitlabError(f"progressive_resize '{self.progressive_resize}' has {resized} epochs of "
                              f"smaller images out of {self.epochs}: leave at least the last epoch at full size")

    def resize_stages(self) -> list[tuple[int, int]]:
        """``progressive_resize`` as (size, epochs) stages in training order; [] when it is off."""
        if not self.progressive_resize:
            return []
        stages = []
        for part in self.progressive_resize.split(","):
            size, _, epochs = part.strip().partition(":")
            if not (size.isdigit() and epochs.isdigit() and int(size) > 0 and int(epochs) > 0):
                raise VitlabError(f"progressive_resize is SIZE:EPOCHS stages such as 24:16 or 16:6,24:10 (positive "
                                  f"integers), not '{self.progressive_resize}'")
            stages.append((int(size), int(epochs)))
        return stages

    def train_size_at(self, epoch: int) -> int | None:
        """The image size epoch ``epoch`` (0-based) trains at under progressive resizing; None: full size."""
        end = 0
        for size, epochs in self.resize_stages():
            end += epochs
            if epoch < end:
                return size
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build a config from a (possibly partial) dict, refusing unknown keys.

        Any bad input (not a mapping, unknown or non-text keys, values of the wrong type or out
        of range) raises :class:`VitlabError`, never another exception.
        """
        if values is not None and not isinstance(values, Mapping):
            raise VitlabError(f"{source} must be a mapping of keys to values, not {values!r}")
        values = dict(values or {})
        data = values.pop("data", None)
        data = {} if data is None else data  # not `or {}`: `data: 0` or `data: ""` must be refused
        if not isinstance(data, dict):
            raise VitlabError(f"'data' in {source} must be a mapping of keys to values, not {data!r}")
        _check_keys(values, cls, source)
        _check_keys(data, DataConfig, f"{source} (data section)")
        values = _check_types(values, cls, source)
        data = _check_types(data, DataConfig, f"{source} (data section)")
        cfg = cls(**values, data=DataConfig(**data))
        cfg.validate()
        return cfg

    def merged(self, overrides: dict[str, Any]) -> "TrainConfig":
        """A copy with ``overrides`` applied; keys ``data.X`` set fields of the data section."""
        values = self.to_dict()
        for key, value in overrides.items():
            if value is None:
                continue
            if key.startswith("data."):
                values["data"][key[5:]] = value
            elif key == "model_args":  # one keyword more, not a new set: a recipe's own ones stay
                values["model_args"] = {**values["model_args"], **value}
            else:
                values[key] = value
        return TrainConfig.from_dict(values, source="options")


def _check_keys(values: dict[str, Any], cls: type, source: str) -> None:
    valid = [f.name for f in fields(cls)]
    for key in values:
        if not isinstance(key, str):  # YAML keys may be numbers, null, ...: not names to match
            raise VitlabError(f"unknown key {key!r} in {source}; valid keys: {', '.join(valid)}")
        if key not in valid:
            close = closest_names(key, valid)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise VitlabError(f"unknown key '{key}' in {source}; {hint}valid keys: {', '.join(valid)}")


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}


def _check_types(values: dict[str, Any], cls: type, source: str) -> dict[str, Any]:
    """Refuse values of the wrong type (``epochs: ten``) with one line; integers pass as floats."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        hint = hints[key]
        members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if value is None and type(None) in members:
            continue  # an optional field left unset
        allowed = [typing.get_origin(t) or t for t in members if t is not type(None)]  # dict[str, Any] -> dict
        if any(isinstance(value, t) and not (isinstance(value, bool) and t is not bool) for t in allowed):
            continue
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            out[key] = float(value)
            continue
        if float in allowed and str not in allowed and isinstance(value, str) and _is_number(value):
            out[key] = float(value)  # YAML 1.1 reads `lr: 1e-3` (no dot) as a string
            continue
        expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in allowed)
        raise VitlabError(f"'{key}' in {source} must be {expected}, not {value!r}")
    return out


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def load_config(path: str | Path) -> TrainConfig:
    """Read a training config (recipe) from a YAML file."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise VitlabError(f"config file '{path}' does not exist") from None
    except UnicodeDecodeError:
        raise VitlabError(f"config file '{path}' is not UTF-8 text; is it really a YAML config?") from None
    except OSError as e:  # a directory, no permission, ...
        raise VitlabError(f"config file '{path}' cannot be read ({e.strerror or type(e).__name__})") from None
    except yaml.YAMLError as e:
        raise VitlabError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise VitlabError(f"config file '{path}' must hold a mapping of keys to values")
    return TrainConfig.from_dict(values, source=f"'{path}'")


def dump_config(cfg: TrainConfig) -> str:
    """The config as YAML text (what ``config.yaml`` holds)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = ["TrainConfig", "DataConfig", "load_config", "dump_config"]
