"""Self-supervised pretraining objectives: the tasks that train without labels.

An objective wraps the backbone (the run's model) with whatever parameters of its own it needs
(MP3's position head, MAE's decoder, DINO's projection head and teacher), and is a
:class:`~vitlab.train.tasks.Task` whose module is itself. Each subclass implements:

* ``forward(images)`` (run inside the step's autocast, through DDP under torchrun) and
  ``loss(outputs, step)``: the loss of the global ``step`` and the batch's training accuracy
  (``None`` where the objective has none);
* ``after_step(step)`` if something follows the optimizer step (DINO's teacher and centre);
* ``validate(loader, device)``: ``(val_loss, val_acc)`` at the end of every epoch, where
  :attr:`val_acc_name` says what ``val_acc`` is.

Everything but the backbone is saved as ``state["task"]`` in every checkpoint, so ``--resume``
restores it exactly; ``model.safetensors`` stays the bare backbone, so ``vitlab finetune RUN``
takes any pretrained run.

The default validation, used by MAE and DINO: ``val_loss`` is the objective on the validation
images (with random numbers from a fixed seed, so every epoch sees the same masks or views and
the numbers are comparable across epochs), and ``val_acc`` a cheap k-NN monitor of the
backbone's pooled features (:func:`~vitlab.knn.knn_accuracy`).
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, ClassVar, Iterable, Iterator

import torch
import torch.nn as nn

from ..errors import VitlabError
from ..knn import knn_accuracy
from .tasks import Task

if TYPE_CHECKING:
    from ..config import TrainConfig

#: The objectives ``TrainConfig.objective`` accepts besides ``supervised``.
PRETRAINING_OBJECTIVES = ("mp3", "mae", "dino")


class PretrainingObjective(nn.Module, Task):
    """Base of the pretraining objectives; subclasses set ``self.backbone`` and implement
    ``forward(images)`` and :meth:`loss`."""

    val_acc_name: ClassVar[str] = "k-NN accuracy of the pooled features"
    # The classifier (and MP3's position embedding) takes no part in the objective.
    unused_parameters: ClassVar[bool] = True
    # The k-NN monitor needs every image's features in one place; validation splits are small.
    shard_validation: ClassVar[bool] = False
    backbone: nn.Module

    @property
    def module(self) -> nn.Module:
        """The objective itself: its own parameters train with the backbone's."""
        return self

    def batch_loss(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   step: int) -> tuple[torch.Tensor, float]:
        """The objective's own loss, no labels; MP3's share of tokens placed right counts as accuracy."""
        loss, accuracy = self.loss(net(images), step)
        return loss, accuracy.item() * images.shape[0] if accuracy is not None else math.nan

    def evaluate(self, loader: Iterable, device: torch.device, precision: str, progress: bool = False,
                 model: nn.Module | None = None) -> dict[str, float]:
        """``{"val_loss": ..., "val_acc": ...}`` from :meth:`validate` (``precision``, ``progress`` and ``model``
        are not used)."""
        val_loss, val_acc = self.validate(loader, device)
        return {"val_loss": val_loss, "val_acc": val_acc}

    def state(self) -> dict[str, torch.Tensor]:
        """The checkpoint's ``state["task"]``: every tensor but the backbone's (:meth:`task_state`)."""
        return self.task_state()

    def load_state(self, state: dict[str, torch.Tensor] | None) -> None:
        """Restore what :meth:`state` saved (:meth:`load_task_state`)."""
        self.load_task_state(state)

    def loss(self, outputs: torch.Tensor | tuple[torch.Tensor, ...],
             step: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The objective's loss from ``forward``'s outputs at global ``step`` (``None``: validation),
        and the batch's training accuracy (``None`` where there is none)."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after the optimizer step of global ``step``; nothing by default."""

    def no_weight_decay(self) -> set[str]:
        """The backbone's parameters exempt from weight decay (position embeddings, conv-init bias
        tables), named as the optimizer sees them through this wrapper."""
        inner = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{name}" for name in inner}

    def task_state(self) -> dict[str, torch.Tensor]:
        """Every tensor of the objective except the backbone's (which model.safetensors holds)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`task_state` saved; anything else missing or extra is an error."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise VitlabError(f"the checkpoint's pretraining state does not fit this run "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]}); "
                              f"was it written by another version?")

    @torch.inference_mode()
    def validate(self, loader: Iterable, device: torch.device | str = "cpu") -> tuple[float, float]:
        """``(val_loss, val_acc)``: the mean loss over ``loader``'s images (random numbers from a
        fixed seed, the same every epoch) and :func:`knn_accuracy` of the backbone's pooled features
        (even-numbered validation images are the labelled bank, odd-numbered ones the queries)."""
        was_training = self.training
        self.eval()
        loss_sum, seen, features, labels = 0.0, 0, [], []
        with seeded(0, device):
            for images, targets in loader:
                images = images.to(device)
                loss_sum += self.loss(self(images), None)[0].item() * images.shape[0]
                seen += images.shape[0]
                features.append(pooled_features(self.backbone, images).float().cpu())
                labels.append(targets)
        self.train(was_training)
        if not seen:
            return float("nan"), float("nan")
        features, labels = torch.cat(features), torch.cat(labels)
        return loss_sum / seen, knn_accuracy(features[0::2], labels[0::2], features[1::2], labels[1::2])


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Draw from ``seed`` inside the block and leave the global RNG (CPU, and CUDA if used) as it was."""
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's pooled features, what its classifier would see: ``forward_head(forward_features(x),
    pre_logits=True)`` (timm's interface; every vitlab model has it)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def feature_dim(model: nn.Module) -> int:
    """The width of :func:`pooled_features`, from timm's attribute names."""
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not isinstance(dim, int):
        raise VitlabError(f"{type(model).__name__} does not say the width of its pooled features "
                          "(head_hidden_size or num_features): self-supervised heads need it")
    return dim


def build_objective(cfg: TrainConfig, model: nn.Module, steps_per_epoch: int, mean: tuple[float, float, float],
                    std: tuple[float, float, float]) -> PretrainingObjective:
    """The objective ``cfg.objective`` names, wrapping ``model``.

    ``steps_per_epoch`` sets the schedules that follow the step (DINO's teacher momentum and
    temperature); ``mean`` and ``std`` are the data's normalisation (DINO's colour jitter
    works on pixels).
    """
    if cfg.objective == "mp3":
        from .position_prediction import PositionPrediction

        return PositionPrediction(model, cfg.mp3.keep)
    if cfg.objective == "mae":
        from .masked_autoencoder import MaskedAutoencoder

        return MaskedAutoencoder(model, mask_ratio=cfg.mae.mask_ratio, decoder_dim=cfg.mae.decoder_dim,
                                 decoder_depth=cfg.mae.decoder_depth, decoder_heads=cfg.mae.decoder_heads,
                                 norm_pix_loss=cfg.mae.norm_pix)
    if cfg.objective == "dino":
        from .dino import DINO

        return DINO(model, total_steps=cfg.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch,
                    mean=mean, std=std, prototypes=cfg.dino.prototypes, hidden_dim=cfg.dino.hidden_dim,
                    bottleneck_dim=cfg.dino.bottleneck_dim, student_temp=cfg.dino.student_temp,
                    teacher_temp=cfg.dino.teacher_temp, teacher_temp_warmup=cfg.dino.teacher_temp_warmup,
                    momentum=cfg.dino.momentum, center_momentum=cfg.dino.center_momentum,
                    crop_scale=cfg.dino.crop_scale)
    raise VitlabError(f"objective must be one of {', '.join(PRETRAINING_OBJECTIVES)}, not '{cfg.objective}'")
