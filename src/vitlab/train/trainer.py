"""The training loop: build, loop, step, evaluate, checkpoint, each a short function below.

:func:`train` reads from top to bottom. What a step computes and how a model is validated is
the task's (:mod:`vitlab.train.tasks`: classification, early-exit training, the pretraining
objectives); the rest is the same for every task: timm's AdamW or SGD, warm-up + cosine
schedule and weight EMA, progressive resizing, the spatial entropy regulariser, checkpoints.

Determinism: the order and augmentation of every sample come from ``(seed, epoch, position)``
(:mod:`vitlab.data.sampling`) and the RNG of every step (dropout, stochastic depth, Mixup,
MAE's masks, DINO's views) from ``(seed, step)``, so nothing random has state to save: a run
resumed from any checkpoint, mid-epoch included, replays exactly what the uninterrupted run
did. (What does carry state, DINO's teacher and centre, is checkpointed with the task.)

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
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
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
from ..distributed import World
from ..errors import VitlabError
from ..models import count_parameters
from ..runs import build_model, default_run_dir, model_args_for, rundir
from ..weights import load_weights_file
from . import accel
from .spatial_entropy import SpatialEntropyProbe, entropy_weight
from .tasks import Task, build_task, evaluate, evaluate_views
from .transfer import freeze_for, prepare_transfer

__all__ = ["TrainResult", "evaluate", "evaluate_views", "train"]


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
        """The last epoch's ``val_acc`` (NaN before the first epoch ends)."""
        return self.metrics[-1]["val_acc"] if self.metrics else float("nan")

    @property
    def train_time_s(self) -> float:
        """Seconds spent training up to the last epoch, resumed runs included (0 before the first epoch ends)."""
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

    def reduced(self) -> EpochSums:
        """The sums over every process (this process's for a world of one)."""
        t = distributed.all_reduce_sum(torch.tensor([self.loss, self.correct, self.seen, self.entropy],
                                                    dtype=torch.float64))
        loss, correct, seen, entropy = t.tolist()
        return EpochSums(loss, correct, seen, self.seconds, entropy)


@dataclass
class Data:
    """The loaders of a run and what the rest needs to know about its data."""

    info: DatasetInfo
    batches: SeededBatches
    train_loader: DataLoader
    val_set: Any

    def val_loader(self, task: Task, world: World, cfg: TrainConfig) -> DataLoader:
        """Every rank evaluates every world_size-th image and the sums are added up (nothing is padded
        in), unless the task validates on the whole split on every rank."""
        shard = Subset(self.val_set, range(world.rank, len(self.val_set), world.world_size)) \
            if task.shard_validation else self.val_set
        return DataLoader(shard, cfg.eval_batch_size, shuffle=False, **_workers(cfg))


@dataclass
class Optimisation:
    """The optimizer, its schedule (advanced every step) and the weights' moving average."""

    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    ema: ModelEmaV3 | None

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


@dataclass
class Position:
    """Where a run stands: the next epoch and step within it, the finished epochs' metrics and the
    unfinished epoch's sums. A checkpoint commits all of it at once."""

    epoch: int = 0
    step: int = 0
    metrics: list[dict[str, float]] = field(default_factory=list)
    sums: EpochSums = field(default_factory=EpochSums)


