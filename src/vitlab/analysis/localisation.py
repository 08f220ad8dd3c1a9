"""Spatial localisation (Raghu et al. 2021, section 5): does the token at a grid position still
describe the image patch at that position?

For a layer with a token grid, the similarity between the token at position ``p`` and the input
patch at position ``q`` is the linear CKA, across images, between the token's features and the
patch's pixels. A model whose tokens stay localised gives a bright diagonal (each token most like
its own patch); Raghu et al. found this for class-token ViTs and less so for ViTs trained with
global average pooling, whose tokens all feed the classifier.

Each position's Gram is built per batch by :class:`~vitlab.analysis.cka.MinibatchCKA` (unbiased
HSIC, float64 sums), so memory is bounded by ``2 * positions`` Grams of one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..capture import Capture
from ..errors import VitlabError
from ..options import option
from .cka import MinibatchCKA
from .registry import Analysis, Context, Stream
from .results import to_jsonable

if TYPE_CHECKING:
    from .subjects import Subject

__all__ = ["image_patches", "token_grid", "Localisation", "LocalisationResult"]


def image_patches(images: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) images cut into non-overlapping patches: (B, patches, C * ph * pw), row-major."""
    ph, pw = patch_size
    if images.shape[-2] % ph or images.shape[-1] % pw:
        raise VitlabError(f"images of {images.shape[-2]}x{images.shape[-1]} px do not split into {ph}x{pw} patches")
    return F.unfold(images, (ph, pw), stride=(ph, pw)).transpose(1, 2)


def token_grid(tokens: Tensor, grid: tuple[int, int], prefix_tokens: int, layout: str | None = None) -> Tensor:
    """A layer's output as (B, grid tokens, C): prefix tokens dropped, NHWC/NCHW maps flattened."""
    if layout == "nhwc":
        tokens = tokens.flatten(1, 2)
    elif tokens.ndim == 4:  # NCHW
        tokens = tokens.flatten(2).transpose(1, 2)
    expected = prefix_tokens + grid[0] * grid[1]
    if tokens.ndim != 3 or tokens.shape[1] != expected:
        raise VitlabError(f"layer output {tuple(tokens.shape)} is not {prefix_tokens} prefix + {grid[0]}x{grid[1]} "
                          "grid tokens; pick a layer on the input's token grid")
    return tokens[:, prefix_tokens:]


class Localisation:
    """Streaming CKA between every token position of one layer and every input patch position."""

    def __init__(self, grid: tuple[int, int], patch_size: tuple[int, int], prefix_tokens: int,
                 layout: str | None = None) -> None:
        self.grid, self.patch_size, self.prefix_tokens, self.layout = (tuple(grid), tuple(patch_size), prefix_tokens,
                                                                       layout)
        positions = [f"{r},{c}" for r in range(grid[0]) for c in range(grid[1])]
        self.cka = MinibatchCKA(positions, positions)

    def add(self, images: Tensor, tokens: Tensor) -> None:
        """One batch: the model's (prepared) input images and the layer's output for them."""
        patches = image_patches(images, self.patch_size)
        grid_tokens = token_grid(tokens, self.grid, self.prefix_tokens, self.layout)
        if patches.shape[1] != grid_tokens.shape[1]:
            raise VitlabError(f"the input splits into {patches.shape[1]} patches but the layer has "
                              f"{grid_tokens.shape[1]} grid tokens")
        for i, name in enumerate(self.cka.layers_a):
            self.cka.add(0, name, grid_tokens[:, i])
            self.cka.add(1, name, patches[:, i])
        self.cka.end_batch()

    def all_reduce(self) -> None:
        """Add up the running sums of every process (under torchrun; a no-op otherwise)."""
        self.cka.all_reduce()

    def result(self, model: str, layer: str) -> LocalisationResult:
        """The token-by-patch CKA matrix so far as a :class:`LocalisationResult` for ``model``'s ``layer``."""
        return LocalisationResult(model, layer, self.grid, self.cka.compute().numpy())


