"""Robustness to occlusion and to shuffled patches (Naseer et al. 2021, "Intriguing Properties of
Vision Transformers").

All occlusion happens in [0, 1] pixel space, before a model's normalisation: a dropped patch is
black. The image is cut into a ``grid x grid`` lattice of patches (14 x 14 at 224 px in the paper;
8 x 8 by default here, 4-pixel patches of a 32 x 32 image), independently of the model's own
tokens, so every model is occluded the same way.

* **Random PatchDrop**: drop ``k * grid^2 // 10`` random patches, ``k = 0 .. 9`` (one random set
  per batch, seeded).
* **Salient / non-salient PatchDrop**: rank the patches by a saliency map, the last layer's
  class-token attention (averaged over heads, pooled to the lattice) of the model itself or of
  a saliency model the user names, and take the most salient patches holding a fraction
  ``lambda`` of the attention mass, ``lambda = 0.1 .. 1.0``. Salient PatchDrop drops them (the
  object goes first); non-salient PatchDrop drops the rest (only the object is left).
* **Patch shuffle**: cut the image into ``g x g`` patches and permute them at random (per image),
  for ``g`` in ``shuffle_grids``; ``g = 1`` is the intact image.

Each test gives accuracy against its level; :class:`RobustnessResult` draws one panel per test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..capture import Capture
from ..errors import VitlabError
from ..options import option
from .batches import Limited, images_of, require_labels
from .registry import Analysis, Context, Figure
from .results import to_jsonable

if TYPE_CHECKING:
    from .subjects import Subject

__all__ = ["TESTS", "patch_mask", "drop_patches", "shuffle_patches", "cls_saliency", "salient_drop_masks",
           "robustness", "RobustnessResult"]

TESTS = ("random", "salient", "non_salient", "shuffle")
DROP_FRACTIONS = tuple(k / 10 for k in range(10))
SALIENT_FRACTIONS = tuple(k / 10 for k in range(1, 11))


def patch_mask(drop: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, grid, grid) booleans (True = drop) as a (B, 1, H, W) keep mask of 0s and 1s."""
    keep = (~drop).to(torch.float32)[:, None]
    return F.interpolate(keep, size=size, mode="nearest")


def drop_patches(images: Tensor, drop: Tensor) -> Tensor:
    """Black out (set to 0) the lattice patches where ``drop`` (B, grid, grid) is True."""
    h, w = images.shape[-2:]
    g = drop.shape[-1]
    if h % g or w % g:
        raise VitlabError(f"a {g}x{g} occlusion grid does not divide {h}x{w} images; choose a grid that divides "
                          f"the image size (e.g. {', '.join(str(d) for d in (2, 4, 8, 16) if h % d == 0)})")
    return images * patch_mask(drop, (h, w)).to(images.dtype)


def shuffle_patches(images: Tensor, grid: int, generator: torch.Generator) -> Tensor:
    """Cut images into ``grid x grid`` patches and permute them, a fresh permutation per image."""
    b, c, h, w = images.shape
    if h % grid or w % grid:
        raise VitlabError(f"a {grid}x{grid} shuffle grid does not divide {h}x{w} images")
    if grid == 1:
        return images
    ph, pw = h // grid, w // grid
    patches = F.unfold(images, (ph, pw), stride=(ph, pw))  # B, C*ph*pw, grid^2
    order = torch.argsort(torch.rand(b, grid * grid, generator=generator), dim=1)
    patches = torch.gather(patches, 2, order[:, None, :].expand_as(patches))
    return F.fold(patches, (h, w), (ph, pw), stride=(ph, pw))


def cls_saliency(subject: Subject, images: Tensor) -> Tensor:
    """The last attention site's class-token attention over its patch grid, head-averaged: (B, gh, gw)."""
    sites = [s for s in subject.anatomy.attention if s.prefix_tokens > 0]
    if not sites:
        raise VitlabError(f"{subject.name} has no class-token attention to rank patches by; "
                          "name a saliency model with a class token (e.g. a ViT)")
    site = sites[-1]
    store: dict[str, Tensor] = {}
    with Capture(subject.model, attention=[site], on_attention=lambda n, a: store.__setitem__(n, a)), torch.no_grad():
        subject.model(subject.prepare(images))
    attn = store[site.name][:, :, 0, site.prefix_tokens:].mean(1)  # B, patches
    return attn.reshape(-1, *site.grid).to(torch.float64)


