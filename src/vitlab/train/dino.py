"""DINO: self-distillation with no labels (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers"), at small scale, for any vitlab backbone.

A student (the backbone and a projection head) learns to match a teacher's output distribution
over K "prototypes" on a different augmented view of the same image. The teacher is the
student's exponential moving average (its momentum rising on a cosine from 0.996 to 1 over
training) and gets no gradient. Collapse is avoided by centering the teacher's outputs (a moving
average of their batch mean, momentum 0.9, is subtracted) and sharpening them (temperature 0.04
against the student's 0.1). The loss is the cross-entropy between the teacher's distribution of
one view and the student's of the other, over both orderings.

Small-scale choices (the paper's values are for ViT-S/16 on ImageNet):

* two views only, no local crops (multi-crop needs smaller crops, which 32x32 images cannot spare);
* both views are made inside :class:`DINO` from the one (already normalised) batch the data
  loader gives: a random resized crop and flip per image as one batched affine ``grid_sample``,
  then per-image colour jitter (brightness, contrast, saturation; hue left out: it has no cheap
  batched form) and random greyscale; no blur or solarisation (32x32 pixels have little detail to
  blur). All of it draws from torch's global RNG, which the trainer reseeds every step, so a
  resumed run replays the same views;
* a head sized for backbones 64-200 wide: 3 layers of 256, a 64-wide bottleneck, 1024 prototypes
  (the paper: 2048, 256 and 65536);
* the weight decay stays constant (the paper raises it from 0.04 to 0.4), and the prototypes are
  never frozen (the paper freezes them for the first epoch, a run here may have only one).

Works for any model with timm's ``forward_features`` and ``forward_head(..., pre_logits=True)``:
ViTs, ResNets, Mixers and the other vitlab families.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.utils import ModelEmaV3

from .. import distributed
from ..errors import VitlabError
from .objectives import PretrainingObjective, feature_dim, pooled_features

#: Colour jitter strengths and probabilities (the paper's, after BYOL's); the hue jitter is left out.
BRIGHTNESS, CONTRAST, SATURATION, JITTER_PROB, GREYSCALE_PROB = 0.4, 0.4, 0.2, 0.8, 0.2
#: The teacher temperature's starting value when it is warmed up (the paper's).
WARMUP_TEACHER_TEMP = 0.04


class DINOHead(nn.Module):
    """Projection head: an MLP (GELU) to a bottleneck, L2-normalised, then a weight-normalised linear
    layer to the prototypes. The last layer's weight norm is fixed at 1 (the paper's default,
    ``norm_last_layer``), so its logits are cosine similarities to the prototypes."""

    def __init__(self, in_dim: int, prototypes: int = 1024, hidden_dim: int = 256, bottleneck_dim: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck_dim))
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        trunc_normal_(self.prototypes, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, in_dim) -> cosine similarities to the prototypes (B, prototypes)."""
        x = F.normalize(self.mlp(features), dim=-1)
        return x @ F.normalize(self.prototypes, dim=-1).T  # weight norm with g = 1: unit-norm rows


def augment_views(images: torch.Tensor, mean: tuple[float, float, float], std: tuple[float, float, float],
                  crop_scale: float = 0.4) -> torch.Tensor:
    """One random view of every image of a normalised batch, the same shape, from torch's global RNG.

    A random resized crop (area fraction in ``[crop_scale, 1]``, aspect ratio in [3/4, 4/3]) and a
    horizontal flip, per image, as one affine ``grid_sample``; then, in pixel space, colour jitter
    (each of brightness, contrast and saturation by a random factor, with probability 0.8) and
    greyscale (probability 0.2); normalised again at the end.
    """
    b, device = images.shape[0], images.device
    u = lambda *shape: torch.rand(*shape, device=device)  # noqa: E731 - every draw from the global RNG
    area = crop_scale + (1 - crop_scale) * u(b)
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u(b)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # fractions of the image's width and height
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx, cy = (1 - w) * (2 * u(b) - 1), (1 - h) * (2 * u(b) - 1)  # crop centres, the crop inside the image
    flip = torch.where(u(b) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)

    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    x = x * s + m  # pixels in [0, 1]
    weights = torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)  # ITU-R 601 luma, as PIL
    grey = lambda t: (t * weights).sum(1, keepdim=True)  # noqa: E731
    factor = lambda strength: (1 + strength * (2 * u(b) - 1)).view(b, 1, 1, 1)  # noqa: E731 - in [1-s, 1+s]
    jitter = (u(b) < JITTER_PROB).view(b, 1, 1, 1)
    y = (x * factor(BRIGHTNESS)).clamp(0, 1)
    level = grey(y).mean((2, 3), keepdim=True)
    y = (level + (y - level) * factor(CONTRAST)).clamp(0, 1)
    y = (grey(y) + (y - grey(y)) * factor(SATURATION)).clamp(0, 1)
    x = torch.where(jitter, y, x)
    x = torch.where((u(b) < GREYSCALE_PROB).view(b, 1, 1, 1), grey(x).expand_as(x), x)
    return ((x - m) / s).to(images.dtype)


