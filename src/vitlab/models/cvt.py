"""CvT, the Convolutional vision Transformer (Wu et al. 2021, "CvT: Introducing Convolutions to
Vision Transformers"), exact to the official code (github.com/microsoft/CvT, ``cls_cvt.py`` and
``experiments/imagenet/cvt/*.yaml``).

Three stages, each a convolutional token embedding (an overlapping strided convolution and a
LayerNorm) followed by transformer blocks whose attention takes its queries, keys and values from
depthwise-convolution + BatchNorm projections of the token map (stride 2 for keys and values).
What decides the parameter count and the behaviour, as in the official code:

* the attention scale is ``dim ** -0.5`` with ``dim`` the full stage width, not the head width;
* the MLP uses QuickGELU (``x * sigmoid(1.702 x)``), LayerNorms use eps 1e-5;
* q, k and v each get their own depthwise 3x3 convolution (no bias) + BatchNorm, then a linear
  layer with bias;
* there is no position embedding (the convolutions encode position), so any input size works;
* only the last stage has a class token; it bypasses the convolutional projections, goes through
  the linear ones, and is the only token the classifier sees (after the final LayerNorm).

CvT-13 has 19,997,480 and CvT-21 31,622,696 parameters at 1000 classes. CvT-W24 (the wide model
the paper trains on ImageNet-22k and fine-tunes at 384) is built from its official configuration
at 224 by default; there is no published exact count to check it against.

``cvt_13_32`` adapts CvT-13 to 32x32 images by changing only the token embeddings: the official
7x7/stride-4 first embedding would leave 8x8, 4x4 and 2x2 token maps (and a 1x1 key map in stage
3), so every stage here embeds with a 3x3 stride-2 convolution (the official embedding of stages
2 and 3): 16x16, 8x8 and 4x4 tokens, keys and values on 8x8, 4x4 and 2x2 maps. Widths, depths,
heads and attention are CvT-13's.

Keys and values live on a 2x subsampled grid, so the attention probabilities, (batch, heads,
queries, keys), are not square over one token grid: they are captured through ``attn_drop`` like
any timm attention, but not listed as attention sites for the attention-distance analysis.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp, QuickGELU, to_2tuple, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..anatomy import Anatomy, Layer, register_anatomy
from .layers import default_cfg

__all__ = ["CvT", "CvTBlock", "CvTStage", "ConvAttention", "ConvEmbed", "ConvProjection", "checkpoint_filter_fn",
           "Cvt", "CvtBlock", "CvtStage"]

# The official models use LayerNorm with PyTorch's default eps everywhere.
_LayerNorm = partial(nn.LayerNorm, eps=1e-5)

# --- blocks ---------------------------------------------------------------------------------------


class ConvEmbed(nn.Module):
    """Convolutional token embedding: an overlapping strided convolution, then a LayerNorm."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.patch_size, self.stride, self.padding = patch_size, stride, padding
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = LayerNorm2d(dim, eps=1e-5)  # LayerNorm over channels, per position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map (B, in_chans, H, W) -> normalised token map (B, dim, H', W') (see :meth:`output_size`)."""
        return self.norm(self.proj(x))

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Token grid (rows, columns) this embedding makes from a (rows, columns) input."""
        return tuple((s + 2 * self.padding - self.patch_size) // self.stride + 1 for s in size)


class ConvProjection(nn.Module):
    """Depthwise convolution + BatchNorm over the token map, returning tokens (B, H'W', C)."""

    def __init__(self, dim: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=kernel_size // 2, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token map (B, C, H, W) -> projected tokens (B, H'W', C), H' and W' subsampled by ``stride``."""
        return self.bn(self.conv(x)).flatten(2).transpose(1, 2)


