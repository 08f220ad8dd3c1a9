"""Vision Transformers for small images, built on timm's ``VisionTransformer``.

The ImageNet ViTs split a 224-pixel image into 16-pixel patches (14x14 tokens). At 32x32 the
same token grid needs much smaller patches, so these variants use 4-pixel patches (8x8 tokens
plus a class token) and keep timm's block, so every timm tool (``forward_intermediates``,
``reset_classifier``, fused attention, checkpoint filters) works unchanged.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

# --- builder ------------------------------------------------------------------------------------


def _create_small_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "vit_nano_patch4_32": _cfg(),
        "vit_micro_patch4_32": _cfg(),
        "vit_tiny_patch4_32": _cfg(),
        "vit_small_patch4_32": _cfg(),
        "vit_tiny_patch2_32": _cfg(),
        "vit_nano_gap_patch4_32": _cfg(),
    }
)

# --- registered variants --------------------------------------------------------------------------
# The defaults every variant shares: 32x32 input, 10 classes (any data set overrides this).
_SMALL = dict(img_size=32, num_classes=10)


@register_model
def vit_nano_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Nano/4 at 32x32: 6 blocks, width 128, 4 heads, MLP ratio 2 (0.8M parameters).

    Small enough to train on a laptop CPU in minutes; vitlab's default ViT in ``compare``.
    """
    args = dict(_SMALL, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0)
    return _create_small_vit("vit_nano_patch4_32", pretrained, **dict(args, **kwargs))


@register_model
def vit_nano_gap_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Nano/4 classifying from the average of its patch tokens instead of a class token."""
    args = dict(_SMALL, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0,
                global_pool="avg", class_token=False)
    return _create_small_vit("vit_nano_gap_patch4_32", pretrained, **dict(args, **kwargs))


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
