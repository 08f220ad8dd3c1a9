"""Feature visualisation of MLP hidden units (Ghiasi et al. 2022, "What do Vision Transformers Learn?").

An image is optimised, from noise, to excite one hidden unit of a transformer MLP (the GELU
output of ``fc1``): the objective is the unit's mean activation over the patch tokens. The
paper's recipe, which keeps the images natural-looking rather than adversarial noise:

* Adam, learning rate 0.1, betas (0.5, 0.99), ``steps = 400`` with a cosine decay;
* every step optimises a batch of 8 augmented copies of the one image: a random per-channel
  colour shift and scale, Gaussian noise whose strength decays to 0 over the steps, and a random
  roll ("jitter") of up to 1/7 of the image size in each direction;
* the image is clamped to [0, 1] after every step, and a total-variation penalty
  (weight ``5e-5``, per pixel) smooths it.

The model sees each copy through its own normalisation (``prepare``), so the same code serves
vitlab models trained on ``shapes`` and ImageNet models from timm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import VitlabError
from ..options import option
from .registry import Analysis, Context, Figure
from .results import to_jsonable

if TYPE_CHECKING:
    from .subjects import Subject

__all__ = ["augment_copies", "total_variation", "visualise_unit", "feature_visualisation", "FeatureVisResult"]


def total_variation(image: Tensor) -> Tensor:
    """Mean absolute difference between neighbouring pixels of (B, C, H, W) images."""
    return (image[..., 1:, :] - image[..., :-1, :]).abs().mean() + (image[..., :, 1:] - image[..., :, :-1]).abs().mean()


def augment_copies(image: Tensor, copies: int, noise: float, generator: torch.Generator) -> Tensor:
    """``copies`` augmented versions of one (1, C, H, W) image: colour shift/scale, noise, roll."""
    c, h, w = image.shape[1:]
    x = image.expand(copies, -1, -1, -1)
    scale = 1 + 0.1 * torch.randn(copies, c, 1, 1, generator=generator)
    shift = 0.1 * torch.randn(copies, c, 1, 1, generator=generator)
    x = x * scale.to(image) + shift.to(image)
    x = x + noise * torch.randn(x.shape, generator=generator).to(image)
    max_roll = max(1, round(min(h, w) / 7))
    rolled = []
    for i in range(copies):
        dy, dx = torch.randint(-max_roll, max_roll + 1, (2,), generator=generator).tolist()
        rolled.append(torch.roll(x[i], shifts=(dy, dx), dims=(1, 2)))
    return torch.stack(rolled)


def visualise_unit(
    model: nn.Module,
    activation: str,
    unit: int,
    image_size: tuple[int, int],
    prepare: Callable[[Tensor], Tensor] = lambda x: x,
    prefix_tokens: int = 0,
    steps: int = 400,
    copies: int = 8,
    lr: float = 0.1,
    tv_weight: float = 5e-5,
    seed: int = 0,
) -> tuple[Tensor, float]:
    """Optimise one image (1, 3, H, W) in [0, 1] to excite ``unit`` of the module ``activation``.

    Returns the image and the unit's mean activation on it (unaugmented) at the end.
    """
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, *image_size, generator=gen).requires_grad_(True)
    captured: dict[str, Tensor] = {}
    module = model.get_submodule(activation)
    handle = module.register_forward_hook(lambda m, i, o: captured.__setitem__("act", o))
    optimizer = torch.optim.Adam([image], lr=lr, betas=(0.5, 0.99))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)  # only the image learns; no parameter gradients are built
    try:
        for step in range(steps):
            noise = 0.05 * (1 - step / steps)
            model(prepare(augment_copies(image, copies, noise, gen)))
            act = captured["act"]
            if act.ndim != 3 or unit >= act.shape[-1]:
                raise VitlabError(f"'{activation}' gives {tuple(act.shape)}; unit {unit} must index the hidden "
                                  "width of a (batch, tokens, hidden) MLP activation")
            loss = -act[:, prefix_tokens:, unit].mean() + tv_weight * total_variation(image) * image[0].numel()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                image.clamp_(0, 1)
        with torch.no_grad():
            model(prepare(image))
            final = float(captured["act"][:, prefix_tokens:, unit].mean())
    finally:
        handle.remove()
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    return image.detach(), final


def feature_visualisation(subject: Subject, units: Sequence[tuple[str, int]] | None = None, per_layer: int = 4,
                          layers: int = 3, steps: int = 400, seed: int = 0, progress: bool = False) -> FeatureVisResult:
    """Visualise MLP hidden units of ``subject``: ``units`` as ``(layer label, unit)`` pairs, or by
    default the first ``per_layer`` units of ``layers`` blocks spread over depth."""
    sites = dict(subject.anatomy.mlp_activations)
    if not sites:
        raise VitlabError(f"{subject.name} has no transformer MLP hidden units to visualise "
                          f"({subject.anatomy.family} models are not described for it)")
    labels = list(sites)
    if units is None:
        picks = sorted(set(np.linspace(0, len(labels) - 1, min(layers, len(labels))).round().astype(int)))
        units = [(labels[i], u) for i in picks for u in range(per_layer)]
    for label, _ in units:
        if label not in sites:
            raise VitlabError(f"{subject.name} has no MLP in layer '{label}'; choose from {', '.join(labels)}")
    size = subject.anatomy.image_size or (32, 32)
    images, values = [], []
    for k, (label, unit) in enumerate(tqdm(units, desc=f"feature visualisation of {subject.name}",
                                           disable=not progress, leave=False)):
        image, value = visualise_unit(subject.model, sites[label], unit, tuple(size), subject.prepare,
                                      subject.anatomy.prefix_tokens, steps=steps, seed=seed + k)
        images.append(image[0].numpy())
        values.append(value)
    return FeatureVisResult(subject.name, [label for label, _ in units], [u for _, u in units],
                            np.stack(images), np.array(values), steps)


@dataclass
class FeatureVisResult:
    """Images (N, 3, H, W) in [0, 1] that excite MLP units, with the activation each reached."""

    kind: ClassVar[str] = "feature_visualisation"

    model: str
    layers: list[str]
    units: list[int]
    images: np.ndarray
    activations: np.ndarray
    steps: int = 400

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: model, steps, and units (layer, unit and the activation reached; not the images)."""
        # The images themselves are in the report's figure; results.json keeps the numbers.
        return to_jsonable({"model": self.model, "steps": self.steps,
                            "units": [{"layer": la, "unit": u, "activation": a}
                                      for la, u, a in zip(self.layers, self.units, self.activations)]})

    def plot(self, ax: Any) -> None:
        """The images as a grid, one row per layer, labelled with layer and unit."""
        rows = list(dict.fromkeys(self.layers))
        cols = max(self.layers.count(r) for r in rows)
        _, _, h, w = self.images.shape
        canvas = np.ones((len(rows) * (h + 2) - 2, cols * (w + 2) - 2, 3))
        seen = {r: 0 for r in rows}
        for image, layer in zip(self.images, self.layers):
            r, c = rows.index(layer), seen[layer]
            seen[layer] += 1
            canvas[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = image.transpose(1, 2, 0)
        ax.imshow(canvas, interpolation="nearest")
        ax.set_yticks([r * (h + 2) + h / 2 for r in range(len(rows))])
        ax.set_yticklabels(rows, fontsize="small")
        ax.set_xticks([c * (w + 2) + w / 2 for c in range(cols)])
        ax.set_xticklabels([f"unit {u}" for u in self.units[:cols]], fontsize="small")
        # Two lines: a model name and the recipe side by side would overrun the panel at the report's width.
        ax.set_title(f"{self.model}\nimages that excite MLP units ({self.steps} Adam steps)", fontsize="small")


# --- in the suite -------------------------------------------------------------------------------


@dataclass
class FeatureVisOptions:
    """Options of feature visualisation."""

    layers: int = option(2, metavar="N", check=lambda v: v >= 1, must="be at least 1",
                         help="blocks visualised, spread over depth")
    units: int = option(2, metavar="N", check=lambda v: v >= 1, must="be at least 1", help="MLP units per block")
    steps: int = option(400, metavar="N", check=lambda v: v >= 1, must="be at least 1",
                        help="Adam steps per feature visualisation (the paper's 400)")


def run(context: Context) -> dict[str, FeatureVisResult]:
    """Images optimised to excite MLP units of every subject that has them."""
    options = context.options
    return {s.name: feature_visualisation(s, per_layer=options.units, layers=options.layers, steps=options.steps,
                                          progress=context.progress) for s in context.subjects}


ANALYSIS = Analysis(
    name="feature_visualisation",
    title="Feature visualisation",
    caption="Images optimised from noise to excite single MLP hidden units with Ghiasi et al.'s recipe (Adam, "
            "augmented copies, total-variation penalty), one row per block, early blocks first.",
    paper="Ghiasi et al. 2022",
    needs=("mlp_activations",),
    options=FeatureVisOptions,
    prefix="featvis_",
    run=run,
    figures=(Figure(width=3.5, height=lambda results: 1.0 + 0.8 * max(len(dict.fromkeys(r.layers)) for r in results)),),
)
