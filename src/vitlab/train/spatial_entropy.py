"""Spatial entropy regulariser (Peruzzo et al., "Spatial Entropy as an Inductive Bias for Vision Transformers").

A ViT trained on little data spreads the class token's attention over the image; the regulariser
rewards attention that forms a few compact blobs. For the last attention layer, per image and
head, take the class token's row of pre-softmax logits ``s`` over the patch grid; keep the
patches above the row's mean; group them into 8-connected components (scipy, no gradient through
the labelling); with ``x = ReLU(s - mean) + 1e-9`` and ``p_k`` the share of component ``k`` in the
total above-mean mass, the spatial entropy is ``SE = -sum_k p_k log p_k``. The loss is its mean over
images and heads (in fp32), added to the cross-entropy with a weight that warms up linearly and
then decays on a cosine to zero.

The logits are recovered from the probabilities the attention module forms: within a row,
``log p = s - logsumexp(s)``, so ``log p - mean(log p) = s - mean(s)`` exactly, and the
gradient flows through the softmax. Models without a class token (CCT's sequence pooling, GAP
ViTs) use the mean over all query rows of the logits instead of the class token's row.

The paper's variant without the last block's attention skip connection (and its second norm) is
:func:`vitlab.models.layers.remove_last_attention_skip` (an architecture change, so it lives with
the models and the run's model builder applies it).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
from scipy import ndimage

from ..anatomy import AttentionSite, anatomy
from ..errors import VitlabError

#: 8-connectivity: diagonal neighbours belong to the same component.
_EIGHT = np.ones((3, 3), dtype=int)


def spatial_entropy(logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Mean spatial entropy of patch logits ``(batch, heads, rows * cols)`` laid out on ``grid``."""
    b, h, n = logits.shape
    rows, cols = grid
    if rows * cols != n:
        raise VitlabError(f"spatial entropy: {n} patch logits do not fill a {rows}x{cols} grid")
    s = logits.float()
    centred = s - s.mean(-1, keepdim=True)
    above = (centred > 0).detach().cpu().numpy().reshape(b * h, rows, cols)
    labels = np.zeros((b * h, rows * cols), dtype=np.int64)
    for i, mask in enumerate(above):  # connected components of each (image, head) map
        labels[i] = ndimage.label(mask, structure=_EIGHT)[0].reshape(-1)
    labels_t = torch.from_numpy(labels).to(s.device)
    x = torch.relu(centred).reshape(b * h, n) + 1e-9
    mass = torch.zeros(b * h, n + 1, device=s.device).scatter_add_(1, labels_t, x)[:, 1:]  # label 0: below mean
    share = mass / mass.sum(1, keepdim=True).clamp_min(1e-12)
    entropy = -(share * torch.log(share.clamp_min(1e-12))).sum(1)
    return entropy.mean()


def entropy_weight(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """The regulariser's weight at ``step``: linear warm-up to ``peak``, then cosine to zero."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    rest = max(total_steps - warmup_steps, 1)
    return peak * 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, rest) / rest))


class SpatialEntropyProbe:
    """Hooks the last attention layer of ``model`` and turns each forward pass into the loss term.

    Use as a context manager around training; after every forward pass, :meth:`loss` is the
    mean spatial entropy of that pass (with gradient).
    """

    def __init__(self, model: nn.Module, model_name: str = "") -> None:
        try:
            sites = anatomy(model).attention
        except VitlabError:
            sites = []
        if not sites:
            raise VitlabError(f"spatial entropy needs attention over a token grid, and "
                              f"{model_name or type(model).__name__} has none; "
                              "use a ViT, CCT, CvT, T2T-ViT, DHVT or QnA-ViT (vitlab models)")
        self.model, self.site = model, sites[-1]
        self._logits: torch.Tensor | None = None
        self._handles: list = []
        self._fused: tuple[nn.Module, bool] | None = None

    def __enter__(self) -> "SpatialEntropyProbe":
        module = self.model.get_submodule(self.site.name)
        if self.site.recompute is not None:
            self._handles.append(module.register_forward_hook(
                lambda m, inputs, out: self._keep(self.site.recompute(m, inputs))))
        else:
            if hasattr(module, "fused_attn"):  # the explicit path forms the probabilities we need
                self._fused = (module, module.fused_attn)
                module.fused_attn = False
            self._handles.append(module.attn_drop.register_forward_hook(lambda m, inputs, out: self._keep(inputs[0])))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        if self._fused is not None:
            self._fused[0].fused_attn = self._fused[1]
        self._handles, self._fused = [], None

    def _keep(self, probs: torch.Tensor) -> None:
        site: AttentionSite = self.site
        log_p = torch.log(probs.float().clamp_min(1e-30))
        p = site.prefix_tokens
        rows = log_p[:, :, 0, p:] if p else log_p[:, :, p:, p:].mean(2)  # class-token row, or all rows' mean
        self._logits = rows

    def loss(self) -> torch.Tensor:
        """The spatial entropy of the last forward pass."""
        if self._logits is None:
            raise RuntimeError("no forward pass since the last loss()")
        logits, self._logits = self._logits, None
        return spatial_entropy(logits, self.site.grid)