class DINO(PretrainingObjective):
    """Student (backbone + :class:`DINOHead`), its EMA teacher and the centre of the teacher's outputs.

    ``forward(images)`` makes two views and gives ``(student, teacher)`` outputs, (2 * batch, K)
    each, the first half from the first view. :meth:`loss` is the cross-view cross-entropy at
    the step's teacher temperature; :meth:`after_step` moves the centre and the teacher. The
    teacher and the centre are part of :meth:`task_state`, so resuming is exact.
    """

    val_acc_name = "k-NN accuracy of the pooled features"

    def __init__(self, backbone: nn.Module, total_steps: int, steps_per_epoch: int,
                 mean: tuple[float, float, float] = (0.5, 0.5, 0.5), std: tuple[float, float, float] = (0.5, 0.5, 0.5),
                 prototypes: int = 1024, hidden_dim: int = 256, bottleneck_dim: int = 64, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, teacher_temp_warmup: float = 0.0, momentum: float = 0.996,
                 center_momentum: float = 0.9, crop_scale: float = 0.4) -> None:
        super().__init__()
        if not (hasattr(backbone, "forward_features") and hasattr(backbone, "forward_head")):
            raise VitlabError(f"DINO needs a model with timm's forward_features and forward_head, which "
                              f"{type(backbone).__name__} lacks; use a vitlab model (vitlab models)")
        self.backbone = backbone
        self.head = DINOHead(feature_dim(backbone), prototypes, hidden_dim, bottleneck_dim)
        # timm's weight EMA holds the teacher; the decay is set every step by after_step's schedule.
        self.teacher = ModelEmaV3(self._student(), decay=momentum)
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, prototypes))
        self.total_steps, self.steps_per_epoch = max(total_steps, 1), steps_per_epoch
        self.mean, self.std, self.crop_scale = mean, std, crop_scale
        self.student_temp, self.teacher_temp, self.teacher_temp_warmup = student_temp, teacher_temp, teacher_temp_warmup
        self.momentum, self.center_momentum = momentum, center_momentum
        self._batch_center: torch.Tensor | None = None

    def _student(self) -> nn.ModuleDict:
        # A view of the student's modules in the teacher's layout (not registered: no second copy in state_dict).
        return nn.ModuleDict({"backbone": self.backbone, "head": self.head})

    def train(self, mode: bool = True) -> "DINO":
        """Set the student's training ``mode``; the teacher always stays in eval mode. Returns ``self``."""
        super().train(mode)
        self.teacher.eval()  # the teacher never drops anything (dropout, stochastic depth) and uses running BN stats
        return self

    def teacher_temperature(self, step: int | None) -> float:
        """Linear warm-up from 0.04 to ``teacher_temp`` over ``teacher_temp_warmup`` epochs, then constant."""
        warmup = self.teacher_temp_warmup * self.steps_per_epoch
        if step is None or warmup <= 0 or step >= warmup:
            return self.teacher_temp
        return WARMUP_TEACHER_TEMP + (self.teacher_temp - WARMUP_TEACHER_TEMP) * step / warmup

    def teacher_momentum(self, step: int) -> float:
        """Cosine from ``momentum`` at the first step to 1 at the last."""
        return 1 - (1 - self.momentum) * (math.cos(math.pi * step / self.total_steps) + 1) / 2

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) -> ``(student, teacher)`` prototype logits (2B, prototypes) each, for two random
        views of every image (first view in the first half)."""
        views = torch.cat([augment_views(images, self.mean, self.std, self.crop_scale) for _ in range(2)])
        student = self.head(pooled_features(self.backbone, views))
        with torch.no_grad():
            teacher_net = self.teacher.module
            teacher = teacher_net["head"](pooled_features(teacher_net["backbone"], views))
        return student, teacher

    def loss(self, outputs: tuple[torch.Tensor, torch.Tensor], step: int | None = None) -> tuple[torch.Tensor, None]:
        """Cross-entropy of the student's view-j distribution against the teacher's (centred,
        sharpened) view-i distribution, averaged over the pairs i != j; training batches also
        note their teacher mean for :meth:`after_step`'s centre update."""
        student, teacher = (o.float() for o in outputs)
        teacher = teacher.detach()
        targets = F.softmax((teacher - self.center) / self.teacher_temperature(step), dim=-1).chunk(2)
        log_probs = F.log_softmax(student / self.student_temp, dim=-1).chunk(2)
        loss = sum(-(targets[i] * log_probs[j]).sum(-1).mean() for i, j in ((0, 1), (1, 0))) / 2
        if self.training:
            self._batch_center = teacher.mean(0, keepdim=True)
        return loss, None

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """The centre moves towards the batch's teacher mean (over every process), the teacher
        towards the student with the step's momentum."""
        if self._batch_center is not None:
            batch = distributed.all_reduce_sum(self._batch_center.clone()) / distributed.current().world_size
            self.center.mul_(self.center_momentum).add_(batch, alpha=1 - self.center_momentum)
            self._batch_center = None
        self.teacher.apply_update_(self._student(), self.teacher_momentum(step))
