"""MAE: masked autoencoders as pretraining (He et al. 2022, "Masked Autoencoders Are Scalable
Vision Learners").

Every image loses a random 75% of its patches (its own random subset); the ViT encoder runs on
the kept patch tokens alone (plus its class/register tokens, all with the ViT's own position
embedding). A light decoder of timm ``Block``\\ s takes the encoded tokens, puts a learned mask
token where each dropped patch was, adds a fixed 2-D sin-cos position embedding and predicts the
pixels of every patch. The loss is the mean squared error on the masked patches only, against
per-patch normalised pixels (each patch's pixels minus their mean, over their standard deviation:
the paper's default, which it found gives better representations).

Fine-tuning (``vitlab finetune RUN``) then trains the encoder, a timm ``VisionTransformer`` that
was never changed, on all patches with a classifier; the decoder is dropped.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block

from ..errors import VitlabError
from .objectives import PretrainingObjective


class MaskedAutoencoder(PretrainingObjective):
    """A ViT encoder and a light pixel decoder.

    ``forward(images)`` gives ``(prediction, target, mask)``: the predicted and the target pixels
    of every patch, both (batch, patches, patch_pixels), and ``mask`` (batch, patches), 1 where a
    patch was masked (hidden from the encoder). :meth:`loss` is the MSE over the masked patches.

    The decoder's defaults (width 128, 2 blocks, 4 heads) suit vitlab's 32x32 ViTs: the paper's
    decoder (512 wide, 8 deep) is meant for ViT-L on 196 patches; here a grid has 16-64 patches
    and the encoder is 128-192 wide, so a decoder no wider than the encoder and a quarter of its
    depth keeps the paper's "light decoder" ratio (it must stay weak, or the encoder learns less).
    """

    val_acc_name = "k-NN accuracy of the pooled features"

    def __init__(self, vit: nn.Module, mask_ratio: float = 0.75, decoder_dim: int = 128, decoder_depth: int = 2,
                 decoder_heads: int = 4, norm_pix_loss: bool = True) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(vit, VisionTransformer):
            raise VitlabError(f"MAE needs a ViT (timm VisionTransformer), not {type(vit).__name__}; use e.g. "
                              "vit_nano_patch4_32 or vit_tiny_patch4_32 (vitlab models 'vit*'), or --objective dino")
        if not 0 < mask_ratio < 1:
            raise VitlabError(f"mae_mask_ratio (the fraction of patches hidden) must be in (0, 1), not {mask_ratio}")
        if getattr(vit, "dynamic_img_size", False):
            raise VitlabError("MAE needs a ViT with a fixed token grid, not one built with dynamic_img_size")
        if decoder_dim % 4 or decoder_dim % decoder_heads:
            raise VitlabError(f"mae_decoder_dim must be a multiple of 4 (sin-cos embedding) and of mae_decoder_heads, "
                              f"not {decoder_dim} with {decoder_heads} heads")
        self.backbone, self.mask_ratio, self.norm_pix_loss = vit, mask_ratio, norm_pix_loss
        self.patch_size = vit.patch_embed.patch_size  # (h, w)
        self.grid = vit.patch_embed.grid_size
        self.num_patches = self.grid[0] * self.grid[1]
        self.kept = max(1, round((1 - mask_ratio) * self.num_patches))
        self.decoder_embed = nn.Linear(vit.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed, not learned (the paper's choice); prefix tokens get no position, as in the paper.
        self.register_buffer("decoder_pos_embed", build_sincos2d_pos_embed(list(self.grid), decoder_dim)[None],
                             persistent=False)
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim,
                                      self.patch_size[0] * self.patch_size[1] * vit.patch_embed.proj.in_channels)
        trunc_normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, patches, ph * pw * C), patches in the order of the ViT's tokens (row-major)."""
        (ph, pw), (gh, gw) = self.patch_size, self.grid
        b, c = images.shape[:2]
        x = images.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, gh * gw, ph * pw * c)

    def random_masking(self, batch: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, the indices of the kept patches (batch, kept) and of every patch in shuffled
        order (batch, patches): a random permutation from torch's global RNG (which the trainer
        reseeds every step, so masks replay exactly on resume)."""
        shuffle = torch.rand(batch, self.num_patches, device=device).argsort(1)
        return shuffle[:, :self.kept], shuffle

    def encode(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The encoder's output for the kept patches only: (B, prefix + kept, D)."""
        vit = self.backbone
        x = vit._pos_embed(vit.patch_embed(images))  # prefix tokens first; the ViT's own embedding
        p = vit.num_prefix_tokens
        patches = x[:, p:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        x = vit.norm_pre(vit.patch_drop(torch.cat([x[:, :p], patches], dim=1)))
        return vit.norm(vit.blocks(x))

    def decode(self, latent: torch.Tensor, shuffle: torch.Tensor) -> torch.Tensor:
        """Pixels of every patch (B, patches, patch_pixels), from the encoded prefix and kept tokens."""
        p = self.backbone.num_prefix_tokens
        x = self.decoder_embed(latent)
        b, d = x.shape[0], x.shape[-1]
        # Kept tokens then mask tokens, in shuffled order; scatter puts each back at its grid position.
        shuffled = torch.cat([x[:, p:], self.mask_token.expand(b, self.num_patches - self.kept, -1)], dim=1)
        patches = torch.empty_like(shuffled).scatter(1, shuffle[..., None].expand(-1, -1, d), shuffled)
        x = torch.cat([x[:, :p], patches + self.decoder_pos_embed.to(x.dtype)], dim=1)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, p:])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) -> ``(prediction, target, mask)``: predicted and target pixels (B, patches,
        patch_pixels), and the mask (B, patches), 1 for the patches the encoder did not see."""
        keep, shuffle = self.random_masking(images.shape[0], images.device)
        prediction = self.decode(self.encode(images, keep), shuffle)
        target = self.patchify(images)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        mask = torch.ones(images.shape[0], self.num_patches, device=images.device)
        mask.scatter_(1, keep, 0.0)
        return prediction, target, mask

    def loss(self, outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
             step: int | None = None) -> tuple[torch.Tensor, None]:
        """Mean squared error per pixel, averaged over the masked patches only (kept ones do not count)."""
        prediction, target, mask = outputs
        per_patch = (prediction.float() - target.float()).pow(2).mean(-1)
        return (per_patch * mask).sum() / mask.sum(), None