class ConvAttention(nn.Module):
    """Multi-head attention whose q, k, v come from convolutional projections of the token map.

    Queries are on the full (H, W) grid, keys and values on the grid subsampled by ``stride_kv``;
    a class token (if the input has one before the grid tokens) skips the convolutions and is
    prepended to all three. With ``fused_attn`` off, the probabilities (B, heads, Tq, Tk) pass
    through ``attn_drop`` (vitlab's capture convention).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        kernel_size: int = 3,
        stride_kv: int = 2,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.stride_kv = stride_kv
        self.scale = dim**-0.5  # the official code scales by the stage width, not the head width
        self.fused_attn = use_fused_attn()
        self.conv_proj_q = ConvProjection(dim, kernel_size, stride=1)
        self.conv_proj_k = ConvProjection(dim, kernel_size, stride=stride_kv)
        self.conv_proj_v = ConvProjection(dim, kernel_size, stride=stride_kv)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        return x.reshape(b, t, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Tokens (B, prefix + H*W, C) over an (H, W) = ``size`` grid -> attention output (B, prefix + H*W, C)."""
        b, n, c = x.shape
        h, w = size
        prefix, grid = x.split([n - h * w, h * w], dim=1)
        grid = grid.transpose(1, 2).reshape(b, c, h, w)
        q = self._heads(self.proj_q(torch.cat([prefix, self.conv_proj_q(grid)], dim=1)))
        k = self._heads(self.proj_k(torch.cat([prefix, self.conv_proj_k(grid)], dim=1)))
        v = self._heads(self.proj_v(torch.cat([prefix, self.conv_proj_v(grid)], dim=1)))
        if self.fused_attn:
            drop = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class CvTBlock(nn.Module):
    """Pre-norm transformer block with convolutional attention and a QuickGELU MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        kernel_size: int = 3,
        stride_kv: int = 2,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = QuickGELU,
        norm_layer: type[nn.Module] = _LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ConvAttention(dim, num_heads, qkv_bias, kernel_size, stride_kv, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Tokens (B, prefix + H*W, C) over an (H, W) = ``size`` grid -> tokens of the same shape."""
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CvTStage(nn.Module):
    """Convolutional token embedding, an optional class token, then ``depth`` blocks.

    Takes and returns a feature map (B, C, H, W); the class token (B, 1, C), or an empty
    (B, 0, C) tensor without one, is returned separately, as the next stage does not use it.
    With ``grad_checkpointing`` each block's activations are recomputed in the backward pass.
    """

    def __init__(
        self,
        in_chans: int,
        dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        patch_stride: int,
        patch_padding: int,
        class_token: bool = False,
        drop_path: Sequence[float] = (),
        proj_drop: float = 0.0,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.patch_embed = ConvEmbed(in_chans, dim, patch_size, patch_stride, patch_padding)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.num_prefix_tokens = int(class_token)
        self.pos_drop = nn.Dropout(proj_drop)
        dpr = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            CvTBlock(dim, num_heads, proj_drop=proj_drop, drop_path=dpr[i], **block_kwargs) for i in range(depth)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature map (B, in_chans, H, W) -> this stage's map (B, dim, H', W') and class token (B, 0 or 1, dim)."""
        x = self.patch_embed(x)
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = self.pos_drop(x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, (h, w))
            else:
                x = block(x, (h, w))
        prefix, x = x.split([self.num_prefix_tokens, h * w], dim=1)
        return x.transpose(1, 2).reshape(b, c, h, w), prefix


# --- model class ----------------------------------------------------------------------------------


class CvT(nn.Module):
    """The Convolutional vision Transformer: three ``CvTStage``s, a final LayerNorm and a linear head.

    ``drop_path_rate`` follows the official configurations, which give stochastic depth to the
    last stage only (rising linearly from 0 within it): a float is that stage's maximum rate, a
    sequence gives one maximum per stage. ``drop_rate`` is dropout before the classifier (timm's
    convention; the official models have none); ``proj_drop_rate`` the dropout inside the blocks.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dims: Sequence[int] = (64, 192, 384),
        depths: Sequence[int] = (1, 2, 10),
        num_heads: Sequence[int] = (1, 3, 6),
        patch_sizes: Sequence[int] = (7, 3, 3),
        patch_strides: Sequence[int] = (4, 2, 2),
        patch_paddings: Sequence[int] = (2, 1, 1),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        kernel_size: int = 3,
        stride_kv: int = 2,
        class_token: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float | Sequence[float] = 0.0,
        act_layer: type[nn.Module] = QuickGELU,
        norm_layer: type[nn.Module] = _LayerNorm,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', not {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        self.img_size = to_2tuple(img_size)  # nominal size only: no position embedding fixes it
        self.num_classes, self.global_pool, self.drop_rate = num_classes, global_pool, drop_rate
        num_stages = len(embed_dims)
        if isinstance(drop_path_rate, (int, float)):
            drop_path_rate = [0.0] * (num_stages - 1) + [float(drop_path_rate)]

        self.stages = nn.ModuleList()
        self.feature_info = []
        chans, reduction = in_chans, 1
        for i in range(num_stages):
            # Plain Python, not torch.linspace: the model is also built on the meta device.
            dpr = [drop_path_rate[i] * j / max(depths[i] - 1, 1) for j in range(depths[i])]
            self.stages.append(CvTStage(
                chans, embed_dims[i], depths[i], num_heads[i], patch_sizes[i], patch_strides[i], patch_paddings[i],
                class_token=class_token and i == num_stages - 1, drop_path=dpr, proj_drop=proj_drop_rate,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, kernel_size=kernel_size, stride_kv=stride_kv,
                attn_drop=attn_drop_rate, act_layer=act_layer, norm_layer=norm_layer,
            ))
            chans, reduction = embed_dims[i], reduction * patch_strides[i]
            self.feature_info.append(dict(num_chs=chans, reduction=reduction, module=f"stages.{i}"))
        self.num_prefix_tokens = self.stages[-1].num_prefix_tokens
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # As the official code: truncated-normal linear weights, zero biases; convolutions keep
        # PyTorch's default initialisation.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, CvTStage) and m.cls_token is not None:
            trunc_normal_(m.cls_token, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay: the class token (no position embedding to exempt)."""
        return {f"stages.{i}.cls_token" for i, s in enumerate(self.stages) if s.cls_token is not None}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping the parameters for layer-wise learning rates: first embedding, then stages/blocks."""
        return dict(
            stem=r"^stages\.0\.patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.(?:patch_embed|cls_token)", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def token_grids(self, img_size: int | tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """Token grid (rows, columns) of every stage for an input of ``img_size`` (default: the nominal one)."""
        size, grids = to_2tuple(img_size) if img_size is not None else self.img_size, []
        for stage in self.stages:
            size = stage.patch_embed.output_size(size)
            grids.append(size)
        return grids

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier (a Linear, or Identity without classes)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none), pooling the class token or the average token."""
        if global_pool is not None:
            if global_pool not in ("token", "avg") or (global_pool == "token" and not self.num_prefix_tokens):
                raise ValueError(f"cannot pool with {global_pool!r} (class token: {bool(self.num_prefix_tokens)})")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens of the last stage, (B, prefix + H*W, C), class token first."""
        for stage in self.stages:
            x, prefix = stage(x)
        return self.norm(torch.cat([prefix, x.flatten(2).transpose(1, 2)], dim=1))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Every stage's output map, (B, C_s, H_s, W_s), as timm's hierarchical models return them.

        ``indices`` picks stages (the last n if an int, all if None); ``norm`` applies the final
        LayerNorm to the last stage's output, the only one of its width (timm's rule for Swin);
        ``stop_early`` skips the stages after the last one taken; ``output_fmt="NLC"`` gives tokens.
        With ``return_prefix_tokens`` each entry is ``(map, class token)``, the class token (B, 1, C)
        in the last stage and empty (B, 0, C) before it. Returns the intermediates, or
        ``(forward_features output, intermediates)`` unless ``intermediates_only``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', not {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        last = len(self.stages) - 1
        intermediates = []
        for i, stage in enumerate(stages):
            x, prefix = stage(x)
            if i in take_indices:
                tokens = x.flatten(2).transpose(1, 2)
                if norm and i == last:
                    tokens, prefix_out = self.norm(tokens), self.norm(prefix)
                else:
                    prefix_out = prefix
                out = tokens if output_fmt == "NLC" else tokens.transpose(1, 2).reshape(x.shape)
                intermediates.append((out, prefix_out) if return_prefix_tokens else out)
        if intermediates_only:
            return intermediates
        x = torch.cat([prefix, x.flatten(2).transpose(1, 2)], dim=1)
        # The final norm has the last stage's width: a run stopped earlier returns its tokens unnormalised.
        return (self.norm(x) if len(stages) == len(self.stages) else x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the final norm, the classifier if asked).

        Without its last stage the model has no class token and another width: the final norm and
        the classifier go too, and pooling becomes the average token.
        """
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.num_prefix_tokens, self.global_pool = 0, "avg"
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0)
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the class token (or the average token), then classify unless ``pre_logits``."""
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> class logits (B, num_classes) (pooled features (B, num_features) without a head)."""
        return self.forward_head(self.forward_features(x))


