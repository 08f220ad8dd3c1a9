"""Convolution as attention (Li et al. 2021, "Can Vision Transformers Perform Convolution?").

One multi-head self-attention layer over P x P patch tokens performs any stride-1 "same"-padded
K x K convolution exactly. The construction (:func:`attention_from_conv`):

* tokens are the flattened P x P patches (C * P * P values each), in row-major grid order, with
  ``R = ceil(reach / P)`` rings of zero-valued *padding tokens* around the grid (``reach`` is how
  many pixels the kernel looks past its centre); softmax cannot give an all-zero row, so a query at
  the border attends to a padding token where the convolution reads zero padding;
* one head per patch offset ``delta`` in ``{-R..R}^2``: ``(2R + 1)^2`` heads, 9 for any K <= 2P + 1;
* content logits are zero (query and key weights are zero) and the relative position bias of head
  ``delta`` is 0 at offset ``delta`` and -inf elsewhere, so the head attends, one-hot, to the patch
  at ``delta`` from the query;
* the value projection of every head is the identity on a patch, and the output projection of head
  ``delta`` is the linear map the kernel induces from the patch at ``delta`` to the query's patch;
  the convolution's bias becomes the output projection's bias.

:class:`PatchSelfAttention` is that layer in general form (learned query/key/value/output
projections and relative position bias), so the construction can also initialise attention as a
convolution for small-data training. :func:`conv_attention_error` checks a construction against
its convolution and returns a result object whose figure shows each head's attention offset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import VitlabError
from ..options import option
from .registry import Analysis, Context
from .results import to_jsonable

__all__ = ["PatchSelfAttention", "attention_from_conv", "conv_attention_error", "ConvAttentionResult"]


class PatchSelfAttention(nn.Module):
    """Multi-head self-attention over P x P patch tokens of an image, back to an image.

    (B, C, H, W) -> tokens (B, N, C*P*P) -> attention -> tokens (B, N, D*P*P) -> (B, D, H, W). The
    token grid is surrounded by ``padding`` rings of zero-valued tokens that serve as keys (the
    value projection has no bias, so they carry zeros); only the image's own tokens are queries.
    Logits are ``q . k / sqrt(qk_dim)`` plus a learned relative position bias per head and grid
    offset (timm's Swin/BEiT-style table over every offset of the padded grid).

    Args:
        in_chans: channels C of the input image.
        out_chans: channels D of the output image.
        patch_size: patch side P; H and W must be multiples of it.
        grid_size: (rows, cols) of the image's patch grid (H / P, W / P), which sizes the bias table.
        num_heads: heads.
        padding: rings of padding tokens around the grid.
        qk_dim: per-head query/key width (default: one patch, C*P*P).
        v_dim: per-head value width (default: one patch, C*P*P).
        bias: whether the output projection has a bias.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        patch_size: int,
        grid_size: tuple[int, int],
        num_heads: int,
        padding: int = 0,
        qk_dim: int | None = None,
        v_dim: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_chans, self.out_chans, self.patch_size = in_chans, out_chans, patch_size
        self.grid_size, self.num_heads, self.padding = tuple(grid_size), num_heads, padding
        token_dim = in_chans * patch_size**2
        self.qk_dim, self.v_dim = qk_dim or token_dim, v_dim or token_dim
        self.q = nn.Linear(token_dim, num_heads * self.qk_dim, bias=False)
        self.k = nn.Linear(token_dim, num_heads * self.qk_dim, bias=False)
        self.v = nn.Linear(token_dim, num_heads * self.v_dim, bias=False)  # padding tokens stay zero
        self.proj = nn.Linear(num_heads * self.v_dim, out_chans * patch_size**2, bias=bias)
        rows, cols = (g + 2 * padding for g in self.grid_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_heads, 2 * rows - 1, 2 * cols - 1))
        # For every (query, key) pair: the offset key - query in the padded grid, as a table index.
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        inside = ((r >= padding) & (r < rows - padding) & (c >= padding) & (c < cols - padding)).flatten()
        qr, qc = r.flatten()[inside], c.flatten()[inside]
        dr = r.flatten()[None, :] - qr[:, None] + rows - 1
        dc = c.flatten()[None, :] - qc[:, None] + cols - 1
        self.register_buffer("relative_position_index", dr * (2 * cols - 1) + dc, persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, queries, keys) bias added to the logits."""
        return self.relative_position_bias_table.flatten(1)[:, self.relative_position_index]

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities (B, heads, image tokens, padded tokens) for images ``x``."""
        queries, keys = self._tokens(x)
        return self._probs(queries, keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, H, W) -> (B, out_chans, H, W): attention over the patch tokens, folded back."""
        b, _, h, w = x.shape
        queries, keys = self._tokens(x)
        attn = self._probs(queries, keys)
        v = self.v(keys).view(b, keys.shape[1], self.num_heads, self.v_dim).transpose(1, 2)
        out = self.proj((attn @ v).transpose(1, 2).flatten(2))  # B, N, D*P*P
        return F.fold(out.transpose(1, 2), (h, w), self.patch_size, stride=self.patch_size)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        p = self.patch_size
        if c != self.in_chans or (h // p, w // p) != self.grid_size or h % p or w % p:
            raise VitlabError(f"this layer takes {self.in_chans}x{self.grid_size[0] * p}x{self.grid_size[1] * p} "
                              f"images, got {c}x{h}x{w}")
        tokens = F.unfold(x, p, stride=p).transpose(1, 2)  # B, N, C*P*P, row-major over the grid
        grid = tokens.view(b, *self.grid_size, -1).permute(0, 3, 1, 2)
        padded = F.pad(grid, [self.padding] * 4).flatten(2).transpose(1, 2)  # zero tokens around
        return tokens, padded

    def _probs(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        b = queries.shape[0]
        q = self.q(queries).view(b, -1, self.num_heads, self.qk_dim).transpose(1, 2)
        k = self.k(keys).view(b, -1, self.num_heads, self.qk_dim).transpose(1, 2)
        logits = q @ k.transpose(-2, -1) * self.qk_dim**-0.5 + self.relative_position_bias()
        return logits.softmax(dim=-1)


def _check_conv(conv: nn.Conv2d, patch_size: int) -> tuple[int, int]:
    """The kernel's left/top reach in pixels (its centre offset), after refusing what cannot be built."""
    if not isinstance(conv, nn.Conv2d):
        raise VitlabError(f"attention_from_conv takes an nn.Conv2d, not {type(conv).__name__}")
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
        raise VitlabError("attention_from_conv needs a stride-1, undilated, ungrouped, zero-padded convolution; "
                          f"got stride {conv.stride}, dilation {conv.dilation}, groups {conv.groups}, "
                          f"padding mode {conv.padding_mode!r}")
    kh, kw = conv.kernel_size
    same = ((kh - 1) // 2, (kw - 1) // 2)  # PyTorch's "same": the extra pixel of an even kernel goes right
    if conv.padding != "same" and (tuple(conv.padding) != same or kh % 2 == 0 or kw % 2 == 0):
        raise VitlabError(f"attention_from_conv needs a 'same'-padded convolution (padding='same' or {same} for "
                          f"a {kh}x{kw} kernel), got padding {conv.padding}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise VitlabError(f"patch_size must be a positive integer, got {patch_size!r}")
    return same


def attention_from_conv(conv: nn.Conv2d, patch_size: int, image_size: int | tuple[int, int]) -> PatchSelfAttention:
    """A :class:`PatchSelfAttention` layer that computes exactly what ``conv`` computes.

    ``conv`` must be stride 1 with "same" padding (any kernel size, larger than the patch too,
    with or without bias); ``image_size`` is (H, W), multiples of ``patch_size``. The layer's
    ``num_heads`` is the construction's head count, ``(2R + 1)^2`` with ``R`` the kernel's reach in
    patches. Its parameters are in ``conv``'s dtype and device.
    """
    top, left = _check_conv(conv, patch_size)
    kh, kw = conv.kernel_size
    p = patch_size
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if h % p or w % p:
        raise VitlabError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    reach = max(top, left, kh - 1 - top, kw - 1 - left)  # pixels the kernel reaches past its centre
    radius = math.ceil(reach / p)
    offsets = [(dr, dc) for dr in range(-radius, radius + 1) for dc in range(-radius, radius + 1)]
    d_out, c_in = conv.out_channels, conv.in_channels
    weight = conv.weight.detach()
    layer = PatchSelfAttention(c_in, d_out, p, (h // p, w // p), len(offsets), padding=radius,
                               bias=conv.bias is not None).to(dtype=weight.dtype, device=weight.device)
    token = c_in * p * p
    with torch.no_grad():
        layer.q.weight.zero_()
        layer.k.weight.zero_()
        layer.v.weight.copy_(torch.eye(token, dtype=weight.dtype).repeat(len(offsets), 1))
        table = layer.relative_position_bias_table
        table.fill_(float("-inf"))
        rows, cols = table.shape[1] // 2, table.shape[2] // 2  # index of offset (0, 0)
        # Output pixel (i, j) of the query patch reads input pixel (i', j') of the patch at
        # (dr, dc) through kernel tap (dr*P + i' - i + top, dc*P + j' - j + left), where in range.
        i = torch.arange(p)
        tap_r = (i[None, :] - i[:, None])  # [i, i'] -> i' - i
        proj = torch.zeros(d_out, p, p, len(offsets), c_in, p, p, dtype=weight.dtype, device=weight.device)
        for head, (dr, dc) in enumerate(offsets):
            table[head, rows + dr, cols + dc] = 0.0
            ur, uc = dr * p + tap_r + top, dc * p + tap_r + left  # (i, i') and (j, j') tap indices
            ok_r, ok_c = (ur >= 0) & (ur < kh), (uc >= 0) & (uc < kw)
            taps = weight[:, :, ur.clamp(0, kh - 1)][:, :, :, :, uc.clamp(0, kw - 1)]  # D, C, i, i', j, j'
            taps = taps * (ok_r[:, :, None, None] & ok_c[None, None, :, :]).to(weight.dtype)
            proj[:, :, :, head] = taps.permute(0, 2, 4, 1, 3, 5)  # D, i, j, C, i', j'
        layer.proj.weight.copy_(proj.reshape(d_out * p * p, len(offsets) * token))
        if conv.bias is not None:
            layer.proj.bias.copy_(conv.bias.detach().repeat_interleave(p * p))
    return layer


@dataclass
class ConvAttentionResult:
    """How exactly a constructed attention layer reproduces its convolution, and where its heads look."""

    kind: ClassVar[str] = "conv_attention"

    kernel_size: tuple[int, int]
    patch_size: int
    num_heads: int
    max_abs_error: float
    #: (heads, 2R+1, 2R+1): attention of a central query of each head over the neighbouring patches.
    head_maps: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: kernel_size, patch_size, num_heads, max_abs_error and head_maps (heads, 2R+1, 2R+1)."""
        return to_jsonable({"kernel_size": list(self.kernel_size), "patch_size": self.patch_size,
                            "num_heads": self.num_heads, "max_abs_error": self.max_abs_error,
                            "head_maps": self.head_maps})

    def plot(self, ax: Any) -> None:
        """Each head's one-hot attention around the query patch, tiled in head order."""
        heads, side, _ = self.head_maps.shape
        cols = math.ceil(math.sqrt(heads))
        rows = math.ceil(heads / cols)
        canvas = np.full((rows * (side + 1) - 1, cols * (side + 1) - 1), np.nan)
        for h in range(heads):
            r, c = divmod(h, cols)
            canvas[r * (side + 1):r * (side + 1) + side, c * (side + 1):c * (side + 1) + side] = self.head_maps[h]
        ax.imshow(canvas, cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{self.kernel_size[0]}x{self.kernel_size[1]} conv = {self.num_heads} heads on "
                     f"{self.patch_size}x{self.patch_size} patches\nmax |attention - conv| = {self.max_abs_error:.1e}",
                     fontsize="small")


@torch.no_grad()
def conv_attention_error(conv: nn.Conv2d, patch_size: int, image_size: int = 16, batch: int = 2,
                         seed: int = 0) -> ConvAttentionResult:
    """Build :func:`attention_from_conv` and compare it with ``conv`` on random images."""
    layer = attention_from_conv(conv, patch_size, image_size)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, conv.in_channels, image_size, image_size, generator=gen).to(conv.weight)
    error = (layer(x) - conv(x)).abs().max().item()
    g = image_size // patch_size
    query = (g // 2) * g + g // 2  # a central patch
    attn = layer.attention(x)[0, :, query]  # heads, padded tokens
    pad, side = layer.padding, g + 2 * layer.padding
    centre_r, centre_c = g // 2 + pad, g // 2 + pad
    maps = attn.view(layer.num_heads, side, side)[:, centre_r - pad:centre_r + pad + 1,
                                                  centre_c - pad:centre_c + pad + 1]
    return ConvAttentionResult(tuple(conv.kernel_size), patch_size, layer.num_heads, error, maps.double().cpu().numpy())


# --- in the suite -------------------------------------------------------------------------------


@dataclass
class ConvAttentionOptions:
    """Options of the convolution-as-attention construction."""

    patch: int = option(4, metavar="P", check=lambda v: v >= 1, must="be at least 1",
                        help="patch size of the construction of a model's first stride-1 convolution")


def run(context: Context) -> dict[str, ConvAttentionResult]:
    """The first stride-1 'same' convolution of every subject, rebuilt exactly as attention."""
    patch = context.options.patch
    size = patch * 4
    out = {}
    for s in context.subjects:
        conv = None
        for module in s.model.modules():  # the first convolution the construction can rebuild
            if isinstance(module, nn.Conv2d):
                try:
                    attention_from_conv(module, patch, size)
                except VitlabError:
                    continue
                conv = module
                break
        if conv is None:
            context.note(f"convolution as attention: {s.name} has no stride-1 'same' convolution to rebuild")
            continue
        out[s.name] = conv_attention_error(conv, patch, image_size=size)
    return out


ANALYSIS = Analysis(
    name="conv_attention",
    title="Convolution as attention",
    caption="A stride-1 convolution of each model rebuilt exactly as one multi-head self-attention layer over "
            "patches (Li et al.): each tile shows where one head attends around the query patch, and the title the "
            "largest difference from the convolution's own output.",
    paper="Cordonnier et al. 2020; Li et al. 2021",
    options=ConvAttentionOptions,
    prefix="conv_attention_",
    run=run,
)
