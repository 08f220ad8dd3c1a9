"""What each attention head does (Walmer et al. 2023, "Teaching Matters"): aligned maps, offsets,
local / global / offset-local labels, entropy, and attention rollout.

**Aligned attention map** of a head: each query patch's attention over the patch grid (prefix
tokens dropped, the row renormalised over the patches) is pasted into a (2g-1) x (2g-1) canvas
centred on the query, then averaged over queries and images. A convolution-like head puts its
mass near the centre; a global head spreads it; an *offset-local* head (one that always looks at,
say, its left neighbour) puts it on one cell next to the centre.

**Offset**: the distance of the aligned map's centre of mass from the canvas centre, in units where
the canvas edges are at +-1 (Walmer et al.).

**Labels** (:func:`classify_heads`). The paper picked offset-local heads by hand; vitlab's rule,
with ``ring`` the 8 cells around the centre of the aligned map:

* ``offset-local``: the largest cell among centre + ring is a ring cell and holds at least
  ``OFFSET_SHARE`` (30%) of the head's mass: it looks at one neighbour in a fixed direction;
* ``local``: otherwise, if centre + ring hold at least ``LOCAL_MASS`` (50%) of the mass;
* ``global``: everything else.

So a head that attends only to itself is local (not offset), one that attends only to its right
neighbour is offset-local, and uniform attention over a 14x14 grid (4.6% of the mass within one
cell of the centre) is global.

**Entropy**: mean over images and query patches of ``-sum_k p_k log p_k`` (nats) of the row
renormalised over patches; ``log(patches)`` for uniform attention, 0 for one-hot.

**Rollout** (Abnar & Zuidema 2020): :func:`attention_rollout` multiplies, layer by layer, the
head-averaged attention mixed with the identity (the residual stream), ``0.5 A + 0.5 I``, each row
renormalised to sum to 1, batched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import VitlabError
from .attention import SiteAccumulators, _check_attention, _pair
from .registry import Analysis, Context, Figure
from .results import to_jsonable

__all__ = [
    "LOCAL_MASS",
    "OFFSET_SHARE",
    "HEAD_LABELS",
    "aligned_attention",
    "attention_entropy",
    "classify_heads",
    "head_offsets",
    "attention_rollout",
    "AttentionHeads",
    "HeadsResult",
]

LOCAL_MASS = 0.5
OFFSET_SHARE = 0.3
HEAD_LABELS = ("local", "offset-local", "global")
_CHUNK_ELEMENTS = 1 << 22  # float64 elements of attention handled at once (~32 MB)


def _patch_rows(attn: Tensor, prefix_tokens: int) -> Tensor:
    """Patch-to-patch attention in float64, each row renormalised over the patches (0 if it had no mass)."""
    a = attn[:, :, prefix_tokens:, prefix_tokens:].to(torch.float64)
    mass = a.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, a / torch.where(mass > 0, mass, 1.0), 0.0)


def _canvas_index(grid: tuple[int, int], device: torch.device) -> Tensor:
    """For every (query, key) pair of the grid, its cell in the (2g-1)^2 canvas centred on the query."""
    gh, gw = grid
    r, c = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    r, c = r.flatten(), c.flatten()
    dr = r[None, :] - r[:, None] + gh - 1  # key row - query row, shifted to >= 0
    dc = c[None, :] - c[:, None] + gw - 1
    return (dr * (2 * gw - 1) + dc).flatten()  # (queries * keys,)


def _sums(attn: Tensor, grid: tuple[int, int], prefix_tokens: int) -> tuple[Tensor, Tensor, int]:
    """Per-head sums over images and queries: aligned canvases (heads, canvas) and entropies (heads,)."""
    batch, heads = attn.shape[:2]
    gh, gw = grid
    index = _canvas_index(grid, attn.device)
    canvas = torch.zeros(heads, (2 * gh - 1) * (2 * gw - 1), dtype=torch.float64, device=attn.device)
    entropy = torch.zeros(heads, dtype=torch.float64, device=attn.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, heads * (gh * gw) ** 2))
    for start in range(0, batch, step):
        p = _patch_rows(attn[start:start + step], prefix_tokens)  # b, heads, Q, K
        canvas.index_add_(1, index, p.sum(0).flatten(1))
        entropy += -(p * torch.log(torch.where(p > 0, p, 1.0))).sum(-1).sum(dim=(0, 2))
    return canvas.view(heads, 2 * gh - 1, 2 * gw - 1), entropy, batch * gh * gw


def aligned_attention(attn: Tensor, grid: int | tuple[int, int], prefix_tokens: int = 1) -> Tensor:
    """Mean aligned attention map of every head: float64 (heads, 2*rows - 1, 2*cols - 1).

    ``attn`` is (batch, heads, T, T) with ``T = prefix_tokens + rows * cols``. Cell ``(rows - 1 + dy,
    cols - 1 + dx)`` holds the mean attention a query gives the patch ``dy`` rows and ``dx`` columns
    away; each map sums to 1 (for heads that put some mass on patches).
    """
    grid_hw = _pair(grid, "grid")
    _check_attention(attn, grid_hw, prefix_tokens)
    with torch.no_grad():
        canvas, _, count = _sums(attn.detach(), grid_hw, prefix_tokens)
    return canvas / count


def attention_entropy(attn: Tensor, grid: int | tuple[int, int], prefix_tokens: int = 1) -> Tensor:
    """Mean entropy (nats) of every head's attention over the patches: float64 (heads,)."""
    grid_hw = _pair(grid, "grid")
    _check_attention(attn, grid_hw, prefix_tokens)
    with torch.no_grad():
        _, entropy, count = _sums(attn.detach(), grid_hw, prefix_tokens)
    return entropy / count