@dataclass
class Run:
    """What the loop works with, built once by :func:`train`."""

    cfg: TrainConfig
    run_dir: Path
    world: World
    #: Whether this process shows progress (rank 0, unless progress is off).
    show: bool
    data: Data
    model: nn.Module
    task: Task
    #: The task's module as the step runs it: wrapped by DDP under torchrun, compiled with --compile.
    net: nn.Module
    opt: Optimisation
    precision: str
    channels_last: bool
    val_loader: DataLoader
    entropy_probe: SpatialEntropyProbe | None
    #: A linear probe's frozen modules, kept in eval mode while the rest trains.
    frozen: list[nn.Module]

    @property
    def steps_per_epoch(self) -> int:
        return self.data.batches.steps_per_epoch


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
    run_dir = open_run_dir(cfg, out, resume, overwrite, world)
    if resume:
        cfg = rundir.read_config(run_dir)  # the run's own config wins over anything passed
    show = progress and world.is_main

    data = build_data(cfg, world, show)
    if not resume:  # saved resolved (classes, image size), so the run rebuilds its model without the data
        cfg = dataclasses.replace(cfg, model_args=model_args_for(cfg, data.info))
    model = build_run_model(cfg, data.info, resume, allow_pickle, show)
    frozen = freeze_for(model, cfg.finetune.mode)  # a linear probe trains only the classifier
    task = build_task(cfg, model, data.info.num_classes, data.batches.steps_per_epoch, data.info.mean, data.info.std)
    if not resume and world.is_main:  # only once the model and task build: a bad option leaves no half-made run
        rundir.save_config(run_dir, cfg)
        rundir.save_weights(run_dir, model, rundir.INIT_WEIGHTS)
    precision = accel.resolve_precision(cfg.accel.precision, world.device)
    channels_last = accel.use_channels_last(cfg.accel.channels_last, model)
    model.to(world.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    task.module.to(world.device)
    opt = build_optimisation(cfg, task, model, data.batches.steps_per_epoch)
    position = restore(run_dir, model, task, opt) if resume else Position()
    net = DistributedDataParallel(task.module, find_unused_parameters=task.unused_parameters) \
        if world.distributed else task.module
    net = accel.compile_model(net) if cfg.accel.compile else net
    entropy_probe = SpatialEntropyProbe(model, cfg.model) if cfg.spatial_entropy else None
    run = Run(cfg, run_dir, world, show, data, model, task, net, opt, precision, channels_last,
              data.val_loader(task, world, cfg), entropy_probe, frozen)

    last_epoch = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch + 1)
    with entropy_probe or contextlib.nullcontext():
        for epoch in range(position.epoch, last_epoch):
            if not run_epoch(run, epoch, position, stop_after_step):  # "killed" right after a checkpoint
                return TrainResult(run_dir, model, cfg, data.info, position.metrics)
            end_epoch(run, epoch, position)
            checkpoint(run, position, (epoch + 1) * run.steps_per_epoch)
    return TrainResult(run_dir, model, cfg, data.info, position.metrics)


# --- build ------------------------------------------------------------------------------------------


def open_run_dir(cfg: TrainConfig, out: str | Path | None, resume: bool, overwrite: bool, world: World) -> Path:
    """The run directory, created (or checked for resuming) by rank 0 before any other rank goes on."""
    path = Path(out) if out else default_run_dir(cfg)
    if world.distributed:  # every rank must use the directory rank 0 named (timestamps differ)
        path = Path(distributed.broadcast_object(str(path)))
    if world.is_main:
        rundir.prepare_run_dir(path, resume, overwrite)
    distributed.barrier()
    return path


def _workers(cfg: TrainConfig) -> dict[str, Any]:
    return dict(num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)


def build_data(cfg: TrainConfig, world: World, show: bool) -> Data:
    """The training batches (this rank's share of each, seeded by sample) and the validation split."""
    train_set, info = build_dataset(cfg.data, "train", seed=cfg.seed, progress=show)
    val_set, _ = build_dataset(cfg.data, "val", seed=cfg.seed, progress=show)
    batches = SeededBatches(len(train_set), cfg.batch_size, cfg.seed, rank=world.rank, world_size=world.world_size)
    train_loader = DataLoader(SeededDataset(train_set), batch_sampler=batches, **_workers(cfg))
    return Data(info, batches, train_loader, val_set)


