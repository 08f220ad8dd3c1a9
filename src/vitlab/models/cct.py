"""Compact Convolutional Transformers (Hassani et al., 2021, "Escaping the Big Data Paradigm with
Compact Transformers"), and the paper's two baselines ViT-Lite and "CVT".

CCT replaces ViT's patchify-and-class-token ends by two small pieces that let a transformer learn
from CIFAR-sized data without pre-training:

* a convolutional tokenizer: ``n_conv_layers`` x [Conv kxk (no bias), ReLU, MaxPool 3/2/1], the
  last one with ``embed_dim`` channels, the others with 64; its feature map is the token grid;
* sequence pooling (SeqPool): a Linear(d, 1) scores every token, a softmax over the tokens turns
  the scores into weights, and the weighted sum of the tokens feeds the classifier. No class token.

The encoder layer follows the official code, which differs from timm's ViT block in two ways that
decide the parameter count: qkv has no bias, and a LayerNorm sits *between* attention and MLP on
the residual stream itself (``x = norm2(x + attn(norm1(x))); x = x + mlp(x)``).

Names follow the paper: ``cct_L_kxC_S`` has L encoder layers, a tokenizer of C convolutions with
k x k kernels, and input size S. Every ``cct_*`` name also has a ``_sine`` variant with the frozen
1-D sinusoidal position embedding of the official code (a frozen ``nn.Parameter``: it is counted
and saved, but never trained). Every model takes ``pos_embed="learn" | "sine" | "none"``; with
``"none"`` it has no position embedding at all and takes any image size.

Baselines: ``vit_lite_7_patch4_32`` (ViT-Lite-7/4: 4x4 patches, class token) and
``vit_lite_seqpool_7_patch4_32`` (ViT-Lite with sequence pooling, which the paper calls "CVT",
short for compact vision transformer; it is unrelated to CvT, the convolutional vision
transformer of Wu et al., hence the name here). Their names spell the patch as vitlab's other
ViTs do (``patch4``); the earlier ``vit_lite_7_4_32`` and ``vit_lite_seqpool_7_4_32`` still build
them, with timm's deprecation warning.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn
from timm.layers import Attention, DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
    register_model_deprecations,
)

from ..anatomy import Anatomy, AttentionSite, Layer, ResidualSite, register_anatomy
from ..errors import VitlabError
from .layers import BlockIntermediates, default_cfg

__all__ = ["CCT", "CCTBlock", "ConvTokenizer", "checkpoint_filter_fn", "sine_pos_embed"]

POS_EMBEDS = ("learn", "sine", "none")
GLOBAL_POOLS = ("seqpool", "token")

# --- blocks ---------------------------------------------------------------------------------------


def sine_pos_embed(num_tokens: int, dim: int) -> torch.Tensor:
    """The 1-D sinusoidal table of Vaswani et al. over ``num_tokens`` positions, shape (1, N, dim).

    Channel pairs (2i, 2i+1) hold sin and cos of ``position / 10000^(2i / dim)``, as in the official
    CCT code (positions run over the flattened token grid, row by row).
    """
    position = torch.arange(num_tokens, dtype=torch.float64)[:, None]
    channel = torch.arange(dim)
    # Angles in float64, sin/cos in float32: bit for bit the official table (and checkpoints' one).
    angle = (position * 10000.0 ** (-(channel // 2 * 2).double() / dim)).float()
    return torch.where(channel % 2 == 0, angle.sin(), angle.cos()).unsqueeze(0)


class ConvTokenizer(nn.Module):
    """CCT's tokenizer: ``n_conv_layers`` x [Conv kxk, ReLU, MaxPool 3/2/1], flattened to tokens.

    Hidden convolutions have ``hidden_chans`` channels, the last one ``embed_dim``; none has a bias.
    ``batchnorm=True`` puts a BatchNorm between each convolution and its ReLU (not in the paper:
    an option for short training, where it lets the tokenizer learn at the transformer's pace).
    Padding and pooling let it take any image size, so it has no ``patch_size`` (which would make
    ``vitlab.create_model`` demand sizes divisible by it); ``reduction`` is its total stride.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        embed_dim: int = 768,
        kernel_size: int = 7,
        n_conv_layers: int = 2,
        stride: int | None = None,
        padding: int | None = None,
        hidden_chans: int = 64,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        # The official rule: kernel 3 -> stride 1, padding 1; kernel 7 -> stride 2, padding 3.
        stride = max(1, kernel_size // 2 - 1) if stride is None else stride
        padding = max(1, kernel_size // 2) if padding is None else padding
        chans = [in_chans] + [hidden_chans] * (n_conv_layers - 1) + [embed_dim]
        self.stages = nn.Sequential(*[
            nn.Sequential(OrderedDict(
                conv=nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False),
                norm=nn.BatchNorm2d(c_out) if batchnorm else nn.Identity(),
                act=nn.ReLU(),
                pool=nn.MaxPool2d(3, stride=2, padding=1),
            ))
            for c_in, c_out in zip(chans[:-1], chans[1:])
        ])

        # The grid by arithmetic rather than a dummy forward pass, so the model builds on "meta".
        self.img_size = to_2tuple(img_size)
        self._conv = (kernel_size, stride, padding, n_conv_layers)
        grid = self.dynamic_feat_size(self.img_size)
        self.grid_size = tuple(grid)
        self.reduction = (stride * 2) ** n_conv_layers
        self.num_patches = grid[0] * grid[1]

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The token grid of an ``img_size`` input (timm's ``PatchEmbed`` has the same method)."""
        kernel_size, stride, padding, n_conv_layers = self._conv
        grid = list(img_size)
        for _ in range(n_conv_layers):
            grid = [(g + 2 * padding - kernel_size) // stride + 1 for g in grid]  # conv
            grid = [(g + 2 - 3) // 2 + 1 for g in grid]  # max-pool 3/2/1
        return grid[0], grid[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, H, W) -> tokens (B, grid rows * grid columns, embed_dim)."""
        # Channels-last because PyTorch's CPU max-pool is several times faster on it than on NCHW
        # (it was a fifth of a CCT training step), and the convolutions are no slower; the reshape
        # to (B, H*W, C) tokens is then a free view. With the explicit attention below it lifted
        # CCT-2/4 from 0.90-1.09 to 1.13-1.21 of vit-pytorch's training speed (benchmarks/models.py).
        x = self.stages(x.contiguous(memory_format=torch.channels_last))
        return x.flatten(2).transpose(1, 2)


class CCTBlock(nn.Module):
    """The official CCT encoder layer: pre-norm attention, a LayerNorm on the residual stream, MLP.

    ``x = norm2(x + attn(norm1(x))); x = x + mlp(x)``. The MLP branch therefore adds to a
    normalised stream (post-norm style), and the block has three LayerNorms' worth of placement
    where timm's has two; qkv has no bias, the output projection has one.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 2.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        # timm's Attention: fused scaled_dot_product_attention when timm allows it, else explicit
        # probabilities through ``attn_drop`` (what vitlab's Capture hooks).
        self.attn = Attention(dim, num_heads, qkv_bias=False, attn_drop=attn_drop_rate, proj_drop=drop_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop_rate)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, dim) through attention and MLP -> tokens (B, N, dim)."""
        x = self.norm2(x + self.drop_path(self._attention(self.norm1(x))))
        return x + self.drop_path(self.mlp(x))

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        # Training on CPU, timm's explicit softmax(q k^T) v is faster than PyTorch's fused attention
        # at CCT's sizes, with or without attention dropout (which the fused CPU kernel lacks and
        # emulates slowly); see the tokenizer for the measured effect. Only CCT's sizes were
        # measured, so timm's ViTs keep the fused kernel.
        if attn.fused_attn and self.training and x.device.type == "cpu":
            attn.fused_attn = False
            try:
                return attn(x)
            finally:
                attn.fused_attn = True
        return attn(x)


# --- model class ----------------------------------------------------------------------------------


class CCT(BlockIntermediates, nn.Module):
    """Compact transformer: tokenizer, position embedding, CCT encoder layers, final norm, pooling, head.

    The default tokenizer is CCT's convolutional one (``kernel_size``, ``n_conv_layers``, hidden
    width ``tokenizer_chans``, ``tokenizer_batchnorm`` for a BatchNorm after each convolution); with
    ``patch_size`` set it is a linear patch embedding (one Conv pxp, stride p, with bias), the
    ViT-Lite and "CVT" baselines. ``global_pool="seqpool"`` is sequence pooling (no class token),
    ``"token"`` a class token (ViT-Lite). ``pos_embed`` is ``"learn"``, ``"sine"`` (frozen) or
    ``"none"``. ``drop_rate`` is the official ``dropout`` (after the position embedding, the attention
    projection and both MLP layers); the defaults of ``attn_drop_rate`` and ``drop_path_rate``
    (0.1 each) are the official ones. ``dynamic_img_size=True`` (timm's name) takes any image size, the
    position embedding resampled to that input's token grid (progressive resizing trains on it).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 14,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        kernel_size: int = 7,
        n_conv_layers: int = 2,
        conv_stride: int | None = None,
        conv_padding: int | None = None,
        tokenizer_chans: int = 64,
        tokenizer_batchnorm: bool = False,
        patch_size: int | None = None,
        global_pool: str = "seqpool",
        pos_embed: str = "learn",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.1,
        drop_path_rate: float = 0.1,
        dynamic_img_size: bool = False,
    ) -> None:
        super().__init__()
        pos_embed = "learn" if pos_embed == "learnable" else pos_embed  # the official code's spelling
        if pos_embed not in POS_EMBEDS:
            raise VitlabError(f"pos_embed must be one of {', '.join(POS_EMBEDS)}, not '{pos_embed}'")
        if global_pool not in GLOBAL_POOLS:
            raise VitlabError(f"global_pool must be one of {', '.join(GLOBAL_POOLS)}, not '{global_pool}'")
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.img_size = to_2tuple(img_size)
        # timm's name: take other image sizes too, the position embedding resampled to their grid.
        self.dynamic_img_size = dynamic_img_size

        if patch_size is None:
            self.patch_embed = ConvTokenizer(img_size, in_chans, embed_dim, kernel_size, n_conv_layers,
                                             conv_stride, conv_padding, tokenizer_chans, tokenizer_batchnorm)
            self.token_stride = to_2tuple(self.patch_embed.reduction)
        else:  # vitlab.create_model checks that patch_size divides img_size; any size runs without pos_embed
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
            self.token_stride = to_2tuple(patch_size)
        self.num_prefix_tokens = 1 if global_pool == "token" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if self.num_prefix_tokens else None

        num_tokens = self.num_prefix_tokens + self.patch_embed.num_patches
        if pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        elif pos_embed == "sine":
            self.pos_embed = nn.Parameter(sine_pos_embed(num_tokens, embed_dim), requires_grad=False)
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)

        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            CCTBlock(embed_dim, num_heads, mlp_ratio, drop_rate, attn_drop_rate, dpr[i]) for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim)
        self.attn_pool = nn.Linear(embed_dim, 1) if global_pool == "seqpool" else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.feature_info = [dict(num_chs=embed_dim, reduction=self.token_stride[0], module=f"blocks.{i}")
                             for i in range(depth)]
        self._init_weights()

    def _init_weights(self) -> None:
        # The official initialisation: truncated normal 0.02 for linear layers, Kaiming (fan-in)
        # for convolutions, a wide truncated normal (0.2) for a learned position embedding.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
        if self.pos_embed is not None and self.pos_embed.requires_grad:
            trunc_normal_(self.pos_embed, std=0.2)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names timm's optimizer factory keeps out of weight decay: none."""
        # The learned position embedding (and ViT-Lite's class token) is decayed, as in the paper's
        # training: the official model classes define no no_weight_decay, and the official train.py
        # builds its optimizer with timm's create_optimizer_v2, which exempts only 1-D parameters
        # (biases, norms), not the (1, N, d) embedding. Exempting it would change the recipe the
        # `cct` preset reproduces (weight decay 0.06). A sine table is frozen and never decayed.
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping the parameters for layer-wise learning rates: embedding, then each block."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])


    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier (a Linear, or Identity without classes)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none); the pooling is part of the architecture."""
        if global_pool is not None and global_pool != self.global_pool:
            raise ValueError(f"the pooling ('{self.global_pool}') is part of the architecture; it cannot be reset")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _pos_embed_for(self, img_size: tuple[int, int]) -> torch.Tensor:
        """The position embedding for an input of ``img_size``: resampled (bicubic, as timm's ViTs)
        when its token grid is not the built one, e.g. for progressive resizing."""
        if not self.dynamic_img_size:
            return self.pos_embed
        grid = tuple(self.patch_embed.dynamic_feat_size(img_size))
        if grid == tuple(self.patch_embed.grid_size):
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, list(grid), list(self.patch_embed.grid_size),
                                      num_prefix_tokens=self.num_prefix_tokens, verbose=False)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the token sequence entering block 1 (class token and position embedding added)."""
        img_size = (x.shape[-2], x.shape[-1])
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            # In place, as in the official code: the sum then writes through the tokenizer's
            # (B, C, H, W) -> (B, H*W, C) view, so the gradient reaches the max-pool as an NCHW
            # tensor and its backward does not first copy the feature map to channels-last.
            x = x.add_(self._pos_embed_for(img_size))
        return self.pos_drop(x)


    def intermediate_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """The token grid of images ``x``: the tokenizer's output grid, which follows the image size."""
        return tuple(self.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1])))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens (sequence pooling or the class token), then classify unless ``pre_logits``."""
        if self.attn_pool is not None:  # sequence pooling: softmax over tokens, weighted sum
            weights = self.attn_pool(x).softmax(dim=1)  # (B, N, 1)
            x = (weights.transpose(1, 2) @ x).squeeze(1)
        else:
            x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> class logits (B, num_classes) (pooled features (B, embed_dim) without a head)."""
        return self.forward_head(self.forward_features(x))


