"""Tasks: every kind of training behind one protocol the loop drives.

A task says what a step computes from a batch and how a model is validated; the loop
(:mod:`vitlab.train.trainer`) does the rest the same way for all of them (optimizer, schedule,
checkpoints, resume, torchrun). The tasks:

* :class:`Classification`: supervised classification with labels (label smoothing, timm's
  Mixup/CutMix), for any model; a model with several heads (early exits) returns a list of
  logits, final head last, and every head learns from the labels;
* :class:`EarlyExitTraining`: Bakhtiarnia et al.'s second stage for early-exit models, the
  backbone frozen and the exit branches trained on the labels or on the final head's decisions;
* the self-supervised objectives MP3, MAE and DINO (:mod:`vitlab.train.objectives`), which wrap
  the model with parameters of their own and validate themselves.

The protocol (:class:`Task`): ``module`` is what the optimizer, DDP and the forward pass see;
``batch_loss(net, images, labels, step)`` returns the loss of one batch and the number of right
predictions in it (NaN where the task has none); ``after_step(step)`` runs after every optimizer
step; ``evaluate(loader, ...)`` returns the validation metrics (``val_loss``, ``val_acc`` and any
more); ``state()``/``load_state()`` hold whatever a checkpoint needs beyond the model's weights.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import distributed
from ..config import TrainConfig
from ..errors import VitlabError
from ..models.early_exit import EarlyExitModel
from . import accel

__all__ = ["Classification", "EarlyExitTraining", "Task", "build_task", "evaluate", "evaluate_views"]


class Task:
    """The protocol of a kind of training (see the module docstring); the defaults suit a task
    whose module is the bare model."""

    #: What ``val_acc`` measures.
    val_acc_name: ClassVar[str] = "accuracy"
    #: DDP must look for parameters a step leaves unused (objectives ignore the classifier).
    unused_parameters: ClassVar[bool] = False
    #: Validation on every process's share of the split, summed (True), or on the whole split everywhere.
    shard_validation: ClassVar[bool] = True
    #: Whether the weights' moving average is validated beside the model (it has a trained classifier).
    validates_ema: ClassVar[bool] = False
    module: nn.Module

    def batch_loss(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   step: int) -> tuple[torch.Tensor, float]:
        """The loss of one batch at global ``step`` and the number of right predictions (NaN: none)."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after the optimizer step of global ``step``; nothing by default."""

    def evaluate(self, loader: DataLoader, device: torch.device, precision: str, progress: bool = False,
                 model: nn.Module | None = None) -> dict[str, float]:
        """``{"val_loss": ..., "val_acc": ..., ...}`` over ``loader`` (of ``model``: default the task's own)."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor] | None:
        """What a checkpoint holds besides the model's weights (None: nothing)."""
        return None

    def load_state(self, state: dict[str, torch.Tensor] | None) -> None:
        """Restore what :meth:`state` saved."""


