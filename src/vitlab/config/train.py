"""Training configuration: every option of a run, declared once, loaded from and saved to YAML.

A run's ``config.yaml`` holds every value the run used, so the run can be rebuilt or resumed
from it alone. Options are grouped into sections where the parts are real (optimisation, data,
device and precision, each pretraining method, fine-tuning, checkpoints); each is declared
with :func:`~vitlab.options.option`, from which its YAML key, its command-line flag and its
check follow (:mod:`vitlab.options`). Unknown keys are refused with the list of valid ones (a
typo must not silently fall back to a default). Configs written before the sections existed
(one flat mapping) load unchanged: every option's key is also accepted at the top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .. import options
from ..data import DataConfig
from ..errors import VitlabError
from ..options import option, section

OBJECTIVES = ("supervised", "mp3", "mae", "dino")

_positive = dict(check=lambda v: v > 0, must="be positive")
_non_negative = dict(check=lambda v: v >= 0, must="be non-negative")
_at_least_one = dict(check=lambda v: v >= 1, must="be at least 1")
_unit = dict(check=lambda v: 0 <= v <= 1, must="be in [0, 1]")


def _odd_kernel(size: int) -> bool:
    if size != 0 and (size < 1 or size % 2 == 0):
        raise VitlabError(f"conv_init is an odd kernel size such as 3 (a kernel has a centre patch; 0: off), "
                          f"not {size}")
    return True


@dataclass
class Optim:
    """Optimisation: timm's optimizer, warm-up and cosine schedule."""

    optimizer: str = option("adamw", choices=("adamw", "sgd"), help="timm's AdamW, or SGD with Nesterov momentum")
    momentum: float = option(0.9, metavar="M", **_unit, help="SGD momentum")
    lr: float = option(1e-3, **_positive, help="peak learning rate, reached after the warm-up")
    min_lr: float = option(1e-5, **_non_negative, help="floor of the cosine decay")
    weight_decay: float = option(0.05, metavar="WD", **_non_negative, help="decoupled weight decay")
    warmup_epochs: float = option(1.0, metavar="EPOCHS", **_non_negative,
                                  help="linear warm-up from warmup_lr to lr, in epochs (fractions allowed)")
    warmup_lr: float = option(1e-6, **_non_negative, help="learning rate at the start of the warm-up")
    grad_clip: float | None = option(None, metavar="NORM", **_positive,
                                     help="clip the gradient norm to this value (none: no clipping)")
    layer_decay: float | None = option(None, metavar="D", check=lambda v: 0 < v <= 1, must="be in (0, 1]",
                                       help="layer-wise learning-rate decay (timm's): block k of n trains at lr * "
                                            "D^(n - k), the head at lr; 0.65-0.75 is MAE's and BEiT's fine-tuning")


@dataclass
class Accel:
    """Device and precision."""

    precision: str = option("fp32", choices=("fp32", "bf16", "auto"),
                            help="bf16 autocast, only where the CPU or GPU has it natively; auto picks it there")
    compile: bool = option(False, help="torch.compile the model")
    channels_last: str = option("off", choices=("auto", "on", "off"),
                                help="channels-last memory layout; auto: for CNNs")
    device: str = option("auto", choices=("auto", "cpu", "cuda"), help="auto: this rank's GPU if there is one")


@dataclass
class Checkpoints:
    """Checkpoints: a killed run resumes from the newest."""

    every: int = option(0, metavar="STEPS", **_non_negative,
                        help="also checkpoint every STEPS steps within an epoch (0: at epoch ends only)")
    keep: int = option(3, key="keep_checkpoints", metavar="K", **_at_least_one, help="checkpoints kept")


@dataclass
class MP3:
    """MP3, masked patch position prediction (Zhai et al. 2022): the ViT runs without its position
    embedding and predicts every patch's position, attending to a random subset of the patches."""

    keep: float = option(0.25, metavar="F", check=lambda v: 0 < v <= 1, must="be in (0, 1]",
                         help="fraction of the patches used as keys")


@dataclass
class MAE:
    """MAE, masked autoencoding (He et al. 2022): the encoder sees a random part of the patches, a light
    decoder (sized for 32x32 ViTs) predicts the pixels of the others."""

    mask_ratio: float = option(0.75, metavar="F", check=lambda v: 0 < v < 1, must="be in (0, 1)",
                               help="fraction of the patches hidden from the encoder")
    decoder_dim: int = option(128, metavar="D", **_at_least_one, help="decoder width")
    decoder_depth: int = option(2, metavar="N", **_at_least_one, help="decoder blocks")
    decoder_heads: int = option(4, metavar="H", **_at_least_one, help="decoder heads")
    norm_pix: bool = option(True, help="predict per-patch normalised pixels (the paper's default)")


