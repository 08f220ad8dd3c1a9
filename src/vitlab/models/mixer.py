"""MLP-Mixers for small images, built on timm's ``MlpMixer``.

As for the small ViTs, 4-pixel patches give an 8x8 token grid on 32x32 images (8-pixel ones 4x4). The token-mixing
MLP (across the 64 patches) is half the width and the channel-mixing MLP four times the width,
the ratios of Tolstikhin et al. (2021).
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.mlp_mixer import MlpMixer, checkpoint_filter_fn

from .layers import default_cfg

__all__: list[str] = []  # register_model adds every variant

# --- builder --------------------------------------------------------------------------------------


def _create_small_mixer(variant: str, pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """timm's ``MlpMixer`` for ``variant`` (which has timm's whole model protocol)."""
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        MlpMixer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "mixer_nano_patch4_32": default_cfg(first_conv="stem.proj"),
        "mixer_nano_patch8_32": default_cfg(first_conv="stem.proj"),
        "mixer_tiny_patch4_32": default_cfg(first_conv="stem.proj"),
        "mixer_small_patch4_32": default_cfg(first_conv="stem.proj"),
    }
)

# --- registered variants --------------------------------------------------------------------------
_SMALL = dict(img_size=32, num_classes=10, patch_size=4, mlp_ratio=(0.5, 4.0))


@register_model
def mixer_nano_patch4_32(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """Mixer-Nano/4 at 32x32: 6 blocks of width 128."""
    args = dict(_SMALL, num_blocks=6, embed_dim=128)
    return _create_small_mixer("mixer_nano_patch4_32", pretrained, **dict(args, **kwargs))


@register_model
def mixer_nano_patch8_32(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """Mixer-Nano/8 at 32x32: 6 blocks of width 128 on 4x4 tokens; vitlab's default Mixer in ``compare``."""
    args = dict(_SMALL, num_blocks=6, embed_dim=128, patch_size=8)
    return _create_small_mixer("mixer_nano_patch8_32", pretrained, **dict(args, **kwargs))


@register_model
def mixer_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """Mixer-Ti/4 at 32x32: 8 blocks of width 256."""
    args = dict(_SMALL, num_blocks=8, embed_dim=256)
    return _create_small_mixer("mixer_tiny_patch4_32", pretrained, **dict(args, **kwargs))


@register_model
def mixer_small_patch4_32(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """Mixer-S/4 at 32x32: the Mixer-S shape (8 blocks of width 512) with 4-pixel patches."""
    args = dict(_SMALL, num_blocks=8, embed_dim=512)
    return _create_small_mixer("mixer_small_patch4_32", pretrained, **dict(args, **kwargs))
