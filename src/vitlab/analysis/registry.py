"""One registration per analysis: what the suite runs, the CLI offers, the report shows and
``results.json`` stores all come from an :class:`Analysis`.

An analysis module ends with its registration::

    ANALYSIS = Analysis(
        name="erf", title="Effective receptive field", caption="...", paper="Luo et al. 2016",
        needs=("layers",), options=ERFOptions, prefix="erf_", run=run,
        figures=(Figure(arrange="rows", width=10.0, height=2.3),),
    )

and :mod:`vitlab.analysis.catalog` lists it. The analysis runs either inside the shared
streamed pass (``stream``: an accumulator fed by hooks, one forward pass per batch for every
streamed analysis) or in a pass of its own (``run``). Either way it returns the one shape of
results: ``{key: result}``, the key a model's name (or ``"A vs B"`` for pairs), every result an
object with ``to_dict()`` (JSON-safe numbers) and ``plot(ax)``. The report draws each
:class:`Figure` of the registration without knowing which analysis it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch

from ..anatomy import Anatomy, AttentionSite
from ..distributed import World
from ..options import option

if TYPE_CHECKING:
    from .subjects import Subject

__all__ = ["Analysis", "AnalysisResults", "Context", "Figure", "NEEDS", "RunOptions", "Stream"]


#: What an analysis can need from a model's anatomy: a test and the phrase of a note when it fails.
NEEDS: dict[str, tuple[Callable[[Anatomy], bool], str]] = {
    "layers": (lambda a: bool(a.layers), "analysable layers"),
    "attention": (lambda a: a.has_attention, "attention maps over its tokens"),
    "residuals": (lambda a: bool(a.residuals), "residual sub-blocks described"),
    "mlp_activations": (lambda a: bool(a.mlp_activations), "transformer MLP units described"),
}


@dataclass(frozen=True)
class Figure:
    """How the results of an analysis (or a selection of them) are drawn in the report.

    ``arrange``: ``"columns"`` (one axis per result, side by side), ``"rows"`` (one axis per
    result, stacked), ``"each"`` (one figure and section per result, titled with its key),
    ``"panels"`` (one axis per panel name from ``panels(results)``, every result drawn on each
    with ``result.plot(ax, panel)``) or ``"shared"`` (one axis, ``draw(ax, results)``).
    ``width``/``height`` are inches per axis; ``height`` may be a function of the results (image
    grids grow with their rows). ``select`` picks the results of this figure by key and result;
    ``title``/``caption`` override the registration's (``{n}`` is the number of images, ``{key}``
    the result's key); ``text`` adds a paragraph under the figure.
    """

    arrange: str = "columns"
    width: float = 4.8
    height: float | Callable[[list[Any]], float] = 4.0
    select: Callable[[str, Any], bool] | None = None
    title: str | None = None
    caption: str | None = None
    panels: Callable[[list[Any]], list[str]] | None = None
    draw: Callable[[Any, list[Any]], None] | None = None
    text: Callable[[list[Any]], str] | None = None


class Stream:
    """An analysis fed by the shared streamed pass: one forward pass of every batch through every
    model hands each layer output, attention map and hooked tensor to every stream that asked.

    Subjects are addressed by name. The suite calls :meth:`layers`, :meth:`attention` and
    :meth:`hooks` once per subject, then, per batch, the ``on_*`` methods during each model's
    forward and :meth:`after_forward` after it, :meth:`end_batch` after every model ran;
    finally :meth:`all_reduce` (sum the accumulators over torchrun processes) and
    :meth:`results`.
    """

    def layers(self, subject: str) -> list[str]:
        """Module paths of the layers whose outputs this stream wants from ``subject``."""
        return []

    def attention(self, subject: str) -> list[AttentionSite]:
        """Attention sites whose probabilities this stream wants from ``subject``."""
        return []

    def hooks(self, subject: str) -> list[tuple[str, str, Callable[[torch.Tensor], None]]]:
        """``(module path, "input" | "output", fn)`` hooks on ``subject`` (see :class:`~vitlab.capture.Hooks`)."""
        return []

    def on_layer(self, subject: str, layer: str, output: torch.Tensor) -> None:
        """One batch's output of one of the layers asked for."""

    def on_attention(self, subject: str, site: str, probs: torch.Tensor) -> None:
        """One batch's attention probabilities of one of the sites asked for."""

    def after_forward(self, subject: str, images: torch.Tensor) -> None:
        """``subject`` has run on ``images`` (prepared: resized and normalised for it)."""

    def end_batch(self) -> None:
        """Every subject has run on the batch."""

    def all_reduce(self) -> None:
        """Sum the accumulators over the torchrun processes (a no-op in one process)."""

    def results(self) -> dict[str, Any]:
        """``{key: result}`` once every batch has been seen."""
        return {}