@dataclass
class DINO:
    """DINO, self-distillation (Caron et al. 2021): a student matches its momentum teacher's output on
    another augmented view."""

    prototypes: int = option(1024, metavar="K", **_at_least_one, help="head output size (prototypes)")
    hidden_dim: int = option(256, metavar="D", **_at_least_one, help="head MLP width")
    bottleneck_dim: int = option(64, metavar="D", **_at_least_one, help="head bottleneck before the prototypes")
    student_temp: float = option(0.1, metavar="T", **_positive, help="student temperature")
    teacher_temp: float = option(0.04, metavar="T", **_positive, help="teacher temperature after the warm-up")
    teacher_temp_warmup: float = option(0.0, metavar="EPOCHS", **_non_negative,
                                        help="epochs of linear warm-up from 0.04 to the teacher temperature")
    momentum: float = option(0.996, metavar="M", **_unit,
                             help="teacher EMA momentum at the start, rising on a cosine to 1")
    center_momentum: float = option(0.9, metavar="M", **_unit, help="momentum of the teacher-output centre")
    crop_scale: float = option(0.4, metavar="F", check=lambda v: 0 < v <= 1, must="be in (0, 1]",
                               help="smallest area fraction of the two random crops")


@dataclass
class Finetune:
    """Transfer (``vitlab finetune RUN``): start from a run's trained weights with a new classifier."""

    source: str | None = option(None, key="finetune_from", metavar="RUN_DIR",
                                help="the run directory whose trained weights the run starts from")
    mode: str = option("full", choices=("full", "linear"),
                       help="full trains every weight, linear only the classifier (a linear probe)")
    reinit_blocks: int = option(0, key="reinit_blocks", metavar="K", **_non_negative,
                                help="re-initialise the top K blocks first (Matsoukas et al.'s feature reuse)")


