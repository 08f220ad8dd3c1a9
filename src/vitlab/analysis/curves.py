"""Training curves of several runs as a result object (numbers + a way to draw them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .results import to_jsonable

_LABELS = {
    "val_acc": "validation accuracy",
    "train_acc": "training accuracy",
    "train_loss": "training loss",
    "val_loss": "validation loss",
}


@dataclass
class TrainingCurves:
    """Per-epoch metrics of each run: ``{model name: [row per epoch]}`` as in ``metrics.csv``."""

    kind: ClassVar[str] = "training_curves"
    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe ``{model name: [metrics row per epoch]}``."""
        return to_jsonable(self.runs)

    def plot(self, ax: Any, metric: str = "val_acc") -> None:
        """One line per run of ``metric`` against epochs; dashed training accuracy for ``val_acc``."""
        for i, (name, rows) in enumerate(self.runs.items()):
            if not rows:
                continue
            colour = f"C{i}"
            epochs = [r["epoch"] for r in rows]
            ax.plot(epochs, [r[metric] for r in rows], marker="o", ms=3, color=colour, label=name)
            if metric == "val_acc":
                ax.plot(epochs, [r["train_acc"] for r in rows], ls="--", color=colour, alpha=0.6)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_xlabel("epoch")
        ax.set_ylabel(_LABELS.get(metric, metric))
        if metric.endswith("acc"):
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