def head_offsets(aligned: Tensor | np.ndarray) -> np.ndarray:
    """Centre-of-mass offset of each aligned map from its centre, in [-1, 1] canvas units: (heads,)."""
    maps = np.asarray(aligned, dtype=np.float64)
    heads, h, w = maps.shape
    ys = (np.arange(h) - (h - 1) / 2) / max((h - 1) / 2, 1)
    xs = (np.arange(w) - (w - 1) / 2) / max((w - 1) / 2, 1)
    mass = maps.sum(axis=(1, 2))
    safe = np.where(mass > 0, mass, 1.0)
    cy = (maps.sum(axis=2) * ys).sum(axis=1) / safe
    cx = (maps.sum(axis=1) * xs).sum(axis=1) / safe
    return np.hypot(cy, cx)


def classify_heads(aligned: Tensor | np.ndarray, local_mass: float = LOCAL_MASS,
                   offset_share: float = OFFSET_SHARE) -> list[str]:
    """Label each head ``local``, ``offset-local`` or ``global`` from its aligned map (module docstring)."""
    maps = np.asarray(aligned, dtype=np.float64)
    _, h, w = maps.shape
    cy, cx = (h - 1) // 2, (w - 1) // 2
    # Pad by one cell so a 1-row or 1-column grid still has a (partly empty) ring.
    padded = np.pad(maps, ((0, 0), (1, 1), (1, 1)))
    labels = []
    for m in padded:
        total = m.sum()
        if total <= 0:
            labels.append("global")
            continue
        near = m[cy:cy + 3, cx:cx + 3] / total  # the centre and its 8 neighbours
        ring = near.copy()
        ring[1, 1] = -np.inf
        if ring.max() > near[1, 1] and ring.max() >= offset_share:
            labels.append("offset-local")
        elif near.sum() >= local_mass:
            labels.append("local")
        else:
            labels.append("global")
    return labels


