"""Shape bias: on cue-conflict images (the shape of one class, the texture of another), how often
does a model decide by shape? (Geirhos et al. 2019; used by Naseer et al. 2021 for ViTs.)

shape bias = shape decisions / (shape decisions + texture decisions); decisions matching neither
cue are left out, and so are images whose two cues agree.

Two protocols:

* **shapes** (:func:`shapes_shape_bias`): vitlab's ``shapes`` rendered with
  ``texture_mode="conflict"`` (every object filled with another class's texture). Meaningful for
  a model trained on ``texture_mode="match"`` data, where shape and texture both predict the
  class, so the model could have learned either cue; a model trained on random textures has
  no reason to use texture and scores near 1 trivially.
* **Geirhos** (:func:`geirhos_shape_bias`): an ImageNet model on a folder of cue-conflict images
  the user supplies (Geirhos et al.'s stimuli are named ``<shape><n>-<texture><m>.png``). The
  1000 ImageNet probabilities are mapped to the 16 entry-level categories by averaging the
  probabilities of each category's ImageNet classes (the indices of Geirhos et al.'s
  ``human_categories.py``), and the largest average is the decision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import VitlabError
from ..options import option
from .registry import Analysis, Context, Figure
from .results import to_jsonable

if TYPE_CHECKING:
    from .subjects import Subject

__all__ = ["GEIRHOS_CATEGORIES", "imagenet_to_16", "ConflictShapes", "shapes_shape_bias", "geirhos_shape_bias",
           "ShapeBiasResult", "plot_shape_bias", "geirhos_stimuli"]

#: ImageNet-1k class indices of the 16 entry-level categories (Geirhos et al. 2019), sorted by name.
GEIRHOS_CATEGORIES: dict[str, tuple[int, ...]] = {
    "airplane": (404,),
    "bear": (294, 295, 296, 297),
    "bicycle": (444, 671),
    "bird": (8, 10, 11, 12, 13, 14, 15, 16, 18, 19, 20, 22, 23, 24, 80, 81, 82, 83, 87, 88, 89, 90, 91, 92, 93,
             94, 95, 96, 98, 99, 100, 127, 128, 129, 130, 131, 132, 133, 135, 136, 137, 138, 139, 140, 141, 142,
             143, 144, 145),
    "boat": (472, 554, 625, 814, 914),
    "bottle": (440, 720, 737, 898, 899, 901, 907),
    "car": (436, 511, 817),
    "cat": (281, 282, 283, 284, 285, 286),
    "chair": (423, 559, 765, 857),
    "clock": (409, 530, 892),
    "dog": (*range(152, 192), *range(193, 204), *range(205, 227), *range(228, 242), *range(243, 251),
            *range(252, 258), 259, 261, 262, 263, *range(265, 269)),
    "elephant": (385, 386),
    "keyboard": (508, 878),
    "knife": (499,),
    "oven": (766,),
    "truck": (555, 569, 656, 675, 717, 734, 864, 867),
}


def imagenet_to_16(probabilities: Tensor) -> Tensor:
    """(B, 1000) ImageNet probabilities -> (B,) index into ``sorted(GEIRHOS_CATEGORIES)`` (mean aggregation)."""
    if probabilities.ndim != 2 or probabilities.shape[1] != 1000:
        raise VitlabError(f"the 16-class mapping takes ImageNet-1k probabilities (B, 1000), "
                          f"got {tuple(probabilities.shape)}")
    means = torch.stack([probabilities[:, list(idx)].mean(1) for idx in GEIRHOS_CATEGORIES.values()], dim=1)
    return means.argmax(1)


class ConflictShapes(Dataset):
    """Cue-conflict ``shapes``: (image in [0, 1], shape label, texture label), each texture another class's."""

    def __init__(self, num_images: int = 1024, image_size: int = 32, seed: int = 12345, progress: bool = False) -> None:
        from ..data.shapes import ShapesConfig, load_shapes

        arrays = load_shapes(ShapesConfig(num_images=num_images, image_size=image_size, seed=seed,
                                          texture_mode="conflict"), progress=progress)
        self.images = arrays.images.float() / 255
        self.labels, self.textures = arrays.labels.long(), arrays.textures.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index], self.textures[index]