@dataclass
class AnalysisResults:
    """What :func:`~vitlab.analysis.suite.run_analyses` produced: one shape for every analysis."""

    #: analysis name -> {model name (or "A vs B") -> result object}.
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Analyses skipped for a model, and why ("attention distance: not applicable to resnet20 ...").
    notes: list[str] = field(default_factory=list)
    num_images: int = 0
    #: Seconds spent: ``"streamed pass"`` and one entry per separate analysis.
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, analysis: str, key: str, result: Any) -> None:
        """Store ``result`` of ``analysis`` under ``key``."""
        self.results.setdefault(analysis, {})[key] = result


@dataclass
class Context:
    """What an analysis is run with."""

    #: The models it applies to (those whose anatomy has what it needs), in the order given.
    subjects: list[Subject]
    #: Analysis images in [0, 1] with their labels, in equal batches.
    loader: Iterable
    #: The analysis's own options (an instance of its registration's ``options``), or None.
    options: Any
    progress: bool
    world: World
    #: A function building a loader of training images (for probes), or None.
    train_loader: Callable[[], Iterable] | None = None
    #: model name -> the same model at initialisation (feature reuse).
    init_subjects: dict[str, Subject] = field(default_factory=dict)
    #: model name -> the data it was trained on, e.g. "shapes (match textures)".
    trained_on: dict[str, str] = field(default_factory=dict)
    #: The results of the analyses that ran before (derived analyses read them).
    done: AnalysisResults = field(default_factory=AnalysisResults)
    #: Where notes go.
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        """Say why something was skipped (shown under "Notes" in the report)."""
        self.notes.append(text)


@dataclass(frozen=True)
class Analysis:
    """One analysis, registered once (see the module docstring)."""

    #: Machine name: the key in results.json, in ``--analyses`` and in ``AnalysisResults.results``.
    name: str
    #: Report section title and the caption under its figure (``{n}``: the number of images analysed).
    title: str
    caption: str
    #: The paper the analysis comes from, for the documentation.
    paper: str
    #: What each model's anatomy must describe (keys of :data:`NEEDS`); models without it get a note.
    needs: tuple[str, ...] = ()
    #: Its options (a dataclass of :func:`~vitlab.options.option` fields) and their keys' prefix.
    options: type | None = None
    prefix: str = ""
    #: ``stream(context) -> Stream`` for the shared pass, or ``run(context) -> {key: result}``.
    stream: Callable[[Context], Stream] | None = None
    run: Callable[[Context], dict[str, Any]] | None = None
    #: ``check(context)`` refuses what cannot work (raising a one-line error) before any analysis starts.
    check: Callable[[Context], None] | None = None
    #: How its results are drawn: one report section per figure, in order.
    figures: tuple[Figure, ...] = (Figure(),)
    #: Whether it runs in ``vitlab compare``/``analyze`` unless ``--analyses`` names the set.
    default: bool = True
    #: A derived analysis reads the results of these (``Context.done``) and runs whenever one of them does.
    derived_from: tuple[str, ...] = ()
    #: Its numbers come from the model's classifier (meaningless for a self-supervised run until fine-tuned).
    reads_classifier: bool = False

    @property
    def streamed(self) -> bool:
        """Whether it runs in the shared streamed pass (it has a ``stream``) rather than a pass of its own."""
        return self.stream is not None

    @property
    def label(self) -> str:
        """The name as notes and progress bars show it (``attention_heads`` -> ``attention heads``)."""
        return self.name.replace("_", " ")


@dataclass
class RunOptions:
    """Which analyses run, on how many images, in what batches."""

    analyses: tuple[str, ...] | None = option(None, metavar="A,B,...",
                                              help="analyses to run (none: every default analysis)")
    images: int = option(2048, key="analysis_images", metavar="N", check=lambda v: v >= 1, must="be at least 1",
                         help="validation images to analyse")
    batch_size: int = option(256, key="analysis_batch_size", metavar="N", check=lambda v: v >= 1,
                             must="be at least 1", help="images per analysis batch (CKA needs equal batches)")


def selected(analyses: Sequence[Analysis], names: Sequence[str] | None) -> list[Analysis]:
    """The registrations ``names`` picks (all default ones for None), in catalog order."""
    if names is None:
        return [a for a in analyses if a.default]
    wanted = set(names)
    return [a for a in analyses if a.name in wanted]
