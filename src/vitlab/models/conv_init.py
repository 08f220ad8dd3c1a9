"""Convolutional initialisation of attention, a training option for small data.

One attention head that attends only to the patch at a fixed offset ``Δ`` from its query copies
that patch; K x K heads over the K x K offsets, with their value and output projections, are a
K x K convolution (Cordonnier et al. 2020; Li et al. 2021; :mod:`vitlab.analysis.conv_attention`
builds it exactly). ConViT (d'Ascoli et al. 2021) starts attention *near* that point and lets
training move away from it. timm's ``Attention`` has no position term to do that with, so
:func:`apply_conv_init` gives every timm ``Attention`` of a model a learnable relative position
bias, timm's Swin/BEiT table (:class:`timm.layers.RelPosBias`, one entry per head and patch
offset, ``(2G - 1)^2`` for a G x G grid), initialised to

    b_h(δ) = α (1 - ||δ - Δ_h||²)        δ: key patch minus query patch, in patches

Head ``h``'s own offset gets ``+α``, the four patches next to it 0, further ones less and less.
The class token and registers get no bias (0, in their rows and columns alike), the same as a
patch one step off the target, so with the default ``α = 5`` about 97% of an inner patch query's
attention sits on its offset at initialisation (e^5 against 5 rivals at e^0; α = 4 gives 91%,
ConViT's soft α = 1 only 30%). The query/key/value
weights keep timm's initialisation: the content term ``q·k`` is near zero at first and grows as
training finds it useful, and the bias itself is learned (without weight decay, as Swin's is).

Offsets are dealt to heads nearest first: ``(0, 0)``, the four neighbours, the diagonals, then
the next ring (row-major within one distance). With more heads than the K² offsets the list
starts again (head ``h`` takes offset ``h mod K²``); with fewer, only the nearest ``heads``
offsets are used, so a 4-head ViT with K = 3 looks at its own patch and the ones above, left and
right (a cross, not the full 3 x 3 square).

The converted modules stay timm ``Attention`` (a subclass whose forward adds the bias as timm's
``attn_mask``), so the fused path, ``attn_drop`` on the probabilities and everything vitlab's
capture and spatial entropy probe rely on work unchanged.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, RelPosBias
from timm.layers.attention import resolve_self_attn_mask

from ..anatomy import anatomy
from ..errors import VitlabError

__all__ = ["RelPosAttention", "apply_conv_init", "kernel_offsets", "DEFAULT_STRENGTH"]

#: α: about 97% of an inner patch query's attention on its head's offset at initialisation.
DEFAULT_STRENGTH = 5.0

#: Parameter names (fnmatch patterns) that stay out of weight decay.
_NO_DECAY = "*rel_pos.relative_position_bias_table"


def kernel_offsets(kernel_size: int) -> list[tuple[int, int]]:
    """The K x K patch offsets ``(rows, cols)`` of a kernel, nearest first, row-major within a distance."""
    r = kernel_size // 2
    offsets = [(dr, dc) for dr in range(-r, r + 1) for dc in range(-r, r + 1)]
    return sorted(offsets, key=lambda d: (d[0] ** 2 + d[1] ** 2, d))


class RelPosAttention(Attention):
    """timm's ``Attention`` over ``prefix_tokens`` + a patch grid, plus a learnable relative position bias.

    Made from an existing module by :meth:`from_attention`; the bias lives in ``rel_pos``
    (timm's :class:`~timm.layers.RelPosBias` over the patch grid) and reaches timm's forward as
    an additive ``attn_mask``, so the probabilities still pass through ``attn_drop``.
    """

    rel_pos: RelPosBias
    prefix_tokens: int

    @classmethod
    def from_attention(cls, attn: Attention, grid: tuple[int, int], prefix_tokens: int) -> "RelPosAttention":
        """Turn ``attn`` itself into this class (every weight and setting kept) and add the bias table."""
        attn.__class__ = cls  # not a rebuilt copy: timm's constructor options need not be known
        attn.prefix_tokens = prefix_tokens
        weight = attn.qkv.weight
        attn.rel_pos = RelPosBias(tuple(grid), attn.num_heads, device=weight.device, dtype=weight.dtype)
        return attn

    def position_bias(self) -> torch.Tensor:
        """(1, heads, tokens, tokens) bias on the logits; zero in the prefix tokens' rows and columns."""
        p = self.prefix_tokens
        return F.pad(self.rel_pos.get_bias(), (p, 0, p, 0))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Self-attention over tokens ``x`` (B, tokens, dim) with the position bias added to the logits (and to
        ``attn_mask``, if given); returns (B, tokens, dim)."""
        bias = self.position_bias()
        n = x.shape[1]
        if bias.shape[-1] != n:
            rows, cols = self.rel_pos.window_size
            raise VitlabError(f"this attention's position bias is for {self.prefix_tokens} prefix tokens and a "
                              f"{rows}x{cols} patch grid ({bias.shape[-1]} tokens), not {n} tokens; "
                              "conv init needs the image size the model was built for")
        mask = resolve_self_attn_mask(n, bias, attn_mask, is_causal)  # a caller's mask (MP3's) adds to it
        return super().forward(x, attn_mask=bias if mask is None else bias + mask)


@torch.no_grad()
def _init_table(attn: RelPosAttention, kernel_size: int, strength: float) -> None:
    rows, cols = attn.rel_pos.window_size
    # Row i of timm's table is the offset query - key = (i // (2 cols - 1), i % (2 cols - 1)) - (rows - 1, cols - 1)
    # (gen_relative_position_index), so key - query runs from (rows - 1, cols - 1) down, row-major.
    dr, dc = torch.meshgrid(torch.arange(rows - 1, -rows, -1), torch.arange(cols - 1, -cols, -1), indexing="ij")
    delta = torch.stack([dr.flatten(), dc.flatten()], 1).to(attn.rel_pos.relative_position_bias_table)  # key - query
    offsets = kernel_offsets(kernel_size)
    targets = torch.tensor([offsets[h % len(offsets)] for h in range(attn.num_heads)]).to(delta)
    distance2 = ((delta[:, None, :] - targets[None, :, :]) ** 2).sum(-1)  # (table rows, heads)
    attn.rel_pos.relative_position_bias_table.copy_(strength * (1 - distance2))


def apply_conv_init(model: nn.Module, kernel_size: int = 3, strength: float = DEFAULT_STRENGTH,
                    model_name: str = "") -> list[str]:
    """Give every timm ``Attention`` of ``model`` a relative position bias initialised as a K x K convolution.

    Works in place on any model whose anatomy lists timm ``Attention`` modules over a patch grid
    (vitlab's ``vit_*`` models, CCT, T2T-ViT, early-exit ViTs); returns the converted modules'
    paths. Refuses, in one line, models with none, an even or non-positive ``kernel_size``, a
    kernel larger than the grid, and a non-positive ``strength``.
    """
    name = model_name or type(model).__name__
    if not (isinstance(kernel_size, int) and kernel_size >= 1 and kernel_size % 2 == 1):
        raise VitlabError("conv init takes an odd kernel size such as 3 (a kernel has a centre patch), "
                          f"not {kernel_size}")
    if not (math.isfinite(strength) and strength > 0):
        raise VitlabError(f"conv init strength must be a positive number (default {DEFAULT_STRENGTH}), not {strength}")
    try:
        sites = anatomy(model).attention
    except VitlabError:
        sites = []
    sites = [s for s in sites if type(model.get_submodule(s.name)) is Attention]  # subclasses may compute otherwise
    if not sites:
        raise VitlabError(f"conv init needs timm attention over a patch grid, and {name} has none; use a vitlab "
                          "ViT (vitlab models 'vit_*'), a CCT or a T2T-ViT")
    for site in sites:
        if kernel_size > min(site.grid):
            largest = min(site.grid) if min(site.grid) % 2 else min(site.grid) - 1
            raise VitlabError(f"a {kernel_size}x{kernel_size} conv init does not fit the {site.grid[0]}x{site.grid[1]} "
                              f"patch grid of {name}; use a kernel size of at most {largest}")
    for site in sites:
        attn = RelPosAttention.from_attention(model.get_submodule(site.name), site.grid, site.prefix_tokens)
        _init_table(attn, kernel_size, strength)
    _exclude_from_weight_decay(model)
    return [site.name for site in sites]


def _exclude_from_weight_decay(model: nn.Module) -> None:
    # timm's optimizer factory skips the names model.no_weight_decay() matches; decaying the bias
    # would pull every head back to uniform attention whatever the data says (Swin excludes it too).
    base = getattr(type(model), "no_weight_decay", None)

    def no_weight_decay(self: nn.Module) -> set[str]:
        return {*(base(self) if base is not None else ()), _NO_DECAY}

    model.no_weight_decay = types.MethodType(no_weight_decay, model)