def conflict_batches(num_images: int, image_size: int = 32, batch_size: int = 256, seed: int = 12345):
    """Cue-conflict ``shapes`` batches ``(images, shapes, textures)``, rendered one batch at a time.

    Memory stays that of one batch however many images are scored (batch ``k`` is rendered
    from seed ``seed + k``, so the stream is the same every time).
    """
    from ..data.shapes import ShapesConfig, render_shapes

    for k, start in enumerate(range(0, num_images, batch_size)):
        n = min(batch_size, num_images - start)
        arrays = render_shapes(ShapesConfig(num_images=n, image_size=image_size, seed=seed + k,
                                            texture_mode="conflict"))
        yield arrays.images.float() / 255, arrays.labels.long(), arrays.textures.long()


def _score(decisions: Tensor, shapes: Tensor, textures: Tensor) -> tuple[int, int, int, int]:
    conflict = shapes != textures
    d, s, t = decisions[conflict], shapes[conflict], textures[conflict]
    return int((d == s).sum()), int((d == t).sum()), int(((d != s) & (d != t)).sum()), int(conflict.sum())


@torch.no_grad()
def shapes_shape_bias(subject: Subject, loader: Iterable | None = None, num_images: int = 1024, batch_size: int = 256,
                      trained_on: str | None = None, progress: bool = False) -> ShapeBiasResult:
    """Shape bias of ``subject`` (a 10-class ``shapes`` model) on cue-conflict ``shapes`` images."""
    if getattr(subject.model, "num_classes", 10) != 10:
        raise VitlabError(f"{subject.name} has {subject.model.num_classes} classes; the shapes protocol needs a "
                          "model trained on shapes (10 classes); for ImageNet models use the Geirhos protocol")
    size = (subject.anatomy.image_size or (32, 32))[0]
    loader = loader or conflict_batches(num_images, image_size=size, batch_size=batch_size)
    counts = np.zeros(4, dtype=np.int64)
    for images, shapes, textures in tqdm(loader, desc=f"shape bias of {subject.name}", disable=not progress,
                                         leave=False):
        decisions = subject.model(subject.prepare(images)).argmax(1)
        counts += _score(decisions, shapes, textures)
    return ShapeBiasResult(subject.name, "shapes", *counts.tolist(), trained_on=trained_on)


_STIMULUS = re.compile(r"^([a-z]+)\d*[-_]([a-z]+)\d*")


def geirhos_stimuli(folder: str | Path) -> list[tuple[Path, int, int]]:
    """(path, shape, texture) of every cue-conflict image under ``folder`` (``<shape><n>-<texture><m>.png``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VitlabError(f"cue-conflict folder '{folder}' does not exist")
    names = sorted(GEIRHOS_CATEGORIES)
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")):
        match = _STIMULUS.match(path.stem.lower())
        if match and match.group(1) in GEIRHOS_CATEGORIES and match.group(2) in GEIRHOS_CATEGORIES:
            out.append((path, names.index(match.group(1)), names.index(match.group(2))))
    if not out:
        raise VitlabError(f"no cue-conflict images named like 'cat1-elephant2.png' (16 Geirhos categories) "
                          f"in '{folder}'")
    return out


@torch.no_grad()
def geirhos_shape_bias(subject: Subject, folder: str | Path, batch_size: int = 32,
                       progress: bool = False) -> ShapeBiasResult:
    """Shape bias of an ImageNet-1k ``subject`` on the Geirhos cue-conflict images in ``folder``."""
    if getattr(subject.model, "num_classes", 1000) != 1000:
        raise VitlabError(f"the Geirhos protocol needs an ImageNet-1k model; {subject.name} has "
                          f"{subject.model.num_classes} classes")
    stimuli = geirhos_stimuli(folder)
    size = subject.anatomy.image_size or (224, 224)
    counts = np.zeros(4, dtype=np.int64)
    for start in tqdm(range(0, len(stimuli), batch_size), desc=f"shape bias of {subject.name}", disable=not progress,
                      leave=False):
        chunk = stimuli[start:start + batch_size]
        images = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize(size[::-1]),
                                                          dtype=np.float32) / 255).permute(2, 0, 1)
                              for p, _, _ in chunk])
        probs = subject.model(subject.prepare(images)).softmax(1)
        counts += _score(imagenet_to_16(probs), torch.tensor([s for _, s, _ in chunk]),
                         torch.tensor([t for _, _, t in chunk]))
    return ShapeBiasResult(subject.name, "geirhos", *counts.tolist(), trained_on="ImageNet-1k")


@dataclass
class ShapeBiasResult:
    """Decisions of one model on cue-conflict images."""

    kind: ClassVar[str] = "shape_bias"

    model: str
    protocol: str
    shape_decisions: int
    texture_decisions: int
    other_decisions: int
    num_images: int
    #: What the model was trained on (for shapes: the training texture mode), shown with the score.
    trained_on: str | None = None

    @property
    def shape_bias(self) -> float:
        """The share of shape decisions among the shape and texture decisions; NaN when there are none."""
        cue = self.shape_decisions + self.texture_decisions
        return self.shape_decisions / cue if cue else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: model, protocol, shape_bias, the shape/texture/other decision counts, num_images and
        trained_on."""
        return to_jsonable({"model": self.model, "protocol": self.protocol, "shape_bias": self.shape_bias,
                            "shape_decisions": self.shape_decisions, "texture_decisions": self.texture_decisions,
                            "other_decisions": self.other_decisions, "num_images": self.num_images,
                            "trained_on": self.trained_on})

    def plot(self, ax: Any) -> None:
        """This model's bar (see :func:`plot_shape_bias` for several models on one axis)."""
        plot_shape_bias(ax, [self])


