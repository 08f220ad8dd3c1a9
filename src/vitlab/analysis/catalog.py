"""Every analysis, in report order: the one list the suite, the CLI, the report and ``results.json``
read. Adding an analysis is one new module ending in its :class:`~vitlab.analysis.registry.Analysis`
and one entry here (see docs/add_an_analysis.md)."""

from __future__ import annotations

from dataclasses import make_dataclass
from typing import Any

from ..options import section
from . import (
    attention,
    cka,
    conv_attention,
    early_exits,
    erf,
    featvis,
    heads,
    localisation,
    probes,
    reuse,
    robustness,
    rollout,
    shape_bias,
    skip,
    supervision,
)
from .registry import Analysis

REGISTRY: tuple[Analysis, ...] = (
    cka.ANALYSIS,
    attention.ANALYSIS,
    heads.ANALYSIS,
    skip.ANALYSIS,
    localisation.ANALYSIS,
    rollout.ANALYSIS,
    probes.ANALYSIS,
    robustness.ANALYSIS,
    shape_bias.ANALYSIS,
    featvis.ANALYSIS,
    erf.ANALYSIS,
    reuse.ANALYSIS,
    conv_attention.ANALYSIS,
    early_exits.ANALYSIS,
    supervision.ANALYSIS,  # derived from the probes and attention distance: after them
)

BY_NAME: dict[str, Analysis] = {a.name: a for a in REGISTRY}
#: Every analysis name, in report order.
ANALYSES: tuple[str, ...] = tuple(BY_NAME)

#: The options of every analysis that has any, one section each (``AnalysisOptions().robustness.images``);
#: each option's key (``robustness_images``) is its command-line flag.
AnalysisOptions: Any = make_dataclass(
    "AnalysisOptions",
    [(a.name, a.options, section(a.options, prefix=a.prefix, title=f"{a.label} options"))
     for a in REGISTRY if a.options is not None],
)
AnalysisOptions.__doc__ = "The options of every registered analysis, one section per analysis."
AnalysisOptions.__module__ = __name__
