"""The training loop: AdamW, warm-up + cosine (timm's), label smoothing, evaluation every epoch.

Read it from top to bottom: :func:`train` builds the data, the model and the optimizer, then
runs the epochs. Determinism: everything random in epoch ``e`` (shuffling, augmentation,
dropout) is seeded from ``(seed, e)`` at the start of the epoch, so a run resumed at an epoch
boundary replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.models import get_pretrained_cfg
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import DatasetInfo, build_dataset
from ..errors import VitlabError
from ..models import count_parameters, create_model
from . import rundir
from .config import TrainConfig


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) run produced."""

    run_dir: Path
    model: nn.Module
    config: TrainConfig
    info: DatasetInfo
    metrics: list[dict[str, float]] = field(default_factory=list)

    @property
    def val_acc(self) -> float:
        return self.metrics[-1]["val_acc"] if self.metrics else float("nan")

    @property
    def train_time_s(self) -> float:
        return self.metrics[-1]["time_s"] if self.metrics else 0.0


def default_run_dir(cfg: TrainConfig, root: str | Path = "runs") -> Path:
    """``runs/<model>-<data>-<timestamp>``."""
    data = cfg.data.name.replace("imagefolder:", "folder-").rstrip("/").replace("/", "_").replace(":", "_")
    return Path(root) / f"{cfg.model}-{data}-{datetime.now():%Y%m%d-%H%M%S}"


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of everything random in one epoch (an odd multiplier spreads nearby seeds apart)."""
    return (seed * 1_000_003 + epoch * 7919 + 1) % (2**63)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker's torch RNG and `random`; numpy (used by some augmentations) too.
    np.random.seed(torch.initial_seed() % 2**32)


def model_args_for(cfg: TrainConfig, info: DatasetInfo) -> dict[str, Any]:
    """The keyword arguments that build the run's model: classes and image size from the data."""
    args: dict[str, Any] = {"num_classes": info.num_classes}
    pretrained_cfg = get_pretrained_cfg(cfg.model)
    if pretrained_cfg is None or pretrained_cfg.fixed_input_size:
        args["img_size"] = info.image_size  # ViTs and Mixers size their token grid from it
    if cfg.drop_path > 0:
        args["drop_path_rate"] = cfg.drop_path
    return {**args, **cfg.model_args}  # explicit model_args win


