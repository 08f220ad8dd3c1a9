"""Building blocks shared by vitlab's model families that timm does not provide."""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from ..errors import VitlabError


class ChannelPadShortcut(nn.Module):
    """The parameter-free "option A" shortcut of He et al. (2016) for CIFAR ResNets.

    Subsamples the input spatially by ``stride`` and zero-pads the new channels, half on each
    side, so the residual path can change width without a projection (and without parameters,
    which is what makes ResNet-20 exactly 269,722 parameters).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option-A shortcut cannot shrink channels ({in_channels} -> {out_channels})")
        self.stride = stride
        self.pad_before = (out_channels - in_channels) // 2
        self.pad_after = out_channels - in_channels - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


def freeze_sincos_pos_embed_(model: nn.Module) -> None:
    """Replace a timm ViT's learned position embedding by the fixed 2-D sin-cos one, frozen.

    Fixed sin-cos embeddings (as in MAE and Beyer et al. 2022, "Better plain ViT baselines") give
    a plain ViT its token layout from the first step instead of learning it, which matters most on
    small data. Rows for prefix tokens (class token), if the embedding has them, are zero. The
    parameter stays in the model (and in its parameter count), with ``requires_grad=False``.
    """
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    grid = list(model.patch_embed.grid_size)
    table = build_sincos2d_pos_embed(grid, model.pos_embed.shape[-1])
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, -table.shape[0]:] = table
    model.pos_embed.requires_grad_(False)


def remove_last_attention_skip(model: nn.Module) -> None:
    """Peruzzo et al.'s variant: the last block computes ``y = attn(norm1(x)); y + mlp(y)``.

    Only for models made of timm ``Block``s (``model.blocks``), such as vitlab's ViTs.
    """
    blocks = getattr(model, "blocks", None)
    last = blocks[-1] if isinstance(blocks, nn.Sequential) and len(blocks) else None
    if not isinstance(last, Block):
        raise VitlabError(f"removing the last attention skip connection needs timm transformer blocks "
                          f"(model.blocks), which {type(model).__name__} does not have; use a vitlab ViT")

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        y = self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return y + self.drop_path2(self.ls2(self.mlp(y)))

    last.norm2 = nn.Identity()
    last.forward = types.MethodType(forward, last)