# --- anatomy --------------------------------------------------------------------------------------


@register_anatomy(CCT)
def _cct_anatomy(model: CCT) -> Anatomy:
    # pos_drop's output is the token sequence with its position embedding: the embedding layer.
    layers = [Layer("pos_drop", "embed", "embed")]
    layers += [Layer(f"blocks.{i}", f"block{i + 1}") for i in range(len(model.blocks))]
    grid, stride, prefix = tuple(model.patch_embed.grid_size), model.token_stride, model.num_prefix_tokens
    # Sequence pooling attends from one learned score to the tokens (not square): not a site.
    sites = [AttentionSite(f"blocks.{i}.attn", f"block{i + 1}", blk.attn.num_heads, grid, stride, prefix)
             for i, blk in enumerate(model.blocks)]
    return Anatomy(
        family="cct",
        layers=layers,
        attention=sites,
        grid=grid,
        prefix_tokens=prefix,
        patch_size=stride,
        # Only the position embedding fixes the input size; without one any size runs. A dynamic model
        # (dynamic_img_size) keeps it: ``grid`` is the grid of that size, so analyses feed it that size.
        image_size=model.img_size if model.pos_embed is not None else None,
        # x = norm2(x + attn(norm1 x)); x = x + mlp(x): the MLP's stream is norm2's output.
        residuals=[site for i in range(len(model.blocks)) for site in (
            ResidualSite(f"block{i + 1}.attn", "attn", (f"blocks.{i}.norm1", "input"), f"blocks.{i}.attn", "tokens",
                         prefix),
            ResidualSite(f"block{i + 1}.mlp", "mlp", (f"blocks.{i}.norm2", "output"), f"blocks.{i}.mlp", "tokens",
                         prefix))],
        mlp_activations=[(f"block{i + 1}", f"blocks.{i}.mlp.act") for i in range(len(model.blocks))],
    )


