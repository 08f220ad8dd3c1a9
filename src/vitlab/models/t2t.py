"""T2T-ViT: Tokens-to-Token Vision Transformers (Yuan et al., ICCV 2021).

Instead of cutting the image into disjoint patches, T2T-ViT tokenizes progressively: a "soft
split" (``nn.Unfold``) gathers overlapping neighbourhoods into tokens, a small token-to-token
layer re-structures them, the tokens are folded back onto their grid and soft-split again. At
224 pixels the splits are 7/4, 3/2 and 3/2 (kernel/stride), so the grid goes 56x56 -> 28x28 ->
14x14, with two token-to-token layers in between: Performers (``t2t_vit_N``) or one-head
Transformers (``t2t_vit_t_N``). A plain ViT backbone (timm's ``Block``, class token, frozen 1-D
sinusoid position embedding) follows.

Exact to the official code (yitu-opensource/T2T-ViT), quirks included, so the parameter counts
are the published totals (frozen parameters count: the sinusoid table and each Performer's
random-feature matrix):

* token-to-token layers map ``dim`` inputs to ``token_dim`` (64) outputs, so their residual
  around attention is ``v`` (which already has the output width), not the input;
* the Transformer T2T attention scales by the *input* width, ``dim ** -0.5``, not the head width;
* the Performer has a biased ``kqv`` projection, ``m = token_dim / 2`` orthogonal random features
  (frozen, scaled by sqrt(m)), the positive feature map ``exp(w.x - |x|^2 / 2) / sqrt(m)``, an
  epsilon of 1e-8 in its normaliser, and a fixed dropout of 0.1 (in training only).

32x32 variants (``t2t_vit_7_32``, ``t2t_vit_14_32``, ``t2t_vit_t_14_32``): the paper's splits
would leave a 2x2 grid (32/16). Only the first split changes, to 3/1 (padding 1): a 3x3
neighbourhood around every pixel, so the first token-to-token layer sees a 32x32 grid; the two
3/2 splits stay, giving 16x16 and then an 8x8 grid of 4-pixel tokens (plus the class token), the
same grid as vitlab's ViT/4 models. The first split keeps its overlap (kernel larger than
stride), which is what a "soft" split is about.
"""

from __future__ import annotations

import math
from typing import Any, Final, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, to_2tuple, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block

from ..anatomy import Anatomy, AttentionSite, Layer, register_anatomy, vit_block_residuals
from .layers import BlockIntermediates, default_cfg

__all__ = ["T2TViT", "TokensToToken", "TokenPerformer", "TokenTransformer", "sinusoid_position_table"]

# (kernel, stride, padding) of the three soft splits.
SoftSplits = Sequence[tuple[int, int, int]]
PAPER_SPLITS: SoftSplits = ((7, 4, 2), (3, 2, 1), (3, 2, 1))
SPLITS_32: SoftSplits = ((3, 1, 1), (3, 2, 1), (3, 2, 1))

# --- blocks ---------------------------------------------------------------------------------------