# Earlier spellings of the class names, kept for imports.
Cvt, CvtBlock, CvtStage = CvT, CvTBlock, CvTStage


# --- anatomy --------------------------------------------------------------------------------------


@register_anatomy(CvT)
def cvt_anatomy(model: CvT) -> Anatomy:
    """The first embedding, then every block of every stage (``s2.b1`` ...); no attention sites.

    Grid and patch size are the first stage's at the model's nominal input size; the first stage
    has no class token. Any input size works (no position embedding), so ``image_size`` is None.
    The attention maps (queries on the stage grid, keys on the ``stride_kv``-subsampled grid, the
    class token in front of both in the last stage) are capturable by module name
    (``stages.S.blocks.B.attn``) but are not square, so they are not attention sites.
    """
    layers = [Layer("stages.0.patch_embed", "embed", "embed")]
    for s, stage in enumerate(model.stages):
        layers += [Layer(f"stages.{s}.blocks.{b}", f"s{s + 1}.b{b + 1}") for b in range(len(stage.blocks))]
    stride = model.stages[0].patch_embed.stride
    return Anatomy(family="cvt", layers=layers, attention=[], grid=model.token_grids()[0], prefix_tokens=0,
                   patch_size=(stride, stride), image_size=None)


# --- builder --------------------------------------------------------------------------------------


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: CvT) -> dict[str, torch.Tensor]:
    """Map an official CvT checkpoint (``stage0.blocks.0...``) onto this model (``stages.0.blocks.0...``).

    Every other name (patch_embed.proj/norm, attn.conv_proj_q.conv/bn, proj_q, mlp.fc1, norm,
    head) is the same in both.
    """
    state_dict = state_dict.get("state_dict", state_dict)
    return {re.sub(r"^stage(\d+)\.", r"stages.\1.", k): v for k, v in state_dict.items()}