def salient_drop_masks(saliency: Tensor, grid: int, fraction: float, salient: bool) -> Tensor:
    """(B, grid, grid) drop masks: the most salient patches holding ``fraction`` of the mass
    (``salient``), or every other patch (not ``salient``)."""
    sal = F.adaptive_avg_pool2d(saliency[:, None], grid)[:, 0] if saliency.shape[-1] != grid else saliency
    flat = sal.flatten(1)
    flat = flat / flat.sum(1, keepdim=True).clamp_min(1e-300)
    order = flat.argsort(dim=1, descending=True, stable=True)
    cumulative = flat.gather(1, order).cumsum(1)
    # The top set grows until its mass reaches the fraction (the patch that crosses it included).
    count = ((cumulative < fraction - 1e-12).sum(1) + 1).clamp_max(flat.shape[1])
    ranks = torch.arange(flat.shape[1]).expand_as(flat)
    top = torch.zeros_like(flat, dtype=torch.bool).scatter(1, order, ranks < count[:, None])
    return (top if salient else ~top).view(-1, grid, grid)


@torch.no_grad()
def robustness(
    subject: Subject,
    loader: Iterable,
    tests: Sequence[str] = TESTS,
    grid: int = 8,
    shuffle_grids: Sequence[int] = (1, 2, 4, 8),
    saliency_subject: Subject | None = None,
    seed: int = 0,
    progress: bool = False,
) -> RobustnessResult:
    """Accuracy of ``subject`` under every level of every test, over ``loader`` ((images in [0, 1], labels))."""
    for test in tests:
        if test not in TESTS:
            raise VitlabError(f"unknown robustness test '{test}'; choose from {', '.join(TESTS)}")
    saliency_from = saliency_subject or subject
    if any(t in tests for t in ("salient", "non_salient")):
        if not any(s.prefix_tokens > 0 for s in saliency_from.anatomy.attention):
            raise VitlabError(f"salient PatchDrop needs class-token attention, which {saliency_from.name} lacks; "
                              "pass a saliency model (--saliency-model NAME, e.g. a ViT) or drop those tests")
    levels: dict[str, Sequence[float]] = {"random": DROP_FRACTIONS, "salient": SALIENT_FRACTIONS,
                                          "non_salient": SALIENT_FRACTIONS, "shuffle": tuple(shuffle_grids)}
    correct = {t: np.zeros(len(levels[t])) for t in tests}
    seen = 0
    gen = torch.Generator().manual_seed(seed)
    model = subject.model
    for images, labels in tqdm(loader, desc=f"robustness of {subject.name}", disable=not progress, leave=False,
                               unit="batch"):
        labels = labels.long()

        def predict(x: Tensor) -> Tensor:
            return model(subject.prepare(x)).argmax(1)

        if "random" in tests:
            for i, frac in enumerate(levels["random"]):
                n = int(round(frac * 10)) * grid * grid // 10
                scores = torch.rand(images.shape[0], grid * grid, generator=gen)
                drop = torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.argsort(1)[:, :n], True)
                dropped = drop_patches(images, drop.view(-1, grid, grid))
                correct["random"][i] += (predict(dropped) == labels).sum().item()
        if "salient" in tests or "non_salient" in tests:
            saliency = cls_saliency(saliency_from, images)
            for test in ("salient", "non_salient"):
                if test not in tests:
                    continue
                for i, frac in enumerate(levels[test]):
                    drop = salient_drop_masks(saliency, grid, frac, salient=test == "salient")
                    correct[test][i] += (predict(drop_patches(images, drop)) == labels).sum().item()
        if "shuffle" in tests:
            for i, g in enumerate(levels["shuffle"]):
                correct["shuffle"][i] += (predict(shuffle_patches(images, g, gen)) == labels).sum().item()
        seen += images.shape[0]
    if not seen:
        raise VitlabError("no images to test robustness on")
    curves = {t: (list(levels[t]), (correct[t] / seen).tolist()) for t in tests}
    return RobustnessResult(subject.name, grid, curves, seen,
                            saliency_model=saliency_from.name if saliency_subject is not None else None)


