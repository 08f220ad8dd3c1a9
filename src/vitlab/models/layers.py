"""Building blocks shared by vitlab's model families that timm does not provide.

Besides layers, the helpers every model file uses: :func:`default_cfg` (timm's pretrained-config
dict with vitlab's common values, each family passing only its differences) and
:func:`tokens_to_intermediates` (block outputs of a token model laid out as timm's
``forward_intermediates`` returns them).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import checkpoint, checkpoint_seq
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block

from ..errors import VitlabError

__all__ = ["BlockIntermediates", "ChannelPadShortcut", "default_cfg", "freeze_sincos_pos_embed_",
           "remove_last_attention_skip", "tokens_to_intermediates"]

#: Normalisation of vitlab's 32x32 models: images scaled to [-1, 1].
SMALL_MEAN = SMALL_STD = (0.5, 0.5, 0.5)


def default_cfg(
    input_size: int = 32,
    num_classes: int = 10,
    *,
    first_conv: str | None = "patch_embed.proj",
    classifier: str = "head",
    **overrides: Any,
) -> dict[str, Any]:
    """timm's pretrained-config dict of a vitlab model: the keys every family shares, then ``overrides``.

    No weights to download (``url`` is empty), a square ``input_size``, bicubic resizing and a
    fixed input size (a position embedding or token grid sized when the model is built). At
    32x32, vitlab's small-image size, images are normalised to [-1, 1] and not cropped; at a
    paper's larger size, timm's ImageNet statistics and crop fraction (0.875) apply. A family
    passes only what differs (CCT's CIFAR statistics, a CNN's ``fixed_input_size=False``, ...).
    """
    small = input_size == 32
    return {
        "url": "",
        "num_classes": num_classes,
        "input_size": (3, input_size, input_size),
        "pool_size": None,
        "crop_pct": 1.0 if small else 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": SMALL_MEAN if small else IMAGENET_DEFAULT_MEAN,
        "std": SMALL_STD if small else IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": classifier,
        **overrides,
    }


def tokens_to_intermediates(
    intermediates: list[torch.Tensor],
    grid: tuple[int, int],
    num_prefix_tokens: int = 0,
    output_fmt: str = "NCHW",
    return_prefix_tokens: bool = False,
) -> list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
    """Block outputs (B, prefix + H*W, C) as timm's ``forward_intermediates`` returns them.

    The prefix tokens (class token, ...) are split off; the grid tokens stay (B, H*W, C) for
    ``output_fmt="NLC"`` or become (B, C, H, W) maps on ``grid`` for ``"NCHW"``. With
    ``return_prefix_tokens`` (and prefix tokens to return) each entry is a ``(map, prefix)`` pair.
    """
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', not {output_fmt!r}")
    prefix = [y[:, :num_prefix_tokens] for y in intermediates]
    tokens = [y[:, num_prefix_tokens:] for y in intermediates]
    if output_fmt == "NCHW":
        tokens = [y.reshape(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for y in tokens]
    if return_prefix_tokens and num_prefix_tokens:
        return list(zip(tokens, prefix))
    return tokens


class BlockIntermediates:
    """``forward_features``, gradient checkpointing and timm's ``forward_intermediates`` and
    ``prune_intermediate_layers`` for a token model that is ``norm(blocks(_embed(x)))`` on one
    token grid (CCT, T2T-ViT, DHVT).

    The model provides ``_embed``, ``blocks``, ``norm``, ``num_prefix_tokens``,
    ``grad_checkpointing``, ``reset_classifier`` and :meth:`intermediate_grid`.
    """

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, prefix + grid tokens, embed_dim)."""
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def intermediate_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """The token grid (rows, columns) the blocks work on for images ``x``."""
        raise NotImplementedError

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
        """Block outputs as timm's ``VisionTransformer.forward_intermediates`` returns them.

        ``indices``: the last n blocks (int), all (None) or the listed ones; ``norm`` applies the
        final norm to each; ``stop_early`` skips the blocks after the last one taken. Maps are
        (B, embed_dim, H, W) on the token grid (``output_fmt="NLC"``: tokens), each with the prefix
        (class) tokens when ``return_prefix_tokens``. Returns the intermediates, or
        ``(forward_features output, intermediates)`` unless ``intermediates_only``.
        """
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        grid = self.intermediate_grid(x)
        x = self._embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[: max_index + 1]
        intermediates = []
        for i, block in enumerate(blocks):
            x = checkpoint(block, x) if self.grad_checkpointing and not torch.jit.is_scripting() else block(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        intermediates = tokens_to_intermediates(intermediates, grid, self.num_prefix_tokens, output_fmt,
                                                return_prefix_tokens)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm, the classifier if asked)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices


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
        """Map (B, in_channels, H, W) -> (B, out_channels, H', W'): subsampled by ``stride``, channels zero-padded."""
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        """Stride and padding, shown in the module's repr."""
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

    def forward(self: Block, x: torch.Tensor, **kwargs) -> torch.Tensor:
        y = self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return y + self.drop_path2(self.ls2(self.mlp(y)))

    last.norm2 = nn.Identity()
    last.forward = types.MethodType(forward, last)