@dataclass
class TrainConfig:
    """Everything a training run depends on."""

    model: str = option("vit_nano_patch8_sincos_32", metavar="NAME",
                        help="registered model name (vitlab models lists them)")
    model_args: dict[str, Any] = option(default_factory=dict,
                                        help="a keyword of the model's constructor, e.g. attn_drop_rate=0 "
                                             "(the value read as YAML; repeatable)")
    data: DataConfig = section(DataConfig, title="data")
    epochs: int = option(10, **_at_least_one, help="epochs to train")
    batch_size: int = option(128, metavar="N", **_at_least_one, help="images per optimizer step (all processes)")
    #: The recipe these values started from; informational once loaded.
    recipe: str | None = option(None, metavar="NAME",
                                help="start from a shipped recipe (vitlab recipes lists them); options override it")
    seed: int = option(0, metavar="N", help="seed of the data order, augmentation and initialisation")
    optim: Optim = section(Optim, title="optimisation")
    label_smoothing: float = option(0.1, metavar="E", check=lambda v: 0 <= v < 1, must="be in [0, 1)",
                                    help="label smoothing of the cross-entropy")
    drop_path: float = option(0.0, metavar="P", **_unit, help="stochastic depth rate, for models that have it")
    mixup: float = option(0.0, metavar="ALPHA", **_non_negative, help="Mixup alpha, 0 for off (timm's)")
    cutmix: float = option(0.0, metavar="ALPHA", **_non_negative, help="CutMix alpha, 0 for off (timm's)")
    mix_prob: float = option(1.0, metavar="P", **_unit, help="probability that a batch is mixed")
    mix_switch_prob: float = option(0.5, metavar="P", **_unit,
                                    help="probability of CutMix instead of Mixup when both are on")
    ema_decay: float = option(0.0, metavar="D", check=lambda v: 0 <= v < 1, must="be in [0, 1)",
                              help="keep a moving average of the weights (timm's ModelEmaV3), evaluated every "
                                   "epoch and saved as model_ema.safetensors; 0 for off")
    objective: str = option("supervised", choices=OBJECTIVES,
                            help="supervised (labels), or self-supervised pretraining without labels: mp3, mae "
                                 "or dino")
    mp3: MP3 = section(MP3, prefix="mp3_", title="mp3")
    mae: MAE = section(MAE, prefix="mae_", title="mae")
    dino: DINO = section(DINO, prefix="dino_", title="dino")
    exit_training: str = option("joint", choices=("joint", "branches", "copycat"),
                                help="early-exit models: every head on the labels (joint), or the backbone frozen "
                                     "and the branches on the labels (branches) or copying the final head "
                                     "(copycat, Bakhtiarnia et al.'s second stage)")
    finetune: Finetune = section(Finetune, prefix="finetune_", title="fine-tuning")
    spatial_entropy: float = option(0.0, metavar="LAMBDA", **_non_negative,
                                    help="peak weight of the spatial entropy regulariser (Peruzzo et al.; 0.01 in "
                                         "the paper; 0: off), after a linear warm-up, then a cosine to zero")
    spatial_entropy_warmup: float = option(10.0, metavar="EPOCHS", **_non_negative,
                                           help="epochs of the regulariser's linear warm-up")
    last_attention_skip: bool = option(True, help="keep the last block's attention skip connection (off: Peruzzo "
                                                  "et al.'s variant without it and its second norm; timm blocks)")
    conv_init: int = option(0, metavar="K", check=_odd_kernel,
                            help="convolutional initialisation of attention: a learnable relative position bias "
                                 "in every timm attention, head h starting on one offset of a KxK kernel (odd; "
                                 "0: off; vitlab.models.conv_init)")
    conv_init_strength: float = option(5.0, metavar="ALPHA", check=lambda v: math.isfinite(v) and v > 0,
                                       must="be a positive number",
                                       help="the bias at each head's own offset: 5 puts about 97% of a patch's "
                                            "attention there at the start, 1 is ConViT's softer locality")
    eval_batch_size: int = option(256, metavar="N", **_at_least_one, help="images per evaluation batch")
    eval_flip: bool = option(False, help="also report validation accuracy with horizontal-flip test-time "
                                         "augmentation (val_acc_flip in metrics.csv, beside the plain val_acc)")
    progressive_resize: str | None = option(None, metavar="SIZE:EPOCHS[,...]",
                                            help="train the first EPOCHS epochs on batches downscaled to SIZE x SIZE "
                                                 "(stages in order, e.g. 24:16), the rest at full size; validation "
                                                 "stays at full size")
    init_weights: str | None = option(None, metavar="FILE",
                                      help="start from these weights (safetensors, or a trusted pickle) instead of a "
                                           "fresh initialisation, matched by name (vitlab.weights)")
    checkpoint: Checkpoints = section(Checkpoints, prefix="checkpoint_", title="checkpoints")
    accel: Accel = section(Accel, title="device and precision")

    def validate(self) -> None:
        """Refuse values that cannot work, with a message naming the fix (before any work starts)."""
        from ..models import check_model_name

        check_model_name(self.model)
        options.check_values(self)
        checks = [
            (not (self.mixup or self.cutmix) or self.batch_size % 2 == 0,
             f"Mixup and CutMix pair images within a batch: use an even batch size, not {self.batch_size}"),
            (self.objective == "supervised" or not (self.mixup or self.cutmix),
             f"Mixup/CutMix mix labels; self-supervised pretraining has none to mix: turn them off for "
             f"--objective {self.objective}"),
            (self.objective == "supervised" or not self.eval_flip,
             f"--eval-flip averages a classifier's logits; --objective {self.objective}'s validation is its own "
             f"objective (or a k-NN monitor): leave it off, and use it when fine-tuning"),
            (self.objective == "supervised" or not self.progressive_resize,
             f"--progressive-resize is for supervised training; --objective {self.objective}'s targets are sized "
             f"to the full token grid: leave it off, and use it when fine-tuning"),
            (self.mae.decoder_dim % 4 == 0 and self.mae.decoder_dim % self.mae.decoder_heads == 0,
             f"mae_decoder_dim must be a multiple of 4 (its sin-cos embedding) and of mae_decoder_heads, "
             f"not {self.mae.decoder_dim} with {self.mae.decoder_heads} heads"),
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
        """The config as nested plain values (what ``config.yaml`` holds)."""
        return options.to_dict(self)

    @classmethod
    def from_dict(cls, values: Any, source: str = "config") -> TrainConfig:
        """Build a config from a (possibly partial) mapping of nested sections or flat option keys,
        refusing unknown keys; a section may also be given as its dataclass.

        Any bad input (not a mapping, unknown or non-text keys, values of the wrong type or out
        of range) raises :class:`VitlabError`, never another exception.
        """
        cfg = options.from_dict(cls, values, source)
        cfg.validate()
        return cfg

    def merged(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with ``overrides`` (option keys such as ``lr``, or dotted paths such as
        ``optim.lr``; ``None`` values skipped) applied; ``model_args`` gains keywords."""
        cfg = options.merged(self, overrides)
        cfg.validate()
        return cfg


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


__all__ = ["Accel", "Checkpoints", "DINO", "DataConfig", "Finetune", "MAE", "MP3", "OBJECTIVES", "Optim",
           "TrainConfig", "dump_config", "load_config"]