def sinusoid_position_table(num_positions: int, dim: int) -> torch.Tensor:
    """The 1-D sinusoid table of "Attention is all you need", shape (1, num_positions, dim).

    Position ``p``, channel ``j``: ``sin`` (even ``j``) or ``cos`` (odd ``j``) of
    ``p / 10000 ** (2 * (j // 2) / dim)``. T2T-ViT numbers the class token 0 and the grid tokens
    1.. in row-major order.
    """
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    channel = torch.arange(dim, dtype=torch.float64)
    angle = position / torch.pow(10000.0, 2 * torch.div(channel, 2, rounding_mode="floor") / dim)
    table = torch.where(channel.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


class TokenPerformer(nn.Module):
    """Performer token-to-token layer: linear-cost attention with positive random features.

    Maps tokens of width ``dim`` to width ``out_dim``. Attention is approximated as
    ``phi(q) (phi(k)^T v) / (phi(q) sum_t phi(k_t))`` with ``phi(x) = exp(w x - |x|^2/2) / sqrt(m)``,
    so no (tokens x tokens) map is ever formed: not an attention site for the analyses.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        kernel_ratio: float = 0.5,
        proj_drop: float = 0.1,
        mlp_drop: float = 0.1,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.eps = eps  # keeps the normaliser away from zero
        self.norm1 = nn.LayerNorm(dim)
        self.kqv = nn.Linear(dim, 3 * out_dim)  # official order k, q, v, with bias
        self.proj = nn.Linear(out_dim, out_dim)
        self.dp = nn.Dropout(proj_drop)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = nn.Sequential(  # Sequential so the keys match the official mlp.0 / mlp.2
            nn.Linear(out_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim), nn.Dropout(mlp_drop))
        self.num_random_features = int(out_dim * kernel_ratio)
        # Drawn once and frozen: a parameter (it is saved, and counted) that is never trained.
        self.w = nn.Parameter(torch.empty(self.num_random_features, out_dim), requires_grad=False)
        self.reset_random_features()

    @torch.no_grad()
    def reset_random_features(self) -> None:
        """Draw fresh orthogonal random features, each of norm sqrt(m) as in the official code."""
        nn.init.orthogonal_(self.w)
        self.w.mul_(math.sqrt(self.num_random_features))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Positive random features ``exp(w x - |x|^2 / 2) / sqrt(m)``: (B, T, d) -> (B, T, m)."""
        half_sq_norm = x.pow(2).sum(dim=-1, keepdim=True) / 2
        return torch.exp(x @ self.w.t().to(x.dtype) - half_sq_norm) / math.sqrt(self.num_random_features)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Performer attention of the normalised tokens (B, T, dim) -> (B, T, out_dim), ``v`` as residual."""
        dtype = x.dtype
        # exp() overflows easily in half precision: the kernel runs in float32, as officially.
        with torch.autocast(device_type=x.device.type, enabled=False):
            k, q, v = self.kqv(x).float().split(self.out_dim, dim=-1)
            kp, qp = self.feature_map(k), self.feature_map(q)
            normaliser = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, T, 1)
            y = (qp @ (kp.transpose(1, 2) @ v)) / (normaliser + self.eps)  # (B, T, out_dim)
        # The input has another width, so the residual is v (as in the Transformer T2T layer).
        return v.to(dtype) + self.dp(self.proj(y.to(dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T, dim) -> tokens (B, T, out_dim): Performer attention, then the MLP."""
        x = self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenAttention(nn.Module):
    """One-head self-attention from width ``dim`` to ``out_dim`` with ``v`` as the residual.

    Follows vitlab's capture convention: ``fused_attn`` and, when it is off, the softmax
    probabilities (B, 1, T, T) pass through ``attn_drop``.
    """

    fused_attn: Final[bool]

    def __init__(self, dim: int, out_dim: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = 1  # the official layer only works with one head (its residual squeezes it)
        self.out_dim = out_dim
        self.scale = dim**-0.5  # official quirk: the input width, not the head width (out_dim)
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, 3 * out_dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 1, self.out_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = self.attn_drop(attn) @ v
        out = self.proj_drop(self.proj(out.squeeze(1)))
        return v.squeeze(1) + out


class TokenTransformer(nn.Module):
    """Transformer token-to-token layer: ``x = attn(norm1(x)); x = x + mlp(norm2(x))``."""

    def __init__(self, dim: int, out_dim: int, mlp_ratio: float = 1.0, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, out_dim, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio), out_dim, act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T, dim) -> tokens (B, T, out_dim): one-head attention, then the MLP."""
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _split_grid(size: tuple[int, int], kernel: int, stride: int, padding: int) -> tuple[int, int]:
    return tuple((s + 2 * padding - kernel) // stride + 1 for s in size)


class TokensToToken(nn.Module):
    """The T2T module: soft split, T2T layer, re-fold and soft split (twice), then a projection.

    ``grids[i]`` is the token grid after soft split ``i``; the T2T layers work on ``grids[0]`` and
    ``grids[1]``, the backbone on ``grids[2]``. ``strides[i]`` is the pixel spacing of those tokens.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        tokens_type: str = "performer",
        in_chans: int = 3,
        embed_dim: int = 768,
        token_dim: int = 64,
        soft_splits: SoftSplits = PAPER_SPLITS,
    ) -> None:
        super().__init__()
        if tokens_type not in ("performer", "transformer"):
            raise ValueError(f"tokens_type must be 'performer' or 'transformer', got {tokens_type!r}")
        if len(soft_splits) != 3:
            raise ValueError(f"T2T-ViT has three soft splits (kernel, stride, padding): {soft_splits}")
        self.tokens_type = tokens_type
        self.soft_split0, self.soft_split1, self.soft_split2 = (
            nn.Unfold(kernel_size=k, stride=s, padding=p) for k, s, p in soft_splits)
        widths = [in_chans * soft_splits[0][0] ** 2, token_dim * soft_splits[1][0] ** 2]
        if tokens_type == "performer":
            self.attention1, self.attention2 = (TokenPerformer(w, token_dim) for w in widths)
        else:
            self.attention1, self.attention2 = (TokenTransformer(w, token_dim, mlp_ratio=1.0) for w in widths)
        self.project = nn.Linear(token_dim * soft_splits[2][0] ** 2, embed_dim)

        grid, stride, self.grids, self.strides = to_2tuple(img_size), 1, [], []
        for k, s, p in soft_splits:
            grid, stride = _split_grid(grid, k, s, p), stride * s
            self.grids.append(grid)
            self.strides.append(stride)
        self.img_size = to_2tuple(img_size)
        self.grid_size = self.grids[-1]
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    @staticmethod
    def _fold_to_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, H*W, C) tokens back onto their (B, C, H, W) grid for the next soft split."""
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, H, W) -> tokens (B, num_patches, embed_dim) on the grid ``grids[2]``."""
        x = self.soft_split0(x).transpose(1, 2)  # (B, H0*W0, C*k*k)
        x = self.attention1(x)
        x = self.soft_split1(self._fold_to_map(x, self.grids[0])).transpose(1, 2)
        x = self.attention2(x)
        x = self.soft_split2(self._fold_to_map(x, self.grids[1])).transpose(1, 2)
        return self.project(x)