@torch.no_grad()
def attention_rollout(attentions: Sequence[Tensor], residual: float = 0.5) -> Tensor:
    """Attention rollout through ``attentions`` (one (batch, heads, T, T) per layer, input first).

    Each layer's heads are averaged and mixed with the identity, ``(1 - residual) A + residual I``,
    every row renormalised to sum to 1; the product runs from the first layer to the last. Returns
    float64 (batch, T, T): row ``i`` is how much each input token contributes to output token ``i``
    (row 0 is the class token's map in a class-token ViT).
    """
    if not attentions:
        raise VitlabError("attention rollout needs the attention of at least one layer")
    if not 0 <= residual <= 1:
        raise VitlabError(f"residual must be in [0, 1], got {residual}")
    rollout = None
    for attn in attentions:
        if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
            raise VitlabError(f"rollout takes (batch, heads, T, T) attention, got shape {tuple(attn.shape)}")
        a = attn.to(torch.float64).mean(dim=1)
        a = (1 - residual) * a + residual * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        if rollout is not None and rollout.shape != a.shape:
            raise VitlabError(f"every layer must have the same tokens for rollout, got {tuple(rollout.shape)} "
                              f"then {tuple(a.shape)}")
        rollout = a if rollout is None else a @ rollout
    return rollout


