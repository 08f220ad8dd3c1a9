"""Counting multiply-accumulates (MACs) of a forward pass, attention matmuls included.

PyTorch's ``FlopCounterMode`` counts every matmul and convolution, but on the CPU the fused
attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no formula and counts as
zero, which would make every ViT look cheaper than it is. This module registers the standard
attention formula for that kernel, so fused and unfused attention count the same.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

__all__ = ["count_macs"]

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _CPU_FLASH is not None:

    @register_flop_formula(_CPU_FLASH)
    def _cpu_flash_attention_flop(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args,
                                  out_shape: torch.Size | None = None, **kwargs) -> int:
        # Same work as the GPU flash kernel: q k^T and attn v.
        return sdpa_flop_count(query_shape, key_shape, value_shape)


@torch.no_grad()
def count_macs(model: nn.Module, image_size: int | tuple[int, int] = 32, in_chans: int = 3) -> int:
    """MACs of one forward pass of ``model`` on one image (attention matmuls included)."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_chans, *size))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2  # FlopCounterMode counts 2 FLOPs per multiply-add