# --- builder --------------------------------------------------------------------------------------

# Official parameter names (SHI-Labs/Compact-Transformers, also vit-pytorch's CCT) -> vitlab's.
_OFFICIAL_KEYS = [
    (r"^tokenizer\.conv_layers\.(\d+)\.0\.", r"patch_embed.stages.\1.conv."),
    (r"^classifier\.positional_emb$", "pos_embed"),
    (r"^classifier\.class_emb$", "cls_token"),
    (r"^classifier\.attention_pool\.", "attn_pool."),
    (r"^classifier\.blocks\.(\d+)\.norm1\.", r"blocks.\1.norm2."),
    (r"^classifier\.blocks\.(\d+)\.pre_norm\.", r"blocks.\1.norm1."),
    (r"^classifier\.blocks\.(\d+)\.self_attn\.", r"blocks.\1.attn."),
    (r"^classifier\.blocks\.(\d+)\.linear1\.", r"blocks.\1.mlp.fc1."),
    (r"^classifier\.blocks\.(\d+)\.linear2\.", r"blocks.\1.mlp.fc2."),
    (r"^classifier\.norm\.", "norm."),
    (r"^classifier\.fc\.", "head."),
]


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: CCT) -> dict[str, torch.Tensor]:
    """Load a state dict of the official code (or of vit-pytorch's CCT) into ``model``.

    Renames the parameters and resamples a learned position embedding to the model's token grid.
    State dicts already in vitlab's naming pass through unchanged.
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith("tokenizer.conv_layers.0.0.") and isinstance(model.patch_embed, PatchEmbed):
            key = key.replace("tokenizer.conv_layers.0.0.", "patch_embed.proj.")
        for pattern, repl in _OFFICIAL_KEYS:
            key = re.sub(pattern, repl, key)
        out[key] = value

    pos = out.get("pos_embed")
    if pos is not None and model.pos_embed is not None and pos.shape != model.pos_embed.shape:
        if not model.pos_embed.requires_grad:
            out["pos_embed"] = model.pos_embed.detach().clone()  # a sine table is rebuilt, not resampled
        else:
            old = int((pos.shape[1] - model.num_prefix_tokens) ** 0.5)
            out["pos_embed"] = resample_abs_pos_embed(pos, list(model.patch_embed.grid_size), [old, old],
                                                      num_prefix_tokens=model.num_prefix_tokens)
    return out


def _create_cct(variant: str, pretrained: bool, args: dict[str, Any], kwargs: dict[str, Any]) -> CCT:
    """Build ``variant`` from its architecture ``args``, which the caller's ``kwargs`` override.

    ``features_only=True`` gives timm's feature extractor over ``forward_intermediates`` (by default
    the last three blocks, as for timm's ViTs).
    """
    args = dict(args, **kwargs)
    return build_model_with_cfg(CCT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=min(3, args.get("depth", 14)), feature_cls="getter"),
                                **args)


def _cfg(input_size: int = 32, num_classes: int = 10, **kwargs: Any) -> dict[str, Any]:
    # The official models' normalisation: CIFAR's own statistics at 32x32, ImageNet's (crop 0.9) above.
    cifar = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)) if input_size == 32 else {}
    return default_cfg(input_size, num_classes, **{"first_conv": "patch_embed.stages.0.conv",
                                                   "crop_pct": 1.0 if input_size == 32 else 0.9, **cifar, **kwargs})


_CCT_NAMES = ["cct_2_3x2_32", "cct_4_3x2_32", "cct_6_3x1_32", "cct_6_3x2_32", "cct_7_3x1_32", "cct_7_3x2_32"]
default_cfgs = generate_default_cfgs({
    **{name + sine: _cfg() for name in _CCT_NAMES for sine in ("", "_sine")},
    "cct_7_7x2_224": _cfg(224, 102),  # Flowers-102, trained from scratch in the paper
    "cct_7_7x2_224_sine": _cfg(224, 102),
    "cct_14_7x2_224": _cfg(224, 1000),
    "cct_14_7x2_224_sine": _cfg(224, 1000),
    "cct_14_7x2_384": _cfg(384, 1000, crop_pct=1.0),
    "cct_14_7x2_384_sine": _cfg(384, 1000, crop_pct=1.0),
    "vit_lite_7_patch4_32": _cfg(first_conv="patch_embed.proj"),
    "vit_lite_seqpool_7_patch4_32": _cfg(first_conv="patch_embed.proj"),
})

# --- registered variants --------------------------------------------------------------------------
# Encoder sizes (layers, heads, MLP ratio, width) and tokenizers (kernel k, C convolutions).
_CCT_2 = dict(depth=2, num_heads=2, mlp_ratio=1.0, embed_dim=128)
_CCT_4 = dict(depth=4, num_heads=2, mlp_ratio=1.0, embed_dim=128)
_CCT_6 = dict(depth=6, num_heads=4, mlp_ratio=2.0, embed_dim=256)
_CCT_7 = dict(depth=7, num_heads=4, mlp_ratio=2.0, embed_dim=256)
_CCT_14 = dict(depth=14, num_heads=6, mlp_ratio=3.0, embed_dim=384)
_3x1 = dict(kernel_size=3, n_conv_layers=1)
_3x2 = dict(kernel_size=3, n_conv_layers=2)
_7x2 = dict(kernel_size=7, n_conv_layers=2)
_32 = dict(img_size=32, num_classes=10)
_SINE = dict(pos_embed="sine")


@register_model
def cct_2_3x2_32(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-2/3x2 at 32x32: 2 layers, width 128, 2 convs 3x3 (8x8 tokens); 283,723 parameters."""
    return _create_cct("cct_2_3x2_32", pretrained, dict(_CCT_2, **_3x2, **_32), kwargs)