def _create_cvt(variant: str, pretrained: bool = False, **kwargs: Any) -> CvT:
    """Build ``variant``; ``features_only=True`` gives timm's feature extractor over the three stages."""
    return build_model_with_cfg(
        CvT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2), feature_cls="getter"), **kwargs,
    )


def _cfg(input_size: int = 224, num_classes: int = 1000) -> dict[str, Any]:
    # No position embedding: any input size runs.
    return default_cfg(input_size, num_classes, first_conv="stages.0.patch_embed.proj", fixed_input_size=False)


default_cfgs = generate_default_cfgs({
    "cvt_13": _cfg(),
    "cvt_21": _cfg(),
    "cvt_w24": _cfg(),
    "cvt_13_32": _cfg(32, 10),
})

# --- registered variants --------------------------------------------------------------------------
# Official configurations (experiments/imagenet/cvt/*.yaml); every one uses patch embeddings 7/4/2,
# 3/2/1, 3/2/1 (kernel/stride/padding), MLP ratio 4, qkv bias, 3x3 projections, k/v stride 2.
_CVT_13 = dict(embed_dims=(64, 192, 384), depths=(1, 2, 10), num_heads=(1, 3, 6))
_CVT_21 = dict(embed_dims=(64, 192, 384), depths=(1, 4, 16), num_heads=(1, 3, 6))
_CVT_W24 = dict(embed_dims=(192, 768, 1024), depths=(2, 2, 20), num_heads=(3, 12, 16))


@register_model
def cvt_13(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-13: widths 64/192/384, 1+2+10 blocks, 1/3/6 heads (19,997,480 parameters; official drop path 0.1)."""
    return _create_cvt("cvt_13", pretrained, **dict(_CVT_13, **kwargs))


@register_model
def cvt_21(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-21: widths 64/192/384, 1+4+16 blocks, 1/3/6 heads (31,622,696 parameters; official drop path 0.1)."""
    return _create_cvt("cvt_21", pretrained, **dict(_CVT_21, **kwargs))


@register_model
def cvt_w24(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-W24: widths 192/768/1024, 2+2+20 blocks, 3/12/16 heads (277M parameters; official drop path 0.3).

    The paper trains it on ImageNet-22k and fine-tunes at 384; any input size works, 224 is the default.
    """
    return _create_cvt("cvt_w24", pretrained, **dict(_CVT_W24, **kwargs))


@register_model
def cvt_13_32(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-13 for 32x32 images: every stage embeds with a 3x3 stride-2 convolution (16x16, 8x8, 4x4 tokens)."""
    args = dict(_CVT_13, img_size=32, num_classes=10, patch_sizes=(3, 3, 3), patch_strides=(2, 2, 2),
                patch_paddings=(1, 1, 1))
    return _create_cvt("cvt_13_32", pretrained, **dict(args, **kwargs))
