"""Run the analyses of several models over one data set in a single streamed pass.

Every batch goes through every model once; hooks hand each layer's output to the CKA
accumulator (which keeps only a Gram matrix) and each attention map to the attention-distance
accumulator (which keeps only sums). One CKA accumulator spans the layers of all models, so each
Gram is computed once per batch and every pair of models, a model with itself included, is a
block of the same matrix.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import VitlabError
from .attention import AttentionDistance, AttentionDistanceResult
from .capture import Capture
from .cka import CKAResult, MinibatchCKA
from .subjects import Subject

ANALYSES = ("cka", "attention_distance")


@dataclass
class AnalysisResults:
    """What :func:`run_analyses` produced, keyed for the report and ``results.json``."""

    #: ``"A vs B"`` -> CKA of every layer of A against every layer of B (A vs A included).
    cka: dict[str, CKAResult] = field(default_factory=dict)
    #: model name -> mean attention distance of each head of each layer.
    attention_distance: dict[str, AttentionDistanceResult] = field(default_factory=dict)
    #: Analyses skipped for a model, and why ("attention distance: resnet20 has no attention").
    notes: list[str] = field(default_factory=list)
    num_images: int = 0


def check_analyses(names: Iterable[str]) -> list[str]:
    """Validate analysis names, with a clear error naming the valid ones."""
    from ..errors import unknown_name_error

    names = list(names)
    for name in names:
        if name not in ANALYSES:
            raise unknown_name_error("analysis", name, ANALYSES, hint=f"(choose from {', '.join(ANALYSES)})")
    return names


def cka_key(a: str, b: str) -> str:
    return f"{a} vs {b}"


@torch.inference_mode()
def run_analyses(
    subjects: Sequence[Subject],
    loader: Iterable,
    analyses: Sequence[str] = ANALYSES,
    progress: bool = True,
    total: int | None = None,
) -> AnalysisResults:
    """Stream ``loader`` (images in [0, 1], equal batch sizes) through every subject once.

    Returns CKA for every pair of subjects (each with itself included) and the mean attention
    distance of every subject that has attention; analyses that do not apply are noted, not failed.
    """
    analyses = check_analyses(analyses)
    names = [s.name for s in subjects]
    if len(set(names)) != len(names):
        raise VitlabError(f"two models share the name {sorted(n for n in names if names.count(n) > 1)[0]}; "
                          "give each run its own directory name")
    out = AnalysisResults()

    cka = None
    if "cka" in analyses:
        cka = MinibatchCKA([f"{i}:{layer.name}" for i, s in enumerate(subjects) for layer in s.anatomy.layers])

    # One accumulator per model and token grid (hierarchical models have one grid per stage).
    distances: dict[int, dict[tuple, AttentionDistance]] = {}
    site_key: dict[tuple[int, str], tuple] = {}
    if "attention_distance" in analyses:
        for i, s in enumerate(subjects):
            if not s.anatomy.has_attention:
                out.notes.append(f"attention distance: not applicable to {s.name} "
                                 f"({s.anatomy.family} has no attention maps over its tokens)")
                continue
            distances[i] = {}
            for site in s.anatomy.attention:
                key = (site.grid, site.patch_size, site.prefix_tokens)
                site_key[i, site.name] = key
                if key not in distances[i]:
                    distances[i][key] = AttentionDistance(site.grid, site.patch_size, prefix_tokens=site.prefix_tokens)

    def on_layer(i: int):
        return lambda name, output: cka.add(0, f"{i}:{name}", output)

    def on_attention(i: int):
        labels = {site.name: site.label for site in subjects[i].anatomy.attention}
        return lambda name, probs: distances[i][site_key[i, name]].add(labels[name], probs)

    with ExitStack() as stack:
        for i, s in enumerate(subjects):
            stack.enter_context(Capture(
                s.model,
                layers=s.anatomy.layer_names if cka is not None else (),
                on_layer=on_layer(i) if cka is not None else None,
                attention=s.anatomy.attention if i in distances else (),
                on_attention=on_attention(i) if i in distances else None,
            ))
        bar = tqdm(loader, desc=f"analysing ({', '.join(analyses)})", total=total, disable=not progress,
                   unit="batch", leave=False)
        for batch in bar:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            for s in subjects:
                s.model(s.prepare(images))
            if cka is not None:
                cka.end_batch()
            out.num_images += images.shape[0]

    if cka is not None:
        matrix = cka.compute().numpy()
        offsets = [0]
        for s in subjects:
            offsets.append(offsets[-1] + len(s.anatomy.layers))
        for i, a in enumerate(subjects):
            for j in range(i, len(subjects)):
                b = subjects[j]
                block = matrix[offsets[i]:offsets[i + 1], offsets[j]:offsets[j + 1]]
                out.cka[cka_key(a.name, b.name)] = CKAResult(a.name, b.name, a.anatomy.layer_labels,
                                                              b.anatomy.layer_labels, block)
    for i, accumulators in distances.items():
        out.attention_distance[subjects[i].name] = _distance_result(subjects[i], accumulators)
    return out


def _distance_result(subject: Subject, accumulators: dict[tuple, AttentionDistance]) -> AttentionDistanceResult:
    """One result per model, sites in depth order; layers with fewer heads are padded with NaN."""
    means = {}
    for acc in accumulators.values():
        means.update({label: m.numpy() for label, m in acc.compute().items()})
    labels = [site.label for site in subject.anatomy.attention]
    table = np.full((len(labels), max(len(m) for m in means.values())), np.nan)
    for row, label in enumerate(labels):
        table[row, :len(means[label])] = means[label]
    (grid, patch, _), *others = accumulators
    # The "uniform attention" reference line exists only when every site shares one square grid.
    image_px = grid[0] * patch[0] if not others and grid[0] == grid[1] and patch[0] == patch[1] else None
    return AttentionDistanceResult(subject.name, labels, table, patch_px=patch[0], image_px=image_px)