@register_model
def cct_2_3x2_32_sine(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-2/3x2 with the frozen sine position embedding."""
    return _create_cct("cct_2_3x2_32_sine", pretrained, dict(_CCT_2, **_3x2, **_32, **_SINE), kwargs)


@register_model
def cct_4_3x2_32(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-4/3x2 at 32x32: 4 layers, width 128, 2 convs 3x3 (8x8 tokens); 482,123 parameters."""
    return _create_cct("cct_4_3x2_32", pretrained, dict(_CCT_4, **_3x2, **_32), kwargs)


@register_model
def cct_4_3x2_32_sine(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-4/3x2 with the frozen sine position embedding."""
    return _create_cct("cct_4_3x2_32_sine", pretrained, dict(_CCT_4, **_3x2, **_32, **_SINE), kwargs)


@register_model
def cct_6_3x1_32(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-6/3x1 at 32x32: 6 layers, width 256, 1 conv 3x3 (16x16 tokens); 3,233,803 parameters."""
    return _create_cct("cct_6_3x1_32", pretrained, dict(_CCT_6, **_3x1, **_32), kwargs)


@register_model
def cct_6_3x1_32_sine(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-6/3x1 with the frozen sine position embedding."""
    return _create_cct("cct_6_3x1_32_sine", pretrained, dict(_CCT_6, **_3x1, **_32, **_SINE), kwargs)


@register_model
def cct_6_3x2_32(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-6/3x2 at 32x32: 6 layers, width 256, 2 convs 3x3 (8x8 tokens); 3,326,923 parameters."""
    return _create_cct("cct_6_3x2_32", pretrained, dict(_CCT_6, **_3x2, **_32), kwargs)


@register_model
def cct_6_3x2_32_sine(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-6/3x2 with the frozen sine position embedding."""
    return _create_cct("cct_6_3x2_32_sine", pretrained, dict(_CCT_6, **_3x2, **_32, **_SINE), kwargs)


@register_model
def cct_7_3x1_32(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-7/3x1 at 32x32, the paper's main CIFAR model: 7 layers, width 256, 1 conv 3x3 (16x16
    tokens); 3,760,139 parameters (3,783,269 with 100 classes)."""
    return _create_cct("cct_7_3x1_32", pretrained, dict(_CCT_7, **_3x1, **_32), kwargs)


@register_model
def cct_7_3x1_32_sine(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-7/3x1 with the frozen sine position embedding."""
    return _create_cct("cct_7_3x1_32_sine", pretrained, dict(_CCT_7, **_3x1, **_32, **_SINE), kwargs)


@register_model
def cct_7_3x2_32(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-7/3x2 at 32x32: 7 layers, width 256, 2 convs 3x3 (8x8 tokens); 3,853,259 parameters."""
    return _create_cct("cct_7_3x2_32", pretrained, dict(_CCT_7, **_3x2, **_32), kwargs)


@register_model
def cct_7_3x2_32_sine(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-7/3x2 with the frozen sine position embedding."""
    return _create_cct("cct_7_3x2_32_sine", pretrained, dict(_CCT_7, **_3x2, **_32, **_SINE), kwargs)


@register_model
def cct_7_7x2_224(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-7/7x2 at 224 (the paper's Flowers-102 model): 2 convs 7x7 stride 2 (14x14 tokens);
    4,573,735 parameters with 102 classes."""
    return _create_cct("cct_7_7x2_224", pretrained, dict(_CCT_7, **_7x2, img_size=224, num_classes=102), kwargs)


@register_model
def cct_7_7x2_224_sine(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-7/7x2 at 224 with the frozen sine position embedding."""
    args = dict(_CCT_7, **_7x2, img_size=224, num_classes=102, **_SINE)
    return _create_cct("cct_7_7x2_224_sine", pretrained, args, kwargs)


@register_model
def cct_14_7x2_224(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-14/7x2 at 224 (ImageNet): 14 layers, width 384, 6 heads (14x14 tokens); 22,367,273 parameters."""
    return _create_cct("cct_14_7x2_224", pretrained, dict(_CCT_14, **_7x2, img_size=224, num_classes=1000), kwargs)


@register_model
def cct_14_7x2_224_sine(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-14/7x2 at 224 with the frozen sine position embedding."""
    args = dict(_CCT_14, **_7x2, img_size=224, num_classes=1000, **_SINE)
    return _create_cct("cct_14_7x2_224_sine", pretrained, args, kwargs)


@register_model
def cct_14_7x2_384(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-14/7x2 at 384 (ImageNet fine-tuning resolution): 24x24 tokens."""
    return _create_cct("cct_14_7x2_384", pretrained, dict(_CCT_14, **_7x2, img_size=384, num_classes=1000), kwargs)


@register_model
def cct_14_7x2_384_sine(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CCT-14/7x2 at 384 with the frozen sine position embedding."""
    args = dict(_CCT_14, **_7x2, img_size=384, num_classes=1000, **_SINE)
    return _create_cct("cct_14_7x2_384_sine", pretrained, args, kwargs)


@register_model
def vit_lite_7_patch4_32(pretrained: bool = False, **kwargs: Any) -> CCT:
    """ViT-Lite-7/4, the CCT paper's baseline: the CCT-7 encoder on 4x4 patches (8x8 tokens) with a
    class token and a learned position embedding; 3,716,874 parameters."""
    args = dict(_CCT_7, patch_size=4, global_pool="token", **_32)
    return _create_cct("vit_lite_7_patch4_32", pretrained, args, kwargs)


@register_model
def vit_lite_seqpool_7_patch4_32(pretrained: bool = False, **kwargs: Any) -> CCT:
    """CVT-7/4 of the CCT paper ("compact vision transformer"; not CvT, Wu et al.): ViT-Lite-7/4 with
    sequence pooling instead of the class token; 3,716,619 parameters."""
    args = dict(_CCT_7, patch_size=4, global_pool="seqpool", **_32)
    return _create_cct("vit_lite_seqpool_7_patch4_32", pretrained, args, kwargs)


# Earlier names, kept so run directories that store them still build (with timm's deprecation warning).
register_model_deprecations(__name__, {
    "vit_lite_7_4_32": "vit_lite_7_patch4_32",
    "vit_lite_seqpool_7_4_32": "vit_lite_seqpool_7_patch4_32",
})
