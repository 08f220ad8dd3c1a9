"""Effective receptive field of every layer (Luo et al. 2016; used by Raghu et al. 2021).

For a layer, the ERF is the gradient of its output at the centre location (the central token, or
the central position of a feature map, summed over channels) with respect to the input image,
in absolute value, summed over colour channels and averaged over images. Each map is normalised
to sum to 1; its *radius* is the smallest distance from the image centre within which half the
gradient mass lies, in pixels. A CNN's ERF grows slowly with depth; a ViT's is global from the
first blocks (its tokens mix across the image at every layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from ..anatomy import Anatomy, Layer
from ..errors import VitlabError
from ..options import option
from .batches import Limited
from .registry import Analysis, Context, Figure
from .results import to_jsonable

__all__ = ["centre_output", "effective_receptive_field", "ERFResult"]


def centre_output(output: Tensor, layer: Layer, prefix_tokens: int) -> Tensor | None:
    """The output at the centre location, summed over channels: (B,); None without a spatial grid."""
    layout = layer.layout or ("nchw" if output.ndim == 4 else "tokens" if output.ndim == 3 else None)
    if layout == "nchw":
        return output[:, :, output.shape[2] // 2, output.shape[3] // 2].sum(1)
    if layout == "nhwc":
        return output[:, output.shape[1] // 2, output.shape[2] // 2].sum(-1)
    if layout == "tokens":
        tokens = output.shape[1]
        # Hierarchical models change the prefix from stage to stage: take the first count that
        # leaves a square grid behind.
        for prefix in dict.fromkeys((prefix_tokens, 0, 1, 2)):
            side = math.isqrt(max(tokens - prefix, 0))
            if side > 0 and side * side == tokens - prefix:
                return output[:, prefix + (side // 2) * side + side // 2].sum(-1)
    return None


def effective_receptive_field(
    model: nn.Module,
    anatomy: Anatomy,
    batches: Iterable[Tensor],
    prepare: Callable[[Tensor], Tensor] = lambda x: x,
    progress: bool = False,
    name: str = "model",
) -> ERFResult:
    """ERF maps of every layer of ``model`` over ``batches`` of input images (float64 sums).

    ``prepare`` maps a batch to the model's input (e.g. a subject's resize + normalisation); the
    gradient is taken with respect to the prepared input. One backward pass per layer per batch.
    """
    was_training = model.training
    model.eval()
    outputs: dict[str, Tensor] = {}
    handles = [model.get_submodule(layer.name).register_forward_hook(
        lambda m, i, o, key=layer.name: outputs.__setitem__(key, o[0] if isinstance(o, (tuple, list)) else o))
        for layer in anatomy.layers]
    sums: dict[str, Tensor] = {}
    images = 0
    try:
        for batch in tqdm(batches, desc="effective receptive field", disable=not progress, leave=False, unit="batch"):
            x = prepare(batch[0] if isinstance(batch, (tuple, list)) else batch).detach().requires_grad_(True)
            outputs.clear()
            with torch.enable_grad():
                model(x)
                centres = [(layer, centre_output(outputs[layer.name], layer, anatomy.prefix_tokens))
                           for layer in anatomy.layers if layer.name in outputs]
                centres = [(layer, c) for layer, c in centres if c is not None and c.requires_grad]
                for k, (layer, centre) in enumerate(centres):
                    (grad,) = torch.autograd.grad(centre.sum(), x, retain_graph=k < len(centres) - 1)
                    g = grad.abs().sum(1).sum(0).to(torch.float64)  # H, W
                    sums[layer.label] = sums.get(layer.label, 0) + g
            images += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not sums:
        raise VitlabError(f"no layer of {name} has a spatial output to take an effective receptive field of")
    labels = [layer.label for layer in anatomy.layers if layer.label in sums]
    maps = np.stack([(sums[label] / sums[label].sum().clamp_min(1e-300)).cpu().numpy() for label in labels])
    return ERFResult(name, labels, maps, images)


@dataclass
class ERFResult:
    """Normalised ERF map (H, W) of every layer, and the radius holding half of each map's mass."""

    kind: ClassVar[str] = "erf"

    model: str
    layers: list[str]
    #: (layers, H, W), each map summing to 1.
    maps: np.ndarray
    num_images: int = 0

    def radii(self, mass: float = 0.5) -> np.ndarray:
        """Per layer: the smallest distance (px) from the image centre within which ``mass`` of the map lies."""
        _, h, w = self.maps.shape
        yy, xx = np.mgrid[0:h, 0:w]
        dist = np.hypot(yy - h // 2, xx - w // 2).ravel()
        order = np.argsort(dist, kind="stable")
        out = []
        for m in self.maps:
            cumulative = np.cumsum(m.ravel()[order])
            out.append(float(dist[order][min(np.searchsorted(cumulative, mass), len(order) - 1)]))
        return np.array(out)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: model, layers, num_images, radius_50_px (per layer) and maps (layers, H, W)."""
        return to_jsonable({"model": self.model, "layers": self.layers, "num_images": self.num_images,
                            "radius_50_px": self.radii(), "maps": self.maps})

    def plot(self, ax: Any) -> None:
        """Up to eight layers' maps side by side (evenly spread over depth), each scaled to its peak."""
        count = len(self.layers)
        picks = sorted(set(np.linspace(0, count - 1, min(count, 8)).round().astype(int)))
        _, h, w = self.maps.shape
        canvas = np.full((h, len(picks) * (w + 2) - 2), np.nan)
        for k, i in enumerate(picks):
            canvas[:, k * (w + 2):k * (w + 2) + w] = self.maps[i] / max(self.maps[i].max(), 1e-300)
        ax.imshow(canvas, cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
        radii = self.radii()
        ax.set_xticks([k * (w + 2) + (w - 1) / 2 for k in range(len(picks))])
        ax.set_xticklabels([f"{self.layers[i]}\n{radii[i]:.0f} px" for i in picks], fontsize="small")
        ax.set_yticks([])
        ax.set_title(f"{self.model}: effective receptive field (50% radius under each layer)")


# --- in the suite -------------------------------------------------------------------------------


@dataclass
class ERFOptions:
    """Options of the effective receptive field."""

    images: int = option(64, metavar="N", check=lambda v: v >= 1, must="be at least 1",
                         help="analysis images whose gradients are averaged")


def run(context: Context) -> dict[str, ERFResult]:
    """The effective receptive field of every layer of every subject."""
    batches = Limited(context.loader, context.options.images)
    out = {}
    for s in context.subjects:
        try:
            out[s.name] = effective_receptive_field(s.model, s.anatomy, batches, s.prepare,
                                                    progress=context.progress, name=s.name)
        except VitlabError as e:
            context.note(f"effective receptive field: {e}")
    return out


ANALYSIS = Analysis(
    name="erf",
    title="Effective receptive field",
    caption="The gradient of each layer's centre output with respect to the input, averaged over images and scaled "
            "to its peak, with the radius that holds half of it under each map: a CNN's receptive field grows with "
            "depth while a ViT's can span the image from its first blocks.",
    paper="Luo et al. 2016; Raghu et al. 2021",
    needs=("layers",),
    options=ERFOptions,
    prefix="erf_",
    run=run,
    figures=(Figure(arrange="rows", width=10.0, height=2.3),),
)
