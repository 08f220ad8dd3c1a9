"""DHVT, the Dynamic Hybrid Vision Transformer (Lu et al., NeurIPS 2022).

"Bridging the Gap Between Vision Transformers and Convolutional Neural Networks on Small
Datasets" gives a plain ViT three convolutional habits so it trains from scratch on CIFAR:

* SOPE (sequential overlapping patch embedding): stride-2 3x3 convolutions with BatchNorm and
  GELU between them instead of one patchify convolution, wrapped in two learnable per-channel
  affine maps (before and after). There is no position embedding: the convolutions and the
  depthwise convolution in every MLP carry the position information.
* DAFF (dynamic aggregation feed-forward): the MLP as 1x1 conv -> BN -> GELU, a depthwise 3x3
  conv -> BN -> GELU with a shortcut around it, then 1x1 conv -> BN, on the patch grid. The class
  token skips the convolutions; it is rescaled channel-wise by a squeeze-excitation of the patch
  output (average pool -> Linear(C, C/4) -> GELU -> Linear(C/4, C), no sigmoid).
* HI-MHSA (head-interaction attention): each head's slice of the tokens is averaged, projected
  to a full-width "head token" (Linear(C/h, C), then LayerNorm(C/h) and GELU on each of its
  C/h-wide pieces) and given a learned embedding per head. The h head tokens join the attention
  and are then averaged into the class token and dropped.

Exact to the official code (github.com/ArieSeirack/DHVT, ``vision_transformer.py``), module
names included, with three differences that change no number: plain BatchNorm2d instead of
SyncBatchNorm; the head tokens sit right after the class token inside the attention
([cls, head tokens, patches] instead of [cls, patches, head tokens]: attention without position
terms is permutation-equivariant, so every output is the same) so the probabilities have the
usual layout of prefix tokens first; and the patch grid is fixed when the model is built
(the official code takes the square root of the token count).

Names: ``dhvt_{tiny,small}_patch{4,2}_32`` (CIFAR) and ``dhvt_{tiny,small}_patch16_224``
(ImageNet), patch sizes spelled as in vitlab's ViTs; the earlier ``dhvt_tiny_p4_32``-style names
still build the same models, with timm's deprecation warning.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, to_2tuple, trunc_normal_, use_fused_attn
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
    register_model_deprecations,
)

from ..anatomy import Anatomy, AttentionSite, Layer, register_anatomy
from .layers import BlockIntermediates, default_cfg

__all__ = ["DHVT", "SOPE", "DAFF", "HeadInteractionAttention", "DHVTBlock"]

# --- blocks ---------------------------------------------------------------------------------------


class Affine(nn.Module):
    """Learnable per-channel scale and shift of a (B, C, H, W) map, starting as the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha + self.beta


def conv3x3_bn(in_chs: int, out_chs: int) -> nn.Sequential:
    """Stride-2 3x3 convolution (no bias: BatchNorm follows) and BatchNorm: one SOPE step."""
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_chs))


class SOPE(nn.Module):
    """Sequential overlapping patch embedding: log2(patch) stride-2 conv-BN steps between affines.

    Widths double up to ``embed_dim`` (patch 16: C/8, C/4, C/2, C), with GELU between the steps.
    The official code builds patch sizes 2, 4 and 16 (8 follows the same rule); with patch 2 its
    single step is followed by a GELU, which the longer stems do not have after their last step.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768) -> None:
        super().__init__()
        steps = int(math.log2(patch_size))
        if patch_size < 2 or 2**steps != patch_size:
            raise ValueError(f"SOPE needs a power-of-two patch size (2, 4, 8, 16), got {patch_size}")
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

        widths = [in_chans] + [embed_dim // 2 ** (steps - 1 - i) for i in range(steps)]
        layers: list[nn.Module] = []
        for i in range(steps):
            layers.append(conv3x3_bn(widths[i], widths[i + 1]))
            if i < steps - 1 or steps == 1:
                layers.append(nn.GELU())
        self.pre_affine = Affine(in_chans)
        self.proj = nn.Sequential(*layers)
        self.post_affine = Affine(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, H, W) -> patch tokens (B, H/patch * W/patch, embed_dim)."""
        x = self.post_affine(self.proj(self.pre_affine(x)))
        return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)


