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
from typing import Any, ClassVar

import numpy as np

from ..errors import VitlabError
from ..runs import read_config
from .registry import Analysis, Context, Figure
from .results import to_jsonable

#: How each training objective is named in reports.
OBJECTIVE_LABELS = {"supervised": "supervised", "mp3": "MP3 (position prediction)",
                    "mae": "MAE (masked reconstruction)", "dino": "DINO (self-distillation)"}
SELF_SUPERVISED = ("mp3", "mae", "dino")


def supervision_of(run_dir: str | Path) -> str:
    """How the run in ``run_dir`` was trained: its objective, and what it was fine-tuned from."""
    cfg = read_config(Path(run_dir))
    label = OBJECTIVE_LABELS.get(cfg.objective, cfg.objective)
    if cfg.finetune.source:
        source = Path(cfg.finetune.source)
        try:
            before = supervision_of(source)
        except VitlabError:  # the source run was moved or deleted: say what is known
            before = f"run {source.name}"
        return f"{before}, then {'linear probe' if cfg.finetune.mode == 'linear' else 'fine-tuned'}"
    if cfg.init_weights:
        return f"{label}, from {Path(cfg.init_weights).name}"
    return label


def is_self_supervised(run_dir: str | Path) -> bool:
    """True for a pretraining run whose classifier never saw a label (not fine-tuned since)."""
    cfg = read_config(Path(run_dir))
    return cfg.objective in SELF_SUPERVISED and not cfg.finetune.source


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
        for run, (_depth, dist) in self.attention.items():
            parts.append(f"{run}'s mean attention distance goes from {dist[0]:.1f} px in the first block "
                         f"to {dist[-1]:.1f} px in the last")
        return "; ".join(parts) + "." if parts else ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: runs, supervision, and per run knn and attention_distance_px against relative depth,
        and best_knn."""
        return to_jsonable({
            "runs": self.runs, "supervision": self.supervision,
            "knn": {r: {"relative_depth": d, "accuracy": a} for r, (d, a) in self.knn.items()},
            "attention_distance_px": {r: {"relative_depth": d, "mean": m} for r, (d, m) in self.attention.items()},
            "best_knn": {r: {"relative_depth": d, "accuracy": a} for r, (d, a) in self.best_knn().items()},
        })

    def plot(self, ax: Any, panel: str = "knn") -> None:
        """One line per run against relative depth: k-NN accuracy (``panel="knn"``) or mean attention
        distance (``panel="attention"``)."""
        series, ylabel = {"knn": (self.knn, "k-NN accuracy of the layer's features"),
                          "attention": (self.attention, "mean attention distance (px)")}[panel]
        for run, (depth, values) in series.items():
            ax.plot(depth, values, "-o", ms=3, label=f"{run}: {self.supervision[run]}")
        ax.set(xlabel="relative depth", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)


def compare_supervision(supervision: dict[str, str],
                        results: dict[str, dict[str, Any]]) -> SupervisionComparison | None:
    """Gather the comparison from the suite's ``results`` (``{analysis: {model: result}}``) for the
    runs named in ``supervision``; ``None`` unless at least two kinds of supervision are present."""
    if len(set(supervision.values())) < 2:
        return None
    comparison = SupervisionComparison(runs=list(supervision), supervision=dict(supervision))
    for run in supervision:
        probe = results.get("probes", {}).get(run)
        if probe is not None and "knn" in probe.accuracy:
            acc = np.asarray(probe.accuracy["knn"], dtype=float)
            comparison.knn[run] = (_relative(len(acc)), acc)
        distance = results.get("attention_distance", {}).get(run)
        if distance is not None:
            per_layer = np.asarray(distance.distances, dtype=float).mean(axis=1)
            comparison.attention[run] = (_relative(len(per_layer)), per_layer)
    return comparison


def _relative(n: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)


# --- in the suite -------------------------------------------------------------------------------

#: The results key of the one comparison.
KEY = "runs"


def run(context: Context) -> dict[str, SupervisionComparison]:
    """The comparison of the runs trained with different supervision (none when all share one)."""
    comparison = compare_supervision({s.name: s.supervision for s in context.subjects if s.supervision},
                                     context.done.results)
    return {} if comparison is None else {KEY: comparison}


ANALYSIS = Analysis(
    name="supervision",
    title="What supervision changes",
    caption="The same comparison for runs trained with different supervision, against relative depth (0: first "
            "block, 1: last): on the left the k-NN accuracy of each layer's features (the probes analysis), on the "
            "right each layer's mean attention distance; Walmer et al. found reconstruction-trained ViTs' best "
            "features mid-network and label- or distillation-trained ones' at the end.",
    paper="Walmer et al. 2023 (Teaching Matters)",
    derived_from=("probes", "attention_distance"),
    run=run,
    figures=(Figure(arrange="panels", panels=lambda results: ["knn", "attention"], width=5.5, height=4.0,
                    text=lambda results: " ".join(r.summary() for r in results)),),
)

__all__ = ["supervision_of", "is_self_supervised", "SupervisionComparison", "compare_supervision",
           "OBJECTIVE_LABELS"]
