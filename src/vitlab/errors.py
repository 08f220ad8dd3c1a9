"""User-facing errors.

A :class:`VitlabError` carries a one-line message that names the problem and the fix. The CLI
prints it as ``vitlab: error: <message>`` and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class VitlabError(ValueError):
    """An error caused by the user's input, with a message that says how to fix it.

    It is a ``ValueError``, so library callers can catch either.
    """


class UnknownOptionError(VitlabError):
    """A model was built with a keyword it does not take; ``option`` names that keyword."""

    def __init__(self, model: str, option: str) -> None:
        super().__init__(f"model '{model}' does not take the option '{option}'")
        self.model, self.option = model, option


def closest_names(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` entries of ``choices`` most similar to ``name`` (possibly none)."""
    choices = list(choices)
    matches = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not matches:
        # Substring hits catch short or partial names ("vit", "mixer") difflib scores low.
        matches = [c for c in choices if name.lower() in c.lower()][:n]
    return matches


def unknown_name_error(kind: str, name: str, choices: Iterable[str], hint: str = "") -> VitlabError:
    """A ``VitlabError`` for an unknown ``kind`` called ``name``, suggesting the closest valid names."""
    close = closest_names(name, choices)
    suggestion = f"; did you mean {', '.join(close)}?" if close else ""
    return VitlabError(f"unknown {kind} '{name}'{suggestion}{(' ' + hint) if hint else ''}")