class Classification(Task):
    """Supervised classification: cross-entropy with label smoothing, optionally on timm's
    Mixup/CutMix soft targets, summed over every head of a model with several; accuracy is the
    final head's, against the true labels."""

    validates_ema = True

    def __init__(self, model: nn.Module, cfg: TrainConfig, num_classes: int) -> None:
        self.module = model
        self.flip = cfg.eval_flip
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        # Mixup/CutMix draw from numpy's RNG, which every step reseeds: mixed batches replay exactly on resume.
        self.mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                         switch_prob=cfg.mix_switch_prob, label_smoothing=cfg.label_smoothing,
                         num_classes=num_classes) if cfg.mixup or cfg.cutmix else None
        self.train_loss_fn = SoftTargetCrossEntropy() if self.mix else self.loss_fn

    def batch_loss(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   step: int) -> tuple[torch.Tensor, float]:
        """:meth:`heads_loss` of the model's heads (on Mixup/CutMix targets if enabled) and the final head's
        right predictions against the true labels."""
        targets = labels
        if self.mix is not None:
            images, targets = self.mix(images, labels)  # soft targets; accuracy is against the true labels
        heads = _heads(net(images))
        loss = self.heads_loss(heads, targets)
        return loss, (heads[-1].argmax(1) == labels).sum().item()

    def heads_loss(self, heads: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """Every head learns from the labels."""
        return sum(self.train_loss_fn(head.float(), targets) for head in heads)

    def evaluate(self, loader: DataLoader, device: torch.device, precision: str, progress: bool = False,
                 model: nn.Module | None = None) -> dict[str, float]:
        """Loss and accuracy of the final head and, with ``eval_flip`` (the task's own model only),
        of horizontal-flip test-time augmentation, from one pass."""
        flip = self.flip and model is None
        (loss, acc), *flipped = evaluate_views(model or self.module, loader, self.loss_fn, progress=progress,
                                               precision=precision, device=device, flip=flip)
        out = {"val_loss": loss, "val_acc": acc}
        if flipped:
            out["val_loss_flip"], out["val_acc_flip"] = flipped[0]
        return out


class EarlyExitTraining(Classification):
    """Bakhtiarnia et al.'s second stage: the trained backbone (from ``--init-weights``) frozen, the
    exit branches learn from the labels (``branches``) or copy the final head's decisions (``copycat``)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, num_classes: int) -> None:
        if not isinstance(model, EarlyExitModel):
            raise VitlabError(f"--exit-training {cfg.exit_training} trains exit branches, and {cfg.model} has none; "
                              "use an early_exit_* model (vitlab models 'early_exit*')")
        super().__init__(model, cfg, num_classes)
        self.copycat = cfg.exit_training == "copycat"
        model.freeze_backbone()

    def heads_loss(self, heads: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """The summed loss of the exit branches (every head but the final one), against ``targets`` or, with
        ``copycat``, against the final head's predicted classes."""
        if self.copycat:  # each branch learns the final head's decisions
            copied = heads[-1].detach().argmax(1)
            return sum(self.loss_fn(head.float(), copied) for head in heads[:-1])
        return sum(self.train_loss_fn(head.float(), targets) for head in heads[:-1])


def build_task(cfg: TrainConfig, model: nn.Module, num_classes: int, steps_per_epoch: int,
               mean: tuple[float, float, float], std: tuple[float, float, float]) -> Task:
    """The task ``cfg`` trains: its objective, and for early-exit models its exit training."""
    from .objectives import build_objective

    if cfg.objective != "supervised":
        return build_objective(cfg, model, steps_per_epoch, mean, std)
    if cfg.exit_training != "joint":
        return EarlyExitTraining(model, cfg, num_classes)
    return Classification(model, cfg, num_classes)


def _heads(outputs: Any) -> list[torch.Tensor]:
    """Models with several heads (early exits) return a list of logits, final head last."""
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module | None = None, progress: bool = False,
             precision: str = "fp32", device: torch.device | str = "cpu", flip: bool = False) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` over ``loader`` (over every process's shard under torchrun).

    ``flip``: test-time augmentation, the mean of the logits of each image and its horizontal mirror.
    """
    return evaluate_views(model, loader, loss_fn, progress, precision, device, flip)[-1]


@torch.inference_mode()
def evaluate_views(model: nn.Module, loader: DataLoader, loss_fn: nn.Module | None = None, progress: bool = False,
                   precision: str = "fp32", device: torch.device | str = "cpu",
                   flip: bool = False) -> list[tuple[float, float]]:
    """``[(loss, accuracy)]`` of the plain images and, with ``flip``, also of horizontal-flip
    test-time augmentation, from one pass over ``loader`` (the plain logits serve both)."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(2 if flip else 1, 3, dtype=torch.float64)  # per view: loss, correct, seen
    for images, labels in tqdm(loader, desc="evaluating", disable=not progress, leave=False, unit="batch"):
        images, labels = images.to(device), labels.to(device)
        views = [_final_logits(model, images, precision, device)]
        if flip:
            views.append((views[0] + _final_logits(model, images.flip(-1), precision, device)) / 2)
        for row, logits in zip(sums, views):
            row += torch.tensor([loss_fn(logits, labels).item() * labels.shape[0],
                                 (logits.argmax(1) == labels).sum().item(), labels.shape[0]], dtype=torch.float64)
    model.train(was_training)
    results = []
    for loss_sum, correct, seen in distributed.all_reduce_sum(sums).tolist():
        results.append((math.nan, math.nan) if seen == 0 else (loss_sum / seen, correct / seen))
    return results


def _final_logits(model: nn.Module, images: torch.Tensor, precision: str, device: torch.device) -> torch.Tensor:
    """fp32 logits of the model's final head (an early-exit model returns every exit's, last is final)."""
    with accel.autocast(precision, device):
        outputs = model(images)
    return (outputs[-1] if isinstance(outputs, (list, tuple)) else outputs).float()
