"""The run directory: the unit everything in vitlab passes around.

``runs/NAME/`` holds ``config.yaml`` (enough to rebuild the model and the data),
``model.safetensors`` (the weights), ``init.safetensors`` (the weights before training, for
feature-reuse analyses), ``metrics.csv`` (one row per epoch), ``state-<step>.pt`` (the last few
checkpoints: what resuming needs, i.e. position, weights, optimizer state, metrics and the
running sums of the unfinished epoch, in one file so that they always agree) and, later,
analysis outputs. Every file is written atomically (temporary file, flush, fsync, rename): a
run killed mid-write keeps the previous complete file.
"""

from __future__ import annotations

import csv
import io
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import TrainConfig, dump_config, load_config
from ..errors import VitlabError
from ..io import atomic_replace, atomic_write_bytes

CONFIG, WEIGHTS, METRICS = "config.yaml", "model.safetensors", "metrics.csv"
#: Checkpoints are ``state-<global step>.pt``; ``state.pt`` is what runs of vitlab 0.1 wrote.
STATE_PATTERN, LEGACY_STATE = "state-*.pt", "state.pt"
#: The weights before the first step, for analyses of what training changed (feature reuse).
INIT_WEIGHTS = "init.safetensors"
#: The moving average of the weights, for runs with ``ema_decay`` (evaluated as ``val_acc_ema``).
EMA_WEIGHTS = "model_ema.safetensors"


def prepare_run_dir(path: Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Create the run directory, refusing to clobber an existing run unless told what to do."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if overwrite:
            shutil.rmtree(path)
        elif not resume:
            raise VitlabError(f"run directory '{path}' already exists; pass --resume to continue it, "
                              "--overwrite to replace it, or --out for another directory")
    elif resume:
        raise VitlabError(f"cannot resume '{path}': it does not exist or is empty")
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Write ``cfg`` to ``run_dir/config.yaml``, atomically."""
    atomic_write_bytes(Path(run_dir) / CONFIG, dump_config(cfg).encode())


def read_config(run_dir: Path) -> TrainConfig:
    """The run's :class:`~vitlab.config.TrainConfig`, read from its ``config.yaml``; one clear line if it has none."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise VitlabError(f"'{run_dir}' is not a vitlab run directory (no {CONFIG})")
    return load_config(path)


def save_weights(run_dir: Path, model: nn.Module, name: str = WEIGHTS) -> None:
    """Write ``model``'s state dict to ``run_dir/name`` as safetensors, atomically."""
    # safetensors refuses tensors that share memory; clone() gives each its own storage.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_replace(Path(run_dir) / name, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def load_weights(run_dir: Path, model: nn.Module, name: str = WEIGHTS) -> None:
    """Load ``model.safetensors`` (or ``name``) into ``model``; a damaged or mismatched file gets one clear line."""
    path = Path(run_dir) / name
    if not path.exists():
        what = "trained weights" if name == WEIGHTS else "initial weights"
        raise VitlabError(f"'{run_dir}' has no {what} ({name}); train it (again) with this vitlab or pick another run")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise VitlabError(f"checkpoint '{path}' is corrupt ({str(e).splitlines()[0]}); "
                          "retrain with --overwrite or restore the file") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise VitlabError(f"checkpoint '{path}' does not fit model '{type(model).__name__}' ({first}); "
                          "was config.yaml edited?") from None


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of global step ``step`` goes: ``run_dir/state-<step, 8 digits>.pt``."""
    return Path(run_dir) / f"state-{step:08d}.pt"


def _numbered_checkpoints(run_dir: Path) -> list[Path]:
    """The ``state-<step>.pt`` files, newest first (zero-padded steps sort as numbers)."""
    return sorted(Path(run_dir).glob(STATE_PATTERN), reverse=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, newest (highest step) first; a legacy ``state.pt`` comes last."""
    legacy = Path(run_dir) / LEGACY_STATE
    return _numbered_checkpoints(run_dir) + ([legacy] if legacy.exists() else [])


def save_checkpoint(run_dir: Path, state: dict[str, Any], step: int, keep: int = 3) -> Path:
    """Write the checkpoint of global step ``step`` atomically, then delete all but the newest ``keep``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = checkpoint_path(run_dir, step)
    atomic_write_bytes(path, buffer.getvalue())
    for old in _numbered_checkpoints(run_dir)[max(keep, 1):]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """One checkpoint, loaded without unpickling code (``weights_only``); damage gets one clear line."""
    try:
        # weights_only: a checkpoint holds tensors and plain containers, never arbitrary objects.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle, zip and EOF errors all mean "damaged")
        raise VitlabError(f"training state '{path}' is corrupt or not vitlab's ({type(e).__name__}); "
                          "restart the run with --overwrite") from None


def load_state(run_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint that loads, or ``None`` when the run has none yet.

    A damaged newest file (a disk that lost its last write) falls back to the one before it,
    with a warning, so a run loses at most one checkpoint interval more.
    """
    paths = list_checkpoints(run_dir)
    for i, path in enumerate(paths):
        try:
            state = load_checkpoint_file(path)
        except VitlabError:
            if i + 1 < len(paths):
                warnings.warn(f"checkpoint '{path}' is damaged; resuming from '{paths[i + 1].name}'", stacklevel=2)
                continue
            raise
        if path.name == LEGACY_STATE:  # epoch checkpoints of vitlab 0.1: the next position is the next epoch
            state.setdefault("position", {"epoch": int(state["epoch"]) + 1, "step": 0})
        state["path"] = str(path)
        return state
    return None


def restore_state(run_dir: Path, state: dict[str, Any], model: nn.Module,
                  optimizer: torch.optim.Optimizer) -> None:
    """Load a :func:`load_state` dict into ``model`` and ``optimizer``.

    A checkpoint that does not fit the run's model (config.yaml edited, another run's state
    copied in) gets one clear line instead of a size-mismatch trace.
    """
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        detail = f"missing {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise VitlabError(f"training state '{state.get('path', run_dir)}' does not fit this run's model ({detail}); "
                          "was config.yaml edited? restart the run with --overwrite") from None


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Write all epoch rows to ``metrics.csv`` (rewritten whole, atomically, each epoch)."""
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(Path(run_dir) / METRICS, buffer.getvalue().encode())


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The rows of ``metrics.csv`` (one per finished epoch) as floats; ``[]`` when the run has none yet."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    try:
        with open(path, newline="") as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except (ValueError, TypeError, csv.Error) as e:
        raise VitlabError(f"'{path}' is damaged ({str(e).splitlines()[0]}); restore it or retrain the run "
                          "with --overwrite") from None
