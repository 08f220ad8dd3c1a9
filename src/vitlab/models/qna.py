"""QnA-ViT: learned queries for efficient local attention (Arar et al., CVPR 2022).

A Query-and-Attend (QnA) layer replaces self-attention's per-token queries by a few *learned*
queries shared by every window: each output position attends over its k x k neighbourhood of
keys and values, like a convolution (shift-invariant, overlapping windows, stride 1 or 2), and
the per-query results are mixed by learned per-offset weights. The hierarchical QnA-ViT (official
JAX/Flax code: github.com/moabarar/qna, ``models/qna_vit.py``) stacks, per stage, global
self-attention blocks (LSA: windowed attention whose window covers the whole stage grid at 224)
and then QnA blocks; the last QnA block of every stage but the last has stride 2 and doubles the
width (its shortcut is a strided 1x1 projection). Stages (tiny): 56x56x64 (2 QnA + down),
28x28x128 (3 QnA + down), 14x14x256 (4 LSA + 2 QnA + down), 7x7x512 (2 LSA); LayerNorm, average
pool, linear head. Tokens stay in (B, H, W, C) layout throughout, as in the official code.

Why QnA is cheap: with queries shared by all windows, ``q . W_k x`` is one small linear map per
position, ``x @ (W_k^T q)``, giving (queries x heads) logits per position instead of keys of full
width, and the softmax-weighted sum over a window factors into two depthwise convolutions (the
official trick): ``sum_p exp(l_p + b_u) s_u v_p`` and ``sum_p exp(l_p + b_u)`` over the window,
whose kernels are the exponentiated relative position bias ``b`` (times the query mixing weights
``s`` for the numerator). Nothing of size (windows x k^2 x width) is ever formed.
:meth:`QnALayer.forward_unfold` is the textbook version that does form it (``F.unfold``), kept as
the reference the tests and the timing compare against.

Attention analyses: a stride-1 QnA layer's queries sit on the same grid as its keys, so its
window softmax, scattered into a dense (B, queries x heads, N, N) map that is zero outside each
k x k window, is a square attention map whose rows sum to 1; the anatomy lists it as an
:class:`AttentionSite` with a ``recompute`` function, one "head" per (learned query, head) pair,
for grids of at most ``DENSE_ATTENTION_MAX_TOKENS`` tokens (a dense map of a 56x56 grid would be
630 MB per image). Stride-2 QnA layers (queries on the coarser grid) are never sites. LSA blocks
are sites when one window covers the stage grid (always the case at the models' own image sizes).

``qna_vit_tiny_32`` adapts tiny to 32x32 images: a 2-pixel patch embedding (16x16 tokens) and
LSA windows equal to the stage grids (4x4, 2x2), so the LSA blocks stay global as at 224.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, lecun_normal_, to_2tuple, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, checkpoint, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..anatomy import Anatomy, AttentionSite, Layer, register_anatomy
from .layers import default_cfg

__all__ = ["QnALayer", "LocalSelfAttention", "QnABlock", "QnAStage", "QnAViT", "qna_attention_probs"]

#: Stride-1 QnA layers on grids with more tokens than this are left out of the attention sites.
DENSE_ATTENTION_MAX_TOKENS = 256

# The official code uses Flax defaults: LayerNorm eps 1e-6 and the tanh approximation of GELU.
_LayerNorm = partial(nn.LayerNorm, eps=1e-6)
_GELU = partial(nn.GELU, approximate="tanh")

# --- blocks ---------------------------------------------------------------------------------------


class QnALayer(nn.Module):
    """Query-and-Attend: learned queries attend over every k x k window of keys and values.

    Input (B, H, W, dim), output (B, ceil(H / stride), ceil(W / stride), out_dim). For every
    output position, each of ``num_queries`` learned queries (split in ``num_heads`` heads) takes a
    softmax over the keys of its window (plus a relative position bias per query, head and window
    offset; positions outside the image are left out); the values it attends to are weighted
    by a learned per-offset scale ``query_scale`` and the queries' results are summed.

    Args:
        dim: input channels.
        out_dim: output channels (queries, keys, values and output projection); ``dim`` if None.
        num_heads: heads; ``out_dim`` must be divisible by it.
        num_queries: learned queries per head (2 in every official model).
        kernel_size: window side k (odd); the window is centred, padding (k - 1) // 2.
        stride: 1, or 2 to downsample as the last block of a stage does.
        normalize_queries: unit-normalise each head's query before scaling by 1/sqrt(head_dim).
    """

    def __init__(
        self,
        dim: int,
        out_dim: int | None = None,
        num_heads: int = 8,
        num_queries: int = 2,
        kernel_size: int = 3,
        stride: int = 1,
        normalize_queries: bool = True,
    ) -> None:
        super().__init__()
        out_dim = out_dim or dim
        if out_dim % num_heads:
            raise ValueError(f"QnA width {out_dim} is not divisible by {num_heads} heads")
        if kernel_size % 2 == 0:
            raise ValueError(f"QnA kernel size must be odd, got {kernel_size}")
        self.num_heads, self.num_queries, self.head_dim = num_heads, num_queries, out_dim // num_heads
        self.kernel_size, self.stride, self.padding = kernel_size, stride, (kernel_size - 1) // 2
        self.normalize_queries = normalize_queries
        self.query = nn.Parameter(torch.empty(num_queries, out_dim))
        self.key = nn.Linear(dim, out_dim, bias=False)
        self.value = nn.Linear(dim, out_dim, bias=False)
        # Per query, head and window offset: a bias added to the logits, and a weight on the
        # attended values that mixes the queries (the official "attn_scale_weights").
        self.rel_pos_bias = nn.Parameter(torch.zeros(num_queries, num_heads, kernel_size, kernel_size))
        self.query_scale = nn.Parameter(torch.empty(num_queries, num_heads, kernel_size, kernel_size))
        self.proj = nn.Linear(out_dim, out_dim, bias=False)
        trunc_normal_(self.query, std=self.head_dim**-0.5, a=-2 * self.head_dim**-0.5, b=2 * self.head_dim**-0.5)
        nn.init.normal_(self.query_scale, std=0.02)

    def queries(self) -> torch.Tensor:
        """The learned queries as used: (num_queries, heads, head_dim), normalised and scaled."""
        q = self.query.view(self.num_queries, self.num_heads, self.head_dim)
        if self.normalize_queries:
            q = q / (q.norm(dim=-1, keepdim=True) + 1e-6)
        return q * self.head_dim**-0.5

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Query-key products at every key position, (B, H, W, queries * heads).

        The queries are shared, so ``q . (W_k x)`` is ``x . (W_k^T q)``: one (dim -> queries*heads)
        projection instead of computing keys of full width.
        """
        w_k = self.key.weight.view(self.num_heads, self.head_dim, -1)
        qk = torch.einsum("qhd,hdc->qhc", self.queries(), w_k).flatten(0, 1)
        return F.linear(x, qk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, H, W, dim) -> (B, ceil(H / stride), ceil(W / stride), out_dim): the queries' windowed attention."""
        logits, v = self.logits(x), self.value(x)
        # exp() and the window sums run in float32 even under autocast: exponentials of logits
        # that differ by more than ~17 underflow in float16, and a window could sum to zero.
        with torch.autocast(device_type=x.device.type, enabled=False):
            attend = self._attend if self._convolution_form_is_exact(logits) else self._attend_windows
            out = attend(logits, v)
        return self.proj(out.to(v.dtype))

    def _convolution_form_is_exact(self, logits: torch.Tensor) -> bool:
        """Whether every exp() of the convolution form stays a normal floating-point number.

        That form shifts the logits by one maximum per image (a per-window shift cannot be
        factored out of a convolution), so a window whose logits all sit far below that maximum
        would underflow to zero. When the spread of logits plus position bias in an image passes
        ~90% of the exponent range (~78 in float32), the layer takes the exact window form instead.
        Trained models stay far below it; it guards against diverging runs and extreme inputs.
        """
        dtype = torch.promote_types(logits.dtype, torch.float32)
        spread = (logits.amax(dim=(1, 2)) - logits.amin(dim=(1, 2))).max()
        spread = spread + (self.rel_pos_bias.amax(dim=(-2, -1)) - self.rel_pos_bias.amin(dim=(-2, -1))).max()
        return bool(spread <= -0.9 * math.log(torch.finfo(dtype).tiny))

    def _attend(self, logits: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Window softmax of ``logits`` applied to ``v`` as two depthwise convolutions."""
        b, h, w, _ = v.shape
        nq, nh, hd, k = self.num_queries, self.num_heads, self.head_dim, self.kernel_size
        dtype = torch.promote_types(v.dtype, torch.float32)  # float16/bfloat16 run in float32
        logits, v = logits.to(dtype), v.to(dtype)
        # Softmax is invariant to a shift shared by a whole window; one shift per image, query and
        # head (its maximum) keeps exp() from overflowing (the official code shifts nothing).
        e = (logits - logits.detach().amax(dim=(1, 2), keepdim=True)).exp()  # B, H, W, nq*nh
        ev = e.view(b, h, w, nq, nh, 1) * v.view(b, h, w, 1, nh, hd)  # B, H, W, nq, nh, hd
        bias = self.rel_pos_bias - self.rel_pos_bias.detach().amax(dim=(-2, -1), keepdim=True)
        pos = bias.to(dtype).exp().view(nq * nh, 1, k, k)
        num_kernel = (pos * self.query_scale.to(dtype).view(nq * nh, 1, k, k)).repeat_interleave(hd, dim=0)
        # permute(0, 3, 1, 2) of a (B, H, W, C) tensor is NCHW in channels-last memory: no copy,
        # and the convolutions answer in channels-last, so the division and the sum over queries
        # run on contiguous (B, Ho, Wo, C) views. Zero padding keeps positions outside the image
        # out of both sums, as in the official code.
        num = F.conv2d(ev.flatten(3).permute(0, 3, 1, 2), num_kernel, stride=self.stride,
                       padding=self.padding, groups=nq * nh * hd).permute(0, 2, 3, 1)
        den = F.conv2d(e.permute(0, 3, 1, 2), pos, stride=self.stride, padding=self.padding,
                       groups=nq * nh).permute(0, 2, 3, 1)
        den = den.clamp_min(torch.finfo(dtype).tiny)  # a window whose exp() all underflowed gives 0, not NaN
        out = num.unflatten(3, (nq, nh, hd)) / den.unflatten(3, (nq, nh, 1))
        return out.sum(3).flatten(3)  # B, Ho, Wo, out_dim

    def window_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention probabilities per window and the token each window slot looks at.

        Returns ``probs`` (B, queries, heads, k*k, L), rows over the k*k slots summing to 1 (0 for
        slots outside the image), and ``index`` (k*k, L): the input token (row-major over H x W)
        of each slot of each of the L output positions, -1 outside the image.
        """
        return self._window_softmax(self.logits(x))

    def _window_softmax(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`window_attention` from the logits map (B, H, W, queries * heads)."""
        b, h, w, _ = logits.shape
        nq, nh, k = self.num_queries, self.num_heads, self.kernel_size
        windows = F.unfold(logits.permute(0, 3, 1, 2), k, padding=self.padding, stride=self.stride)
        windows = windows.view(b, nq, nh, k * k, -1) + self.rel_pos_bias.to(logits.dtype).view(1, nq, nh, k * k, 1)
        index = self._window_index(h, w, logits.device)
        return windows.masked_fill(index < 0, float("-inf")).softmax(dim=3), index

    def _window_index(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        k, s, p = self.kernel_size, self.stride, self.padding
        rows = torch.arange(0, h + 2 * p - k + 1, s, device=device)  # window top rows (padded coords)
        cols = torch.arange(0, w + 2 * p - k + 1, s, device=device)
        offs = torch.arange(k, device=device)
        y = (rows.view(1, -1, 1) + offs.view(-1, 1, 1) - p).view(k, 1, -1, 1)  # ky, 1, Ho, 1
        x = (cols.view(1, -1) + offs.view(-1, 1) - p).view(1, k, 1, -1)  # 1, kx, 1, Wo
        valid = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        return torch.where(valid, y * w + x, -1).view(k * k, -1)

    def forward_unfold(self, x: torch.Tensor) -> torch.Tensor:
        """Reference implementation with explicit windows: the same output as ``forward``.

        Materialises the values of every window, (B, out_dim, k*k, L): k*k times the memory of
        the values, which the convolution form of ``forward`` avoids.
        """
        return self.proj(self._attend_windows(self.logits(x), self.value(x)))

    def _attend_windows(self, logits: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Window softmax of ``logits`` applied to ``v`` with explicit windows: exact for any logits."""
        b, h, w, _ = v.shape
        nq, nh, hd, k = self.num_queries, self.num_heads, self.head_dim, self.kernel_size
        dtype = torch.promote_types(v.dtype, torch.float32)
        probs, _ = self._window_softmax(logits.to(dtype))
        weights = (probs * self.query_scale.to(dtype).view(1, nq, nh, k * k, 1)).sum(1)  # B, nh, k*k, L
        v = F.unfold(v.to(dtype).permute(0, 3, 1, 2), k, padding=self.padding, stride=self.stride)
        out = torch.einsum("bhkl,bhdkl->bhdl", weights, v.view(b, nh, hd, k * k, -1))
        ho, wo = (h + 2 * self.padding - k) // self.stride + 1, (w + 2 * self.padding - k) // self.stride + 1
        return out.reshape(b, nh * hd, ho, wo).permute(0, 2, 3, 1)

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Dense attention maps (B, queries * heads, L, H*W): each window's softmax in its row.

        Query ``q``, head ``h`` is "head" ``q * heads + h``. Square (L = H*W) for stride 1.
        """
        probs, index = self.window_attention(x)
        b, nq, nh, kk, length = probs.shape
        dense = probs.new_zeros(b, nq * nh, length, x.shape[1] * x.shape[2])
        target = index.clamp_min(0).t().expand(b, nq * nh, length, kk)  # slots outside add 0 to token 0
        return dense.scatter_add_(3, target, probs.view(b, nq * nh, kk, length).transpose(2, 3))


def qna_attention_probs(module: QnALayer, inputs: tuple) -> torch.Tensor:
    """``AttentionSite.recompute`` for a QnA layer: its dense window attention from its input."""
    return module.attention_probs(inputs[0])


class LocalSelfAttention(nn.Module):
    """Multi-head self-attention in non-overlapping windows with a relative position bias (LSA).

    Input and output (B, H, W, dim); H and W must be multiples of ``window_size``. With one
    window covering the grid (the official configurations at 224) it is global self-attention.
    Follows timm's attention convention: ``fused_attn``, and softmax probabilities of shape
    (B * windows, heads, window^2, window^2) passed through ``attn_drop`` when it is off.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim, self.window_size = num_heads, dim // num_heads, window_size
        self.scale = self.head_dim**-0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                            indexing="ij")).flatten(1)  # 2, w*w
        rel = (coords[:, :, None] - coords[:, None, :]) + window_size - 1  # 2, w*w, w*w, from 0
        self.register_buffer("relative_position_index", rel[0] * (2 * window_size - 1) + rel[1], persistent=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=False)

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, window^2, window^2) bias added to the attention logits."""
        return self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, H, W, dim) -> (B, H, W, dim): self-attention within each ``window_size`` x ``window_size`` window."""
        b, h, w, c = x.shape
        ws = self.window_size
        windows = x.view(b, h // ws, ws, w // ws, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)
        n = windows.shape[0]
        q, k, v = self.qkv(windows).view(n, ws * ws, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias().unsqueeze(0)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                                 dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
            out = self.attn_drop(attn) @ v
        out = self.proj(out.transpose(1, 2).reshape(n, ws * ws, c))
        return out.view(b, h // ws, w // ws, ws, ws, c).transpose(2, 3).reshape(b, h, w, c)


class StridedProjection(nn.Module):
    """The shortcut of a downsampling block: a 1x1 convolution with stride, bias-free, on (B, H, W, C)."""

    def __init__(self, dim: int, out_dim: int, stride: int = 2) -> None:
        super().__init__()
        self.stride = stride
        self.proj = nn.Linear(dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, H, W, dim) -> (B, ceil(H / stride), ceil(W / stride), out_dim)."""
        return self.proj(x[:, :: self.stride, :: self.stride])


class QnABlock(nn.Module):
    """Pre-norm block: ``x = shortcut(x) + attn(norm1(x)); x = x + mlp(norm2(x))`` on (B, H, W, C).

    ``attn`` is the spatial mixer (a :class:`QnALayer` or :class:`LocalSelfAttention`). A
    downsampling block passes a ``shortcut`` (:class:`StridedProjection`) and, as in the
    official code, gets no stochastic depth on its attention branch.
    """

    def __init__(
        self,
        dim: int,
        attn: nn.Module,
        out_dim: int | None = None,
        shortcut: nn.Module | None = None,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = _LayerNorm,
        act_layer: type[nn.Module] = _GELU,
    ) -> None:
        super().__init__()
        out_dim = out_dim or dim
        self.norm1 = norm_layer(dim)
        self.attn = attn
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 and shortcut is None else nn.Identity()
        self.norm2 = norm_layer(out_dim)
        self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio), act_layer=act_layer)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, H, W, dim) -> (B, H', W', out_dim): subsampled by a downsampling block, else the same grid."""
        x = self.shortcut(x) + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class QnAStage(nn.Module):
    """One stage: global/windowed self-attention blocks, then QnA blocks, then (optionally) a
    stride-2 QnA block that doubles the width (official order)."""

    def __init__(
        self,
        dim: int,
        grid_size: tuple[int, int],
        lsa_depth: int,
        lsa_heads: int,
        lsa_window: int,
        qna_depth: int,
        qna_heads: int,
        downsample: bool,
        kernel_size: int = 3,
        num_queries: int = 2,
        mlp_ratio: float = 4.0,
        drop_path: Sequence[float] = (),
        norm_layer: type[nn.Module] = _LayerNorm,
        act_layer: type[nn.Module] = _GELU,
    ) -> None:
        super().__init__()
        self.grid_size = grid_size
        if lsa_depth:
            # Like Swin, a window larger than the grid shrinks to it (an override of img_size).
            lsa_window = min(lsa_window, *grid_size)
            if grid_size[0] % lsa_window or grid_size[1] % lsa_window:
                raise ValueError(f"stage grid {grid_size[0]}x{grid_size[1]} is not divisible by the self-attention "
                                 f"window {lsa_window}; choose lsa_windows or img_size to match")
        self.lsa_window = lsa_window
        self.has_downsample = downsample
        self.grad_checkpointing = False
        dpr = list(drop_path) or [0.0] * (lsa_depth + qna_depth + int(downsample))
        block = partial(QnABlock, mlp_ratio=mlp_ratio, norm_layer=norm_layer, act_layer=act_layer)
        qna = partial(QnALayer, num_queries=num_queries, kernel_size=kernel_size)
        blocks = [block(dim, LocalSelfAttention(dim, lsa_heads, lsa_window), drop_path=dpr[i])
                  for i in range(lsa_depth)]
        blocks += [block(dim, qna(dim, num_heads=qna_heads), drop_path=dpr[lsa_depth + i]) for i in range(qna_depth)]
        if downsample:
            blocks.append(block(dim, qna(dim, 2 * dim, num_heads=2 * qna_heads, stride=2), out_dim=2 * dim,
                                shortcut=StridedProjection(dim, 2 * dim), drop_path=dpr[lsa_depth + qna_depth]))
        self.blocks = nn.Sequential(*blocks)

    def remove_downsample(self) -> None:
        """Drop the stride-2 block that ends this stage (when the stages after it are pruned)."""
        if self.has_downsample:
            self.blocks = self.blocks[:-1]
            self.has_downsample = False

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(block, x) if self.grad_checkpointing and not torch.jit.is_scripting() else block(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, H, W, dim) -> the stage's output: (B, ceil(H / 2), ceil(W / 2), 2 * dim) if it downsamples, else
        (B, H, W, dim)."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_intermediate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, output)``: the map before the downsampling block (at this stage's grid and
        width) and the stage's output (the same map for a stage that does not downsample)."""
        body = self.blocks[:-1] if self.has_downsample else self.blocks
        for block in body:
            x = self._run(block, x)
        return x, (self._run(self.blocks[-1], x) if self.has_downsample else x)


# --- model class ----------------------------------------------------------------------------------


class QnAViT(nn.Module):
    """Hierarchical QnA-ViT: patch embedding, four stages of LSA and QnA blocks, LayerNorm, GAP, head.

    Per-stage settings are tuples of four; stage ``i`` works at width ``embed_dim * 2**i`` on a
    grid of ``img_size / (patch_size * 2**i)`` (every stage but the last ends with a stride-2
    QnA block). Stochastic depth rises linearly over all blocks, downsampling blocks included.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 64,
        qna_depths: Sequence[int] = (2, 3, 2, 0),
        qna_heads: Sequence[int] = (8, 16, 32, 64),
        lsa_depths: Sequence[int] = (0, 0, 4, 2),
        lsa_heads: Sequence[int] = (2, 4, 8, 16),
        lsa_windows: Sequence[int] = (7, 7, 14, 7),
        kernel_size: int = 3,
        num_queries: int = 2,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        num_stages = len(qna_depths)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.img_size = to_2tuple(img_size)
        # The official stem is a bias-free patchify convolution with no norm after it.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, flatten=False, output_fmt="NHWC",
                                      bias=False)
        downsample = [i < num_stages - 1 for i in range(num_stages)]
        num_blocks = sum(lsa_depths) + sum(qna_depths) + num_stages - 1
        dpr = torch.linspace(0, drop_path_rate, num_blocks, device="cpu").tolist()  # also when built on meta
        grid, dim, stages = tuple(self.patch_embed.grid_size), embed_dim, []
        for i in range(num_stages):
            n = lsa_depths[i] + qna_depths[i] + int(downsample[i])
            stages.append(QnAStage(dim, grid, lsa_depths[i], lsa_heads[i], lsa_windows[i], qna_depths[i], qna_heads[i],
                                   downsample[i], kernel_size, num_queries, mlp_ratio, dpr[:n]))
            dpr = dpr[n:]
            if downsample[i]:
                grid, dim = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2)), 2 * dim
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dim
        self.norm = _LayerNorm(dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.feature_info = [dict(num_chs=embed_dim * 2**i, reduction=patch_size * 2**i, module=f"stages.{i}")
                             for i in range(num_stages)]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Flax defaults, as in the official code: LeCun-normal kernels, zero biases.
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            lecun_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names (fnmatch patterns) kept out of weight decay."""
        # The official recipe exempts the position biases and the query mixing weights.
        return {"*.rel_pos_bias", "*.query_scale", "*.relative_position_bias_table"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping the parameters for layer-wise learning rates: patch embedding, then stages/blocks."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier (a Linear, or Identity without classes)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none); ``global_pool`` 'avg' or '' (no pooling)."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised final feature map, (B, H/32, W/32, num_features) for a 4-pixel patch."""
        return self.norm(self.stages(self.patch_embed(x)))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Every stage's feature map at its own resolution, as timm's hierarchical models return them.

        A stage's map is its features before the stride-2 block that ends it (the official code
        downsamples at the end of a stage, timm's Swin at the start): widths ``embed_dim * 2**i`` at
        strides ``patch_size * 2**i``, a feature pyramid. ``indices`` picks stages (the last n if an
        int, all if None); ``norm`` applies the final LayerNorm to the last stage's map, the only one
        of its width; ``stop_early`` skips the stages after the last one taken; ``output_fmt`` is
        ``"NCHW"`` or the model's own ``"NHWC"``. Returns the intermediates, or
        ``(forward_features output, intermediates)`` unless ``intermediates_only``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', not {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        last = len(self.stages) - 1
        x = self.patch_embed(x)
        intermediates = []
        for i, stage in enumerate(stages):
            if i not in take_indices:
                x = stage(x)
                continue
            features, x = stage.forward_intermediate(x)
            if norm and i == last:
                features = self.norm(features)
            intermediates.append(features.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else features)
        if intermediates_only:
            return intermediates
        # The final norm has the last stage's width: a run stopped earlier returns its map unnormalised.
        return (self.norm(x) if len(stages) == len(self.stages) else x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the final norm, the classifier if asked).

        A new last stage loses its downsampling block too, so the model ends at that stage's
        resolution and width; the final norm (another width) and the classifier go with it.
        """
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_end:
            self.stages[-1].remove_downsample()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0)
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average the map (with ``global_pool="avg"``), then classify unless ``pre_logits``."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> class logits (B, num_classes) (pooled features (B, num_features) without a head)."""
        return self.forward_head(self.forward_features(x))


# --- anatomy --------------------------------------------------------------------------------------


@register_anatomy(QnAViT)
def qna_anatomy(model: QnAViT) -> Anatomy:
    """Patch embedding, then every block labelled stage.block; global LSA and small stride-1 QnA sites."""
    patch = model.patch_embed.patch_size[0]
    # Tokens stay (B, H, W, C) throughout.
    layers, sites = [Layer("patch_embed", "embed", "embed", layout="nhwc")], []
    for s, stage in enumerate(model.stages):
        grid, px = stage.grid_size, (patch * 2**s, patch * 2**s)
        for b, block in enumerate(stage.blocks):
            name, label = f"stages.{s}.blocks.{b}", f"{s + 1}.{b + 1}"
            layers.append(Layer(name, label, layout="nhwc"))
            attn = block.attn
            if isinstance(attn, LocalSelfAttention) and attn.window_size == grid[0] == grid[1]:
                sites.append(AttentionSite(f"{name}.attn", label, attn.num_heads, grid, px))
            elif isinstance(attn, QnALayer) and attn.stride == 1 and grid[0] * grid[1] <= DENSE_ATTENTION_MAX_TOKENS:
                sites.append(AttentionSite(f"{name}.attn", label, attn.num_queries * attn.num_heads, grid, px,
                                           recompute=qna_attention_probs))
    return Anatomy(family="qna", layers=layers, attention=sites, grid=tuple(model.patch_embed.grid_size),
                   prefix_tokens=0, patch_size=tuple(model.patch_embed.patch_size), image_size=model.img_size)


# --- builder --------------------------------------------------------------------------------------


def _create_qna_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> QnAViT:
    """Build ``variant``; ``features_only=True`` gives timm's feature extractor over every stage."""
    num_stages = len(kwargs.get("qna_depths", (2, 3, 2, 0)))
    return build_model_with_cfg(QnAViT, variant, pretrained,
                                feature_cfg=dict(out_indices=tuple(range(num_stages)), feature_cls="getter"), **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "qna_vit_tiny": default_cfg(224, 1000, pool_size=(7, 7)),
        "qna_vit_small": default_cfg(224, 1000, pool_size=(7, 7)),
        "qna_vit_base": default_cfg(224, 1000, pool_size=(7, 7)),
        "qna_vit_tiny_32": default_cfg(32, 10, pool_size=(2, 2)),
    }
)

# --- registered variants --------------------------------------------------------------------------
# Official configurations (models/qna_vit.py). The paper trains them with stochastic depth 0.05
# (tiny), 0.2 (small) and 0.5 (base); pass drop_path_rate to match.

_TINY = dict(embed_dim=64, qna_depths=(2, 3, 2, 0), qna_heads=(8, 16, 32, 64), lsa_depths=(0, 0, 4, 2),
             lsa_heads=(2, 4, 8, 16), lsa_windows=(7, 7, 14, 7))


@register_model
def qna_vit_tiny(pretrained: bool = False, **kwargs: Any) -> QnAViT:
    """QnA-ViT tiny at 224: width 64, QnA blocks (2, 3, 2, 0), global attention blocks (0, 0, 4, 2)."""
    return _create_qna_vit("qna_vit_tiny", pretrained, **dict(_TINY, **kwargs))


@register_model
def qna_vit_small(pretrained: bool = False, **kwargs: Any) -> QnAViT:
    """QnA-ViT small at 224: width 64, QnA blocks (2, 3, 6, 0), global attention blocks (0, 0, 12, 2)."""
    args = dict(_TINY, qna_depths=(2, 3, 6, 0), lsa_depths=(0, 0, 12, 2))
    return _create_qna_vit("qna_vit_small", pretrained, **dict(args, **kwargs))


@register_model
def qna_vit_base(pretrained: bool = False, **kwargs: Any) -> QnAViT:
    """QnA-ViT base at 224: width 96, small's depths, QnA heads of width 16 and attention heads of 32."""
    args = dict(embed_dim=96, qna_depths=(2, 3, 6, 0), qna_heads=(6, 12, 24, 48), lsa_depths=(0, 0, 12, 2),
                lsa_heads=(3, 6, 12, 24), lsa_windows=(7, 7, 14, 7))
    return _create_qna_vit("qna_vit_base", pretrained, **dict(args, **kwargs))


@register_model
def qna_vit_tiny_32(pretrained: bool = False, **kwargs: Any) -> QnAViT:
    """QnA-ViT tiny for 32x32 images: 2-pixel patches (stage grids 16, 8, 4, 2), global LSA windows."""
    args = dict(_TINY, img_size=32, patch_size=2, num_classes=10, lsa_windows=(16, 8, 4, 2))
    return _create_qna_vit("qna_vit_tiny_32", pretrained, **dict(args, **kwargs))
