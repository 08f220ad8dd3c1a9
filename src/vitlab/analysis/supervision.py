"""What supervision changes (Walmer et al., "Teaching Matters"): the same architecture trained with
labels, by position prediction (MP3), by masked reconstruction (MAE) or by self-distillation (DINO),
side by side.

Nothing new is measured here: the comparison gathers, per run, what the suite already measured on
the same images, against relative depth (0 = first block, 1 = last), so runs of different depths
share an axis:

* the k-NN accuracy of each layer's features (the ``probes`` analysis): Walmer et al. find that
  reconstruction-trained ViTs keep their most semantic features in the middle of the network,
  label- and distillation-trained ones at the end;
* the mean attention distance of each layer (``attention_distance``): which training makes
  early heads local and late heads global.

A run's supervision is read from its ``config.yaml`` (:func:`supervision_of`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from ..errors import VitlabError
from ..runs import read_config
from .results import to_jsonable

#: How each training objective is named in reports.
OBJECTIVE_LABELS = {"supervised": "supervised", "mp3": "MP3 (position prediction)",
                    "mae": "MAE (masked reconstruction)", "dino": "DINO (self-distillation)"}
SELF_SUPERVISED = ("mp3", "mae", "dino")


def supervision_of(run_dir: str | Path) -> str:
    """How the run in ``run_dir`` was trained: its objective, and what it was fine-tuned from."""
    cfg = read_config(Path(run_dir))
    label = OBJECTIVE_LABELS.get(cfg.objective, cfg.objective)
    if cfg.finetune_from:
        source = Path(cfg.finetune_from)
        try:
            before = supervision_of(source)
        except VitlabError:  # the source run was moved or deleted: say what is known
            before = f"run {source.name}"
        return f"{before}, then {'linear probe' if cfg.finetune_mode == 'linear' else 'fine-tuned'}"
    if cfg.init_weights:
        return f"{label}, from {Path(cfg.init_weights).name}"
    return label


def is_self_supervised(run_dir: str | Path) -> bool:
    """True for a pretraining run whose classifier never saw a label (not fine-tuned since)."""
    cfg = read_config(Path(run_dir))
    return cfg.objective in SELF_SUPERVISED and not cfg.finetune_from


@dataclass
class SupervisionComparison:
    """Per run: its supervision, and k-NN accuracy and attention distance against relative depth."""

    kind: ClassVar[str] = "supervision"

    runs: list[str]
    supervision: dict[str, str]
    #: run -> (relative depths, k-NN accuracy per layer); absent without the probes analysis.
    knn: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: run -> (relative depths, mean attention distance per layer in pixels); attention models only.
    attention: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def best_knn(self) -> dict[str, tuple[float, float]]:
        """For every run, the relative depth of its best k-NN layer and that layer's accuracy."""
        out = {}
        for run, (depth, acc) in self.knn.items():
            if np.isfinite(acc).any():
                i = int(np.nanargmax(acc))
                out[run] = (float(depth[i]), float(acc[i]))
        return out

    def summary(self) -> str:
        """One sentence per measured quantity, computed from the numbers."""
        parts = []
        for run, (depth, acc) in self.best_knn().items():
            parts.append(f"{run} ({self.supervision[run]}) has its best k-NN features at {depth:.0%} of its depth "
                         f"({acc:.1%}; last layer {self.knn[run][1][-1]:.1%})")
        for run, (depth, dist) in self.attention.items():
            parts.append(f"{run}'s mean attention distance goes from {dist[0]:.1f} px in the first block "
                         f"to {dist[-1]:.1f} px in the last")
        return "; ".join(parts) + "." if parts else ""

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({
            "runs": self.runs, "supervision": self.supervision,
            "knn": {r: {"relative_depth": d, "accuracy": a} for r, (d, a) in self.knn.items()},
            "attention_distance_px": {r: {"relative_depth": d, "mean": m} for r, (d, m) in self.attention.items()},
            "best_knn": {r: {"relative_depth": d, "accuracy": a} for r, (d, a) in self.best_knn().items()},
        })

    def plot(self, axes: Sequence) -> None:
        """k-NN accuracy (left) and mean attention distance (right) against relative depth, one line per run."""
        panels = [(axes[0], self.knn, "k-NN accuracy of the layer's features"),
                  (axes[1] if len(axes) > 1 else None, self.attention, "mean attention distance (px)")]
        for ax, series, ylabel in panels:
            if ax is None:
                continue
            for run, (depth, values) in series.items():
                ax.plot(depth, values, "-o", ms=3, label=f"{run}: {self.supervision[run]}")
            ax.set(xlabel="relative depth", ylabel=ylabel)
            ax.grid(alpha=0.3)
            if series:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)


def compare_supervision(supervision: dict[str, str], results: Any) -> SupervisionComparison | None:
    """Gather the comparison from the suite's ``results`` (an :class:`AnalysisResults`) for the runs
    named in ``supervision``; ``None`` unless at least two kinds of supervision are present."""
    if len(set(supervision.values())) < 2:
        return None
    comparison = SupervisionComparison(runs=list(supervision), supervision=dict(supervision))
    for run in supervision:
        probe = results.results.get("probes", {}).get(run)
        if probe is not None and "knn" in probe.accuracy:
            acc = np.asarray(probe.accuracy["knn"], dtype=float)
            comparison.knn[run] = (_relative(len(acc)), acc)
        distance = results.attention_distance.get(run)
        if distance is not None:
            per_layer = np.asarray(distance.distances, dtype=float).mean(axis=1)
            comparison.attention[run] = (_relative(len(per_layer)), per_layer)
    return comparison


def _relative(n: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)


__all__ = ["supervision_of", "is_self_supervised", "SupervisionComparison", "compare_supervision",
           "OBJECTIVE_LABELS"]
