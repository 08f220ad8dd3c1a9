"""Accuracy against compute for early-exit models (Bakhtiarnia et al.), one point per confidence threshold.

For each threshold, :meth:`~vitlab.models.early_exit.EarlyExitModel.predict` leaves every image
at the first exit whose top softmax probability reaches it. The curve pairs the accuracy of
those decisions with the MACs they cost, as a fraction of one full backbone pass (branches
included). Threshold 1.0 or more never exits early: the backbone's own accuracy at full cost,
plus nothing. The fraction of images leaving at each exit is kept too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..errors import VitlabError
from .results import to_jsonable

#: Default thresholds: from "exit at once" to "never exit early".
THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01)


@dataclass
class ExitCurveResult:
    """Accuracy and relative compute of an early-exit model at each confidence threshold."""

    model: str
    thresholds: list[float]
    accuracy: list[float]
    #: Mean MACs per image over one full backbone pass (1.0: no saving; below 1: saved).
    relative_compute: list[float]
    #: Per threshold, the fraction of images that left at each exit (branches, then the final head).
    exit_shares: list[list[float]] = field(default_factory=list)
    num_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({"model": self.model, "thresholds": self.thresholds, "accuracy": self.accuracy,
                            "relative_compute": self.relative_compute, "exit_shares": self.exit_shares,
                            "num_images": self.num_images})

    def plot(self, ax: Any) -> None:
        """Accuracy against relative compute, each point labelled with its threshold."""
        ax.plot(self.relative_compute, self.accuracy, "-o", ms=4, label=self.model)
        for t, x, y in zip(self.thresholds, self.relative_compute, self.accuracy):
            ax.annotate(f"{t:g}" if t <= 1 else "off", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_xlabel("compute (fraction of one backbone pass)")
        ax.set_ylabel("accuracy")
        ax.set_title(self.model, fontsize=9)
        ax.grid(alpha=0.3)


@torch.inference_mode()
def exit_curve(subject, loader: Iterable, thresholds: Sequence[float] = THRESHOLDS,
               name: str | None = None) -> ExitCurveResult:
    """The accuracy-against-compute curve of ``subject`` (a :class:`Subject` of an early-exit model)."""
    from ..models.early_exit import EarlyExitModel

    model = subject.model
    if not isinstance(model, EarlyExitModel):
        raise VitlabError(f"{subject.name} has no early exits (not an early_exit_* model)")
    was_training = model.training
    model.eval()
    correct = np.zeros(len(thresholds))
    macs = np.zeros(len(thresholds))
    shares = np.zeros((len(thresholds), model.num_exits + 1))
    seen, full = 0, 0
    try:
        for batch in loader:
            images, labels = batch[0], batch[1]
            prepared = subject.prepare(images)
            for i, t in enumerate(thresholds):
                out = model.predict(prepared, t)
                correct[i] += (out.predictions == labels).sum().item()
                macs[i] += out.macs.double().sum().item()
                shares[i] += torch.bincount(out.exit_index, minlength=model.num_exits + 1).numpy()
                full = out.full_macs
            seen += labels.shape[0]
    finally:
        model.train(was_training)
    if seen == 0:
        raise VitlabError("the early-exit curve needs labelled images; the loader yielded none")
    return ExitCurveResult(name or subject.name, list(thresholds), (correct / seen).tolist(),
                           (macs / (seen * full)).tolist(), (shares / seen).tolist(), seen)