class AttentionHeads:
    """Streaming aligned maps and entropies per layer: float64 sums only, one batch in memory.

    ``add(layer, attn)`` can be called from a capture hook; :meth:`result` builds the
    :class:`HeadsResult`. All layers must share one token grid (one accumulator per grid for
    hierarchical models).
    """

    def __init__(self, grid: int | tuple[int, int], prefix_tokens: int = 1) -> None:
        self.grid = _pair(grid, "grid")
        if prefix_tokens < 0:
            raise VitlabError(f"prefix_tokens must be >= 0, got {prefix_tokens}")
        self.prefix_tokens = prefix_tokens
        self.canvas: dict[str, Tensor] = {}
        self.entropy: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, layer: str, attn: Tensor) -> None:
        """Add one batch's attention (batch, heads, T, T) of ``layer`` to its aligned-map and entropy sums."""
        _check_attention(attn, self.grid, self.prefix_tokens)
        with torch.no_grad():
            canvas, entropy, count = _sums(attn.detach(), self.grid, self.prefix_tokens)
        if layer in self.canvas:
            if self.canvas[layer].shape != canvas.shape:
                raise VitlabError(f"layer '{layer}' had {self.canvas[layer].shape[0]} heads before, "
                                  f"got {canvas.shape[0]} now")
            self.canvas[layer] += canvas.to(self.canvas[layer].device)
            self.entropy[layer] += entropy.to(self.entropy[layer].device)
            self.counts[layer] += count
        else:
            self.canvas[layer], self.entropy[layer], self.counts[layer] = canvas, entropy, count

    def all_reduce(self) -> None:
        """Add up the running sums of every process (under torchrun; a no-op otherwise)."""
        from ..distributed import all_reduce_fields

        all_reduce_fields(self, ("canvas", "entropy", "counts"))

    def compute(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer: (aligned maps (heads, 2g-1, 2g-1), entropy (heads,))}`` on the CPU, first-seen order."""
        return {layer: ((self.canvas[layer] / n).cpu(), (self.entropy[layer] / n).cpu())
                for layer, n in self.counts.items()}

    def result(self, model: str, labels: Sequence[str] | None = None) -> HeadsResult:
        """The accumulated statistics as a :class:`HeadsResult`; ``labels`` name the layers for plots."""
        stats = self.compute()
        if not stats:
            raise VitlabError("no attention added; call add(layer, attn) before result()")
        names = list(labels) if labels is not None else list(stats)
        return HeadsResult(model, names, [m.numpy() for m, _ in stats.values()], [e.numpy() for _, e in stats.values()])


@dataclass
class HeadsResult:
    """Aligned maps, offsets, labels and entropies of every head of every layer of one model."""

    kind: ClassVar[str] = "attention_heads"

    model: str
    layers: list[str]
    #: Per layer: aligned maps (heads, 2*rows - 1, 2*cols - 1).
    aligned: list[np.ndarray]
    #: Per layer: mean entropy of each head (nats).
    entropy: list[np.ndarray]

    def offsets(self) -> list[np.ndarray]:
        """Per layer: each head's centre-of-mass distance from the query, in [-1, 1] canvas units (heads,)."""
        return [head_offsets(m) for m in self.aligned]

    def labels(self) -> list[list[str]]:
        """Per layer: each head's label, ``local``, ``offset-local`` or ``global`` (:func:`classify_heads`)."""
        return [classify_heads(m) for m in self.aligned]

    def counts(self) -> dict[str, int]:
        """How many heads carry each label, over all layers."""
        flat = [label for layer in self.labels() for label in layer]
        return {label: flat.count(label) for label in HEAD_LABELS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: model, layers, the labelling rule, and per layer labels, offsets, entropy and aligned
        maps; label_counts over all layers."""
        return to_jsonable({
            "model": self.model, "layers": self.layers,
            "rule": {"local_mass": LOCAL_MASS, "offset_share": OFFSET_SHARE},
            "labels": self.labels(), "offsets": self.offsets(), "entropy": self.entropy,
            "label_counts": self.counts(), "aligned": self.aligned,
        })

    def plot(self, ax: Any) -> None:
        """Every head's aligned map, layers as rows and heads as columns, each outlined by its label."""
        from matplotlib.patches import Rectangle

        n_heads = max(m.shape[0] for m in self.aligned)
        h, w = self.aligned[0].shape[1:]
        canvas = np.full((len(self.aligned) * (h + 1) - 1, n_heads * (w + 1) - 1), np.nan)
        colours = {"local": "tab:blue", "offset-local": "tab:orange", "global": "tab:green"}
        labels = self.labels()
        for row, maps in enumerate(self.aligned):
            for col, m in enumerate(maps):
                # Each map scaled to its own peak: the pattern, not the absolute mass, is what to read.
                canvas[row * (h + 1):row * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = m / max(m.max(), 1e-12)
        ax.imshow(canvas, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        for row, layer_labels in enumerate(labels):
            for col, label in enumerate(layer_labels):
                ax.add_patch(Rectangle((col * (w + 1) - 0.5, row * (h + 1) - 0.5), w, h, fill=False,
                                       edgecolor=colours[label], lw=1.2))
        ax.set_yticks([row * (h + 1) + (h - 1) / 2 for row in range(len(self.layers))])
        ax.set_yticklabels(self.layers, fontsize="small")
        ax.set_xticks([col * (w + 1) + (w - 1) / 2 for col in range(n_heads)])
        ax.set_xticklabels([str(c + 1) for c in range(n_heads)], fontsize="small")
        ax.set_xlabel("head")
        counts = self.counts()
        ax.set_title(f"{self.model}\noutlines: blue local {counts['local']}, orange offset-local "
                     f"{counts['offset-local']}, green global {counts['global']}", fontsize="small")


# --- in the suite -------------------------------------------------------------------------------


class AttentionHeadsStream(SiteAccumulators):
    """Aligned maps and entropies of every head, per model and token grid."""

    def __init__(self, context: Context) -> None:
        super().__init__(context, lambda site: AttentionHeads(site.grid, prefix_tokens=site.prefix_tokens))

    def results(self) -> dict[str, HeadsResult]:
        return {name: self._result(name, own) for name, own in self.accumulators.items()}

    def _result(self, name: str, accumulators: dict[tuple, AttentionHeads]) -> HeadsResult:
        """Aligned maps of the sites on the model's main grid (the largest number of sites), in depth order."""
        (key, acc), *_ = sorted(accumulators.items(), key=lambda kv: -len(kv[1].counts))
        stats = acc.compute()
        labels = [site.label for site in self.subjects[name].anatomy.attention if site.label in stats]
        return HeadsResult(name, labels, [stats[label][0].numpy() for label in labels],
                           [stats[label][1].numpy() for label in labels])


def _grid_height(results: list) -> float:
    return 1.0 + 0.8 * max(len(dict.fromkeys(r.layers)) for r in results)


ANALYSIS = Analysis(
    name="attention_heads",
    title="Attention heads: local, offset-local, global",
    caption="Each head's attention averaged over queries and images and re-centred on the query (layers as rows, "
            "heads as columns), outlined blue when local, orange when offset-local (it looks at one neighbour in a "
            "fixed direction) and green when global, by vitlab's documented rule (after Walmer et al.).",
    paper="Walmer et al. 2023 (section 4)",
    needs=("attention",),
    stream=AttentionHeadsStream,
    figures=(Figure(width=4.5, height=_grid_height),),
)