@dataclass
class LocalisationResult:
    """CKA of token position p (rows) against input patch position q (columns), positions row-major."""

    kind: ClassVar[str] = "localisation"

    model: str
    layer: str
    grid: tuple[int, int]
    matrix: np.ndarray

    def own_patch_rate(self) -> float:
        """Fraction of token positions most similar to their own input patch."""
        return float((self.matrix.argmax(axis=1) == np.arange(len(self.matrix))).mean())

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: model, layer, grid, own_patch_rate and matrix (token positions x patch positions)."""
        return to_jsonable({"model": self.model, "layer": self.layer, "grid": list(self.grid),
                            "own_patch_rate": self.own_patch_rate(), "matrix": self.matrix})

    def plot(self, ax: Any) -> None:
        """Heatmaps over input patches for a 3x3 selection of token positions, each marked by a dot."""
        gh, gw = self.grid
        rows = sorted(set(np.linspace(0, gh - 1, min(gh, 3)).round().astype(int)))
        cols = sorted(set(np.linspace(0, gw - 1, min(gw, 3)).round().astype(int)))
        canvas = np.full((len(rows) * (gh + 1) - 1, len(cols) * (gw + 1) - 1), np.nan)
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                heat = self.matrix[r * gw + c].reshape(gh, gw)
                canvas[i * (gh + 1):i * (gh + 1) + gh, j * (gw + 1):j * (gw + 1) + gw] = heat
                ax.plot(j * (gw + 1) + c, i * (gh + 1) + r, "o", ms=3, mfc="none", mec="cyan")
        image = ax.imshow(canvas, cmap="viridis", vmin=0, vmax=np.nanmax(canvas), interpolation="nearest")
        ax.figure.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="CKA with input patch")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{self.model}, {self.layer}\n{100 * self.own_patch_rate():.0f}% of tokens most like their own "
                     "patch", fontsize="small")


# --- in the suite -------------------------------------------------------------------------------


@dataclass
class LocalisationOptions:
    """Options of the spatial-localisation analysis."""

    layer: str | None = option(None, metavar="LABEL",
                               help="layer label for spatial localisation (none: the deepest layer still on the "
                                    "input's token grid)")


def localisation_layer(subject: Subject, label: str | None) -> tuple[str, str] | None:
    """(module path, label) of the layer whose tokens are compared with the input patches."""
    a = subject.anatomy
    if a.grid is None or a.patch_size is None:
        return None
    layers = [layer for layer in a.layers if label is None or layer.label == label]
    if label is not None and not layers:
        raise VitlabError(f"{subject.name} has no layer '{label}' for localisation; choose from "
                          f"{', '.join(a.layer_labels)}")
    probe = torch.zeros(1, 3, *(a.image_size or (a.grid[0] * a.patch_size[0], a.grid[1] * a.patch_size[1])))
    outputs: dict[str, Tensor] = {}
    with Capture(subject.model, [layer.name for layer in layers], outputs.__setitem__), torch.no_grad():
        subject.model(probe)
    for layer in reversed(layers):  # the deepest layer still on the input's token grid
        try:
            token_grid(outputs[layer.name], a.grid, a.prefix_tokens, layer.layout)
            return layer.name, layer.label
        except VitlabError:
            continue
    return None


class LocalisationStream(Stream):
    """Token-to-patch CKA of one layer of every model that has a layer on its input's token grid."""

    def __init__(self, context: Context) -> None:
        self.localisers: dict[str, tuple[Localisation, str, str]] = {}
        self.pending: dict[str, Tensor] = {}
        for s in context.subjects:
            found = localisation_layer(s, context.options.layer)
            if found is None:
                context.note(f"localisation: not applicable to {s.name} (no layer on the input's token grid)")
                continue
            a = s.anatomy
            layout = next(layer.layout for layer in a.layers if layer.name == found[0])
            self.localisers[s.name] = (Localisation(a.grid, a.patch_size, a.prefix_tokens, layout), *found)

    def layers(self, subject: str) -> list[str]:
        return [self.localisers[subject][1]] if subject in self.localisers else []

    def on_layer(self, subject: str, layer: str, output: Tensor) -> None:
        self.pending[subject] = output

    def after_forward(self, subject: str, images: Tensor) -> None:
        if subject in self.pending:
            self.localisers[subject][0].add(images, self.pending.pop(subject))

    def all_reduce(self) -> None:
        for localiser, _, _ in self.localisers.values():
            localiser.all_reduce()

    def results(self) -> dict[str, LocalisationResult]:
        return {name: localiser.result(name, label) for name, (localiser, _, label) in self.localisers.items()}


ANALYSIS = Analysis(
    name="localisation",
    title="Spatial localisation",
    caption="For a 3x3 selection of token positions (circled), the CKA over {n} images between the token at that "
            "position of the named layer and every input patch: a bright spot on the circle means the token still "
            "describes its own patch (Raghu et al. found this for class-token ViTs, less for pooled ones).",
    paper="Raghu et al. 2021 (section 5, figure 9)",
    needs=("layers",),
    options=LocalisationOptions,
    prefix="localisation_",
    stream=LocalisationStream,
)