def build_run_model(cfg: TrainConfig, info: DatasetInfo, resume: bool, allow_pickle: bool, show: bool) -> nn.Module:
    """The run's model from the seed's initialisation, with ``init_weights`` or a fine-tuning source loaded
    (a resumed run's checkpoint holds the weights instead)."""
    seed_all(cfg.seed)  # the initialisation
    model = build_model(cfg)
    if cfg.init_weights and not resume:
        report = load_weights_file(model, cfg.init_weights, allow_pickle=allow_pickle)
        if show:
            tqdm.write(f"{cfg.model}: {report}")
    if cfg.finetune.source and not resume:
        seed_all(cfg.seed)
        fresh = build_model(cfg)  # the seed's own initialisation: what re-initialised parts start from
        reset = prepare_transfer(model, fresh, str(Path(cfg.finetune.source) / rundir.WEIGHTS),
                                 cfg.finetune.reinit_blocks)
        if show:
            tqdm.write(f"{cfg.model}: weights of {cfg.finetune.source}, new {', '.join(reset)}")
    check_resize_stages(cfg, model, info)
    return model


def build_optimisation(cfg: TrainConfig, task: Task, model: nn.Module, steps_per_epoch: int) -> Optimisation:
    """timm's optimizer over the task's parameters, its warm-up + cosine schedule, and the weights' EMA."""
    sgd = cfg.optim.optimizer == "sgd"
    if cfg.optim.layer_decay and not hasattr(task.module, "group_matcher"):
        raise VitlabError(f"--layer-decay needs the model's layer groups (timm's group_matcher), which "
                          f"{type(task.module).__name__} does not have; leave it off for --objective {cfg.objective}")
    optimizer = create_optimizer_v2(task.module, "momentum" if sgd else "adamw", lr=cfg.optim.lr,
                                    weight_decay=cfg.optim.weight_decay, layer_decay=cfg.optim.layer_decay,
                                    **({"momentum": cfg.optim.momentum} if sgd else {}))
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=cfg.epochs * steps_per_epoch,
        lr_min=cfg.optim.min_lr,
        warmup_t=round(cfg.optim.warmup_epochs * steps_per_epoch),
        warmup_lr_init=cfg.optim.warmup_lr,
        t_in_epochs=False,  # the schedule advances every step, not every epoch
    )
    # The weights' moving average: stateless apart from its weights (the decay follows the step).
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema_decay else None
    return Optimisation(optimizer, scheduler, ema)


