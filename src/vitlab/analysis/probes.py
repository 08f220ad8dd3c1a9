"""Layer probes: how linearly (and how locally) decodable the class is after every layer
(Raghu et al. 2021, section 7; Walmer et al. 2023, section 5).

For every analysable layer, three token read-outs:

* ``cls``: the class token (models with one);
* ``mean``: the average of the spatial tokens (global average pooling for CNN feature maps);
* ``centre``: the single spatial token (or feature-map position) at the centre of the grid;

and two probes fitted on training images and scored on held-out ones:

* **ridge**: closed-form ridge regression onto {-1, +1} one-hot targets (Raghu et al.), from
  float64 sums ``X^T X`` and ``X^T Y`` of centred features, so memory does not grow with the data;
  the penalty is ``ridge`` times the mean feature variance (scale-free), prediction = argmax;
* **k-NN** (Walmer et al.): L2-normalised features (the class token, else the mean token), cosine
  similarity to the training bank, the ``k = 20`` nearest neighbours vote with weights
  ``exp(similarity / 0.07)``. The bank holds at most ``max_bank`` training images (float32).

:meth:`LayerProbes.result` reports every accuracy against depth and the best layer of each task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..anatomy import Layer
from ..capture import Capture
from ..errors import VitlabError
from ..knn import knn_predict
from ..options import option
from .batches import Limited, require_labels
from .registry import Analysis, Context
from .results import to_jsonable

__all__ = ["READOUTS", "readouts", "LayerProbes", "ProbeResult"]

READOUTS = ("cls", "mean", "centre")


def readouts(output: Tensor, layer: Layer, prefix_tokens: int) -> dict[str, Tensor]:
    """The ``cls``, ``mean`` and ``centre`` read-outs of one layer's output, float64 (B, C) each."""
    x = output.detach().to(torch.float64)
    layout = layer.layout or ("nchw" if x.ndim == 4 else "tokens" if x.ndim == 3 else None)
    if layout == "nchw":
        x, prefix = x.flatten(2).transpose(1, 2), 0
        side = (output.shape[2], output.shape[3])
    elif layout == "nhwc":
        side, x, prefix = (output.shape[1], output.shape[2]), x.flatten(1, 2), 0
    elif layout == "tokens":
        side, prefix = None, prefix_tokens
        for p in dict.fromkeys((prefix_tokens, 0, 1, 2)):  # hierarchical models change the prefix
            s = math.isqrt(max(x.shape[1] - p, 0))
            if s > 0 and s * s == x.shape[1] - p:
                side, prefix = (s, s), p
                break
    else:
        raise VitlabError(f"layer {layer.label} gives a {x.ndim}-D output; probes read tokens or feature maps")
    spatial = x[:, prefix:]
    out = {"mean": spatial.mean(1)}
    if prefix:
        out["cls"] = x[:, 0]
    if side is not None:
        out["centre"] = spatial[:, (side[0] // 2) * side[1] + side[1] // 2]
    return out


@dataclass
class _Ridge:
    n: int = 0
    sum_x: Tensor | None = None
    sum_xx: Tensor | None = None
    sum_xy: Tensor | None = None
    sum_y: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    correct: int = 0
    seen: int = 0


class LayerProbes:
    """Ridge and k-NN probes of every layer: :meth:`add_train` batches, :meth:`fit`, :meth:`add_eval` batches.

    ``on_layer``-style calls take the layer's output for a batch together with the batch's labels.
    """

    def __init__(self, layers: Sequence[Layer], prefix_tokens: int, num_classes: int, ridge: float = 1e-2,
                 k: int = 20, temperature: float = 0.07, max_bank: int = 10_000) -> None:
        if num_classes < 2:
            raise VitlabError(f"probes need at least 2 classes, got {num_classes}")
        self.layers = list(layers)
        self.prefix_tokens, self.num_classes = prefix_tokens, num_classes
        self.ridge, self.k, self.temperature, self.max_bank = ridge, k, temperature, max_bank
        self._ridge: dict[tuple[str, str], _Ridge] = {}
        self._bank: dict[str, list[Tensor]] = {}
        self._bank_labels: dict[str, list[Tensor]] = {}
        self._knn: dict[str, list[int]] = {}
        self._fitted = False

    def _layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise VitlabError(f"probes were not set up for layer '{name}'")

    def _targets(self, labels: Tensor) -> Tensor:
        y = torch.full((labels.shape[0], self.num_classes), -1.0, dtype=torch.float64)
        y[torch.arange(labels.shape[0]), labels.long().cpu()] = 1.0
        return y

    def add_train(self, name: str, output: Tensor, labels: Tensor) -> None:
        """Add one training batch of layer ``name``'s output to the ridge sums and the k-NN bank."""
        if self._fitted:
            raise VitlabError("the probes are already fitted; add training batches before fit()")
        feats = readouts(output, self._layer(name), self.prefix_tokens)
        y = self._targets(labels)
        for kind, x in feats.items():
            x = x.cpu()
            s = self._ridge.setdefault((name, kind), _Ridge())
            if s.sum_x is None:
                d = x.shape[1]
                s.sum_x, s.sum_xx = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
                s.sum_xy = torch.zeros(d, self.num_classes, dtype=torch.float64)
                s.sum_y = torch.zeros(self.num_classes, dtype=torch.float64)
            s.n += x.shape[0]
            s.sum_x += x.sum(0)
            s.sum_xx += x.T @ x
            s.sum_xy += x.T @ y
            s.sum_y += y.sum(0)
        banked = sum(t.shape[0] for t in self._bank.get(name, []))
        if banked < self.max_bank:
            key = feats.get("cls", feats["mean"])
            take = self.max_bank - banked
            self._bank.setdefault(name, []).append(torch.nn.functional.normalize(key[:take], dim=1).float().cpu())
            self._bank_labels.setdefault(name, []).append(labels[:take].long().cpu())

    def fit(self) -> None:
        """Solve every ridge probe (centred features, penalty ``ridge`` x mean feature variance)."""
        if not self._ridge:
            raise VitlabError("no training batch added; call add_train() before fit()")
        for s in self._ridge.values():
            mean_x, mean_y = s.sum_x / s.n, s.sum_y / s.n
            cov = s.sum_xx / s.n - torch.outer(mean_x, mean_x)
            cross = s.sum_xy / s.n - torch.outer(mean_x, mean_y)
            penalty = self.ridge * max(cov.diagonal().mean().item(), 1e-12)
            eye = torch.eye(cov.shape[0], dtype=torch.float64)
            s.weight = torch.linalg.solve(cov + penalty * eye, cross)
            s.bias = mean_y - mean_x @ s.weight
        self._bank = {name: [torch.cat(parts)] for name, parts in self._bank.items()}
        self._bank_labels = {name: [torch.cat(parts)] for name, parts in self._bank_labels.items()}
        self._fitted = True

    def add_eval(self, name: str, output: Tensor, labels: Tensor) -> None:
        """Score one held-out batch of layer ``name``'s output with every fitted probe."""
        if not self._fitted:
            raise VitlabError("call fit() after the training batches and before add_eval()")
        labels = labels.long().cpu()
        feats = readouts(output, self._layer(name), self.prefix_tokens)
        for kind, x in feats.items():
            s = self._ridge.get((name, kind))
            if s is None:
                continue
            pred = (x.cpu() @ s.weight + s.bias).argmax(1)
            s.correct += int((pred == labels).sum())
            s.seen += labels.shape[0]
        bank, bank_labels = self._bank[name][0], self._bank_labels[name][0]
        query = torch.nn.functional.normalize(feats.get("cls", feats["mean"]), dim=1).float().cpu()
        predicted = knn_predict(query, bank, bank_labels, self.num_classes, self.k, self.temperature)
        counts = self._knn.setdefault(name, [0, 0])
        counts[0] += int((predicted == labels).sum())
        counts[1] += labels.shape[0]

    def result(self, model: str) -> ProbeResult:
        """Accuracy of every task (``ridge/<readout>``, ``knn``) at every layer, NaN where not applicable."""
        labels = [layer.label for layer in self.layers]
        acc: dict[str, list[float]] = {}
        for kind in READOUTS:
            row = [self._ridge[(layer.name, kind)] if (layer.name, kind) in self._ridge else None
                   for layer in self.layers]
            if any(s is not None and s.seen for s in row):
                acc[f"ridge/{kind}"] = [s.correct / s.seen if s is not None and s.seen else float("nan") for s in row]
        acc["knn"] = [self._knn[layer.name][0] / self._knn[layer.name][1] if layer.name in self._knn else float("nan")
                      for layer in self.layers]
        if all(math.isnan(a) for a in acc["knn"]):
            raise VitlabError("no held-out batch scored; call add_eval() before result()")
        return ProbeResult(model, labels, {k: np.array(v) for k, v in acc.items()})


@dataclass
class ProbeResult:
    """Probe accuracy against depth, per task."""

    kind: ClassVar[str] = "probes"

    model: str
    layers: list[str]
    #: task -> accuracy per layer (NaN where the read-out does not exist).
    accuracy: dict[str, np.ndarray] = field(default_factory=dict)

    def best_layers(self) -> dict[str, dict[str, Any]]:
        """For every task, the layer with the highest accuracy and that accuracy."""
        out = {}
        for task, acc in self.accuracy.items():
            if np.isfinite(acc).any():
                i = int(np.nanargmax(acc))
                out[task] = {"layer": self.layers[i], "depth": i, "accuracy": float(acc[i])}
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: model, layers, accuracy (task -> per layer) and best (task -> layer, depth, accuracy)."""
        return to_jsonable({"model": self.model, "layers": self.layers, "accuracy": self.accuracy,
                            "best": self.best_layers()})

    def plot(self, ax: Any) -> None:
        """Accuracy of every probe against depth; the best layer of each task is ringed."""
        depth = np.arange(len(self.layers))
        best = self.best_layers()
        for task, acc in self.accuracy.items():
            (line,) = ax.plot(depth, acc, "-o", ms=3, label=task)
            if task in best:
                ax.plot(best[task]["depth"], best[task]["accuracy"], "o", ms=9, mfc="none", mec=line.get_color())
        stride = max(1, int(np.ceil(len(self.layers) / 12)))
        ax.set_xticks(depth[::stride])
        ax.set_xticklabels(self.layers[::stride], rotation=45, ha="right", fontsize="small")
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer (depth)")
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"{self.model}: layer probes")
        ax.legend(fontsize="small")


# --- in the suite -------------------------------------------------------------------------------


@dataclass
class ProbeOptions:
    """Options of the layer probes."""

    images: int = option(2048, metavar="N", check=lambda v: v >= 1, must="be at least 1",
                         help="training images the probes are fitted on (held-out scoring uses the analysis images)")


def run(context: Context) -> dict[str, ProbeResult]:
    """Fit every subject's probes on training images, score them on the analysis images."""
    if context.train_loader is None:
        context.note("probes: skipped (no training images to fit them on)")
        return {}
    require_labels(context.loader, "probes")
    out = {}
    for s in context.subjects:
        classes = getattr(s.model, "num_classes", 0)
        probes = LayerProbes(s.anatomy.layers, s.anatomy.prefix_tokens, max(classes, 2))
        batches = (("train", Limited(context.train_loader(), context.options.images)), ("eval", context.loader))
        for phase, loader in batches:
            labels_now: dict[str, torch.Tensor] = {}
            add = probes.add_train if phase == "train" else probes.add_eval

            def receive(name: str, output: Tensor, add: Callable[[str, Tensor, Tensor], None] = add,
                        labels_now: dict[str, torch.Tensor] = labels_now) -> None:
                add(name, output, labels_now["y"])

            with Capture(s.model, s.anatomy.layer_names, receive), torch.no_grad():
                for images, labels, *_ in tqdm(loader, desc=f"probes of {s.name} ({phase})",
                                               disable=not context.progress, leave=False):
                    labels_now["y"] = labels
                    s.model(s.prepare(images))
            if phase == "train":
                probes.fit()
        out[s.name] = probes.result(s.name)
    return out


ANALYSIS = Analysis(
    name="probes",
    title="Layer probes",
    caption="Held-out accuracy after every layer of closed-form ridge probes on the class token, the token average "
            "and the centre token, and of a weighted 20-nearest-neighbour probe, fitted on training images, with "
            "each probe's best layer ringed: it shows at what depth the class becomes decodable.",
    paper="Raghu et al. 2021 (section 7); Walmer et al. 2023 (section 5)",
    needs=("layers",),
    options=ProbeOptions,
    prefix="probe_",
    run=run,
)
