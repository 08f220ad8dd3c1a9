"""The shape every analysis result takes.

An analysis returns a plain object holding its numbers. ``to_dict()`` gives them in a JSON-safe
form (what ``results.json`` stores) and ``plot(ax)`` draws them on a matplotlib axis (what the
report shows). The report arranges results; it never computes anything itself.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class AnalysisResult(Protocol):
    """Protocol of analysis results: numbers plus a way to draw them."""

    #: Short machine-readable name of the analysis, e.g. ``"cka"``.
    kind: str

    def to_dict(self) -> dict[str, Any]:
        """The result's numbers as JSON-safe Python objects."""
        ...

    def plot(self, ax: Any) -> None:
        """Draw the result on a matplotlib ``Axes``."""
        ...


def to_jsonable(value: Any) -> Any:
    """Convert tensors, arrays and numpy scalars (nested in lists/dicts) to plain Python values.

    Non-finite floats become ``None`` so the output is strict JSON.
    """
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
