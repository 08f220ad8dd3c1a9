"""MP3: masked patch position prediction as pretraining (Zhai et al. 2022, "Position Prediction as an
Effective Pretraining Strategy").

The ViT runs without its position embedding, so it must work out where each patch came from.
Every token is a query, but keys and values come only from a random subset of the patches (25%
kept by default; class tokens are always kept), which makes the task hard enough to learn
spatial structure. A linear head maps each output token to logits over the N grid positions,
trained with N-way cross-entropy. Fine-tuning (``vitlab finetune RUN``) then trains the same ViT
with its position embedding and a classifier.

Built on timm's ``VisionTransformer``: the key subset is an attention mask that every timm
``Block`` accepts, so the blocks themselves are unchanged.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import VitlabError
from .objectives import PretrainingObjective


class PositionPrediction(PretrainingObjective):
    """A ViT and a position head: ``forward(images)`` gives (batch, patches, patches) position logits."""

    val_acc_name = "position accuracy"

    def __init__(self, vit: nn.Module, keep: float = 0.25) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(vit, VisionTransformer):
            raise VitlabError(f"MP3 position prediction needs a ViT (timm VisionTransformer), not "
                              f"{type(vit).__name__}; use e.g. vit_tiny_patch4_32 (vitlab models 'vit*')")
        if not 0 < keep <= 1:
            raise VitlabError(f"mp3_keep (the fraction of patches used as keys) must be in (0, 1], not {keep}")
        self.backbone, self.keep = vit, keep
        self.num_patches = vit.patch_embed.num_patches
        self.head = nn.Linear(vit.embed_dim, self.num_patches)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> position logits (B, patches, patches) of every patch token, attending to a
        random subset of keys and without the position embedding."""
        vit = self.backbone
        x = vit.patch_embed(images)  # (B, N, D): no position embedding
        b, n, _ = x.shape
        prefix = [t.expand(b, -1, -1) for t in (vit.cls_token, getattr(vit, "reg_token", None)) if t is not None]
        p = sum(t.shape[1] for t in prefix)
        x = vit.norm_pre(torch.cat(prefix + [x], dim=1))
        # Keys and values: a random subset of the patches per image (prefix tokens always kept).
        kept = max(1, round(self.keep * n))
        chosen = torch.rand(b, n, device=x.device).argsort(1)[:, :kept]
        keys = torch.zeros(b, p + n, dtype=torch.bool, device=x.device)
        keys[:, :p] = True
        keys.scatter_(1, chosen + p, True)
        mask = keys[:, None, None, :]  # (B, 1, 1, tokens): every query sees the same keys
        for block in vit.blocks:
            x = block(x, attn_mask=mask)
        return self.head(vit.norm(x)[:, p:])

    def targets(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The position index of every token, flattened like ``forward(...).flatten(0, 1)``."""
        return torch.arange(self.num_patches, device=device).repeat(batch)

    def loss(self, outputs: torch.Tensor, step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """N-way cross-entropy (unsmoothed) of every token's position, and the share of tokens placed right."""
        logits = outputs.flatten(0, 1).float()
        targets = self.targets(outputs.shape[0], logits.device)
        return F.cross_entropy(logits, targets), (logits.argmax(1) == targets).float().mean()

    def validate(self, loader: Iterable, device: torch.device | str = "cpu") -> tuple[float, float]:
        """Position-prediction loss and accuracy over every token of the validation images."""
        return position_accuracy(self, loader, device)

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the position head; also from checkpoints written before the pretraining objectives
        shared one protocol, which saved the bare head's state (``weight``, ``bias``) unprefixed."""
        if state and all("." not in key for key in state):
            state = {f"head.{key}": value for key, value in state.items()}
        super().load_task_state(state)


@torch.inference_mode()
def position_accuracy(task: PositionPrediction, loader: Iterable,
                      device: torch.device | str = "cpu") -> tuple[float, float]:
    """Mean position-prediction loss and accuracy over the images of ``loader`` (labels unused)."""
    was_training = task.training
    task.eval()
    loss_sum = correct = seen = 0.0
    for images, _ in loader:
        images = images.to(device)
        logits = task(images).flatten(0, 1).float()
        targets = task.targets(images.shape[0], logits.device)
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(1) == targets).sum().item()
        seen += targets.numel()
    task.train(was_training)
    return (loss_sum / seen, correct / seen) if seen else (float("nan"), float("nan"))
