"""The training loop: AdamW or SGD, warm-up + cosine, label smoothing, Mixup/CutMix and weight EMA
(all timm's), evaluation every epoch.

Read it from top to bottom: :func:`train` builds the data, the model and the optimizer, then
runs the steps. Determinism: the order and augmentation of every sample come from
``(seed, epoch, position)`` (:mod:`vitlab.data.sampling`) and the RNG of every step (dropout,
stochastic depth) from ``(seed, step)``, so nothing random has state to save: a run resumed
from any checkpoint, mid-epoch included, replays exactly what the uninterrupted run did.
(The random masks of MAE and views of DINO draw from the same per-step RNG; what does carry
state, DINO's teacher and centre, is checkpointed with the objective.)

Self-supervised pretraining (``cfg.objective`` mp3, mae or dino) goes through one protocol
(:mod:`vitlab.train.objectives`): the objective wraps the model, computes its own loss from the
images, updates itself after each optimizer step and validates itself.

Under ``torchrun`` every process takes its share of each global batch, DDP averages the
gradients, and rank 0 alone writes the run directory and shows progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .. import distributed
from ..config import TrainConfig
from ..data import DatasetInfo, build_dataset
from ..data.sampling import SeededBatches, SeededDataset, mix_seed, seed_all
from ..errors import VitlabError
from ..models import count_parameters
from ..runs import build_model, default_run_dir, model_args_for, rundir
from ..weights import load_weights_file
from . import accel
from .objectives import build_objective
from .spatial_entropy import SpatialEntropyProbe, entropy_weight
from .transfer import freeze_for, prepare_transfer


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


@dataclass
class EpochSums:
    """Running sums of the unfinished epoch (saved in mid-epoch checkpoints)."""

    loss: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    seconds: float = 0.0
    #: Sum over images of the spatial entropy (runs with the regulariser).
    entropy: float = 0.0

    def reduced(self) -> "EpochSums":
        """The sums over every process (this process's for a world of one)."""
        t = distributed.all_reduce_sum(torch.tensor([self.loss, self.correct, self.seen, self.entropy],
                                                    dtype=torch.float64))
        loss, correct, seen, entropy = t.tolist()
        return EpochSums(loss, correct, seen, self.seconds, entropy)


def train(
    cfg: TrainConfig,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_step: int | None = None,
    stop_after_epoch: int | None = None,
    allow_pickle: bool = False,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` and write a run directory; returns the trained model.

    ``resume`` continues the run in ``out`` from its newest checkpoint (using the saved
    config); ``overwrite`` replaces it. ``stop_after_step`` (a global step count) and
    ``stop_after_epoch`` (0-based) end the run early, as if it had been killed right after that
    step's or epoch's checkpoint (used to test that resuming is exact). ``allow_pickle`` lets
    ``cfg.init_weights`` be a pickle checkpoint (only for files from a trusted source).
    """
    cfg.validate()
    world = distributed.setup(cfg.accel.device)
    path = Path(out) if out else default_run_dir(cfg)
    if world.distributed:  # every rank must use the directory rank 0 named (timestamps differ)
        path = Path(distributed.broadcast_object(str(path)))
    if world.is_main:
        rundir.prepare_run_dir(path, resume, overwrite)
    distributed.barrier()
    run_dir = path
    if resume:
        cfg = rundir.read_config(run_dir)  # the run's own config wins over anything passed
    show = progress and world.is_main

    # --- data ---------------------------------------------------------------------------------
    train_set, info = build_dataset(cfg.data, "train", seed=cfg.seed, progress=show)
    val_set, _ = build_dataset(cfg.data, "val", seed=cfg.seed, progress=show)
    batches = SeededBatches(len(train_set), cfg.batch_size, cfg.seed, rank=world.rank, world_size=world.world_size)
    workers = dict(num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)
    train_loader = DataLoader(SeededDataset(train_set), batch_sampler=batches, **workers)
    # Every rank evaluates every world_size-th image; the sums are added up, nothing is padded in.
    val_shard = Subset(val_set, range(world.rank, len(val_set), world.world_size))
    val_loader = DataLoader(val_shard, cfg.eval_batch_size, shuffle=False, **workers)
    # Pretraining objectives validate on the whole split on every rank (their k-NN monitor needs
    # every image's features in one place; validation splits are small).
    task_val_loader = DataLoader(val_set, cfg.eval_batch_size, shuffle=False, **workers) \
        if cfg.objective != "supervised" else None

    # --- model, optimizer, schedule -------------------------------------------------------------
    if not resume:
        # Saved resolved (classes, image size), so the run rebuilds its model without the data.
        cfg = dataclasses.replace(cfg, model_args=model_args_for(cfg, info))
    seed_all(cfg.seed)  # the initialisation
    model = build_model(cfg)
    if cfg.init_weights and not resume:  # a resumed run's checkpoint holds the weights
        report = load_weights_file(model, cfg.init_weights, allow_pickle=allow_pickle)
        if show:
            tqdm.write(f"{cfg.model}: {report}")
    if cfg.finetune.source and not resume:
        seed_all(cfg.seed)
        fresh = build_model(cfg)  # the seed's own initialisation: what re-initialised parts start from
        reset = prepare_transfer(model, fresh, str(Path(cfg.finetune.source) / rundir.WEIGHTS), cfg.finetune.reinit_blocks)
        if show:
            tqdm.write(f"{cfg.model}: weights of {cfg.finetune.source}, new {', '.join(reset)}")
    frozen = freeze_for(model, cfg.finetune.mode)
    if cfg.exit_training != "joint":
        from ..models.early_exit import EarlyExitModel

        if not isinstance(model, EarlyExitModel):
            raise VitlabError(f"--exit-training {cfg.exit_training} trains exit branches, and {cfg.model} has none; "
                              "use an early_exit_* model (vitlab models 'early_exit*')")
        model.freeze_backbone()  # stage two: the trained backbone (from --init-weights) stays as it is
    check_resize_stages(cfg, model, info)
    if not resume and world.is_main:  # only once the model builds: a bad option must not leave a half-made run
        rundir.save_config(run_dir, cfg)
        rundir.save_weights(run_dir, model, rundir.INIT_WEIGHTS)
    precision = accel.resolve_precision(cfg.accel.precision, world.device)
    channels_last = accel.use_channels_last(cfg.accel.channels_last, model)
    model.to(world.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    steps_per_epoch = batches.steps_per_epoch
    # Self-supervised objectives (MP3, MAE, DINO; vitlab.train.objectives) wrap the model with
    # parameters of their own: the wrapper is what the optimizer, DDP and the loss see, and it
    # computes its own loss from the images; model.safetensors stays the bare model.
    task = build_objective(cfg, model, steps_per_epoch, info.mean, info.std)
    if task is not None:
        task.to(world.device)
    trained = task or model
    optimizer = create_optimizer_v2(trained, "momentum" if cfg.optim.optimizer == "sgd" else "adamw", lr=cfg.optim.lr,
                                    weight_decay=cfg.optim.weight_decay,
                                    **({"momentum": cfg.optim.momentum} if cfg.optim.optimizer == "sgd" else {}))
    # The weights' moving average: stateless apart from its weights (the decay follows the step).
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema_decay else None
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=cfg.epochs * steps_per_epoch,
        lr_min=cfg.optim.min_lr,
        warmup_t=round(cfg.optim.warmup_epochs * steps_per_epoch),
        warmup_lr_init=cfg.optim.warmup_lr,
        t_in_epochs=False,  # the schedule advances every step, not every epoch
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    # Mixup/CutMix draw from numpy's RNG, which every step reseeds: mixed batches replay exactly on resume.
    mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob, switch_prob=cfg.mix_switch_prob,
                label_smoothing=cfg.label_smoothing, num_classes=info.num_classes) if cfg.mixup or cfg.cutmix else None
    train_loss_fn = SoftTargetCrossEntropy() if mix else loss_fn
    entropy_probe = SpatialEntropyProbe(model, cfg.model) if cfg.spatial_entropy else None
    entropy_warmup = round(cfg.spatial_entropy_warmup * steps_per_epoch)

    # --- resume --------------------------------------------------------------------------------
    # A checkpoint is the one commit point: position, weights, optimizer, metrics and the
    # unfinished epoch's sums together, so a run killed between two file writes resumes from a
    # consistent state. No RNG state is needed (see the module docstring).
    epoch, step, metrics, sums = 0, 0, [], EpochSums()
    state = rundir.load_state(run_dir) if resume else None
    if state is not None:
        rundir.restore_state(run_dir, state, model, optimizer)
        if task is not None:
            task.load_task_state(state["task"])  # MAE's decoder, DINO's teacher and centre, ...
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        epoch, step = state["position"]["epoch"], state["position"]["step"]
        metrics, sums = list(state["metrics"]), EpochSums(**state.get("sums", {}))
    params = count_parameters(model)
    elapsed = metrics[-1]["time_s"] if metrics else 0.0
    # Objectives leave parts of the model unused (the classifier; MP3 the position embedding).
    net = DistributedDataParallel(trained, find_unused_parameters=task is not None) if world.distributed else trained
    net = accel.compile_model(net) if cfg.accel.compile else net

    def checkpoint(next_epoch: int, next_step: int, sums: EpochSums) -> None:
        if not all(torch.isfinite(p).all() for p in model.parameters()):  # never commit broken weights
            raise VitlabError(f"the weights became NaN or infinite at step {global_step}; lower --lr or raise "
                              "--warmup-epochs (the last good checkpoint is kept)")
        if world.is_main:
            rundir.save_checkpoint(run_dir, {
                "position": {"epoch": next_epoch, "step": next_step}, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "metrics": metrics, "sums": dataclasses.asdict(sums),
                **({"ema": ema.module.state_dict()} if ema is not None else {}),
                **({"task": task.task_state()} if task is not None else {}),
                "params": params, "torch_version": str(torch.__version__)}, global_step, cfg.checkpoint.keep)
        distributed.barrier()

    # --- steps --------------------------------------------------------------------------------
    last_epoch = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch + 1)
    global_step = epoch * steps_per_epoch + step
    stack = contextlib.ExitStack()
    if entropy_probe is not None:
        stack.enter_context(entropy_probe)
    for epoch in range(epoch, last_epoch):
        batches.set_epoch(epoch, start_step=step)
        net.train()
        for module in frozen:  # a linear probe: the frozen features stay in eval mode (BatchNorm, dropout)
            module.eval()
        bar = tqdm(train_loader, desc=f"{cfg.model} epoch {epoch + 1}/{cfg.epochs}", disable=not show,
                   leave=False, unit="batch", dynamic_ncols=True, initial=step, total=steps_per_epoch)
        train_size = cfg.train_size_at(epoch)  # progressive resizing: this epoch's stage (None: full size)
        started = time.perf_counter()
        for step, (images, labels) in enumerate(bar, start=step):
            if stop_after_step is not None and global_step >= stop_after_step:
                stack.close()
                return TrainResult(run_dir, model, cfg, info, metrics)  # "killed" right after a checkpoint
            scheduler.step_update(global_step)
            step_seed = mix_seed(cfg.seed, global_step, world.rank)  # dropout and stochastic depth of this step
            seed_all(step_seed)
            if world.device.type == "cuda":
                torch.cuda.manual_seed(step_seed)
            images, labels = images.to(world.device, non_blocking=True), labels.to(world.device, non_blocking=True)
            if train_size is not None:
                images = F.interpolate(images, size=(train_size, train_size), mode="bilinear", antialias=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = labels
            if mix is not None:
                images, targets = mix(images, labels)  # soft targets; accuracy is against the true labels
            try:
                with accel.autocast(precision, world.device):
                    outputs = net(images)
                    if task is not None:  # self-supervised: the objective's own loss, no labels
                        loss, task_acc = task.loss(outputs, global_step)
                    else:
                        # Models with several heads (early exits) return a list, final head last: every
                        # head learns from the labels, and accuracy is the final head's.
                        heads = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
                        if cfg.exit_training == "copycat":  # each branch learns the final head's decisions
                            copied = heads[-1].detach().argmax(1)
                            loss = sum(loss_fn(head.float(), copied) for head in heads[:-1])
                        elif cfg.exit_training == "branches":
                            loss = sum(train_loss_fn(head.float(), targets) for head in heads[:-1])
                        else:
                            loss = sum(train_loss_fn(head.float(), targets) for head in heads)
                    if entropy_probe is not None:
                        entropy = entropy_probe.loss()
                        loss = loss + entropy_weight(global_step, cfg.epochs * steps_per_epoch, entropy_warmup,
                                                     cfg.spatial_entropy) * entropy
                if not torch.isfinite(loss):
                    raise VitlabError(f"loss became {loss.item()} at step {global_step} (epoch {epoch + 1}); lower "
                                      "--lr or raise --warmup-epochs (the last good checkpoint is kept)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip:
                    nn.utils.clip_grad_norm_(trained.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                if task is not None:
                    task.after_step(global_step)  # DINO: the teacher and the centre follow the student
                if ema is not None:
                    ema.update(model, step=global_step)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                raise out_of_memory_error(e, cfg.batch_size // world.world_size, global_step) from None
            global_step += 1

            n = labels.shape[0]
            sums.loss += loss.item() * n
            if task is None:
                sums.correct += (heads[-1].argmax(1) == labels).sum().item()
            else:  # MP3's share of tokens placed right; MAE and DINO have no training accuracy (NaN)
                sums.correct += task_acc.item() * n if task_acc is not None else math.nan
            sums.seen += n
            if entropy_probe is not None:
                sums.entropy += entropy.item() * n
            shown = dict(loss=f"{sums.loss / sums.seen:.3f}")
            if not math.isnan(sums.correct):  # MAE and DINO have no training accuracy to show
                shown["acc"] = f"{sums.correct / sums.seen:.3f}"
            bar.set_postfix(**shown, lr=f"{optimizer.param_groups[0]['lr']:.1e}", refresh=False)
            if cfg.checkpoint.every and global_step % cfg.checkpoint.every == 0 and step + 1 < steps_per_epoch:
                sums.seconds += time.perf_counter() - started
                started = time.perf_counter()
                checkpoint(epoch, step + 1, sums)
        sums.seconds += time.perf_counter() - started
        elapsed += sums.seconds
        total = sums.reduced()
        if task is not None:  # the objective on the validation images, and its own val_acc (val_acc_name)
            (val_loss, val_acc), flipped = task.validate(task_val_loader, world.device), []
        else:
            # One pass gives the plain figures and, with eval_flip, the flip-TTA ones (refused under an objective).
            (val_loss, val_acc), *flipped = evaluate_views(model, val_loader, loss_fn, progress=show,
                                                           precision=precision, device=world.device,
                                                           flip=cfg.eval_flip)
        metrics.append(dict(epoch=epoch + 1, step=global_step, lr=optimizer.param_groups[0]["lr"],
                            train_loss=total.loss / total.seen, train_acc=total.correct / total.seen,
                            val_loss=val_loss, val_acc=val_acc, time_s=round(elapsed, 3),
                            images_per_s=round(total.seen / max(sums.seconds, 1e-9), 1)))
        if cfg.progressive_resize:
            metrics[-1]["train_size"] = train_size or info.image_size
        if entropy_probe is not None:
            metrics[-1]["spatial_entropy"] = total.entropy / total.seen
        if ema is not None and task is None:  # the EMA's classifier is untrained under an objective
            metrics[-1]["val_loss_ema"], metrics[-1]["val_acc_ema"] = evaluate(
                ema.module, val_loader, loss_fn, precision=precision, device=world.device)
        if flipped:
            metrics[-1]["val_loss_flip"], metrics[-1]["val_acc_flip"] = flipped[0]
        if show:
            m = metrics[-1]
            train_acc = "" if math.isnan(m["train_acc"]) else f" acc {m['train_acc']:.3f}"
            flip_acc = f" (flip TTA {m['val_acc_flip']:.3f})" if "val_acc_flip" in m else ""
            tqdm.write(f"{cfg.model} epoch {epoch + 1}/{cfg.epochs}: train loss {m['train_loss']:.3f}"
                       f"{train_acc} | val loss {val_loss:.3f} acc {val_acc:.3f}{flip_acc} | "
                       f"{m['images_per_s']:.0f} img/s")
        # The user-facing files first, then the checkpoint that commits the epoch.
        if world.is_main:
            rundir.save_weights(run_dir, model)
            if ema is not None:
                rundir.save_weights(run_dir, ema.module, rundir.EMA_WEIGHTS)
            rundir.write_metrics(run_dir, metrics)
        step, sums = 0, EpochSums()
        checkpoint(epoch + 1, 0, sums)
    stack.close()
    return TrainResult(run_dir, model, cfg, info, metrics)


def check_resize_stages(cfg: TrainConfig, model: nn.Module, info: DatasetInfo) -> None:
    """Refuse progressive-resizing stages the data or the model cannot take, in one line, before any work."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    for size, _ in cfg.resize_stages():
        if size >= info.image_size:
            raise VitlabError(f"progressive_resize stage {size} px is not smaller than the {info.image_size} px images; "
                              f"use sizes below {info.image_size} (e.g. {3 * info.image_size // 4})")
        if patch is not None and any(size % p for p in patch):
            raise VitlabError(f"progressive_resize stage {size} px is not a multiple of {cfg.model}'s patch size "
                              f"{patch[0]}; use e.g. {max(patch[0], size // patch[0] * patch[0])}")


def out_of_memory_error(error: BaseException, batch_size: int, step: int) -> BaseException:
    """A one-line :class:`VitlabError` with advice for an allocator failure; any other error unchanged."""
    text = str(error)
    if not (isinstance(error, torch.OutOfMemoryError) or "out of memory" in text
            or "can't allocate memory" in text or "not enough memory" in text):
        return error
    return VitlabError(f"out of memory at step {step} with {batch_size} images per batch; lower --batch-size "
                       f"(e.g. {max(batch_size // 2, 1)}), use --precision bf16, or a smaller --image-size "
                       "(the last checkpoint is kept: --resume continues)")


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