# --- model class ----------------------------------------------------------------------------------


class T2TViT(BlockIntermediates, nn.Module):
    """T2T-ViT: a tokens-to-token module, then a ViT backbone (timm ``Block``s) with a class token."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        tokens_type: str = "performer",
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        token_dim: int = 64,
        soft_splits: SoftSplits = PAPER_SPLITS,
        global_pool: str = "token",
    ) -> None:
        super().__init__()
        if global_pool != "token":
            raise ValueError(f"T2T-ViT classifies from its class token ('token'), got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1

        self.tokens_to_token = TokensToToken(
            img_size, tokens_type, in_chans, embed_dim, token_dim=token_dim, soft_splits=soft_splits)
        num_patches = self.tokens_to_token.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed, but a parameter (frozen) as officially: it is saved and counted.
        table = sinusoid_position_table(num_patches + 1, embed_dim)
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]  # stochastic depth
        # timm's Block is the official block exactly: no qkv bias by default, scale head_dim**-0.5,
        # GELU MLP; torch's LayerNorm (eps 1e-5) as officially, not timm's default (1e-6).
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=nn.LayerNorm)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        reduction = self.tokens_to_token.strides[-1]
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f"blocks.{i}") for i in range(depth)]

        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay (timm's ViT convention)."""
        return {"cls_token"}  # pos_embed and the random features are frozen anyway

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping the parameters for layer-wise learning rates: T2T module and embedding, then blocks."""
        return dict(stem=r"^cls_token|^pos_embed|^tokens_to_token",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])


    @property
    def grid_size(self) -> tuple[int, int]:
        """The backbone's token grid (rows, columns)."""
        return self.tokens_to_token.grid_size

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier (a Linear, or Identity without classes)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none) on the class token."""
        if global_pool not in (None, "token"):
            raise ValueError(f"T2T-ViT classifies from its class token, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the tokens entering block 1: T2T tokens, class token, position embedding."""
        x = self.tokens_to_token(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)


    def intermediate_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """The token grid of images ``x``: the grid of the last tokens-to-token step."""
        return tuple(self.grid_size)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The class token, classified unless ``pre_logits``."""
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> class logits (B, num_classes) (the class token (B, embed_dim) without a head)."""
        return self.forward_head(self.forward_features(x))


