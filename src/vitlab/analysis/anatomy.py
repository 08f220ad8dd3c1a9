"""Anatomy: where a model's analysable layers and attention modules are.

Analyses never hard-code a family: they ask :func:`anatomy` for the layers to hook (in depth
order, with short labels for plots), the attention modules, the token grid, the number of prefix
tokens (class/distillation tokens) and the patch size in pixels. Family knowledge lives here
only. Supported: timm's ``VisionTransformer`` (ViT, DeiT and vitlab's small ViTs), ``MlpMixer``,
``ResNet`` (timm's and vitlab's CIFAR ResNets).

Attention convention (what :mod:`vitlab.analysis.capture` relies on): an attention module has a
``fused_attn`` flag and, when it is off, passes its softmax probabilities of shape
(batch, heads, tokens, tokens) through a submodule ``attn_drop``. timm's ``Attention`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from ..errors import VitlabError


@dataclass
class Layer:
    """One analysable layer: the module whose output is the representation after it."""

    #: Module path inside the model (``model.get_submodule(name)``).
    name: str
    #: Short label for plots and tables, e.g. ``"block3"`` or ``"2.1"`` (stage 2, block 1).
    label: str
    #: ``"embed"``, ``"block"`` or ``"stem"``.
    kind: str = "block"


@dataclass
class Anatomy:
    """The analysable structure of one model."""

    family: str
    layers: list[Layer]
    #: Module paths of attention modules in depth order (empty for CNNs and Mixers).
    attention: list[str] = field(default_factory=list)
    #: Heads of each attention module, and a short label for each (the block it sits in).
    num_heads: list[int] = field(default_factory=list)
    attention_labels: list[str] = field(default_factory=list)
    #: Token grid (rows, columns) of token-based models; ``None`` for CNNs.
    grid: tuple[int, int] | None = None
    #: Tokens before the patch tokens (class token, distillation token, registers).
    prefix_tokens: int = 0
    #: Pixels per token side; ``None`` for CNNs.
    patch_size: tuple[int, int] | None = None
    #: Input image size the model expects (``None`` when any size works).
    image_size: tuple[int, int] | None = None

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def layer_labels(self) -> list[str]:
        return [layer.label for layer in self.layers]

    @property
    def has_attention(self) -> bool:
        return bool(self.attention)


def anatomy(model: nn.Module) -> Anatomy:
    """Describe ``model``'s analysable layers; a clear error for families vitlab does not know."""
    from timm.models.mlp_mixer import MlpMixer
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    from ..models.resnet import CifarResNet

    if isinstance(model, VisionTransformer):
        return _vit(model)
    if isinstance(model, MlpMixer):
        return _mixer(model)
    if isinstance(model, (ResNet, CifarResNet)):
        return _resnet(model)
    raise VitlabError(
        f"vitlab cannot find the layers of {type(model).__name__}; supported families: "
        "VisionTransformer (vit_*, deit_*), MlpMixer (mixer_*), ResNet (resnet*)"
    )


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _vit(model: nn.Module) -> Anatomy:
    embed = model.patch_embed
    # norm_pre sees the tokens after the class token and position embedding are added (it is an
    # Identity in most ViTs, which still runs hooks): the true input representation.
    layers = [Layer("norm_pre", "embed", "embed")]
    layers += [Layer(f"blocks.{i}", f"block{i + 1}") for i in range(len(model.blocks))]
    return Anatomy(
        family="vit",
        layers=layers,
        attention=[f"blocks.{i}.attn" for i in range(len(model.blocks))],
        num_heads=[blk.attn.num_heads for blk in model.blocks],
        attention_labels=[f"block{i + 1}" for i in range(len(model.blocks))],
        grid=_pair(embed.grid_size),
        prefix_tokens=model.num_prefix_tokens,
        patch_size=_pair(embed.patch_size),
        image_size=_pair(embed.img_size) if embed.img_size is not None else None,
    )


def _mixer(model: nn.Module) -> Anatomy:
    stem = model.stem
    layers = [Layer("stem", "embed", "embed")]
    layers += [Layer(f"blocks.{i}", f"block{i + 1}") for i in range(len(model.blocks))]
    return Anatomy(
        family="mixer",
        layers=layers,
        grid=_pair(stem.grid_size),
        prefix_tokens=0,
        patch_size=_pair(stem.patch_size),
        image_size=_pair(stem.img_size),
    )


def _resnet(model: nn.Module) -> Anatomy:
    # The stem's last module: max-pool for ImageNet ResNets (an Identity for CIFAR stems), act1 else.
    stem = "maxpool" if hasattr(model, "maxpool") else "act1"
    layers = [Layer(stem, "stem", "stem")]
    stage = 1
    while hasattr(model, f"layer{stage}"):
        for i, _ in enumerate(getattr(model, f"layer{stage}")):
            layers.append(Layer(f"layer{stage}.{i}", f"{stage}.{i + 1}"))
        stage += 1
    return Anatomy(family="resnet", layers=layers)