def check_resize_stages(cfg: TrainConfig, model: nn.Module, info: DatasetInfo) -> None:
    """Refuse progressive-resizing stages the data or the model cannot take, in one line, before any work."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    for size, _ in cfg.resize_stages():
        if size >= info.image_size:
            raise VitlabError(f"progressive_resize stage {size} px is not smaller than the {info.image_size} px "
                              f"images; use sizes below {info.image_size} (e.g. {3 * info.image_size // 4})")
        if patch is not None and any(size % p for p in patch):
            raise VitlabError(f"progressive_resize stage {size} px is not a multiple of {cfg.model}'s patch size "
                              f"{patch[0]}; use e.g. {max(patch[0], size // patch[0] * patch[0])}")


# --- loop -------------------------------------------------------------------------------------------


def run_epoch(run: Run, epoch: int, position: Position, stop_after_step: int | None = None) -> bool:
    """The steps of one epoch from ``position.step``; False if the run stops after ``stop_after_step``."""
    cfg, opt = run.cfg, run.opt
    run.net.train()
    for module in run.frozen:  # a linear probe: the frozen features stay in eval mode (BatchNorm, dropout)
        module.eval()
    run.data.batches.set_epoch(epoch, start_step=position.step)
    bar = tqdm(run.data.train_loader, desc=f"{cfg.model} epoch {epoch + 1}/{cfg.epochs}", disable=not run.show,
               leave=False, unit="batch", dynamic_ncols=True, initial=position.step, total=run.steps_per_epoch)
    train_size = cfg.train_size_at(epoch)  # progressive resizing: this epoch's stage (None: full size)
    sums, started = position.sums, time.perf_counter()
    for step, (images, labels) in enumerate(bar, start=position.step):
        global_step = epoch * run.steps_per_epoch + step
        if stop_after_step is not None and global_step >= stop_after_step:
            return False
        device = run.world.device
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss, correct, entropy = train_step(run, global_step, images, labels, train_size)
        n = labels.shape[0]
        sums.loss += loss * n
        sums.correct += correct
        sums.seen += n
        sums.entropy += entropy * n
        shown = dict(loss=f"{sums.loss / sums.seen:.3f}")
        if not math.isnan(sums.correct):  # MAE and DINO have no training accuracy to show
            shown["acc"] = f"{sums.correct / sums.seen:.3f}"
        bar.set_postfix(**shown, lr=f"{opt.lr:.1e}", refresh=False)
        if cfg.checkpoint.every and (global_step + 1) % cfg.checkpoint.every == 0 and step + 1 < run.steps_per_epoch:
            sums.seconds += time.perf_counter() - started
            started = time.perf_counter()
            position.step = step + 1
            checkpoint(run, position, global_step + 1)
    sums.seconds += time.perf_counter() - started
    return True


def train_step(run: Run, global_step: int, images: torch.Tensor, labels: torch.Tensor,
               train_size: int | None) -> tuple[float, float, float]:
    """One optimizer step; returns the batch's loss, its right predictions and its spatial entropy."""
    cfg, opt, world = run.cfg, run.opt, run.world
    opt.scheduler.step_update(global_step)
    step_seed = mix_seed(cfg.seed, global_step, world.rank)  # dropout, stochastic depth, mixing of this step
    seed_all(step_seed)
    if world.device.type == "cuda":
        torch.cuda.manual_seed(step_seed)
    if train_size is not None:
        images = F.interpolate(images, size=(train_size, train_size), mode="bilinear", antialias=True)
    if run.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    entropy = torch.zeros(())
    try:
        with accel.autocast(run.precision, world.device):
            loss, correct = run.task.batch_loss(run.net, images, labels, global_step)
            if run.entropy_probe is not None:
                entropy = run.entropy_probe.loss()
                weight = entropy_weight(global_step, cfg.epochs * run.steps_per_epoch,
                                        round(cfg.spatial_entropy_warmup * run.steps_per_epoch), cfg.spatial_entropy)
                loss = loss + weight * entropy
        if not torch.isfinite(loss):
            raise VitlabError(f"loss became {loss.item()} at step {global_step} (epoch "
                              f"{global_step // run.steps_per_epoch + 1}); lower --lr or raise --warmup-epochs (the "
                              "last good checkpoint is kept)")
        opt.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            nn.utils.clip_grad_norm_(run.task.module.parameters(), cfg.optim.grad_clip)
        opt.optimizer.step()
        run.task.after_step(global_step)  # DINO: the teacher and the centre follow the student
        if opt.ema is not None:
            opt.ema.update(run.model, step=global_step)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        raise out_of_memory_error(e, cfg.batch_size // world.world_size, global_step) from None
    return loss.item(), correct, entropy.item()


# --- evaluate ---------------------------------------------------------------------------------------


def end_epoch(run: Run, epoch: int, position: Position) -> None:
    """Validate, append the epoch's metrics row, write the user-facing files and move to the next epoch."""
    cfg, opt, task, world = run.cfg, run.opt, run.task, run.world
    total = position.sums.reduced()
    elapsed = (position.metrics[-1]["time_s"] if position.metrics else 0.0) + position.sums.seconds
    val = task.evaluate(run.val_loader, world.device, run.precision, progress=run.show)
    row = dict(epoch=epoch + 1, step=(epoch + 1) * run.steps_per_epoch, lr=opt.lr,
               train_loss=total.loss / total.seen, train_acc=total.correct / total.seen,
               val_loss=val.pop("val_loss"), val_acc=val.pop("val_acc"), time_s=round(elapsed, 3),
               images_per_s=round(total.seen / max(position.sums.seconds, 1e-9), 1))
    if cfg.progressive_resize:
        row["train_size"] = cfg.train_size_at(epoch) or run.data.info.image_size
    if run.entropy_probe is not None:
        row["spatial_entropy"] = total.entropy / total.seen
    if opt.ema is not None and task.validates_ema:  # under an objective the EMA's classifier is untrained
        ema = task.evaluate(run.val_loader, world.device, run.precision, model=opt.ema.module)
        row["val_loss_ema"], row["val_acc_ema"] = ema["val_loss"], ema["val_acc"]
    row.update(val)  # the task's further figures (flip TTA)
    position.metrics.append(row)
    if run.show:
        _print_epoch(cfg, row)
    if world.is_main:  # the user-facing files first, then the checkpoint that commits the epoch
        rundir.save_weights(run.run_dir, run.model)
        if opt.ema is not None:
            rundir.save_weights(run.run_dir, opt.ema.module, rundir.EMA_WEIGHTS)
        rundir.write_metrics(run.run_dir, position.metrics)
    position.epoch, position.step, position.sums = epoch + 1, 0, EpochSums()


def _print_epoch(cfg: TrainConfig, m: dict[str, float]) -> None:
    train_acc = "" if math.isnan(m["train_acc"]) else f" acc {m['train_acc']:.3f}"
    flip_acc = f" (flip TTA {m['val_acc_flip']:.3f})" if "val_acc_flip" in m else ""
    tqdm.write(f"{cfg.model} epoch {m['epoch']}/{cfg.epochs}: train loss {m['train_loss']:.3f}{train_acc} | "
               f"val loss {m['val_loss']:.3f} acc {m['val_acc']:.3f}{flip_acc} | {m['images_per_s']:.0f} img/s")


# --- checkpoint -------------------------------------------------------------------------------------


def checkpoint(run: Run, position: Position, global_step: int) -> None:
    """Commit the run's position, weights, optimizer, metrics and unfinished sums in one file.

    A checkpoint is the one commit point, so a run killed between two file writes resumes from a
    consistent state; no RNG state is needed (see the module docstring).
    """
    model, opt = run.model, run.opt
    if not all(torch.isfinite(p).all() for p in model.parameters()):  # never commit broken weights
        raise VitlabError(f"the weights became NaN or infinite at step {global_step}; lower --lr or raise "
                          "--warmup-epochs (the last good checkpoint is kept)")
    if run.world.is_main:
        state = run.task.state()
        rundir.save_checkpoint(run.run_dir, {
            "position": {"epoch": position.epoch, "step": position.step}, "model": model.state_dict(),
            "optimizer": opt.optimizer.state_dict(), "metrics": position.metrics,
            "sums": dataclasses.asdict(position.sums),
            **({"ema": opt.ema.module.state_dict()} if opt.ema is not None else {}),
            **({"task": state} if state is not None else {}),
            "params": count_parameters(model), "torch_version": str(torch.__version__)},
            global_step, run.cfg.checkpoint.keep)
    distributed.barrier()


def restore(run_dir: Path, model: nn.Module, task: Task, opt: Optimisation) -> Position:
    """The position of the run's newest checkpoint, with model, optimizer, task and EMA restored."""
    state = rundir.load_state(run_dir)
    if state is None:
        return Position()
    rundir.restore_state(run_dir, state, model, opt.optimizer)
    if "task" in state:
        task.load_state(state["task"])  # MAE's decoder, DINO's teacher and centre, ...
    if opt.ema is not None:
        opt.ema.module.load_state_dict(state["ema"])
    return Position(state["position"]["epoch"], state["position"]["step"], list(state["metrics"]),
                    EpochSums(**state.get("sums", {})))


def out_of_memory_error(error: BaseException, batch_size: int, step: int) -> BaseException:
    """A one-line :class:`VitlabError` with advice for an allocator failure; any other error unchanged."""
    text = str(error)
    if not (isinstance(error, torch.OutOfMemoryError) or "out of memory" in text
            or "can't allocate memory" in text or "not enough memory" in text):
        return error
    return VitlabError(f"out of memory at step {step} with {batch_size} images per batch; lower --batch-size "
                       f"(e.g. {max(batch_size // 2, 1)}), use --precision bf16, or a smaller --image-size "
                       "(the last checkpoint is kept: --resume continues)")