class DAFF(nn.Module):
    """Dynamic aggregation feed-forward: a conv MLP on the patch grid, SE-rescaling of the class token.

    Takes and returns (B, 1 + H*W, C) with the class token first. Dropout is not applied here,
    as in the official code.
    """

    def __init__(self, dim: int, hidden_dim: int, grid_size: tuple[int, int], kernel_size: int = 3,
                 act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.conv1 = nn.Conv2d(dim, hidden_dim, 1)
        self.bn1 = nn.BatchNorm2d(hidden_dim)
        self.conv2 = nn.Conv2d(hidden_dim, hidden_dim, kernel_size, padding=kernel_size // 2, groups=hidden_dim)
        self.bn2 = nn.BatchNorm2d(hidden_dim)
        self.conv3 = nn.Conv2d(hidden_dim, dim, 1)
        self.bn3 = nn.BatchNorm2d(dim)
        self.act = act_layer()
        # Squeeze-excitation for the class token, reduction ratio 4 (fixed in the paper).
        self.compress = nn.Linear(dim, dim // 4)
        self.excitation = nn.Linear(dim // 4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, 1 + H*W, C), class token first -> (B, 1 + H*W, C): patches through the conv MLP, class
        token rescaled."""
        B, _, C = x.shape
        cls_token, tokens = x[:, :1], x[:, 1:]
        x = tokens.transpose(1, 2).reshape(B, C, *self.grid_size)
        x = self.act(self.bn1(self.conv1(x)))
        x = x + self.act(self.bn2(self.conv2(x)))  # depthwise conv with a shortcut around it
        x = self.bn3(self.conv3(x))
        weight = self.excitation(self.act(self.compress(x.mean(dim=(2, 3)))))  # (B, C), no sigmoid
        return torch.cat([cls_token * weight.unsqueeze(1), x.flatten(2).transpose(1, 2)], dim=1)


class HeadInteractionAttention(nn.Module):
    """HI-MHSA: multi-head self-attention over [class token, h head tokens, patch tokens].

    Takes and returns (B, 1 + N, C). The head tokens only live inside the module: after the output
    projection their mean is added to the class token and they are dropped. The probabilities
    (B, heads, 1 + h + N, 1 + h + N) pass through ``attn_drop`` when ``fused_attn`` is off.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = use_fused_attn()

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # Head tokens: one full-width token from each head's mean channel slice.
        self.ht_proj = nn.Linear(self.head_dim, dim)
        self.ht_norm = nn.LayerNorm(self.head_dim)  # on each head_dim-wide piece of a head token
        self.act = nn.GELU()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_heads, dim))  # which head a token came from

    def head_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, heads, C) head tokens of the input tokens x (B, T, C), class token included."""
        B, T, C = x.shape
        ht = self.ht_proj(x.reshape(B, T, self.num_heads, self.head_dim).mean(dim=1))  # (B, h, C)
        ht = self.act(self.ht_norm(ht.reshape(B, self.num_heads, self.num_heads, self.head_dim)))
        return ht.flatten(2) + self.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, 1 + N, C), class token first -> attention output (B, 1 + N, C), head tokens dropped."""
        B, T, C = x.shape
        h = self.num_heads
        x = torch.cat([x[:, :1], self.head_tokens(x), x[:, 1:]], dim=1)
        q, k, v = self.qkv(x).reshape(B, T + h, 3, h, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        x = self.proj(x.transpose(1, 2).reshape(B, T + h, C))
        cls_token, ht, patches = x.split([1, h, T - 1], dim=1)
        x = torch.cat([cls_token + ht.mean(dim=1, keepdim=True), patches], dim=1)
        return self.proj_drop(x)


class DHVTBlock(nn.Module):
    """Pre-norm transformer block with HI-MHSA as the attention and DAFF as the MLP."""

    def __init__(self, dim: int, num_heads: int, grid_size: tuple[int, int], mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = HeadInteractionAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = DAFF(dim, int(dim * mlp_ratio), grid_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, 1 + H*W, C), class token first, through HI-MHSA and DAFF -> tokens of the same shape."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# --- model class ----------------------------------------------------------------------------------


class DHVT(BlockIntermediates, nn.Module):
    """DHVT: SOPE patch embedding, class token, DHVT blocks, LayerNorm, linear head on the class token.

    As in the official code, ``drop_rate`` is the dropout after each attention's output projection
    (DAFF and the head have none); ``drop_path_rate`` grows linearly to the last block.
    """

    def __init__(self, img_size: int | tuple[int, int] = 32, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 100, embed_dim: int = 192, depth: int = 12, num_heads: int = 4,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "token") -> None:
        super().__init__()
        if global_pool != "token":
            raise ValueError(f"DHVT classifies from its class token (global_pool='token'), got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1

        self.patch_embed = SOPE(img_size, patch_size, in_chans, embed_dim)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.norm_pre = nn.Identity()  # no-op hook point (as in timm's ViT): the tokens entering block 1
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows linearly
        self.blocks = nn.Sequential(*[
            DHVTBlock(embed_dim, num_heads, grid, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i])
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # Checkpointed, DAFF's BatchNorm updates its running statistics a second time in training mode
        # (outputs and gradients are unchanged), as any checkpointed BatchNorm does.
        self.grad_checkpointing = False
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self.init_weights()

    def init_weights(self) -> None:
        """The official init: truncated normal (std .02) for tokens and every Linear (head included)."""
        trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, HeadInteractionAttention):
                trunc_normal_(module.pos_embed, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay."""
        return {"cls_token"}  # the official set ("pos_embed", "cls_token") matches only this here

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping the parameters for layer-wise learning rates: SOPE and class token, then blocks."""
        return dict(stem=r"^cls_token|^patch_embed|^norm_pre", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])


    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier (a Linear, or Identity without classes)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none) on the class token."""
        if global_pool not in (None, "token"):
            raise ValueError(f"DHVT classifies from its class token (global_pool='token'), got {global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the tokens entering block 1: SOPE tokens after the class token."""
        x = self.patch_embed(x)
        return self.norm_pre(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1))


    def intermediate_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """The token grid of images ``x``: SOPE's patch grid."""
        return tuple(self.patch_embed.grid_size)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The class token, classified unless ``pre_logits``."""
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> class logits (B, num_classes) (the class token (B, embed_dim) without a head)."""
        return self.forward_head(self.forward_features(x))


# --- anatomy --------------------------------------------------------------------------------------


@register_anatomy(DHVT)
def dhvt_anatomy(model: DHVT) -> Anatomy:
    """Tokens entering block 1, then every block; HI-MHSA per block with 1 + heads prefix tokens."""
    embed = model.patch_embed
    layers = [Layer("norm_pre", "embed", "embed")]
    layers += [Layer(f"blocks.{i}", f"block{i + 1}") for i in range(len(model.blocks))]
    sites = [AttentionSite(f"blocks.{i}.attn", f"block{i + 1}", blk.attn.num_heads, embed.grid_size,
                           embed.patch_size, 1 + blk.attn.num_heads) for i, blk in enumerate(model.blocks)]
    return Anatomy(family="dhvt", layers=layers, attention=sites, grid=embed.grid_size, prefix_tokens=1,
                   patch_size=embed.patch_size, image_size=embed.img_size)


# --- builder --------------------------------------------------------------------------------------


def _create_dhvt(variant: str, pretrained: bool = False, **kwargs: Any) -> DHVT:
    """Build ``variant``; ``features_only=True`` gives timm's feature extractor (the last three blocks)."""
    return build_model_with_cfg(DHVT, variant, pretrained,
                                feature_cfg=dict(out_indices=min(3, kwargs.get("depth", 12)), feature_cls="getter"),
                                **kwargs)


def _cfg(input_size: int = 32, num_classes: int = 100) -> dict[str, Any]:
    # The official data pipeline normalises with ImageNet statistics, CIFAR included.
    return default_cfg(input_size, num_classes, first_conv="patch_embed.proj.0.0", mean=IMAGENET_DEFAULT_MEAN,
                       std=IMAGENET_DEFAULT_STD)


default_cfgs = generate_default_cfgs({
    "dhvt_tiny_patch4_32": _cfg(),
    "dhvt_tiny_patch2_32": _cfg(),
    "dhvt_small_patch4_32": _cfg(),
    "dhvt_small_patch2_32": _cfg(),
    "dhvt_tiny_patch16_224": _cfg(224, 1000),
    "dhvt_small_patch16_224": _cfg(224, 1000),
})

# --- registered variants --------------------------------------------------------------------------
# CIFAR models (official *_cifar_*): 32x32, 100 classes; tiny has 4 heads and small 8 (not the
# DeiT 3 and 6). ImageNet models (official *_imagenet_patch16): DeiT-T/S heads, 1000 classes.
_TINY_32 = dict(img_size=32, num_classes=100, embed_dim=192, depth=12, num_heads=4, mlp_ratio=4.0)
_SMALL_32 = dict(img_size=32, num_classes=100, embed_dim=384, depth=12, num_heads=8, mlp_ratio=4.0)


@register_model
def dhvt_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> DHVT:
    """DHVT-T/4 for 32x32 (CIFAR-100): width 192, 12 blocks, 4 heads, 8x8 patches (6.0M)."""
    return _create_dhvt("dhvt_tiny_patch4_32", pretrained, **dict(_TINY_32, patch_size=4, **kwargs))


@register_model
def dhvt_tiny_patch2_32(pretrained: bool = False, **kwargs: Any) -> DHVT:
    """DHVT-T/2 for 32x32 (CIFAR-100): DHVT-T with 2-pixel patches (16x16 tokens)."""
    return _create_dhvt("dhvt_tiny_patch2_32", pretrained, **dict(_TINY_32, patch_size=2, **kwargs))


@register_model
def dhvt_small_patch4_32(pretrained: bool = False, **kwargs: Any) -> DHVT:
    """DHVT-S/4 for 32x32 (CIFAR-100): width 384, 12 blocks, 8 heads, 8x8 patches."""
    return _create_dhvt("dhvt_small_patch4_32", pretrained, **dict(_SMALL_32, patch_size=4, **kwargs))


@register_model
def dhvt_small_patch2_32(pretrained: bool = False, **kwargs: Any) -> DHVT:
    """DHVT-S/2 for 32x32 (CIFAR-100): the paper's best CIFAR-100 model (85.68%), 22.8M."""
    return _create_dhvt("dhvt_small_patch2_32", pretrained, **dict(_SMALL_32, patch_size=2, **kwargs))


@register_model
def dhvt_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> DHVT:
    """DHVT-T/16 for ImageNet-1k at 224: width 192, 12 blocks, 3 heads, 14x14 patches."""
    args = dict(img_size=224, patch_size=16, num_classes=1000, embed_dim=192, depth=12, num_heads=3)
    return _create_dhvt("dhvt_tiny_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def dhvt_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> DHVT:
    """DHVT-S/16 for ImageNet-1k at 224: width 384, 12 blocks, 6 heads, 14x14 patches (24.0M)."""
    args = dict(img_size=224, patch_size=16, num_classes=1000, embed_dim=384, depth=12, num_heads=6)
    return _create_dhvt("dhvt_small_patch16_224", pretrained, **dict(args, **kwargs))


# Earlier names (``p4`` for the patch size), kept so run directories that store them still build, with
# timm's deprecation warning; the names above spell the patch as vitlab's other models do.
register_model_deprecations(__name__, {
    "dhvt_tiny_p4_32": "dhvt_tiny_patch4_32",
    "dhvt_tiny_p2_32": "dhvt_tiny_patch2_32",
    "dhvt_small_p4_32": "dhvt_small_patch4_32",
    "dhvt_small_p2_32": "dhvt_small_patch2_32",
    "dhvt_tiny_p16_224": "dhvt_tiny_patch16_224",
    "dhvt_small_p16_224": "dhvt_small_patch16_224",
})
