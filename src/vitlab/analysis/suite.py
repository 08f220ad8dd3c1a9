"""Run the registered analyses of several models over one data set.

The streamed analyses share one pass: every batch goes through every model once; hooks hand
each layer's output, attention map and residual tensor to the :class:`~vitlab.analysis.registry.Stream`
of every analysis that asked for it, and the streams keep only sums (a Gram matrix for CKA), so
memory is bounded by the batch, not the data set. The other analyses (probes fit on training
images, robustness occludes the images, feature visualisation and the effective receptive field
take gradients, ...) then run in passes of their own, one after the other, and derived analyses
(what supervision changes) read what ran before. An analysis that does not apply to a model
(attention on a ResNet) is skipped for it with a note, never an error.

Which analyses exist, in what order, with what options, comes from their registrations
(:mod:`vitlab.analysis.catalog`); nothing here names one.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .. import distributed, options
from ..capture import Capture, Hooks
from ..distributed import World, all_reduce_sum
from ..errors import VitlabError, unknown_name_error
from .catalog import ANALYSES, BY_NAME, AnalysisOptions
from .registry import NEEDS, Analysis, AnalysisResults, Context, Stream, selected
from .subjects import Subject

__all__ = ["ANALYSES", "AnalysisOptions", "AnalysisResults", "check_analyses", "run_analyses"]


def check_analyses(names: Iterable[str] | None) -> list[str]:
    """Validate analysis names (None: every default one), with a clear error naming the valid ones."""
    if names is None:
        return [a.name for a in selected(BY_NAME.values(), None)]
    names = list(names)
    for name in names:
        if name not in BY_NAME:
            raise unknown_name_error("analysis", name, ANALYSES, hint=f"(choose from {', '.join(ANALYSES)})")
    return names


def run_analyses(
    subjects: Sequence[Subject],
    loader: Iterable,
    analyses: Sequence[str] | None = ("cka", "attention_distance"),
    progress: bool = True,
    total: int | None = None,
    options: Any = None,
    train_loader: Callable[[], Iterable] | None = None,
    init_subjects: dict[str, Subject] | None = None,
    trained_on: dict[str, str] | None = None,
    world: World | None = None,
) -> AnalysisResults:
    """Run ``analyses`` on every subject over ``loader`` (images in [0, 1] and labels, equal batch sizes).

    ``options`` is an :data:`~vitlab.analysis.catalog.AnalysisOptions` (the declared defaults when
    None). ``train_loader`` builds a loader of training images for the probes; ``init_subjects``
    maps a subject's name to the same model at initialisation (feature reuse); ``trained_on``
    names each subject's training data for the shape-bias figure. Analyses that do not apply are
    noted, not failed.

    Under torchrun (``world`` of several processes) the streamed analyses split the batches
    between the processes and add up their sums; the analyses with passes of their own then run
    on rank 0 alone, and the other ranks return after the streamed pass.
    """
    world = world or distributed.current()
    names = set(check_analyses(analyses))
    # Catalog order (derived analyses come after what they read), with every derived analysis whose
    # inputs run.
    chosen = [a for a in BY_NAME.values() if a.name in names or names & set(a.derived_from)]
    options = options if options is not None else AnalysisOptions()
    names = [s.name for s in subjects]
    if len(set(names)) != len(names):
        raise VitlabError(f"two models share the name {sorted(n for n in names if names.count(n) > 1)[0]}; "
                          "give each run its own directory name")
    out = AnalysisResults()

    def context(analysis: Analysis) -> Context:
        applicable = []
        for s in subjects:
            missing = [need for need in analysis.needs if not NEEDS[need][0](s.anatomy)]
            if missing:
                out.notes.append(f"{analysis.label}: not applicable to {s.name} ({s.anatomy.family} has no "
                                 f"{NEEDS[missing[0]][1]})")
            else:
                applicable.append(s)
        own = getattr(options, analysis.name) if analysis.options is not None else None
        return Context(applicable, loader, own, progress, world, train_loader, init_subjects or {},
                       trained_on or {}, out, out.notes)

    # Every analysis checks what it can before any work is done.
    contexts = {a.name: context(a) for a in chosen}
    for analysis in chosen:
        if analysis.check is not None:
            analysis.check(contexts[analysis.name])
    streams = {a.name: a.stream(contexts[a.name]) for a in chosen if a.streamed}
    if streams:
        started = time.perf_counter()
        if world.distributed and total is not None and total < world.world_size:
            raise VitlabError(f"{total} analysis batches cannot be split over {world.world_size} processes; "
                              "pass more --analysis-images or start fewer processes")
        _streamed_pass(subjects, loader, streams, out, progress and world.is_main, total, world)
        out.timings["streamed pass"] = round(time.perf_counter() - started, 2)
    if not world.is_main:
        return out
    for analysis in chosen:
        if not analysis.streamed:
            started = time.perf_counter()
            for key, result in analysis.run(contexts[analysis.name]).items():
                out.add(analysis.name, key, result)
            out.timings[analysis.name] = round(time.perf_counter() - started, 2)
    return out


@torch.inference_mode()
def _streamed_pass(subjects: Sequence[Subject], loader: Iterable, streams: dict[str, Stream], out: AnalysisResults,
                   progress: bool, total: int | None, world: World) -> None:
    """Feed every batch through every subject once, handing what each stream asked for to it."""
    with ExitStack() as stack:
        for s in subjects:
            wanted = {name: stream.layers(s.name) for name, stream in streams.items()}
            layers = list(dict.fromkeys(layer for names in wanted.values() for layer in names))
            sites = {name: stream.attention(s.name) for name, stream in streams.items()}
            attention = list({site.name: site for found in sites.values() for site in found}.values())
            stack.enter_context(Capture(
                s.model, layers=layers, on_layer=_fan_out(s.name, streams, wanted, "on_layer") if layers else None,
                attention=attention,
                on_attention=_fan_out(s.name, streams, {n: [x.name for x in v] for n, v in sites.items()},
                                      "on_attention") if attention else None))
            hooks = [hook for stream in streams.values() for hook in stream.hooks(s.name)]
            if hooks:
                stack.enter_context(Hooks(s.model, hooks))
        mine = total if total is None else len(range(world.rank, total, world.world_size))
        bar = tqdm(loader, desc=f"analysing ({', '.join(streams)})", total=mine, disable=not progress, unit="batch",
                   leave=False)
        for k, batch in enumerate(bar):
            if k % world.world_size != world.rank:  # under torchrun every process takes every world_size-th batch
                continue
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            for s in subjects:
                prepared = s.prepare(images)
                s.model(prepared)
                for stream in streams.values():
                    stream.after_forward(s.name, prepared)
            for stream in streams.values():
                stream.end_batch()
            out.num_images += images.shape[0]

    # Every stream holds sums only: adding up the processes' sums equals one process fed every batch.
    count = torch.tensor([out.num_images])
    all_reduce_sum(count)
    out.num_images = int(count.item())
    for name, stream in streams.items():
        stream.all_reduce()
        for key, result in stream.results().items():
            out.add(name, key, result)


def _fan_out(subject: str, streams: dict[str, Stream], wanted: dict[str, list[str]], method: str):
    """A capture callback handing ``(name, tensor)`` to every stream that asked for ``name``."""
    receivers: dict[str, list[Callable]] = {}
    for stream_name, names in wanted.items():
        for name in names:
            receivers.setdefault(name, []).append(getattr(streams[stream_name], method))

    def receive(name: str, tensor: torch.Tensor) -> None:
        for fn in receivers.get(name, ()):
            fn(subject, name, tensor)
    return receive


def analysis_options(**keys: Any) -> Any:
    """An :data:`AnalysisOptions` with the options named by their keys (``probe_images=512``) changed."""
    return options.merged(AnalysisOptions(), keys)