# --- anatomy --------------------------------------------------------------------------------------


@register_anatomy(T2TViT)
def t2t_anatomy(model: T2TViT) -> Anatomy:
    """The two token-to-token layers (as the stem), the embedding, then every backbone block.

    Attention sites: every backbone block (class token + final grid) and, for Transformer T2T
    layers, their one-head attention over their own grid (no prefix token). Performer layers
    never form a (tokens x tokens) map and are no sites.
    """
    t2t = model.tokens_to_token
    layers = [Layer("tokens_to_token.attention1", "t2t1", "stem"),
              Layer("tokens_to_token.attention2", "t2t2", "stem"),
              Layer("pos_drop", "embed", "embed")]  # tokens after class token and position embedding
    layers += [Layer(f"blocks.{i}", f"block{i + 1}") for i in range(len(model.blocks))]
    sites = []
    if t2t.tokens_type == "transformer":
        sites += [AttentionSite(f"tokens_to_token.attention{i + 1}.attn", f"t2t{i + 1}", 1, t2t.grids[i],
                                to_2tuple(t2t.strides[i]), 0) for i in range(2)]
    patch = to_2tuple(t2t.strides[-1])
    sites += [AttentionSite(f"blocks.{i}.attn", f"block{i + 1}", blk.attn.num_heads, t2t.grid_size, patch, 1)
              for i, blk in enumerate(model.blocks)]
    residuals = [site for i in range(len(model.blocks))
                 for site in vit_block_residuals(f"blocks.{i}", f"block{i + 1}", 1)]
    return Anatomy(family="t2t", layers=layers, attention=sites, grid=t2t.grid_size, prefix_tokens=1,
                   patch_size=patch, image_size=t2t.img_size, residuals=residuals,
                   mlp_activations=[(f"block{i + 1}", f"blocks.{i}.mlp.act") for i in range(len(model.blocks))])


# --- builder --------------------------------------------------------------------------------------


def _create_t2t(variant: str, pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """Build ``variant``; ``features_only=True`` gives timm's feature extractor (the last three blocks)."""
    return build_model_with_cfg(T2TViT, variant, pretrained,
                                feature_cfg=dict(out_indices=min(3, kwargs.get("depth", 12)), feature_cls="getter"),
                                **kwargs)


def _cfg(input_size: int = 224, num_classes: int = 1000) -> dict[str, Any]:
    # The official crop is 0.9 at 224; the soft splits have no convolution to name as first_conv.
    return default_cfg(input_size, num_classes, first_conv=None, **({} if input_size == 32 else {"crop_pct": 0.9}))


default_cfgs = generate_default_cfgs(
    {
        "t2t_vit_7": _cfg(),
        "t2t_vit_10": _cfg(),
        "t2t_vit_12": _cfg(),
        "t2t_vit_14": _cfg(),
        "t2t_vit_19": _cfg(),
        "t2t_vit_24": _cfg(),
        "t2t_vit_t_14": _cfg(),
        "t2t_vit_t_19": _cfg(),
        "t2t_vit_t_24": _cfg(),
        "t2t_vit_7_32": _cfg(32, 10),
        "t2t_vit_14_32": _cfg(32, 10),
        "t2t_vit_t_14_32": _cfg(32, 10),
    }
)

# --- registered variants --------------------------------------------------------------------------
# Backbone shapes of the official code (embed_dim, depth, num_heads, mlp_ratio); token_dim is 64.
_T2T_7 = dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0)
_T2T_10 = dict(embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0)
_T2T_12 = dict(embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0)
_T2T_14 = dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0)
_T2T_19 = dict(embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0)
_T2T_24 = dict(embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0)
_PERFORMER = dict(tokens_type="performer")
_TRANSFORMER = dict(tokens_type="transformer")
_SMALL = dict(img_size=32, num_classes=10, soft_splits=SPLITS_32)


