"""Subjects of analysis: a trained run directory or a model name, with what analyses need.

Analyses feed every model the same images in [0, 1]; each subject normalises them with its own
statistics and resizes them to its own input size, so a model trained on 32x32 ``shapes`` and a
timm model pretrained on ImageNet at 224x224 can be compared on one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..anatomy import Anatomy, anatomy
from ..data.datasets import dataset_stats
from ..errors import VitlabError
from ..models import count_parameters, create_model
from ..runs import build_model, rundir
from ..weights import load_weights_file
from .supervision import supervision_of


@dataclass
class Subject:
    """A model ready for analysis, with its provenance and training record."""

    name: str
    model: nn.Module
    anatomy: Anatomy
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    params: int
    #: ``"run"`` (a trained run directory), ``"untrained"`` or ``"pretrained"`` (timm weights).
    source: str = "untrained"
    run_dir: Path | None = None
    model_name: str = ""
    #: Per-epoch training metrics of a run (empty for named models).
    metrics: list[dict[str, float]] = field(default_factory=list)
    #: How it was trained: ``supervised``, ``MAE (masked reconstruction)``, ... (see
    #: :func:`~vitlab.analysis.supervision.supervision_of`), ``timm pretrained`` or ``untrained``.
    supervision: str = ""

    @property
    def val_acc(self) -> float | None:
        """The run's last-epoch validation accuracy; ``None`` for named models (no training record)."""
        return self.metrics[-1]["val_acc"] if self.metrics else None

    @property
    def train_time_s(self) -> float | None:
        """The run's training time in seconds up to its last epoch; ``None`` for named models."""
        return self.metrics[-1]["time_s"] if self.metrics else None

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Resize [0, 1] images to the model's input size (if it has one) and normalise them."""
        size = self.anatomy.image_size
        if size is not None and tuple(images.shape[-2:]) != tuple(size):
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype).view(1, -1, 1, 1)
        return (images - mean) / std


def subject_from_run(run_dir: str | Path, name: str | None = None, weights: str = "model.safetensors") -> Subject:
    """Load a trained run directory (config, weights, metrics) as a subject.

    ``weights`` picks the file: the trained ``model.safetensors``, or ``init.safetensors`` for the
    same model before training.
    """
    run_dir = Path(run_dir)
    cfg = rundir.read_config(run_dir)
    model = build_model(cfg)
    rundir.load_weights(run_dir, model, weights)
    mean, std = dataset_stats(cfg.data.name)
    return Subject(
        name=name or run_dir.name,
        model=model.eval(),
        anatomy=anatomy(model),
        mean=mean,
        std=std,
        params=count_parameters(model),
        source="run",
        run_dir=run_dir,
        model_name=cfg.model,
        metrics=rundir.read_metrics(run_dir),
        supervision=supervision_of(run_dir),
    )


def subject_from_name(model_name: str, pretrained: bool = False, **overrides) -> Subject:
    """Build a registered model by name (untrained, or with timm's pretrained weights)."""
    try:
        model = create_model(model_name, pretrained=pretrained, **overrides)
    except (OSError, RuntimeError) as e:
        if pretrained:
            raise VitlabError(f"could not load pretrained weights for '{model_name}' ({type(e).__name__}); "
                              "they need the network once, or drop --pretrained") from None
        raise
    cfg = model.pretrained_cfg or {}
    return Subject(
        name=model_name,
        model=model.eval(),
        anatomy=anatomy(model),
        mean=tuple(cfg.get("mean", (0.5, 0.5, 0.5))),
        std=tuple(cfg.get("std", (0.5, 0.5, 0.5))),
        params=count_parameters(model),
        source="pretrained" if pretrained else "untrained",
        model_name=model_name,
        supervision="timm pretrained" if pretrained else "untrained",
    )


def load_subject(spec: str, pretrained: bool = False, allow_pickle: bool = False) -> Subject:
    """A run directory (if ``spec`` is one), ``MODEL@FILE`` (a model with the weights in FILE),
    or else a registered model name."""
    path = Path(spec)
    if path.is_dir():
        return subject_from_run(path)
    if "@" in spec:
        name, weights = spec.split("@", 1)
        subject = subject_from_name(name)
        report = load_weights_file(subject.model, weights, allow_pickle=allow_pickle)
        if report.skipped:  # a classifier of another size: the file's model was fine-tuned, build it alike
            classes = report.shapes[report.skipped[0]][0]
            subject = subject_from_name(name, num_classes=classes)
            load_weights_file(subject.model, weights, allow_pickle=allow_pickle)
        subject.name, subject.source = f"{name}@{Path(weights).stem}", "weights file"
        return subject
    if path.exists() or "/" in spec:
        raise VitlabError(f"'{spec}' is neither a run directory nor a model name")
    return subject_from_name(spec, pretrained=pretrained)
