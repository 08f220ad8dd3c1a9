"""ResNets for 32x32 images.

Two families, both on timm's ``BasicBlock``:

* ``CifarResNet``: the 6n+2-layer networks of He et al. (2016, section 4.2): a 3x3 stem with 16
  channels, three stages of n blocks with 16, 32 and 64 channels, and the parameter-free
  "option A" shortcut. ResNet-20/56/110 have exactly 269,722 / 853,018 / 1,727,962 parameters.
* ``resnet18_cifar``: timm's ImageNet ResNet-18 with the usual CIFAR stem (one 3x3 stride-1
  convolution, no max-pool), so a 32x32 image keeps a 32x32 map in the first stage.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.layers import DropPath, create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock, ResNet

from ..anatomy import register_anatomy, resnet_anatomy
from .layers import ChannelPadShortcut, default_cfg

__all__ = ["CifarResNet", "CifarStemResNet"]

# --- model class ----------------------------------------------------------------------------------


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al.: stem, three stages of ``depth_per_stage`` basic blocks, head."""

    def __init__(
        self,
        depth_per_stage: int = 3,
        channels: tuple[int, ...] = (16, 32, 64),
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = True,
        **kwargs: Any,  # timm passes img_size etc. through create_model; a CNN does not need them
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=channels[0], reduction=1, module="act1")]

        num_blocks = depth_per_stage * len(channels)
        in_ch, block_idx = channels[0], 0
        for stage_idx, out_ch in enumerate(channels):
            stride = 1 if stage_idx == 0 else 2
            blocks = []
            for i in range(depth_per_stage):
                s = stride if i == 0 else 1
                shortcut = ChannelPadShortcut(in_ch, out_ch, s) if (s != 1 or in_ch != out_ch) else None
                # Stochastic depth grows linearly with depth, as in timm's ResNet.
                dpr = drop_path_rate * block_idx / max(num_blocks - 1, 1)
                drop_path = DropPath(dpr) if dpr > 0 else None
                blocks.append(BasicBlock(in_ch, out_ch, stride=s, downsample=shortcut, drop_path=drop_path))
                in_ch, block_idx = out_ch, block_idx + 1
            self.add_module(f"layer{stage_idx + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_ch, reduction=2**stage_idx, module=f"layer{stage_idx + 1}"))
        self.stages = [f"layer{i + 1}" for i in range(len(channels))]

        self.num_features = self.head_hidden_size = channels[-1]
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.grad_checkpointing = False
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_last:  # each residual branch starts as identity: faster, stabler early training
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Regexes grouping the parameters for layer-wise learning rates (timm's ResNet's)."""
        return dict(stem=r"^conv1|bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier (a Linear, or Identity without classes)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """A new classifier for ``num_classes`` (0: none) after ``global_pool`` ('' for none)."""
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

    def _run_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        stage = getattr(self, name)
        return checkpoint_seq(stage, x) if self.grad_checkpointing and not torch.jit.is_scripting() else stage(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the last stage's feature map (B, C, H/4, W/4)."""
        x = self.act1(self.bn1(self.conv1(x)))
        for name in self.stages:
            x = self._run_stage(name, x)
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The stem's and every stage's feature map, as timm's ``ResNet.forward_intermediates``.

        Index 0 is the stem, 1.. the stages; ``indices`` takes the last n (int), all (None) or the
        listed ones; ``stop_early`` skips the stages after the last one taken. There is no final
        norm, so ``norm`` changes nothing. Returns the intermediates, or
        ``(forward_features output, intermediates)`` unless ``intermediates_only``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', not {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        x = self.act1(self.bn1(self.conv1(x)))
        intermediates = [x] if 0 in take_indices else []
        names = self.stages[:max_index] if stop_early else self.stages
        for i, name in enumerate(names, start=1):
            x = self._run_stage(name, x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Empty the stages after the last of ``indices`` (and drop the classifier), as timm's ResNet."""
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        for name in self.stages[max_index:]:
            setattr(self, name, nn.Sequential())  # empty, so forward_features passes the map through
        prune_end = max_index < len(self.stages)
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the map, then classify unless ``pre_logits``."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, H, W) -> class logits (B, num_classes) (pooled features (B, num_features) without a
        head)."""
        return self.forward_head(self.forward_features(x))


class CifarStemResNet(ResNet):
    """timm's ``ResNet`` with the CIFAR stem: a 3x3 stride-1 convolution and no max-pool."""

    def __init__(self, *args: Any, in_chans: int = 3, **kwargs: Any) -> None:
        kwargs.pop("img_size", None)
        super().__init__(*args, in_chans=in_chans, **kwargs)
        stem_width = self.conv1.out_channels
        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        # Without the 4x stem reduction every feature map is 4x larger than timm records.
        for info in self.feature_info:
            info["reduction"] = max(info["reduction"] // 4, 1)


# --- anatomy --------------------------------------------------------------------------------------

register_anatomy(CifarResNet)(resnet_anatomy)  # same layout as timm's ResNet: stem, layerN.i


# --- builder --------------------------------------------------------------------------------------


def _create(cls: type[nn.Module], variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build ``cls`` as ``variant``; ``features_only=True`` hooks the stem and every stage."""
    return build_model_with_cfg(cls, variant, pretrained, feature_cfg=dict(flatten_sequential=True), **kwargs)


def _cfg(pool_size: tuple[int, int] = (8, 8)) -> dict[str, Any]:
    # A CNN takes any input size; torchvision-style bilinear resizing, the classifier is ``fc``.
    return default_cfg(pool_size=pool_size, interpolation="bilinear", fixed_input_size=False, first_conv="conv1",
                       classifier="fc")


default_cfgs = generate_default_cfgs(
    {
        "resnet20_cifar": _cfg(),
        "resnet32_cifar": _cfg(),
        "resnet44_cifar": _cfg(),
        "resnet56_cifar": _cfg(),
        "resnet110_cifar": _cfg(),
        "resnet18_cifar": _cfg(pool_size=(4, 4)),
    }
)

# --- registered variants --------------------------------------------------------------------------


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 (He et al., option A shortcuts): 3 blocks per stage, 0.27M parameters."""
    return _create(CifarResNet, "resnet20_cifar", pretrained, **dict(dict(depth_per_stage=3), **kwargs))


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 (He et al., option A shortcuts): 5 blocks per stage."""
    return _create(CifarResNet, "resnet32_cifar", pretrained, **dict(dict(depth_per_stage=5), **kwargs))


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-44 (He et al., option A shortcuts): 7 blocks per stage."""
    return _create(CifarResNet, "resnet44_cifar", pretrained, **dict(dict(depth_per_stage=7), **kwargs))


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 (He et al., option A shortcuts): 9 blocks per stage, 0.85M parameters."""
    return _create(CifarResNet, "resnet56_cifar", pretrained, **dict(dict(depth_per_stage=9), **kwargs))


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110 (He et al., option A shortcuts): 18 blocks per stage, 1.7M parameters."""
    return _create(CifarResNet, "resnet110_cifar", pretrained, **dict(dict(depth_per_stage=18), **kwargs))


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> CifarStemResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool (11.2M parameters at 10 classes)."""
    args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create(CifarStemResNet, "resnet18_cifar", pretrained, **dict(args, **kwargs))
