"""Accuracy against compute for early-exit models (Bakhtiarnia et al.), one point per confidence threshold.

:func:`predict` classifies a batch the way an early-exit model runs at inference: every image
leaves at the first branch whose top softmax probability reaches the threshold, the backbone
goes on with the images still in the batch, and it stops once none is left. It is a plain loop
over the backbone's layers, which the anatomy describes as a chain (``stem``, the layers, ``head``);
for a backbone it does not describe that way, every branch sees the whole batch and the
decisions (and the compute they are charged) are the same, only the savings are not realised.

Compute is counted per image from MACs measured once on one image with ``FlopCounterMode``
(:func:`exit_costs`; attention matmuls included, fused CPU attention too): the backbone up to each
exit, each branch, the whole backbone. A threshold above 1 can never be reached, so no branch
runs: the backbone's own accuracy at full cost.

:func:`exit_curve` pairs, for each threshold, the accuracy of those decisions with the MACs they
cost as a fraction of one full backbone pass (branches included), and keeps the fraction of
images leaving at each exit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..anatomy import anatomy
from ..errors import VitlabError
from ..models.early_exit import EarlyExitModel
from .batches import require_labels
from .registry import Analysis, Context
from .results import to_jsonable

if TYPE_CHECKING:
    from .subjects import Subject

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
        """JSON-safe dict: model, thresholds, accuracy, relative_compute, exit_shares (per threshold), num_images."""
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


@dataclass
class ExitCosts:
    """MACs of one image: the backbone up to each exit layer (cumulative), each branch, the whole backbone."""

    backbone_macs: list[int]
    branch_macs: list[int]
    full_macs: int


@dataclass
class EarlyExitPrediction:
    """What :func:`predict` returns (one entry per image, in input order)."""

    #: Predicted class and the logits it came from (of the exit the image left at).
    predictions: torch.Tensor
    logits: torch.Tensor
    #: Exit each image left at: ``0 .. num_exits - 1`` for branches, ``num_exits`` for the final head.
    exit_index: torch.Tensor
    #: MACs spent on each image (backbone up to its exit plus every branch it passed through).
    macs: torch.Tensor
    #: MACs of one full backbone forward pass (no branches), the reference for ``compute_saved``.
    full_macs: int

    @property
    def compute_saved(self) -> float:
        """Fraction of the full backbone's MACs not spent (negative when branch overhead outweighs exits)."""
        return 1.0 - self.macs.double().sum().item() / (self.full_macs * len(self.macs))


