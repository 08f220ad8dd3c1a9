"""How much each residual branch adds to its stream (Raghu et al. 2021, section 6).

For a sub-block ``z_out = z + f(LN(z))`` the ratio ``||z|| / ||f(LN(z))||`` of the two norms, per
token, says how strongly the skip connection dominates: a large ratio means the block barely
changes the representation and the skip carries it through. Raghu et al. found the class token's
ratio high in early ViT blocks and low in later ones, and the spatial tokens the other way round.

The ratio is computed per token (the L2 norm over channels; for CNN feature maps, per spatial
position) and averaged over tokens and images, class tokens and spatial tokens apart. Where the
stream and the branch sit comes from the model's anatomy (:class:`~vitlab.anatomy.ResidualSite`):
transformer attention and MLP sub-blocks, a Mixer's token- and channel-mixing MLPs, a CNN's
residual blocks (stream: the block input after its shortcut; branch: the last BatchNorm's output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor

from ..anatomy import ResidualSite
from ..errors import VitlabError
from .registry import Analysis, Context, Stream
from .results import to_jsonable

__all__ = ["token_norms", "SkipRatios", "SkipResult"]


def token_norms(x: Tensor, layout: str) -> Tensor:
    """Float64 L2 norm of every token, (B, tokens), of a (B, T, C), (B, C, T) or (B, C, H, W) tensor."""
    x = x.to(torch.float64)
    if layout == "tokens":
        return x.norm(dim=-1)
    if layout == "transposed":
        return x.norm(dim=1)
    if layout == "channels":
        return x.flatten(2).norm(dim=1)
    raise VitlabError(f"unknown token layout {layout!r}; use 'tokens', 'transposed' or 'channels'")


class SkipRatios:
    """Streaming mean ``||z|| / ||f||`` of every residual site: float64 sums, one batch in memory.

    Use :meth:`hooks` with :class:`~vitlab.capture.Hooks`; each forward pass feeds the
    stream and the branch of every site (in either order) and the ratio is summed as soon as both
    have arrived.
    """

    def __init__(self, sites: Sequence[ResidualSite]) -> None:
        if not sites:
            raise VitlabError("no residual sub-blocks to measure; this model's anatomy describes none")
        self.sites = list(sites)
        n = len(self.sites)
        self.prefix_sum = torch.zeros(n, dtype=torch.float64)
        self.prefix_count = torch.zeros(n, dtype=torch.float64)
        self.spatial_sum = torch.zeros(n, dtype=torch.float64)
        self.spatial_count = torch.zeros(n, dtype=torch.float64)
        self._pending: dict[tuple[int, str], Tensor] = {}

    def hooks(self) -> list[tuple[str, str, Callable[[Tensor], None]]]:
        """``(module path, "input" | "output", fn)`` for :class:`~vitlab.capture.Hooks`."""
        out = []
        for i, site in enumerate(self.sites):
            stream_layout = "channels" if site.layout == "channels" else "tokens"
            out.append((site.stream[0], site.stream[1], self._receiver(i, "stream", stream_layout)))
            out.append((site.branch, "output", self._receiver(i, "branch", site.layout)))
        return out

    def _receiver(self, index: int, side: str, layout: str) -> Callable[[Tensor], None]:
        def receive(tensor: Tensor) -> None:
            # Norms at once: a ResNet adds the shortcut to the branch's tensor in place afterwards.
            self._pending[index, side] = token_norms(tensor, layout).cpu()
            other = (index, "branch" if side == "stream" else "stream")
            if other in self._pending:
                self._add(index, self._pending.pop((index, "stream")), self._pending.pop((index, "branch")))

        return receive

    def _add(self, index: int, stream: Tensor, branch: Tensor) -> None:
        if stream.shape != branch.shape:
            raise VitlabError(f"residual site {self.sites[index].label}: stream has {tuple(stream.shape)} tokens, "
                              f"branch {tuple(branch.shape)}; its anatomy points at the wrong modules")
        ratio = stream / branch.clamp_min(torch.finfo(torch.float64).tiny)
        p = self.sites[index].prefix_tokens
        self.prefix_sum[index] += ratio[:, :p].sum()
        self.prefix_count[index] += ratio[:, :p].numel()
        self.spatial_sum[index] += ratio[:, p:].sum()
        self.spatial_count[index] += ratio[:, p:].numel()

    def all_reduce(self) -> None:
        """Add up the running sums of every process (under torchrun; a no-op otherwise)."""
        from ..distributed import all_reduce_fields

        all_reduce_fields(self, ("prefix_sum", "prefix_count", "spatial_sum", "spatial_count"))

    def result(self, model: str) -> SkipResult:
        """The mean ratios so far as a :class:`SkipResult` for ``model`` (NaN where a site has no such tokens)."""
        if not self.spatial_count.any():
            raise VitlabError("no forward pass seen; run the model inside Hooks(model, ratios.hooks())")
        nan = torch.full_like(self.prefix_sum, float("nan"))
        prefix = torch.where(self.prefix_count > 0, self.prefix_sum / self.prefix_count.clamp_min(1), nan)
        spatial = torch.where(self.spatial_count > 0, self.spatial_sum / self.spatial_count.clamp_min(1), nan)
        return SkipResult(model, [s.label for s in self.sites], [s.kind for s in self.sites],
                          prefix.numpy(), spatial.numpy())


@dataclass
class SkipResult:
    """Mean ``||z|| / ||f||`` of every residual sub-block, for the class token(s) and the spatial tokens."""

    kind: ClassVar[str] = "skip_connections"

    model: str
    sites: list[str]
    kinds: list[str]
    #: Per site; NaN for models without class tokens.
    cls_ratio: np.ndarray
    spatial_ratio: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: model, sites, kinds, and the per-site cls_ratio and spatial_ratio."""
        return to_jsonable({"model": self.model, "sites": self.sites, "kinds": self.kinds,
                            "cls_ratio": self.cls_ratio, "spatial_ratio": self.spatial_ratio})

    def plot(self, ax: Any) -> None:
        """The ratio against depth, one line per sub-block kind, class token dashed (log scale)."""
        kinds = list(dict.fromkeys(self.kinds))
        colours = dict(zip(kinds, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
        for kind in kinds:
            idx = [i for i, k in enumerate(self.kinds) if k == kind]
            depth = np.arange(1, len(idx) + 1)
            ax.plot(depth, self.spatial_ratio[idx], "-o", ms=3, color=colours[kind], label=f"{kind}, spatial tokens")
            if np.isfinite(self.cls_ratio[idx]).any():
                ax.plot(depth, self.cls_ratio[idx], "--s", ms=3, color=colours[kind], label=f"{kind}, class token")
        ax.set_yscale("log")
        ax.axhline(1.0, color="0.6", lw=0.8)
        ax.set_xlabel("block (depth)")
        ax.set_ylabel("||z|| / ||f(z)||")
        ax.set_title(f"{self.model}: ||z|| / ||f(z)||", fontsize="medium")
        ax.legend(fontsize="small")


# --- in the suite -------------------------------------------------------------------------------


class SkipStream(Stream):
    """Skip ratios of every residual site of every model, from forward hooks on stream and branch."""

    def __init__(self, context: Context) -> None:
        self.ratios = {s.name: SkipRatios(s.anatomy.residuals) for s in context.subjects}

    def hooks(self, subject: str) -> list[tuple[str, str, Callable[[Tensor], None]]]:
        return self.ratios[subject].hooks() if subject in self.ratios else []

    def all_reduce(self) -> None:
        for ratios in self.ratios.values():
            ratios.all_reduce()

    def results(self) -> dict[str, SkipResult]:
        return {name: ratios.result(name) for name, ratios in self.ratios.items()}


ANALYSIS = Analysis(
    name="skip_connections",
    title="Skip connections",
    caption="The norm of the residual stream divided by the norm of what each branch adds, against depth, for the "
            "spatial tokens (solid) and the class token (dashed): above 1 the skip connection dominates and the "
            "block changes the representation little (Raghu et al.).",
    paper="Raghu et al. 2021 (section 6, figure 8)",
    needs=("residuals",),
    stream=SkipStream,
)
