"""Vision Transformers for small images, built on timm's ``VisionTransformer``.

The ImageNet ViTs split a 224-pixel image into 16-pixel patches (14x14 tokens). At 32x32 these
variants use 4-pixel patches (8x8 tokens plus a class token) or 8-pixel patches (4x4 tokens, four
times cheaper), and keep timm's block, so every timm tool (``forward_intermediates``,
``reset_classifier``, fused attention, checkpoint filters) works unchanged.

Every variant also takes ``pos_embed="sincos"``: a fixed 2-D sin-cos position embedding instead
of a learned one, which lets a plain ViT learn from small data much sooner (the ``_sincos``
variants have it by default).
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .layers import default_cfg, freeze_sincos_pos_embed_

__all__: list[str] = []  # register_model adds every variant

# --- builder --------------------------------------------------------------------------------------


def _create_small_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """timm's ``VisionTransformer`` for ``variant``; ``pos_embed="sincos"`` freezes a 2-D sin-cos table."""
    out_indices = kwargs.pop("out_indices", 3)
    sincos = kwargs.get("pos_embed") == "sincos"
    if sincos:
        # Built with a learned table that is then overwritten and frozen; prefix tokens get none.
        kwargs.update(pos_embed="learn", no_embed_class=True)
    model = build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )
    if sincos:
        freeze_sincos_pos_embed_(model)
    return model


default_cfgs = generate_default_cfgs(
    {
        "vit_nano_patch4_32": default_cfg(),
        "vit_nano_patch4_gap_32": default_cfg(),
        "vit_nano_patch8_32": default_cfg(),
        "vit_nano_patch8_sincos_32": default_cfg(),
        "vit_micro_patch4_32": default_cfg(),
        "vit_tiny_patch4_32": default_cfg(),
        "vit_tiny_patch2_32": default_cfg(),
        "vit_small_patch4_32": default_cfg(),
    }
)

# --- registered variants --------------------------------------------------------------------------
# The defaults every variant shares: 32x32 input, 10 classes (any data set overrides this).
_SMALL = dict(img_size=32, num_classes=10)


_NANO = dict(_SMALL, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0)


@register_model
def vit_nano_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Nano/4 at 32x32: 6 blocks, width 128, 4 heads, MLP ratio 2 (0.8M parameters)."""
    return _create_small_vit("vit_nano_patch4_32", pretrained, **dict(_NANO, patch_size=4, **kwargs))


@register_model
def vit_nano_patch4_gap_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Nano/4 classifying from the average of its patch tokens instead of a class token."""
    args = dict(_NANO, patch_size=4, global_pool="avg", class_token=False)
    return _create_small_vit("vit_nano_patch4_gap_32", pretrained, **dict(args, **kwargs))


@register_model
def vit_nano_patch8_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Nano/8 at 32x32: ViT-Nano with 8-pixel patches (4x4 tokens), four times cheaper."""
    return _create_small_vit("vit_nano_patch8_32", pretrained, **dict(_NANO, patch_size=8, **kwargs))


@register_model
def vit_nano_patch8_sincos_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Nano/8 with a fixed 2-D sin-cos position embedding: vitlab's default ViT in ``compare``.

    The combination that learns ``shapes`` fastest on a CPU: 8-pixel patches make each step
    four times cheaper than 4-pixel ones, and the fixed embedding saves learning the layout.
    """
    args = dict(_NANO, patch_size=8, pos_embed="sincos")
    return _create_small_vit("vit_nano_patch8_sincos_32", pretrained, **dict(args, **kwargs))


@register_model
def vit_micro_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Micro/4 at 32x32: 8 blocks, width 160, 4 heads, MLP ratio 2."""
    args = dict(_SMALL, patch_size=4, embed_dim=160, depth=8, num_heads=4, mlp_ratio=2.0)
    return _create_small_vit("vit_micro_patch4_32", pretrained, **dict(args, **kwargs))


@register_model
def vit_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Ti/4 at 32x32: the ViT-Ti shape (12 blocks, width 192, 3 heads) with 4-pixel patches."""
    args = dict(_SMALL, patch_size=4, embed_dim=192, depth=12, num_heads=3)
    return _create_small_vit("vit_tiny_patch4_32", pretrained, **dict(args, **kwargs))


@register_model
def vit_tiny_patch2_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Ti/2 at 32x32: ViT-Ti with 2-pixel patches (16x16 tokens)."""
    args = dict(_SMALL, patch_size=2, embed_dim=192, depth=12, num_heads=3)
    return _create_small_vit("vit_tiny_patch2_32", pretrained, **dict(args, **kwargs))


@register_model
def vit_small_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S/4 at 32x32: the ViT-S shape (12 blocks, width 384, 6 heads) with 4-pixel patches."""
    args = dict(_SMALL, patch_size=4, embed_dim=384, depth=12, num_heads=6)
    return _create_small_vit("vit_small_patch4_32", pretrained, **dict(args, **kwargs))
