"""LeViT (Graham et al. 2021) for vitlab: analysis support for timm's ``levit_*`` and 32x32 variants.

timm implements LeViT exactly (``levit_128s`` has the official 7,777,058 parameters before
BatchNorm fusion). This module adds what vitlab needs on top:

* an anatomy, so CKA, capture and the attention analyses work on any timm LeViT: the stem,
  every block and shrinking-attention stage in depth order, and each block's attention with the
  token grid of its stage. LeViT's attention never exposes its probabilities (it adds a learned
  per-head bias over relative offsets and applies the softmax inline), so they are recomputed
  from the block's input in a hook, exactly as the module computes them;
* variants for 32x32 images. LeViT's 16x stem would leave 2x2 tokens, so ``levit_*_32`` use a
  4x stem of two stride-2 3x3 convolutions (the first two of the 16x stem's four, with the
  widths of its last two): 8x8 tokens, then 4x4 and 2x2 after the two shrinking stages. They
  have no distillation head (there is no teacher to distil from at this size).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models.levit import Attention as LevitAttention
from timm.models.levit import ConvNorm, Levit, create_levit, model_cfgs

from ..anatomy import Anatomy, AttentionSite, Layer, register_anatomy
from .layers import default_cfg

__all__ = ["Stem4", "levit_attention_probs", "levit_anatomy"]

# --- blocks ---------------------------------------------------------------------------------------


class Stem4(nn.Sequential):
    """Two stride-2 3x3 ConvNorm layers with an activation between: a 4x stem for small images."""

    def __init__(self, in_chs: int, out_chs: int, act_layer: type[nn.Module] = nn.Hardswish) -> None:
        super().__init__()
        self.stride = 4
        self.add_module("conv1", ConvNorm(in_chs, out_chs // 2, 3, stride=2, padding=1))
        self.add_module("act1", act_layer())
        self.add_module("conv2", ConvNorm(out_chs // 2, out_chs, 3, stride=2, padding=1))


def levit_attention_probs(module: LevitAttention, inputs: tuple) -> torch.Tensor:
    """The softmax probabilities (B, heads, N, N) timm's LeViT ``Attention`` computes internally."""
    x = inputs[0]
    if module.use_conv:  # (B, C, H, W) layout
        b, _, h, w = x.shape
        q, k, _ = module.qkv(x).view(b, module.num_heads, -1, h * w).split(
            [module.key_dim, module.key_dim, module.val_dim], dim=2)
        logits = (q.transpose(-2, -1) @ k) * module.scale
    else:  # (B, N, C) layout
        b, n, _ = x.shape
        q, k, _ = module.qkv(x).view(b, n, module.num_heads, -1).split(
            [module.key_dim, module.key_dim, module.val_dim], dim=3)
        logits = (q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1)) * module.scale
    return (logits + module.get_attention_biases(x.device)).softmax(dim=-1)


# --- anatomy --------------------------------------------------------------------------------------


@register_anatomy(Levit)
def levit_anatomy(model: Levit) -> Anatomy:
    """Stem, then per stage its shrinking attention (if any) and blocks; attention per block."""
    stride = model.stem.stride
    layers = [Layer("stem", "stem", "stem")]
    sites = []
    for s, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, nn.Identity):
            layers.append(Layer(f"stages.{s}.downsample", f"s{s + 1}.down"))
        for b, block in enumerate(stage.blocks):
            label = f"s{s + 1}.b{b + 1}"
            layers.append(Layer(f"stages.{s}.blocks.{b}", label))
            grid = tuple(block.attn.resolution)
            sites.append(AttentionSite(f"stages.{s}.blocks.{b}.attn", label, block.attn.num_heads, grid,
                                       (stride * 2**s, stride * 2**s), 0, recompute=levit_attention_probs))
    first = tuple(model.stages[0].blocks[0].attn.resolution)
    return Anatomy(family="levit", layers=layers, attention=sites, grid=first, prefix_tokens=0,
                   patch_size=(stride, stride), image_size=(first[0] * stride, first[1] * stride))


# --- builder --------------------------------------------------------------------------------------


def _create_levit_32(variant: str, cfg_variant: str, pretrained: bool = False, **kwargs: Any) -> Levit:
    """timm's ``cfg_variant`` LeViT with the 4x stem and no distillation head, for 32x32 images.

    timm's ``Levit`` provides the rest of the timm protocol (``forward_intermediates``,
    ``group_matcher``, ``set_grad_checkpointing``, ``no_weight_decay``); the stem is a plain
    ``nn.Sequential``, so it works unchanged.
    """
    width = kwargs.get("embed_dim", model_cfgs[cfg_variant]["embed_dim"])[0]
    stem = Stem4(kwargs.get("in_chans", 3), width)
    kwargs.setdefault("img_size", 32)
    return create_levit(variant, cfg_variant, pretrained, distilled=False, stem_backbone=stem, stem_stride=4,
                        **kwargs)


def _cfg() -> dict[str, Any]:
    return default_cfg(32, 10, first_conv="stem.conv1.linear", classifier="head.linear")


default_cfgs = generate_default_cfgs({"levit_128s_32": _cfg(), "levit_128_32": _cfg(), "levit_256_32": _cfg()})

# --- registered variants --------------------------------------------------------------------------


@register_model
def levit_128s_32(pretrained: bool = False, **kwargs: Any) -> Levit:
    """LeViT-128S for 32x32 images: 4x stem, stages of 8x8, 4x4 and 2x2 tokens, 10 classes."""
    return _create_levit_32("levit_128s_32", "levit_128s", pretrained, **dict(dict(num_classes=10), **kwargs))


@register_model
def levit_128_32(pretrained: bool = False, **kwargs: Any) -> Levit:
    """LeViT-128 for 32x32 images (4x stem)."""
    return _create_levit_32("levit_128_32", "levit_128", pretrained, **dict(dict(num_classes=10), **kwargs))


@register_model
def levit_256_32(pretrained: bool = False, **kwargs: Any) -> Levit:
    """LeViT-256 for 32x32 images (4x stem)."""
    return _create_levit_32("levit_256_32", "levit_256", pretrained, **dict(dict(num_classes=10), **kwargs))
