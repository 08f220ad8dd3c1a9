"""Feature reuse (Matsoukas et al. 2022, "What Makes Transfer Learning Work for Medical Images"):
how much of a model survives training (or fine-tuning), layer by layer.

For two models with the same layers (a run and its initialisation, or a model before and after
fine-tuning), per layer:

* **feature similarity**: linear CKA (minibatch, unbiased HSIC) between the layer's outputs of the
  two models on the same images; 1 means the layer computes the same representation (up to a
  rotation and scale), so its features were reused;
* **weight change**: ``||W_a - W_b|| / ||W_b||`` over the parameters of the layer's module.

Matsoukas et al. found early layers of transferred models changing little while late ones change
most; a model trained from scratch moves far from its initialisation everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..capture import Capture
from ..errors import VitlabError
from ..runs import INIT_WEIGHTS
from .cka import MinibatchCKA
from .registry import Analysis, Context
from .results import to_jsonable

if TYPE_CHECKING:
    from .subjects import Subject

__all__ = ["same_parameter_shapes", "weight_change", "feature_reuse", "FeatureReuseResult"]


def same_parameter_shapes(model_a: nn.Module, model_b: nn.Module) -> bool:
    """Whether two models have the same parameters by name and shape.

    One model name is not enough: model options such as ``mlp_ratio`` change the shapes but not
    the layer names.
    """
    shapes_a = {k: v.shape for k, v in model_a.named_parameters()}
    return shapes_a == {k: v.shape for k, v in model_b.named_parameters()}


def weight_change(model_a: nn.Module, model_b: nn.Module, module: str) -> float:
    """Relative L2 distance ``||a - b|| / ||b||`` of the parameters under ``module`` (float64)."""
    params_a = dict(model_a.get_submodule(module).named_parameters())
    params_b = dict(model_b.get_submodule(module).named_parameters())
    if not params_b:
        return float("nan")  # a parameter-free layer (e.g. an identity or pooling)
    diff = sum(float((params_a[k].detach().double() - v.detach().double()).pow(2).sum()) for k, v in params_b.items())
    norm = sum(float(v.detach().double().pow(2).sum()) for v in params_b.values())
    return (diff / norm) ** 0.5 if norm > 0 else float("nan")


@torch.no_grad()
def feature_reuse(subject_a: Subject, subject_b: Subject, loader: Iterable,
                  progress: bool = False) -> FeatureReuseResult:
    """Per-layer CKA and weight change between two subjects of the same architecture."""
    layers = subject_a.anatomy.layer_names
    if layers != subject_b.anatomy.layer_names:
        raise VitlabError(f"feature reuse compares models with the same layers; {subject_a.name} and "
                          f"{subject_b.name} differ")
    if not same_parameter_shapes(subject_a.model, subject_b.model):
        raise VitlabError(f"feature reuse compares models with the same parameter shapes; {subject_a.name} and "
                          f"{subject_b.name} were built with different model options")
    cka = MinibatchCKA(layers, layers)
    with Capture(subject_a.model, layers, lambda n, t: cka.add(0, n, t)), \
            Capture(subject_b.model, layers, lambda n, t: cka.add(1, n, t)):
        for batch in tqdm(loader, desc=f"feature reuse {subject_a.name} vs {subject_b.name}", disable=not progress,
                          leave=False):
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            subject_a.model(subject_a.prepare(images))
            if subject_b.model is not subject_a.model:  # one model's hooks already fed both sides
                subject_b.model(subject_b.prepare(images))
            cka.end_batch()
    similarity = cka.compute().numpy().diagonal().copy()
    change = np.array([weight_change(subject_a.model, subject_b.model, name) for name in layers])
    return FeatureReuseResult(subject_a.name, subject_b.name, subject_a.anatomy.layer_labels, similarity, change)


@dataclass
class FeatureReuseResult:
    """Per layer: CKA between two models' outputs and the relative change of the layer's weights."""

    kind: ClassVar[str] = "feature_reuse"

    model_a: str
    model_b: str
    layers: list[str]
    cka: np.ndarray
    weight_change: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: model_a, model_b, layers, and per layer cka and weight_change."""
        return to_jsonable({"model_a": self.model_a, "model_b": self.model_b, "layers": self.layers,
                            "cka": self.cka, "weight_change": self.weight_change})

    def plot(self, ax: Any) -> None:
        """CKA (left axis) and weight change (right axis) against depth."""
        depth = np.arange(len(self.layers))
        ax.plot(depth, self.cka, "-o", ms=3, color="tab:blue", label="feature CKA")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("CKA between the two models", color="tab:blue")
        twin = ax.twinx()
        twin.plot(depth, self.weight_change, "--s", ms=3, color="tab:red", label="weight change")
        twin.set_ylabel("||W_a - W_b|| / ||W_b||", color="tab:red")
        twin.set_ylim(bottom=0)
        stride = max(1, int(np.ceil(len(self.layers) / 12)))
        ax.set_xticks(depth[::stride])
        ax.set_xticklabels(self.layers[::stride], rotation=45, ha="right", fontsize="small")
        ax.set_xlabel("layer (depth)")
        ax.set_title(f"feature reuse:\n{self.model_a} vs {self.model_b}", fontsize="small")


# --- in the suite -------------------------------------------------------------------------------


def initial_subject(subject: Subject) -> Subject | None:
    """The subject's run at initialisation (its ``init.safetensors``), or None without one."""
    from .subjects import subject_from_run

    if subject.run_dir is None or not (subject.run_dir / INIT_WEIGHTS).exists():
        return None
    return subject_from_run(subject.run_dir, name=f"{subject.name} (init)", weights=INIT_WEIGHTS)


def run(context: Context) -> dict[str, FeatureReuseResult]:
    """Each run against its initial weights, and two runs of one architecture against each other."""
    out = {}
    for s in context.subjects:
        init = context.init_subjects.get(s.name) or initial_subject(s)
        if init is not None:
            out[f"{s.name} vs initialisation"] = feature_reuse(s, init, context.loader, progress=context.progress)
    # Two runs of the same architecture (e.g. before and after fine-tuning) are compared directly.
    for i, a in enumerate(context.subjects):
        for b in context.subjects[i + 1:]:
            if (a.model_name and a.model_name == b.model_name and a.anatomy.layer_names == b.anatomy.layer_names
                    and same_parameter_shapes(a.model, b.model)):
                out[f"{a.name} vs {b.name}"] = feature_reuse(a, b, context.loader, progress=context.progress)
    if not out:
        context.note("feature reuse: no run with its initial weights (init.safetensors) and no two models of the "
                     "same architecture to compare")
    return out


ANALYSIS = Analysis(
    name="feature_reuse",
    title="Feature reuse",
    caption="CKA between the same layer of two versions of one model (solid) and how far its weights moved, "
            "||W_a - W_b|| / ||W_b|| (dashed), against depth: layers with high CKA and small changes were reused, "
            "the others relearned (Matsoukas et al.).",
    paper="Matsoukas et al. 2022 (what makes transfer learning work for medical images)",
    needs=("layers",),
    run=run,
)
