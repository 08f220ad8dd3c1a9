"""Attention rollout (Abnar & Zuidema 2020): where a class-token ViT's final class token draws its
information from, through every layer's attention and skip connection.

Each layer's attention, averaged over heads and mixed with the identity for the residual path,
``(1 - residual) A + residual I`` with rows renormalised, is multiplied into the product of the
layers before it (:func:`~vitlab.analysis.heads.attention_rollout`); the class token's row of the
product, over the patch tokens and renormalised to sum to 1, is the image's rollout map. The
analysis keeps the mean map over the analysis images, the mean normalised entropy of the maps
(1: spread evenly over the image, 0: on one patch) and the maps of the first few images.

The product is built as the attention arrives, one layer after the other, so memory holds one
(batch, tokens, tokens) float64 product, never every layer's attention. It applies to models
with a class token whose attention sites share one token grid (ViT, DeiT, T2T-ViT, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..anatomy import AttentionSite
from ..options import option
from .registry import Analysis, Context, Figure, Stream
from .results import to_jsonable

__all__ = ["RolloutOptions", "RolloutResult", "RolloutStream"]


@dataclass
class RolloutResult:
    """The class token's rollout maps of one model: the mean over images and a few examples."""

    kind: ClassVar[str] = "rollout"

    model: str
    grid: tuple[int, int]
    residual: float
    #: Mean rollout map over the analysis images, (rows, columns), summing to 1.
    mean_map: np.ndarray
    #: Mean over images of each map's entropy divided by log(patches): 1 uniform, 0 one patch.
    entropy: float
    num_images: int
    #: The maps of the first images (k, rows, columns) and the images themselves in [0, 1] (k, 3, H, W).
    example_maps: np.ndarray = field(repr=False)
    example_images: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: model, grid, residual, entropy, num_images, mean_map and example_maps (not the images)."""
        return to_jsonable({"model": self.model, "grid": list(self.grid), "residual": self.residual,
                            "entropy": self.entropy, "num_images": self.num_images, "mean_map": self.mean_map,
                            "example_maps": self.example_maps})

    def plot(self, ax: Any) -> None:
        """The example images with their maps overlaid, then the mean map, in one row."""
        panels = [(image.transpose(1, 2, 0), heat) for image, heat in zip(self.example_images, self.example_maps)]
        panels.append((None, self.mean_map))
        h, w = self.example_images.shape[-2:] if len(self.example_images) else self.grid
        for i, (image, heat) in enumerate(panels):
            extent = (i * (w + 2), i * (w + 2) + w, h, 0)
            if image is not None:
                ax.imshow(image.clip(0, 1), extent=extent)
            ax.imshow(heat / heat.max(), extent=extent, cmap="inferno", alpha=0.6 if image is not None else 1.0,
                      vmin=0, vmax=1, interpolation="nearest")
        ax.set_xlim(0, len(panels) * (w + 2) - 2)
        ax.set_ylim(h, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{self.model}: class-token rollout (examples, then the mean over {self.num_images} images; "
                     f"entropy {self.entropy:.2f})", fontsize="small")


@dataclass
class RolloutOptions:
    """Options of attention rollout."""

    residual: float = option(0.5, metavar="R", check=lambda v: 0 <= v <= 1, must="be in [0, 1]",
                             help="weight of the identity (the skip connection) mixed into each layer's attention")
    examples: int = option(4, metavar="K", check=lambda v: v >= 0, must="be 0 or more",
                           help="analysis images whose own rollout maps the report shows")


class RolloutStream(Stream):
    """Class-token rollout of every model with a class token and one token grid, built layer by layer."""

    def __init__(self, context: Context) -> None:
        self.options = context.options
        self.subjects = {}
        for s in context.subjects:
            keys = {(site.grid, site.prefix_tokens) for site in s.anatomy.attention}
            if len(keys) > 1 or next(iter(keys))[1] < 1:
                why = "its attention sites have several token grids" if len(keys) > 1 else "it has no class token"
                context.note(f"rollout: not applicable to {s.name} ({why})")
                continue
            self.subjects[s.name] = s
        self.product: dict[str, Tensor] = {}
        self.sums = {name: torch.zeros(s.anatomy.attention[0].grid, dtype=torch.float64)
                     for name, s in self.subjects.items()}
        self.entropy = {name: 0.0 for name in self.subjects}
        self.counts = {name: 0 for name in self.subjects}
        self.examples: dict[str, tuple[list, list]] = {name: ([], []) for name in self.subjects}

    def attention(self, subject: str) -> list[AttentionSite]:
        """Every attention site of ``subject`` if rollout applies to it, else none."""
        return list(self.subjects[subject].anatomy.attention) if subject in self.subjects else []

    def on_attention(self, subject: str, site: str, probs: Tensor) -> None:
        """Multiply the next layer's head-averaged, residual-mixed attention (B, tokens, tokens) into the product."""
        a = probs.detach().to(torch.float64).mean(dim=1)
        residual = self.options.residual
        a = (1 - residual) * a + residual * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        self.product[subject] = a if subject not in self.product else a @ self.product[subject]

    def after_forward(self, subject: str, images: Tensor) -> None:
        """Add the batch's class-token maps (from the finished product) to the mean and the entropy, and keep the
        first examples with their images (un-normalised to [0, 1])."""
        if subject not in self.product:
            return
        s = self.subjects[subject]
        site = s.anatomy.attention[0]
        maps = self.product.pop(subject)[:, 0, site.prefix_tokens:].cpu()
        maps = maps / maps.sum(dim=1, keepdim=True)
        entropy = -(maps * maps.clamp_min(1e-300).log()).sum(dim=1) / np.log(maps.shape[1])
        self.sums[subject] += maps.sum(dim=0).view(site.grid)
        self.entropy[subject] += entropy.sum().item()
        self.counts[subject] += maps.shape[0]
        shown, originals = self.examples[subject]
        for k in range(min(self.options.examples - len(shown), maps.shape[0])):
            shown.append(maps[k].view(site.grid).numpy())
            mean, std = torch.tensor(s.mean).view(3, 1, 1), torch.tensor(s.std).view(3, 1, 1)
            originals.append((images[k].float().cpu() * std + mean).numpy())

    def all_reduce(self) -> None:
        """Sum the map sums, entropies and image counts over the torchrun processes (a no-op in one process)."""
        from ..distributed import all_reduce_fields

        for name in self.subjects:
            box = _Sums(self.sums[name], self.entropy[name], self.counts[name])
            all_reduce_fields(box, ("total", "entropy", "count"))
            self.sums[name], self.entropy[name], self.counts[name] = box.total, box.entropy, box.count

    def results(self) -> dict[str, RolloutResult]:
        """A :class:`RolloutResult` per applicable model: mean map and mean entropy over the images seen."""
        out = {}
        for name, s in self.subjects.items():
            count = max(self.counts[name], 1)
            maps, images = self.examples[name]
            out[name] = RolloutResult(name, tuple(s.anatomy.attention[0].grid), self.options.residual,
                                      (self.sums[name] / count).numpy(), self.entropy[name] / count,
                                      self.counts[name], np.array(maps), np.array(images))
        return out


@dataclass
class _Sums:
    total: Tensor
    entropy: float
    count: int


ANALYSIS = Analysis(
    name="rollout",
    title="Attention rollout",
    caption="Where the class token draws its information from through every layer (Abnar & Zuidema's rollout: "
            "head-averaged attention mixed with the identity for the skip connection, multiplied through the "
            "layers): the first images with their maps overlaid, then the mean map over {n} images; a low "
            "entropy means the class token looks at a few patches.",
    paper="Abnar & Zuidema 2020",
    needs=("attention",),
    options=RolloutOptions,
    prefix="rollout_",
    stream=RolloutStream,
    default=False,  # added after the default set was fixed: name it in --analyses
    figures=(Figure(arrange="rows", width=9.0, height=2.4),),
)
