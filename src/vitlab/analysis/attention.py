"""Mean attention distance per head (Raghu et al. 2021, "Do Vision Transformers See Like CNNs?").

For one head, the attention distance of a query patch ``q`` is ``sum_k A[q, k] * ||pos(q) - pos(k)||``
with positions in pixels; the head's *mean* attention distance averages that over query patches and
images. Small values mean a local head (convolution-like), values near the uniform-attention
distance mean a global one. Raghu et al. plot every head of every layer against depth.

Conventions that change the numbers, and what this module does:

* Prefix tokens (class token, DeiT's distillation token, registers) have no grid position, so their
  rows (queries) and columns (keys) are dropped.
* ``renormalize=True`` (default) rescales each remaining row to sum to 1, so the value describes
  where a head looks *among the patches*. ``renormalize=False`` keeps the raw mass, so attention on
  prefix tokens counts as distance 0 and heads that sink mass into the class token look more local.

Test anchors (14x14 grid, 16-px patches, 1 class token): uniform attention 116.49 px, self only 0,
one 4-neighbour 16 px, uniform with 30% on the class token without renormalisation 81.54 px.

:func:`mean_attention_distance` handles one tensor; :class:`AttentionDistance` streams over batches
and layers (e.g. from forward hooks) and keeps only float64 running sums.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..errors import VitlabError
from .registry import Analysis, Context, Figure, Stream
from .results import to_jsonable

__all__ = [
    "token_positions",
    "mean_attention_distance",
    "AttentionDistance",
    "AttentionDistanceResult",
]

# Upper bound on elements of the float64 copy of attention processed at once: a batch of 256
# ViT-B/16 maps (12 heads, 196^2 patch pairs) would be ~0.9 GB in float64, so the batch is cut into
# chunks of at most ~32 MB instead.
_CHUNK_ELEMENTS = 1 << 22


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """``value`` as a (rows, cols) pair of positive ints, or a one-line ValueError."""
    try:
        items = [value] * 2 if not hasattr(value, "__len__") else list(value)  # type: ignore[arg-type]
        # operator.index accepts numpy/torch integers but rejects floats such as 16.0.
        pair = tuple(operator.index(v) for v in items if not isinstance(v, bool))
    except TypeError:
        pair = ()
    if len(pair) != 2 or min(pair) <= 0:
        raise VitlabError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


def token_positions(grid: int | tuple[int, int], patch_px: int | tuple[int, int]) -> Tensor:
    """Pixel coordinates of the patch centres, one row per patch token.

    Args:
        grid: patch grid as ``g`` (square) or ``(rows, cols)``.
        patch_px: patch size in pixels as ``p`` or ``(height, width)``.

    Returns:
        float64 tensor of shape ``(rows * cols, 2)`` holding ``(y, x)`` = ``(grid row + 0.5) * patch
        height, (grid col + 0.5) * patch width``, in row-major order (the order ViT patch tokens
        use). The half-patch offset puts the point at the patch centre; distances do not depend on it.
    """
    gh, gw = _pair(grid, "grid")
    ph, pw = _pair(patch_px, "patch_px")
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    return torch.stack([(rows.reshape(-1) + 0.5) * ph, (cols.reshape(-1) + 0.5) * pw], dim=1)


def _distance_matrix(grid: int | tuple[int, int], patch_px: int | tuple[int, int]) -> Tensor:
    """(patches, patches) float64 Euclidean distances in pixels between patch centres."""
    pos = token_positions(grid, patch_px)
    return torch.cdist(pos, pos)


def _check_attention(attn: Tensor, grid: tuple[int, int], prefix_tokens: int) -> None:
    """Raise a one-line ValueError unless ``attn`` is (batch, heads, T, T) with T = prefix + patches."""
    if attn.ndim != 4:
        raise VitlabError(
            f"attention must be 4-D (batch, heads, tokens, tokens), got shape {tuple(attn.shape)}"
        )
    if attn.shape[-1] != attn.shape[-2]:
        raise VitlabError(
            f"attention must be square over tokens (batch, heads, T, T), got shape {tuple(attn.shape)}"
        )
    expected = prefix_tokens + grid[0] * grid[1]
    if attn.shape[-1] != expected:
        raise VitlabError(
            f"attention has {attn.shape[-1]} tokens but expected {expected} "
            f"({prefix_tokens} prefix + {grid[0]}x{grid[1]} grid = {grid[0] * grid[1]} patches); "
            f"check grid and prefix_tokens"
        )


def _distance_sums(attn: Tensor, dist: Tensor, prefix_tokens: int, renormalize: bool) -> tuple[Tensor, int]:
    """Per-head sums of query attention distances, summed over images and query patches.

    The one place the maths lives, shared by :func:`mean_attention_distance` and
    :class:`AttentionDistance`. ``attn`` must already be validated; ``dist`` is the float64
    patch-distance matrix on ``attn``'s device.

    Returns:
        ``(sums, count)``: float64 tensor ``(heads,)`` and the number of (image, query) pairs
        summed, so that ``sums / count`` is the mean attention distance per head.
    """
    batch, heads = attn.shape[0], attn.shape[1]
    patches = attn[:, :, prefix_tokens:, prefix_tokens:]  # a view: nothing copied yet
    sums = torch.zeros(heads, dtype=torch.float64, device=attn.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, heads * patches.shape[-1] ** 2))
    for start in range(0, batch, step):
        a = patches[start : start + step].to(torch.float64)
        # sum_k A[q,k] d(q,k) per query; renormalising a row is dividing this by the row's mass,
        # so the normalised matrix never has to be built.
        weighted = torch.einsum("bhqk,qk->bhq", a, dist)
        if renormalize:
            mass = a.sum(dim=-1)
            # An all-zero row (all mass on prefix tokens) has no patch distribution; it contributes
            # 0 rather than NaN, as it does without renormalisation.
            weighted = torch.where(mass > 0, weighted / torch.where(mass > 0, mass, 1.0), 0.0)
        sums += weighted.sum(dim=(0, 2))
    return sums, batch * patches.shape[-1]


def mean_attention_distance(
    attn: Tensor,
    grid: int | tuple[int, int],
    patch_px: int | tuple[int, int],
    prefix_tokens: int = 1,
    renormalize: bool = True,
) -> Tensor:
    """Mean attention distance of every head, in pixels (Raghu et al. 2021).

    Args:
        attn: attention probabilities ``(batch, heads, T, T)`` with ``T = prefix_tokens + rows*cols``;
            prefix tokens come first, patch tokens follow in row-major order.
        grid: patch grid as ``g`` or ``(rows, cols)``.
        patch_px: patch size in pixels as ``p`` or ``(height, width)``.
        prefix_tokens: number of leading non-patch tokens (1 for a class token, 2 for DeiT's class
            and distillation tokens, 0 for GAP models without one). Their rows and columns are dropped.
        renormalize: rescale each patch-to-patch row to sum to 1 (True), or keep the raw mass so
            attention on prefix tokens counts as distance 0 (False).

    Returns:
        float64 tensor ``(heads,)``: mean over images and query patches of
        ``sum_k A[q, k] * ||pos(q) - pos(k)||``, in head order (unsorted).

    Raises:
        ValueError: ``attn`` is not 4-D, not square over tokens, or its token count does not match
            ``prefix_tokens`` and ``grid``.
    """
    grid_hw = _pair(grid, "grid")
    if prefix_tokens < 0:
        raise VitlabError(f"prefix_tokens must be >= 0, got {prefix_tokens}")
    _check_attention(attn, grid_hw, prefix_tokens)
    with torch.no_grad():
        dist = _distance_matrix(grid_hw, patch_px).to(attn.device)
        sums, count = _distance_sums(attn.detach(), dist, prefix_tokens, renormalize)
    return sums / count


class AttentionDistance:
    """Streaming mean attention distance over batches and layers.

    Only float64 running sums are kept, so averaging over a whole data set holds no more than one
    batch of attention at a time; :meth:`add` can be called from a forward hook.

    ``distance_sums[layer]`` and ``query_counts[layer]`` are float64 tensors of shape ``(heads,)``
    on the device of the first attention added for that layer. A distributed caller can all-reduce
    (sum) each of them before :meth:`compute`, provided every rank added the same layers.

    Example::

        acc = AttentionDistance(14, 16, prefix_tokens=1)
        acc.add("blocks.0", attn)          # attn (B, heads, 197, 197)
        acc.compute()                      # {"blocks.0": tensor of shape (heads,)}
        acc.result("vit_b16")              # AttentionDistanceResult
    """

    def __init__(
        self,
        grid: int | tuple[int, int],
        patch_px: int | tuple[int, int],
        prefix_tokens: int = 1,
        renormalize: bool = True,
    ) -> None:
        """Set up an empty accumulator for a ``grid`` of ``patch_px`` patches after ``prefix_tokens``."""
        self.grid = _pair(grid, "grid")
        self.patch_px = _pair(patch_px, "patch_px")
        if prefix_tokens < 0:
            raise VitlabError(f"prefix_tokens must be >= 0, got {prefix_tokens}")
        self.prefix_tokens = prefix_tokens
        self.renormalize = renormalize
        # dicts keep insertion order, which is the layers' first-seen order.
        self.distance_sums: dict[str, Tensor] = {}
        self.query_counts: dict[str, Tensor] = {}
        # The distance matrix is the same for every call; build it once per device.
        self._dist: dict[torch.device, Tensor] = {}

    def _dist_on(self, device: torch.device) -> Tensor:
        if device not in self._dist:
            self._dist[device] = _distance_matrix(self.grid, self.patch_px).to(device)
        return self._dist[device]

    def add(self, layer: str, attn: Tensor) -> None:
        """Add one batch of attention ``(B, heads, T, T)`` for ``layer`` to the running sums."""
        _check_attention(attn, self.grid, self.prefix_tokens)
        heads = attn.shape[1]
        if layer in self.distance_sums and self.distance_sums[layer].numel() != heads:
            raise VitlabError(
                f"layer '{layer}' had {self.distance_sums[layer].numel()} heads before, got {heads} now"
            )
        with torch.no_grad():
            sums, count = _distance_sums(
                attn.detach(), self._dist_on(attn.device), self.prefix_tokens, self.renormalize
            )
            if layer not in self.distance_sums:
                self.distance_sums[layer] = torch.zeros_like(sums)
                self.query_counts[layer] = torch.zeros_like(sums)
            self.distance_sums[layer] += sums.to(self.distance_sums[layer].device)
            self.query_counts[layer] += count

    def all_reduce(self) -> None:
        """Add up the running sums of every process (under torchrun; a no-op otherwise)."""
        from ..distributed import all_reduce_fields

        all_reduce_fields(self, ("distance_sums", "query_counts"))

    def reset(self) -> None:
        """Forget everything added so far."""
        self.distance_sums.clear()
        self.query_counts.clear()

    def compute(self) -> dict[str, Tensor]:
        """Mean attention distance per layer: ``{layer: float64 (heads,) on CPU}``, first-seen order."""
        return {
            layer: (self.distance_sums[layer] / self.query_counts[layer]).cpu()
            for layer in self.distance_sums
        }

    def result(self, model: str) -> AttentionDistanceResult:
        """The accumulated distances as an :class:`AttentionDistanceResult` for ``model``.

        ``image_px`` is filled in (so the plot shows the uniform-attention line) when grid and
        patches are square; ``patch_px`` is an int for square patches, else ``(height, width)``.

        Raises:
            ValueError: nothing was added, or layers have different head counts.
        """
        means = self.compute()
        if not means:
            raise VitlabError("no attention added; call add(layer, attn) before result()")
        head_counts = {m.numel() for m in means.values()}
        if len(head_counts) != 1:
            raise VitlabError(
                f"layers have different head counts {sorted(head_counts)}; "
                f"use compute() for per-layer values instead"
            )
        square = self.grid[0] == self.grid[1] and self.patch_px[0] == self.patch_px[1]
        return AttentionDistanceResult(
            model=model,
            layers=list(means),
            distances=torch.stack(list(means.values())).numpy(),
            patch_px=self.patch_px[0] if self.patch_px[0] == self.patch_px[1] else self.patch_px,
            image_px=self.grid[0] * self.patch_px[0] if square else None,
        )


@dataclass
class AttentionDistanceResult:
    """Mean attention distance of every head of every layer of one model.

    Attributes:
        model: model name.
        layers: layer names, in depth order.
        distances: float64 array ``(layers, heads)`` in pixels, heads in the model's order.
        patch_px: patch size in pixels (``(height, width)`` for non-square patches).
        image_px: input side in pixels; when given, :meth:`plot` draws the distance uniform
            attention over the whole ``image_px // patch_px`` grid would give.
    """

    kind: ClassVar[str] = "attention_distance"

    model: str
    layers: list[str]
    distances: np.ndarray
    patch_px: int | tuple[int, int]
    image_px: int | None = None

    def __post_init__(self) -> None:
        self.layers = list(self.layers)
        self.distances = np.asarray(self.distances, dtype=np.float64)
        if self.distances.ndim != 2 or self.distances.shape[0] != len(self.layers):
            raise VitlabError(
                f"distances must have shape (layers={len(self.layers)}, heads), "
                f"got {self.distances.shape}"
            )

    def sorted_distances(self) -> np.ndarray:
        """``distances`` with each layer's heads sorted ascending (head identity is dropped)."""
        return np.sort(self.distances, axis=1)

    def uniform_distance(self) -> float | None:
        """Mean distance of uniform attention over the full patch grid, in px (None without image_px)."""
        if self.image_px is None:
            return None
        ph, pw = _pair(self.patch_px, "patch_px")
        grid = (self.image_px // ph, self.image_px // pw)
        return float(_distance_matrix(grid, (ph, pw)).mean())

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe numbers: model, layers, patch_px, image_px and distances ``[layer][head]`` in px.

        Each layer's heads are sorted ascending, as Raghu et al. plot them; head identity is not
        kept (head order is arbitrary across models and seeds).
        """
        return to_jsonable(
            {
                "model": self.model,
                "layers": self.layers,
                "patch_px": self.patch_px,
                "image_px": self.image_px,
                "distances": self.sorted_distances(),
            }
        )

    def plot(self, ax: Any) -> None:
        """Raghu et al.'s scatter: every head's mean attention distance against layer depth.

        One dot per head, heads sorted within a layer and coloured by rank; a faint line joins the
        per-layer means; a dashed line marks uniform attention when ``image_px`` is known.
        """
        import matplotlib.pyplot as plt  # lazy: keep matplotlib off the import path of analysis code

        dist = self.sorted_distances()
        n_layers, n_heads = dist.shape
        depth = np.arange(1, n_layers + 1)
        xs = np.repeat(depth, n_heads)
        ranks = np.tile(np.arange(n_heads), n_layers)
        cmap = plt.get_cmap("viridis")
        points = ax.scatter(
            xs, dist.reshape(-1), c=ranks, cmap=cmap, vmin=0, vmax=max(n_heads - 1, 1), s=14, zorder=3
        )
        # nanmean: stages of hierarchical models may have fewer heads (NaN-padded rows).
        ax.plot(depth, np.nanmean(dist, axis=1), color="0.4", alpha=0.4, lw=1, zorder=2, label="layer mean")
        uniform = self.uniform_distance()
        if uniform is not None:
            ax.axhline(uniform, color="0.2", ls="--", lw=1, zorder=1, label="uniform attention")
        if n_heads > 1:
            # A colour bar says "colour = head rank" in little space, whatever the head count.
            bar = ax.figure.colorbar(points, ax=ax, fraction=0.04, pad=0.02)
            bar.set_label("head rank (sorted)")
            bar.set_ticks([0, n_heads - 1])
            bar.set_ticklabels(["lowest", "highest"])
        # Thin the tick labels so long layer names stay readable in deep models.
        stride = max(1, int(np.ceil(n_layers / 12)))
        ticks = depth[::stride]
        ax.set_xticks(ticks)
        long_names = any(len(name) > 4 for name in self.layers)
        ax.set_xticklabels(
            [self.layers[t - 1] for t in ticks],
            rotation=45 if long_names else 0,
            ha="right" if long_names else "center",
            fontsize="small",
        )
        ax.set_xlim(0.5, n_layers + 0.5)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("layer (depth)")
        ax.set_ylabel("mean attention distance (px)")
        ax.set_title(f"{self.model}: mean attention distance")
        ax.legend(loc="lower right", fontsize="small")


# --- in the suite -------------------------------------------------------------------------------


class SiteAccumulators(Stream):
    """One accumulator per model and token grid (hierarchical models have one grid per stage),
    fed by every attention site of the model; the base of the attention-map analyses."""

    def __init__(self, context: Context, make: Any) -> None:
        self.subjects = {s.name: s for s in context.subjects}
        self.accumulators: dict[str, dict[tuple, Any]] = {}
        self.site_key: dict[tuple[str, str], tuple] = {}
        self.labels = {(s.name, site.name): site.label for s in context.subjects for site in s.anatomy.attention}
        for s in context.subjects:
            own = self.accumulators[s.name] = {}
            for site in s.anatomy.attention:
                key = (site.grid, site.patch_size, site.prefix_tokens)
                self.site_key[s.name, site.name] = key
                if key not in own:
                    own[key] = make(site)

    def attention(self, subject: str) -> list:
        return list(self.subjects[subject].anatomy.attention) if subject in self.subjects else []

    def on_attention(self, subject: str, site: str, probs: Tensor) -> None:
        self.accumulators[subject][self.site_key[subject, site]].add(self.labels[subject, site], probs)

    def all_reduce(self) -> None:
        for own in self.accumulators.values():
            for accumulator in own.values():
                accumulator.all_reduce()


class AttentionDistanceStream(SiteAccumulators):
    """Mean attention distance of every head of every attention site of every model."""

    def __init__(self, context: Context) -> None:
        super().__init__(context, lambda site: AttentionDistance(site.grid, site.patch_size,
                                                                 prefix_tokens=site.prefix_tokens))

    def results(self) -> dict[str, AttentionDistanceResult]:
        return {name: self._result(name, own) for name, own in self.accumulators.items()}

    def _result(self, name: str, accumulators: dict[tuple, AttentionDistance]) -> AttentionDistanceResult:
        """One result per model, sites in depth order; layers with fewer heads are padded with NaN."""
        means = {}
        for acc in accumulators.values():
            means.update({label: m.numpy() for label, m in acc.compute().items()})
        labels = [site.label for site in self.subjects[name].anatomy.attention]
        table = np.full((len(labels), max(len(m) for m in means.values())), np.nan)
        for row, label in enumerate(labels):
            table[row, :len(means[label])] = means[label]
        (grid, patch, _), *others = accumulators
        # The "uniform attention" reference line exists only when every site shares one square grid.
        image_px = grid[0] * patch[0] if not others and grid[0] == grid[1] and patch[0] == patch[1] else None
        return AttentionDistanceResult(name, labels, table, patch_px=patch[0], image_px=image_px)


ANALYSIS = Analysis(
    name="attention_distance",
    title="Attention distance",
    caption="Each dot is one head's mean distance in pixels between a query patch and the patches it attends to "
            "(attention-weighted, class token excluded, over {n} images): low dots are local, convolution-like "
            "heads, dots near the dashed line global (Raghu et al.: early layers mix both only when trained on "
            "enough data).",
    paper="Dosovitskiy et al. 2021 (figure 7); Raghu et al. 2021 (figures 3-4)",
    needs=("attention",),
    stream=AttentionDistanceStream,
    figures=(Figure(arrange="each", width=6.0, height=4.0, title="Attention distance: {key}"),),
)