@register_model
def t2t_vit_7(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-7 (Performer T2T): 7 blocks, width 256, 4 heads, MLP ratio 2 (4.3M parameters)."""
    return _create_t2t("t2t_vit_7", pretrained, **{**_T2T_7, **_PERFORMER, **kwargs})


@register_model
def t2t_vit_10(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-10 (Performer T2T): 10 blocks, width 256, 4 heads, MLP ratio 2."""
    return _create_t2t("t2t_vit_10", pretrained, **{**_T2T_10, **_PERFORMER, **kwargs})


@register_model
def t2t_vit_12(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-12 (Performer T2T): 12 blocks, width 256, 4 heads, MLP ratio 2."""
    return _create_t2t("t2t_vit_12", pretrained, **{**_T2T_12, **_PERFORMER, **kwargs})


@register_model
def t2t_vit_14(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-14 (Performer T2T): 14 blocks, width 384, 6 heads, MLP ratio 3 (21.5M parameters)."""
    return _create_t2t("t2t_vit_14", pretrained, **{**_T2T_14, **_PERFORMER, **kwargs})


@register_model
def t2t_vit_19(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-19 (Performer T2T): 19 blocks, width 448, 7 heads, MLP ratio 3."""
    return _create_t2t("t2t_vit_19", pretrained, **{**_T2T_19, **_PERFORMER, **kwargs})


@register_model
def t2t_vit_24(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-24 (Performer T2T): 24 blocks, width 512, 8 heads, MLP ratio 3 (64.1M parameters)."""
    return _create_t2t("t2t_vit_24", pretrained, **{**_T2T_24, **_PERFORMER, **kwargs})


@register_model
def t2t_vit_t_14(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT_t-14: T2T-ViT-14 with Transformer T2T layers (21.5M parameters)."""
    return _create_t2t("t2t_vit_t_14", pretrained, **{**_T2T_14, **_TRANSFORMER, **kwargs})


@register_model
def t2t_vit_t_19(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT_t-19: T2T-ViT-19 with Transformer T2T layers."""
    return _create_t2t("t2t_vit_t_19", pretrained, **{**_T2T_19, **_TRANSFORMER, **kwargs})


@register_model
def t2t_vit_t_24(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT_t-24: T2T-ViT-24 with Transformer T2T layers."""
    return _create_t2t("t2t_vit_t_24", pretrained, **{**_T2T_24, **_TRANSFORMER, **kwargs})


@register_model
def t2t_vit_7_32(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-7 for 32x32 images: first soft split 3/1, so the backbone sees 8x8 tokens of 4 pixels."""
    return _create_t2t("t2t_vit_7_32", pretrained, **{**_T2T_7, **_PERFORMER, **_SMALL, **kwargs})


@register_model
def t2t_vit_14_32(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-14 for 32x32 images: first soft split 3/1, so the backbone sees 8x8 tokens of 4 pixels."""
    return _create_t2t("t2t_vit_14_32", pretrained, **{**_T2T_14, **_PERFORMER, **_SMALL, **kwargs})


@register_model
def t2t_vit_t_14_32(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT_t-14 for 32x32 images: Transformer T2T layers on 32x32 and 16x16 grids, then 8x8."""
    return _create_t2t("t2t_vit_t_14_32", pretrained, **{**_T2T_14, **_TRANSFORMER, **_SMALL, **kwargs})