@torch.no_grad()
def exit_costs(model: EarlyExitModel) -> ExitCosts:
    """MACs of one image up to each exit, of each branch and of the whole backbone."""
    param = next(model.parameters())
    x = torch.zeros(1, model.in_chans, *model.img_size, device=param.device, dtype=param.dtype)
    outputs, at_exit = {}, []
    was_training = model.training
    model.eval()
    try:
        with _mac_counter() as counter:
            def note(i: int, output: torch.Tensor) -> None:
                at_exit.append(counter.get_total_flops() // 2)
                outputs[i] = output

            model._run_backbone(x, note)
        full = counter.get_total_flops() // 2
        branch_macs = []
        for i, branch in enumerate(model.branches):
            with _mac_counter() as counter:
                branch(outputs[i])
            branch_macs.append(counter.get_total_flops() // 2)
    finally:
        model.train(was_training)
    return ExitCosts(at_exit, branch_macs, full)


@torch.no_grad()
def predict(model: EarlyExitModel, x: torch.Tensor, threshold: float,
            costs: ExitCosts | None = None) -> EarlyExitPrediction:
    """Classify ``x`` leaving each image at the first exit whose top softmax probability is ``>= threshold``.

    Images that exit are dropped from the batch, so later layers run only on the rest, and the
    backbone stops once none is left. ``costs`` (from :func:`exit_costs`) is measured when not given.
    """
    if tuple(x.shape[-2:]) != tuple(model.img_size):
        raise VitlabError(f"this model takes {model.img_size[0]}x{model.img_size[1]} images, "
                          f"got {x.shape[-2]}x{x.shape[-1]}")
    costs = costs or exit_costs(model)
    n = x.shape[0]
    exit_index = torch.full((n,), model.num_exits, dtype=torch.long, device=x.device)
    logits = torch.empty(n, model.num_classes, device=x.device)
    # No softmax probability exceeds 1: above it no branch could fire, so none runs.
    branches_run = threshold <= 1
    was_training = model.training
    model.eval()
    try:
        if not branches_run:
            logits[:] = model.backbone(x)
        else:
            _run_with_exits(model, x, threshold, logits, exit_index)
    finally:
        model.train(was_training)

    backbone_macs = torch.tensor([*costs.backbone_macs, costs.full_macs])
    branch_macs = torch.tensor([*costs.branch_macs, 0] if branches_run else [0] * (model.num_exits + 1))
    spent = backbone_macs + branch_macs.cumsum(0)  # exits 0..n-1, then the final head
    return EarlyExitPrediction(logits.argmax(-1), logits, exit_index, spent.to(x.device)[exit_index],
                               costs.full_macs)


def _run_with_exits(model: EarlyExitModel, x: torch.Tensor, threshold: float, logits: torch.Tensor,
                    exit_index: torch.Tensor) -> None:
    """Fill ``logits`` and ``exit_index`` for every image, running the backbone layer by layer."""
    running = torch.arange(x.shape[0], device=x.device)  # input positions of the images still in the batch

    def leave(i: int, branch_logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Record the images of ``rows`` that exit at branch ``i``; the mask of those that stay."""
        done = branch_logits.softmax(-1).amax(-1) >= threshold
        logits[rows[done]] = branch_logits[done].to(logits.dtype)
        exit_index[rows[done]] = i
        return ~done

    backbone = model.backbone
    chain = anatomy(backbone)
    if chain.stem is None or chain.head is None:  # not described as a chain: every branch sees every image
        exit_logits, final = model.forward_exits(x)
        for i, branch_logits in enumerate(exit_logits):
            running = running[leave(i, branch_logits[running], running)]
        logits[running] = final[running].to(logits.dtype)
        return
    exits = {name: i for i, name in enumerate(model.exit_names)}
    h = chain.stem(backbone, x)
    for layer in chain.layers[1:]:
        h = backbone.get_submodule(layer.name)(h)
        if layer.name in exits:
            stays = leave(exits[layer.name], model.branches[exits[layer.name]](h), running)
            running, h = running[stays], h[stays]
            if running.numel() == 0:
                return
    logits[running] = chain.head(backbone, h).to(logits.dtype)


def _mac_counter() -> FlopCounterMode:
    # The fused CPU attention kernel has no FLOP formula in PyTorch: count it as q k^T and attn v.
    custom = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        custom[cpu_flash] = lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    return FlopCounterMode(display=False, custom_mapping=custom)


@torch.inference_mode()
def exit_curve(subject: Subject, loader: Iterable, thresholds: Sequence[float] = THRESHOLDS,
               name: str | None = None) -> ExitCurveResult:
    """The accuracy-against-compute curve of ``subject`` (a :class:`Subject` of an early-exit model)."""
    model = subject.model
    if not isinstance(model, EarlyExitModel):
        raise VitlabError(f"{subject.name} has no early exits (not an early_exit_* model)")
    was_training = model.training
    model.eval()
    correct = np.zeros(len(thresholds))
    macs = np.zeros(len(thresholds))
    shares = np.zeros((len(thresholds), model.num_exits + 1))
    seen, full = 0, 0
    costs = exit_costs(model)
    try:
        for batch in loader:
            images, labels = batch[0], batch[1]
            prepared = subject.prepare(images)
            for i, t in enumerate(thresholds):
                out = predict(model, prepared, t, costs)
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


# --- in the suite -------------------------------------------------------------------------------


def run(context: Context) -> dict[str, ExitCurveResult]:
    """The accuracy-against-compute curve of every early-exit model."""
    require_labels(context.loader, "early exits")
    out = {}
    for s in context.subjects:
        if isinstance(s.model, EarlyExitModel):
            out[s.name] = exit_curve(s, context.loader)
        else:
            context.note(f"early exits: not applicable to {s.name} (no exit branches)")
    return out


ANALYSIS = Analysis(
    name="early_exits",
    title="Early exits: accuracy against compute",
    caption="Accuracy against compute of each early-exit model on {n} images, one point per confidence threshold "
            "(an image leaves at the first exit whose top probability reaches it; 'off' never exits early): points "
            "up and to the left are better, and the curve's flat part is compute the exits save for free.",
    paper="Bakhtiarnia et al. 2022",
    run=run,
    reads_classifier=True,
)