def train(
    cfg: TrainConfig,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_epoch: int | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` and write a run directory; returns the trained model.

    ``resume`` continues the run in ``out`` from its last finished epoch (using the saved
    config); ``overwrite`` replaces it. ``stop_after_epoch`` ends the run early, as if it had
    been interrupted (used to test that resuming is exact).
    """
    cfg.validate()
    run_dir = rundir.prepare_run_dir(Path(out) if out else default_run_dir(cfg), resume, overwrite)
    if resume:
        cfg = rundir.read_config(run_dir)  # the run's own config wins over anything passed

    # --- data ---------------------------------------------------------------------------------
    seed_everything(cfg.seed)
    train_set, info = build_dataset(cfg.data, "train", seed=cfg.seed, progress=progress)
    val_set, _ = build_dataset(cfg.data, "val", seed=cfg.seed, progress=progress)
    if len(train_set) < cfg.batch_size:
        raise VitlabError(f"the training split has {len(train_set)} images, fewer than one batch of "
                          f"{cfg.batch_size}; lower --batch-size")
    shuffle_gen = torch.Generator()
    workers = dict(num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                   worker_init_fn=_seed_worker)
    train_loader = DataLoader(train_set, cfg.batch_size, shuffle=True, drop_last=True,
                              generator=shuffle_gen, **workers)
    val_loader = DataLoader(val_set, cfg.eval_batch_size, shuffle=False, **workers)

    # --- model, optimizer, schedule -------------------------------------------------------------
    if not resume:
        # Saved resolved (classes, image size), so the run rebuilds its model without the data.
        cfg = dataclasses.replace(cfg, model_args=model_args_for(cfg, info))
    model = create_model(cfg.model, **cfg.model_args)
    if not resume:  # only once the model builds: a bad option must not leave a half-made run behind
        rundir.save_config(run_dir, cfg)
        rundir.save_weights(run_dir, model, rundir.INIT_WEIGHTS)
    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train_loader)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=cfg.epochs * steps_per_epoch,
        lr_min=cfg.min_lr,
        warmup_t=round(cfg.warmup_epochs * steps_per_epoch),
        warmup_lr_init=cfg.warmup_lr,
        t_in_epochs=False,  # the schedule advances every step, not every epoch
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    # --- resume --------------------------------------------------------------------------------
    # state.pt is the one commit point of an epoch: weights, optimizer and metrics together, so
    # a run killed between two file writes resumes from a consistent epoch. No RNG state is
    # needed: every epoch reseeds from (seed, epoch).
    start_epoch, metrics = 0, []
    state = rundir.load_state(run_dir) if resume else None
    if state is not None:
        start_epoch, metrics = rundir.restore_state(run_dir, state, model, optimizer)
    elapsed = metrics[-1]["time_s"] if metrics else 0.0
    params = count_parameters(model)

    # --- epochs -------------------------------------------------------------------------------
    last_epoch = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch + 1)
    for epoch in range(start_epoch, last_epoch):
        seed = epoch_seed(cfg.seed, epoch)
        shuffle_gen.manual_seed(seed)
        seed_everything(seed + 1)
        started = time.perf_counter()
        model.train()
        loss_sum = correct = seen = 0.0
        bar = tqdm(train_loader, desc=f"{cfg.model} epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   leave=False, unit="batch", dynamic_ncols=True)
        for step, (images, labels) in enumerate(bar):
            scheduler.step_update(epoch * steps_per_epoch + step)
            outputs = model(images)
            # Models with several heads (early exits) return a list, final head last: every head
            # learns from the labels, and accuracy is the final head's.
            heads = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
            logits = heads[-1]
            loss = sum(loss_fn(head, labels) for head in heads)
            if not torch.isfinite(loss):
                raise VitlabError(f"loss became {loss.item()} at epoch {epoch + 1}, step {step}; "
                                  "lower --lr or raise --warmup-epochs (the last finished epoch is saved)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()

            n = labels.shape[0]
            loss_sum += loss.item() * n
            correct += (logits.argmax(1) == labels).sum().item()
            seen += n
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.1e}", refresh=False)
        train_time = time.perf_counter() - started
        elapsed += train_time
        val_loss, val_acc = evaluate(model, val_loader, loss_fn, progress=progress)
        metrics.append(dict(epoch=epoch + 1, step=(epoch + 1) * steps_per_epoch, lr=optimizer.param_groups[0]["lr"],
                            train_loss=loss_sum / seen, train_acc=correct / seen, val_loss=val_loss,
                            val_acc=val_acc, time_s=round(elapsed, 3),
                            images_per_s=round(seen / train_time, 1)))
        if progress:
            tqdm.write(f"{cfg.model} epoch {epoch + 1}/{cfg.epochs}: train loss {loss_sum / seen:.3f} "
                       f"acc {correct / seen:.3f} | val loss {val_loss:.3f} acc {val_acc:.3f} | "
                       f"{seen / train_time:.0f} img/s")
        # The user-facing files first, then the state that commits the epoch.
        rundir.save_weights(run_dir, model)
        rundir.write_metrics(run_dir, metrics)
        rundir.save_state(run_dir, {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "metrics": metrics, "params": params, "torch_version": str(torch.__version__)})
    return TrainResult(run_dir, model, cfg, info, metrics)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module | None = None,
             progress: bool = False) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` over ``loader``."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    was_training = model.training
    model.eval()
    loss_sum = correct = seen = 0.0
    for images, labels in tqdm(loader, desc="evaluating", disable=not progress, leave=False, unit="batch"):
        logits = model(images)
        loss_sum += loss_fn(logits, labels).item() * labels.shape[0]
        correct += (logits.argmax(1) == labels).sum().item()
        seen += labels.shape[0]
    model.train(was_training)
    if seen == 0:
        return math.nan, math.nan
    return loss_sum / seen, correct / seen
