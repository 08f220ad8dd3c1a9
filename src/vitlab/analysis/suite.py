"""Run the analyses of several models over one data set.

The representation analyses share one streamed pass: every batch goes through every model once;
hooks hand each layer's output to the CKA accumulator (which keeps only a Gram matrix), each
attention map to the attention-distance and attention-head accumulators (which keep only sums),
each residual stream and branch to the skip-connection accumulator, and the chosen layer's tokens
to the localisation accumulator. One CKA accumulator spans the layers of all models, so each Gram
is computed once per batch and every pair of models, a model with itself included, is a block of
the same matrix.

The other analyses need their own passes (probes fit on training images, robustness occludes
the images, shape bias renders cue-conflict images, feature visualisation and the effective
receptive field take gradients) and run after it, one model at a time. An analysis that does not
apply to a model (attention analyses on a ResNet) is skipped with a note, never an error.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import distributed
from ..capture import Capture, Hooks
from ..distributed import World, all_reduce_sum
from ..errors import VitlabError, unknown_name_error
from .attention import AttentionDistance, AttentionDistanceResult
from .cka import CKAResult, MinibatchCKA
from .heads import AttentionHeads, HeadsResult
from .localisation import Localisation, token_grid
from .skip import SkipRatios
from .subjects import Subject

#: Every analysis, in report order.
ANALYSES = ("cka", "attention_distance", "attention_heads", "skip_connections", "localisation", "probes",
            "robustness", "shape_bias", "feature_visualisation", "erf", "feature_reuse", "conv_attention",
            "early_exits")
#: Analyses of the shared streamed pass.
STREAMED = ("cka", "attention_distance", "attention_heads", "skip_connections", "localisation")


@dataclass
class AnalysisOptions:
    """Settings of the analyses that have any (the CLI exposes the common ones)."""

    #: Training images the probes are fitted on (held-out scoring uses the analysis images).
    probe_images: int = 2048
    #: Images for robustness, shape bias and the effective receptive field (a subset of the analysis images).
    robustness_images: int = 256
    erf_images: int = 64
    shape_bias_images: int = 512
    occlusion_grid: int = 8
    shuffle_grids: tuple[int, ...] = (1, 2, 4, 8)
    #: A model (name or run directory) whose class-token attention ranks patches for salient
    #: PatchDrop of models without one (a ResNet, a Mixer); None skips those curves for them.
    saliency_model: str | None = None
    #: A folder of Geirhos cue-conflict images for the 16-class protocol of ImageNet models.
    cue_conflict_dir: str | None = None
    #: Feature visualisation: blocks spread over depth, units per block, Adam steps.
    featvis_layers: int = 2
    featvis_units: int = 2
    featvis_steps: int = 400
    #: Layer label for spatial localisation (default: the deepest layer on the input's token grid).
    localisation_layer: str | None = None
    #: Patch size of the convolution-as-attention construction of a model's first convolution.
    conv_attention_patch: int = 4


@dataclass
class AnalysisResults:
    """What :func:`run_analyses` produced, keyed for the report and ``results.json``."""

    #: ``"A vs B"`` -> CKA of every layer of A against every layer of B (A vs A included).
    cka: dict[str, CKAResult] = field(default_factory=dict)
    #: model name -> mean attention distance of each head of each layer.
    attention_distance: dict[str, AttentionDistanceResult] = field(default_factory=dict)
    #: analysis name -> {model name (or "A vs B") -> result object}, for every other analysis.
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Analyses skipped for a model, and why ("attention distance: resnet20 has no attention").
    notes: list[str] = field(default_factory=list)
    num_images: int = 0
    #: Seconds spent: ``"streamed pass"`` and one entry per separate analysis.
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, analysis: str, key: str, result: Any) -> None:
        self.results.setdefault(analysis, {})[key] = result


def check_analyses(names: Iterable[str]) -> list[str]:
    """Validate analysis names, with a clear error naming the valid ones."""
    names = list(names)
    for name in names:
        if name not in ANALYSES:
            raise unknown_name_error("analysis", name, ANALYSES, hint=f"(choose from {', '.join(ANALYSES)})")
    return names


def cka_key(a: str, b: str) -> str:
    return f"{a} vs {b}"


def _localisation_layer(subject: Subject, label: str | None) -> tuple[str, str] | None:
    """(module path, label) of the layer whose tokens are compared with the input patches."""
    a = subject.anatomy
    if a.grid is None or a.patch_size is None:
        return None
    layers = [layer for layer in a.layers if label is None or layer.label == label]
    if label is not None and not layers:
        raise VitlabError(f"{subject.name} has no layer '{label}' for localisation; choose from "
                          f"{', '.join(a.layer_labels)}")
    probe = torch.zeros(1, 3, *(a.image_size or (a.grid[0] * a.patch_size[0], a.grid[1] * a.patch_size[1])))
    outputs: dict[str, torch.Tensor] = {}
    with Capture(subject.model, [layer.name for layer in layers], outputs.__setitem__), torch.no_grad():
        subject.model(probe)
    for layer in reversed(layers):  # the deepest layer still on the input's token grid
        try:
            token_grid(outputs[layer.name], a.grid, a.prefix_tokens, layer.layout)
            return layer.name, layer.label
        except VitlabError:
            continue
    return None


@torch.inference_mode()
def _streamed_pass(subjects: Sequence[Subject], loader: Iterable, analyses: Sequence[str], options: AnalysisOptions,
                   out: AnalysisResults, progress: bool, total: int | None, world: World) -> None:
    cka = None
    if "cka" in analyses:
        cka = MinibatchCKA([f"{i}:{layer.name}" for i, s in enumerate(subjects) for layer in s.anatomy.layers])

    # One accumulator per model and token grid (hierarchical models have one grid per stage).
    distances: dict[int, dict[tuple, AttentionDistance]] = {}
    heads: dict[int, dict[tuple, AttentionHeads]] = {}
    site_key: dict[tuple[int, str], tuple] = {}
    skips: dict[int, SkipRatios] = {}
    localisers: dict[int, tuple[Localisation, str, str]] = {}
    wants_attention = [a for a in ("attention_distance", "attention_heads") if a in analyses]
    for i, s in enumerate(subjects):
        if wants_attention and not s.anatomy.has_attention:
            out.notes.append(f"{', '.join(a.replace('_', ' ') for a in wants_attention)}: not applicable to {s.name} "
                             f"({s.anatomy.family} has no attention maps over its tokens)")
        elif wants_attention:
            distances[i], heads[i] = {}, {}
            for site in s.anatomy.attention:
                key = (site.grid, site.patch_size, site.prefix_tokens)
                site_key[i, site.name] = key
                if key not in distances[i]:
                    distances[i][key] = AttentionDistance(site.grid, site.patch_size, prefix_tokens=site.prefix_tokens)
                    heads[i][key] = AttentionHeads(site.grid, prefix_tokens=site.prefix_tokens)
        if "skip_connections" in analyses:
            if s.anatomy.residuals:
                skips[i] = SkipRatios(s.anatomy.residuals)
            else:
                out.notes.append(f"skip connections: not described for {s.name} ({s.anatomy.family})")
        if "localisation" in analyses:
            found = _localisation_layer(s, options.localisation_layer)
            if found is None:
                out.notes.append(f"localisation: not applicable to {s.name} (no layer on the input's token grid)")
            else:
                a = s.anatomy
                layout = next(layer.layout for layer in a.layers if layer.name == found[0])
                localisers[i] = (Localisation(a.grid, a.patch_size, a.prefix_tokens, layout), *found)

    def on_layer(i: int):
        def receive(name: str, output: torch.Tensor) -> None:
            if cka is not None:
                cka.add(0, f"{i}:{name}", output)
            if i in localisers and name == localisers[i][1]:
                pending[i] = output
        return receive

    def on_attention(i: int):
        labels = {site.name: site.label for site in subjects[i].anatomy.attention}

        def receive(name: str, probs: torch.Tensor) -> None:
            if "attention_distance" in analyses:
                distances[i][site_key[i, name]].add(labels[name], probs)
            if "attention_heads" in analyses:
                heads[i][site_key[i, name]].add(labels[name], probs)
        return receive

    pending: dict[int, torch.Tensor] = {}
    with ExitStack() as stack:
        for i, s in enumerate(subjects):
            layer_names = list(s.anatomy.layer_names) if cka is not None else []
            if i in localisers and localisers[i][1] not in layer_names:
                layer_names.append(localisers[i][1])
            stack.enter_context(Capture(
                s.model,
                layers=layer_names,
                on_layer=on_layer(i) if layer_names else None,
                attention=s.anatomy.attention if i in distances else (),
                on_attention=on_attention(i) if i in distances else None,
            ))
            if i in skips:
                stack.enter_context(Hooks(s.model, skips[i].hooks()))
        mine = total if total is None else len(range(world.rank, total, world.world_size))
        bar = tqdm(loader, desc=f"analysing ({', '.join(a for a in analyses if a in STREAMED)})", total=mine,
                   disable=not progress, unit="batch", leave=False)
        for k, batch in enumerate(bar):
            if k % world.world_size != world.rank:  # under torchrun every process takes every world_size-th batch
                continue
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            for i, s in enumerate(subjects):
                prepared = s.prepare(images)
                s.model(prepared)
                if i in pending:
                    localisers[i][0].add(prepared, pending.pop(i))
            if cka is not None:
                cka.end_batch()
            out.num_images += images.shape[0]

    # Every accumulator holds sums only: adding up the processes' sums equals one process fed every batch.
    count = torch.tensor([out.num_images])
    all_reduce_sum(count)
    out.num_images = int(count.item())
    for accumulator in [cka, *(a for d in (*distances.values(), *heads.values()) for a in d.values()),
                        *skips.values(), *(loc for loc, _, _ in localisers.values())]:
        if accumulator is not None:
            accumulator.all_reduce()
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
        if "attention_distance" in analyses:
            out.attention_distance[subjects[i].name] = _distance_result(subjects[i], accumulators)
        if "attention_heads" in analyses:
            out.add("attention_heads", subjects[i].name, _heads_result(subjects[i], heads[i]))
    for i, ratios in skips.items():
        out.add("skip_connections", subjects[i].name, ratios.result(subjects[i].name))
    for i, (localiser, _, label) in localisers.items():
        out.add("localisation", subjects[i].name, localiser.result(subjects[i].name, label))


def run_analyses(
    subjects: Sequence[Subject],
    loader: Iterable,
    analyses: Sequence[str] = ("cka", "attention_distance"),
    progress: bool = True,
    total: int | None = None,
    options: AnalysisOptions | None = None,
    train_loader: Callable[[], Iterable] | None = None,
    init_subjects: dict[str, Subject] | None = None,
    trained_on: dict[str, str] | None = None,
    world: World | None = None,
) -> AnalysisResults:
    """Run ``analyses`` on every subject over ``loader`` (images in [0, 1] and labels, equal batch sizes).

    Returns CKA for every pair of subjects (each with itself included), the streamed per-model
    analyses, and then the analyses with passes of their own. ``train_loader`` builds a loader of
    training images for the probes; ``init_subjects`` maps a subject's name to the same model at
    initialisation (feature reuse); ``trained_on`` names each subject's training data for the
    shape-bias figure. Analyses that do not apply are noted, not failed.

    Under torchrun (``world`` of several processes) the streamed analyses split the batches
    between the processes and add up their sums; the analyses with passes of their own then run
    on rank 0 alone, and the other ranks return after the streamed pass.
    """
    world = world or distributed.current()
    analyses = check_analyses(analyses)
    options = options or AnalysisOptions()
    names = [s.name for s in subjects]
    if len(set(names)) != len(names):
        raise VitlabError(f"two models share the name {sorted(n for n in names if names.count(n) > 1)[0]}; "
                          "give each run its own directory name")
    if "robustness" in analyses:
        _check_grids(loader, options)
    out = AnalysisResults()
    streamed = [a for a in analyses if a in STREAMED]
    if streamed:
        started = time.perf_counter()
        if world.distributed and total is not None and total < world.world_size:
            raise VitlabError(f"{total} analysis batches cannot be split over {world.world_size} processes; "
                              "pass more --analysis-images or start fewer processes")
        _streamed_pass(subjects, loader, streamed, options, out, progress and world.is_main, total, world)
        out.timings["streamed pass"] = round(time.perf_counter() - started, 2)
    if not world.is_main:
        return out
    for analysis in analyses:
        if analysis not in STREAMED:
            started = time.perf_counter()
            _SEPARATE[analysis](subjects, loader, options, out, progress, train_loader=train_loader,
                                init_subjects=init_subjects or {}, trained_on=trained_on or {})
            out.timings[analysis] = round(time.perf_counter() - started, 2)
    return out


def _check_grids(loader: Iterable, options: AnalysisOptions) -> None:
    """Refuse occlusion and shuffle grids that do not divide the images, before any work is done."""
    for batch in loader:
        h, w = (batch[0] if isinstance(batch, (tuple, list)) else batch).shape[-2:]
        for name, grids in (("--occlusion-grid", (options.occlusion_grid,)), ("shuffle grid", options.shuffle_grids)):
            for g in grids:
                if g < 1 or h % g or w % g:
                    fits = ", ".join(str(d) for d in range(2, min(h, w) + 1) if h % d == 0 and w % d == 0)
                    raise VitlabError(f"{name} {g} does not divide the {h}x{w} analysis images; use one of {fits}")
        return


class _Limited:
    """The first batches of ``loader`` holding about ``num_images`` images (at least one batch).

    Iterable again and again without keeping the batches, so memory does not grow with the
    number of images (a list of them would hold a copy of the data).
    """

    def __init__(self, loader: Iterable, num_images: int) -> None:
        self.loader, self.num_images = loader, num_images

    def __iter__(self):
        seen = 0
        for batch in self.loader:
            yield batch
            seen += (batch[0] if isinstance(batch, (tuple, list)) else batch).shape[0]
            if seen >= self.num_images:
                return


def _labelled(loader: Iterable, analysis: str) -> None:
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise VitlabError(f"{analysis} needs labelled batches (images, labels)")
        return


def _probes(subjects, loader, options, out, progress, train_loader=None, **_) -> None:
    from .probes import LayerProbes

    if train_loader is None:
        out.notes.append("probes: skipped (no training images to fit them on)")
        return
    _labelled(loader, "probes")
    for s in subjects:
        classes = getattr(s.model, "num_classes", 0)
        probes = LayerProbes(s.anatomy.layers, s.anatomy.prefix_tokens, max(classes, 2))
        layers = s.anatomy.layer_names
        for phase, batches in (("train", _Limited(train_loader(), options.probe_images)), ("eval", loader)):
            labels_now: dict[str, torch.Tensor] = {}
            add = probes.add_train if phase == "train" else probes.add_eval
            with Capture(s.model, layers, lambda n, t: add(n, t, labels_now["y"])), torch.no_grad():
                for images, labels, *_ in tqdm(batches, desc=f"probes of {s.name} ({phase})", disable=not progress,
                                               leave=False):
                    labels_now["y"] = labels
                    s.model(s.prepare(images))
            if phase == "train":
                probes.fit()
        out.add("probes", s.name, probes.result(s.name))


def _robustness(subjects, loader, options, out, progress, **_) -> None:
    from .robustness import TESTS, robustness
    from .subjects import load_subject

    _labelled(loader, "robustness")
    batches = _Limited(loader, options.robustness_images)
    saliency = load_subject(options.saliency_model) if options.saliency_model else None
    for s in subjects:
        own = any(site.prefix_tokens > 0 for site in s.anatomy.attention)
        tests = [t for t in TESTS if own or saliency is not None or t not in ("salient", "non_salient")]
        if len(tests) < len(TESTS):
            out.notes.append(f"robustness: salient PatchDrop skipped for {s.name} (no class-token attention to rank "
                             "patches by; name a saliency model with --saliency-model)")
        out.add("robustness", s.name, robustness(s, batches, tests, grid=options.occlusion_grid,
                                                 shuffle_grids=options.shuffle_grids,
                                                 saliency_subject=None if own else saliency, progress=progress))


def _shape_bias(subjects, loader, options, out, progress, trained_on=None, **_) -> None:
    from .shape_bias import geirhos_shape_bias, shapes_shape_bias

    for s in subjects:
        classes = getattr(s.model, "num_classes", None)
        if classes == 1000 and options.cue_conflict_dir:
            out.add("shape_bias", s.name, geirhos_shape_bias(s, options.cue_conflict_dir, progress=progress))
        elif classes == 10 and s.source == "run" and trained_on.get(s.name, "").startswith("shapes"):
            out.add("shape_bias", s.name, shapes_shape_bias(s, num_images=options.shape_bias_images,
                                                            trained_on=trained_on.get(s.name), progress=progress))
        elif classes == 1000:
            out.notes.append(f"shape bias: {s.name} is an ImageNet model; pass --cue-conflict DIR (Geirhos et al.'s "
                             "cue-conflict images) to measure it")
        else:
            out.notes.append(f"shape bias: not applicable to {s.name} (needs a run trained on shapes, or an "
                             "ImageNet model with --cue-conflict DIR)")


def _feature_visualisation(subjects, loader, options, out, progress, **_) -> None:
    from .featvis import feature_visualisation

    for s in subjects:
        if not s.anatomy.mlp_activations:
            out.notes.append(f"feature visualisation: not applicable to {s.name} ({s.anatomy.family} has no "
                             "transformer MLP units described)")
            continue
        out.add("feature_visualisation", s.name, feature_visualisation(
            s, per_layer=options.featvis_units, layers=options.featvis_layers, steps=options.featvis_steps,
            progress=progress))


def _erf(subjects, loader, options, out, progress, **_) -> None:
    from .erf import effective_receptive_field

    batches = _Limited(loader, options.erf_images)
    for s in subjects:
        try:
            out.add("erf", s.name, effective_receptive_field(s.model, s.anatomy, batches, s.prepare,
                                                             progress=progress, name=s.name))
        except VitlabError as e:
            out.notes.append(f"effective receptive field: {e}")


def _feature_reuse(subjects, loader, options, out, progress, init_subjects=None, **_) -> None:
    from .reuse import feature_reuse, same_parameter_shapes

    done = False
    for s in subjects:
        init = init_subjects.get(s.name)
        if init is not None:
            out.add("feature_reuse", f"{s.name} vs initialisation", feature_reuse(s, init, loader, progress=progress))
            done = True
    # Two runs of the same architecture (e.g. before and after fine-tuning) are compared directly.
    for i, a in enumerate(subjects):
        for b in subjects[i + 1:]:
            if (a.model_name and a.model_name == b.model_name and a.anatomy.layer_names == b.anatomy.layer_names
                    and same_parameter_shapes(a.model, b.model)):
                out.add("feature_reuse", cka_key(a.name, b.name), feature_reuse(a, b, loader, progress=progress))
                done = True
    if not done:
        out.notes.append("feature reuse: no run with its initial weights (init.safetensors) and no two models of the "
                         "same architecture to compare")


def _conv_attention(subjects, loader, options, out, progress, **_) -> None:
    from .conv_attention import attention_from_conv, conv_attention_error

    size = options.conv_attention_patch * 4
    for s in subjects:
        conv = None
        for module in s.model.modules():  # the first convolution the construction can rebuild
            if isinstance(module, nn.Conv2d):
                try:
                    attention_from_conv(module, options.conv_attention_patch, size)
                except VitlabError:
                    continue
                conv = module
                break
        if conv is None:
            out.notes.append(f"convolution as attention: {s.name} has no stride-1 'same' convolution to rebuild")
            continue
        out.add("conv_attention", s.name, conv_attention_error(conv, options.conv_attention_patch, image_size=size))


def _early_exits(subjects, loader, options, out, progress, **_) -> None:
    from ..models.early_exit import EarlyExitModel
    from .early_exits import exit_curve

    _labelled(loader, "early exits")
    for s in subjects:
        if isinstance(s.model, EarlyExitModel):
            out.add("early_exits", s.name, exit_curve(s, loader))
        else:
            out.notes.append(f"early exits: not applicable to {s.name} (no exit branches)")


_SEPARATE: dict[str, Callable[..., None]] = {
    "probes": _probes, "robustness": _robustness, "shape_bias": _shape_bias,
    "feature_visualisation": _feature_visualisation, "erf": _erf, "feature_reuse": _feature_reuse,
    "conv_attention": _conv_attention, "early_exits": _early_exits,
}


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


def _heads_result(subject: Subject, accumulators: dict[tuple, AttentionHeads]) -> HeadsResult:
    """Aligned maps of the sites on the model's main grid (the largest number of sites), in depth order."""
    (key, acc), *_ = sorted(accumulators.items(), key=lambda kv: -len(kv[1].counts))
    stats = acc.compute()
    labels = [site.label for site in subject.anatomy.attention if site.label in stats]
    return HeadsResult(subject.name, labels, [stats[label][0].numpy() for label in labels],
                       [stats[label][1].numpy() for label in labels])