@dataclass
class RobustnessResult:
    """Accuracy against occlusion / shuffle level, per test, for one model."""

    kind: ClassVar[str] = "robustness"

    model: str
    grid: int
    #: test -> (levels, accuracies)
    curves: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    num_images: int = 0
    saliency_model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: model, grid, num_images, saliency_model and curves (test -> levels and accuracy)."""
        return to_jsonable({"model": self.model, "grid": self.grid, "num_images": self.num_images,
                            "saliency_model": self.saliency_model,
                            "curves": {t: {"levels": x, "accuracy": y} for t, (x, y) in self.curves.items()}})

    def plot(self, ax: Any, test: str = "random") -> None:
        """This model's curve of one test (call once per model on a shared axis to compare models)."""
        if test not in self.curves:
            return
        levels, acc = self.curves[test]
        ax.plot(levels, acc, "-o", ms=3, label=self.model)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_xlabel({"random": "fraction of patches dropped", "salient": "attention mass dropped (salient first)",
                       "non_salient": "attention mass kept (the rest dropped)",
                       "shuffle": "shuffle grid (g x g patches)"}[test])
        if test == "shuffle":
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels)
            ax.set_xticklabels([str(g) for g in levels])
        ax.set_title({"random": "random PatchDrop", "salient": "salient PatchDrop",
                      "non_salient": "non-salient PatchDrop", "shuffle": "patch shuffle"}[test]
                     + f" ({self.grid}x{self.grid} grid)" * (test != "shuffle"))
        ax.legend(fontsize="small")


# --- in the suite -------------------------------------------------------------------------------


@dataclass
class RobustnessOptions:
    """Options of the occlusion and shuffling tests."""

    images: int = option(256, metavar="N", check=lambda v: v >= 1, must="be at least 1",
                         help="analysis images the robustness tests use")
    occlusion_grid: int = option(8, key="occlusion_grid", metavar="G", check=lambda v: v >= 1,
                                 must="be a positive number of patches per side",
                                 help="PatchDrop lattice of G x G patches (it must divide the image size)")
    shuffle_grids: tuple[int, ...] = option((1, 2, 4, 8), key="shuffle_grids", metavar="G,G,...",
                                            help="grids of the patch-shuffling test")
    saliency_model: str | None = option(None, key="saliency_model", metavar="NAME_OR_RUN",
                                        help="a model with a class token that ranks patches for salient PatchDrop of "
                                             "models without one (a ResNet, a Mixer)")


def check(context: Context) -> None:
    """Refuse occlusion and shuffle grids that do not divide the images, before any work is done."""
    for batch in context.loader:
        h, w = images_of(batch).shape[-2:]
        options = context.options
        for name, grids in (("--occlusion-grid", (options.occlusion_grid,)), ("shuffle grid", options.shuffle_grids)):
            for g in grids:
                if g < 1 or h % g or w % g:
                    fits = ", ".join(str(d) for d in range(2, min(h, w) + 1) if h % d == 0 and w % d == 0)
                    raise VitlabError(f"{name} {g} does not divide the {h}x{w} analysis images; use one of {fits}")
        return


def run(context: Context) -> dict[str, RobustnessResult]:
    """Every subject under random and salient PatchDrop and patch shuffling."""
    from .subjects import load_subject

    require_labels(context.loader, "robustness")
    options = context.options
    batches = Limited(context.loader, options.images)
    saliency = load_subject(options.saliency_model) if options.saliency_model else None
    out = {}
    for s in context.subjects:
        own = any(site.prefix_tokens > 0 for site in s.anatomy.attention)
        tests = [t for t in TESTS if own or saliency is not None or t not in ("salient", "non_salient")]
        if len(tests) < len(TESTS):
            context.note(f"robustness: salient PatchDrop skipped for {s.name} (no class-token attention to rank "
                         "patches by; name a saliency model with --saliency-model)")
        out[s.name] = robustness(s, batches, tests, grid=options.occlusion_grid, shuffle_grids=options.shuffle_grids,
                                 saliency_subject=None if own else saliency, progress=context.progress)
    return out


def _tests_drawn(results: list[RobustnessResult]) -> list[str]:
    return list(dict.fromkeys(t for r in results for t in r.curves))


ANALYSIS = Analysis(
    name="robustness",
    title="Robustness to occlusion and shuffling",
    caption="Accuracy of every model when random patches, the most attended patches (salient) or all but them "
            "(non-salient) are blacked out before normalisation, and when the image is cut into g x g shuffled "
            "patches (Naseer et al. found ViTs degrade more gracefully than CNNs).",
    paper="Naseer et al. 2021 (sections 3.1-3.2)",
    options=RobustnessOptions,
    prefix="robustness_",
    check=check,
    run=run,
    reads_classifier=True,
    figures=(Figure(arrange="panels", panels=_tests_drawn, width=4.2, height=3.6),),
)
