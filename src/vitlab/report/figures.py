"""Turning result objects into figures (PNG bytes) with a consistent look."""

from __future__ import annotations

import base64
import io
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # reports are written headless; never open a window
import matplotlib.pyplot as plt  # noqa: E402


def figure_png(draw: Callable[[Sequence], None], ncols: int = 1, width: float = 5.0, height: float = 4.0,
               dpi: int = 110, nrows: int = 1) -> bytes:
    """Call ``draw(axes)`` on a fresh ``nrows`` x ``ncols`` figure (axes row by row) and return PNG bytes."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    try:
        draw(list(axes.flat))
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        return buffer.getvalue()
    finally:
        plt.close(fig)


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI, so the HTML report is one self-contained file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