def plot_shape_bias(ax: Any, results: list[ShapeBiasResult]) -> None:
    """One horizontal bar per model, split into shape (left) and texture (right) decisions."""
    for row, r in enumerate(results):
        shape = r.shape_bias if np.isfinite(r.shape_bias) else 0.0
        ax.barh(row, shape, color="tab:blue", label="shape" if row == 0 else None)
        ax.barh(row, 1 - shape, left=shape, color="tab:orange", label="texture" if row == 0 else None)
        ax.text(0.01, row, f"{r.shape_bias:.2f}", va="center", ha="left", color="white", fontsize="small")
    ax.set_yticks(range(len(results)))
    ax.set_yticklabels([r.model + (f"\n(trained on {r.trained_on})" if r.trained_on else "") for r in results],
                       fontsize="small")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of cue decisions: shape | texture")
    ax.set_title(f"shape bias on {results[0].protocol} cue-conflict images" if results else "shape bias")
    ax.legend(fontsize="small", loc="lower right")


# --- in the suite -------------------------------------------------------------------------------


@dataclass
class ShapeBiasOptions:
    """Options of the shape-bias analysis."""

    images: int = option(512, metavar="N", check=lambda v: v >= 1, must="be at least 1",
                         help="rendered cue-conflict images for models trained on shapes")
    cue_conflict_dir: str | None = option(None, key="cue_conflict_dir", metavar="DIR",
                                          help="Geirhos cue-conflict images (cat1-elephant2.png ...) for the shape "
                                               "bias of ImageNet models")


def run(context: Context) -> dict[str, ShapeBiasResult]:
    """Shape bias of the models it can be measured for: runs trained on shapes, ImageNet models."""
    options, out = context.options, {}
    for s in context.subjects:
        classes = getattr(s.model, "num_classes", None)
        trained_on = context.trained_on.get(s.name, "")
        if classes == 1000 and options.cue_conflict_dir:
            out[s.name] = geirhos_shape_bias(s, options.cue_conflict_dir, progress=context.progress)
        elif classes == 10 and s.source == "run" and trained_on.startswith("shapes"):
            out[s.name] = shapes_shape_bias(s, num_images=options.images, trained_on=trained_on,
                                            progress=context.progress)
        elif classes == 1000:
            context.note(f"shape bias: {s.name} is an ImageNet model; pass --cue-conflict-dir DIR (Geirhos et al.'s "
                         "cue-conflict images) to measure it")
        else:
            context.note(f"shape bias: not applicable to {s.name} (needs a run trained on shapes, or an ImageNet "
                         "model with --cue-conflict-dir DIR)")
    return out


ANALYSIS = Analysis(
    name="shape_bias",
    title="Shape bias",
    caption="The share of shape decisions among cue decisions on cue-conflict images (one class's shape filled "
            "with another's texture), 1 meaning shape only and 0 texture only; it is informative for models trained "
            "where both cues predict the class (shapes with match textures, or ImageNet).",
    paper="Geirhos et al. 2019; Naseer et al. 2021 (section 3.4)",
    options=ShapeBiasOptions,
    prefix="shape_bias_",
    run=run,
    reads_classifier=True,
    figures=(Figure(arrange="shared", draw=lambda ax, results: plot_shape_bias(ax, results), width=7.0,
                    height=lambda results: 1.0 + 0.7 * len(results)),),
)
