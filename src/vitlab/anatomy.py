"""Anatomy: where a model's analysable layers and attention modules are.

Analyses never hard-code a family: they ask :func:`anatomy` for the layers to hook (in depth
order, with short labels for plots), the attention modules with the token grid each one works
on, the number of prefix tokens (class/distillation tokens) and the patch size in pixels.

Family knowledge lives in one function per family, registered for the family's model class with
:func:`register_anatomy`: timm's families (``VisionTransformer``, ``MlpMixer``, ``ResNet``) below,
vitlab's own next to their model code.

Attention convention (what :mod:`vitlab.capture` relies on): an attention module has a
``fused_attn`` flag and, when it is off, passes its softmax probabilities of shape
(batch, heads, tokens, tokens) through a submodule ``attn_drop``, as timm's ``Attention`` does.
A module that never forms them (LeViT's) gets a ``recompute`` function in its
:class:`AttentionSite` that rebuilds them from the module's input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn
from timm.models.mlp_mixer import MlpMixer
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer

from .errors import VitlabError


@dataclass
class Layer:
    """One analysable layer: the module whose output is the representation after it."""

    #: Module path inside the model (``model.get_submodule(name)``).
    name: str
    #: Short label for plots and tables, e.g. ``"block3"`` or ``"2.1"`` (stage 2, block 1).
    label: str
    #: ``"embed"``, ``"block"`` or ``"stem"``.
    kind: str = "block"
    #: Layout of the output: ``"tokens"`` (B, T, C), ``"nchw"`` or ``"nhwc"`` feature maps; ``None``
    #: means 3-D outputs are tokens and 4-D ones NCHW maps.
    layout: str | None = None


@dataclass
class AttentionSite:
    """One attention module whose probabilities are square over a token grid (queries = keys)."""

    #: Module path of the attention module.
    name: str
    #: Short label for plots, e.g. ``"block3"``.
    label: str
    num_heads: int
    #: Token grid (rows, columns) of its queries and keys, and the pixels each token spans.
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    #: Tokens before the grid tokens (class token ...).
    prefix_tokens: int = 0
    #: For modules that never form the probabilities explicitly: ``f(module, inputs)`` returning
    #: them, shape (batch, heads, tokens, tokens), recomputed from the module's input.
    recompute: Callable[[nn.Module, tuple], torch.Tensor] | None = None


@dataclass
class ResidualSite:
    """One residual sub-block ``z_out = z + f(z)``: where its stream ``z`` and its branch ``f`` are.

    ``stream`` is ``(module path, "input" | "output")``: the tensor ``z`` is that module's input (a
    forward pre-hook) or output; ``branch`` is the module whose output is the branch ``f(...)``
    (before it is added). ``layout`` is the branch's: (B, tokens, C) (``"tokens"``), (B, C, tokens)
    for a Mixer's token-mixing MLP (``"transposed"``), or a feature map (B, C, H, W)
    (``"channels"``); the stream is a feature map for ``"channels"`` and (B, tokens, C) otherwise.
    """

    label: str
    #: ``"attn"``, ``"mlp"`` (transformer sub-blocks), ``"token_mixing"``, ``"channel_mixing"``
    #: (Mixer) or ``"conv"`` (a CNN's residual block).
    kind: str
    stream: tuple[str, str]
    branch: str
    layout: str = "tokens"
    #: Class/distillation tokens before the spatial tokens of ``z`` (reported separately).
    prefix_tokens: int = 0


@dataclass
class Anatomy:
    """The analysable structure of one model."""

    family: str
    layers: list[Layer]
    #: Attention modules in depth order (empty for CNNs and Mixers).
    attention: list[AttentionSite] = field(default_factory=list)
    #: Token grid (rows, columns) of the model's (first) token grid; ``None`` for CNNs.
    grid: tuple[int, int] | None = None
    #: Tokens before the patch tokens (class token, distillation token, registers).
    prefix_tokens: int = 0
    #: Pixels per token side; ``None`` for CNNs.
    patch_size: tuple[int, int] | None = None
    #: Input image size the model expects (``None`` when any size works).
    image_size: tuple[int, int] | None = None
    #: Residual sub-blocks in depth order, for the skip-connection analysis (empty: not described).
    residuals: list[ResidualSite] = field(default_factory=list)
    #: ``(label, module path)`` of every MLP's hidden activation (GELU of fc1), output (B, T, hidden),
    #: for feature visualisation.
    mlp_activations: list[tuple[str, str]] = field(default_factory=list)
    #: For models whose layers form a chain (each layer's input is the previous layer's output), how
    #: to run them layer by layer: ``stem(model, images)`` is the output of ``layers[0]`` and
    #: ``head(model, last)`` the logits from the output of ``layers[-1]``. ``None``: not described.
    #: Early-exit inference uses them to stop a batch once every image has left it.
    stem: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None

    @property
    def layer_names(self) -> list[str]:
        """Module paths of the analysable layers, in depth order."""
        return [layer.name for layer in self.layers]

    @property
    def layer_labels(self) -> list[str]:
        """Short plot labels of the analysable layers, in depth order."""
        return [layer.label for layer in self.layers]

    @property
    def has_attention(self) -> bool:
        """Whether the model has attention modules (False for CNNs and Mixers)."""
        return bool(self.attention)

    @property
    def attention_names(self) -> list[str]:
        """Module paths of the attention modules, in depth order."""
        return [site.name for site in self.attention]


AnatomyFn = Callable[[nn.Module], Anatomy]
_FAMILIES: dict[type, AnatomyFn] = {}


def register_anatomy(*classes: type) -> Callable[[AnatomyFn], AnatomyFn]:
    """Decorator: ``fn(model) -> Anatomy`` describes models of ``classes`` (and their subclasses)."""

    def register(fn: AnatomyFn) -> AnatomyFn:
        for cls in classes:
            _FAMILIES[cls] = fn
        return fn

    return register


def anatomy(model: nn.Module) -> Anatomy:
    """Describe ``model``'s analysable layers; a clear error for families vitlab does not know."""
    for cls in type(model).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls](model)
    known = ", ".join(sorted({c.__name__ for c in _FAMILIES}))
    raise VitlabError(f"vitlab cannot find the layers of {type(model).__name__}; supported families: {known}")


def pair(value: int | Iterable[int]) -> tuple[int, int]:
    """``value`` as a (rows, columns) tuple."""
    return (value, value) if isinstance(value, int) else tuple(value)


def vit_block_residuals(path: str, label: str, prefix_tokens: int) -> list[ResidualSite]:
    """The two sub-blocks of a timm ``Block`` at ``path``: ``x + ls1(attn(norm1 x))``, ``x + ls2(mlp(norm2 x))``.

    ``ls1``/``ls2`` (layer scale; an Identity without it) return exactly the branch that is added.
    """
    return [ResidualSite(f"{label}.attn", "attn", (f"{path}.norm1", "input"), f"{path}.ls1", "tokens", prefix_tokens),
            ResidualSite(f"{label}.mlp", "mlp", (f"{path}.norm2", "input"), f"{path}.ls2", "tokens", prefix_tokens)]


def resnet_block_residual(path: str, label: str, block: nn.Module) -> ResidualSite:
    """A timm ``BasicBlock``/``Bottleneck``: the last BatchNorm's output is the branch, the
    (downsampled) block input the stream."""
    branch = f"{path}.bn3" if hasattr(block, "bn3") else f"{path}.bn2"
    stream = (f"{path}.downsample", "output") if block.downsample is not None else (path, "input")
    return ResidualSite(label, "conv", stream, branch, "channels")


# --- timm's families ------------------------------------------------------------------------------


@register_anatomy(VisionTransformer)
def _vit(model: nn.Module) -> Anatomy:
    embed = model.patch_embed
    # norm_pre sees the tokens after the class token and position embedding are added (it is an
    # Identity in most ViTs, which still runs hooks): the true input representation.
    layers = [Layer("norm_pre", "embed", "embed")]
    layers += [Layer(f"blocks.{i}", f"block{i + 1}") for i in range(len(model.blocks))]
    grid, patch = pair(embed.grid_size), pair(embed.patch_size)
    sites = [AttentionSite(f"blocks.{i}.attn", f"block{i + 1}", blk.attn.num_heads, grid, patch,
                           model.num_prefix_tokens) for i, blk in enumerate(model.blocks)]
    return Anatomy(
        family="vit",
        layers=layers,
        attention=sites,
        grid=grid,
        prefix_tokens=model.num_prefix_tokens,
        patch_size=patch,
        # Kept under dynamic_img_size too: ``grid`` is this size's grid, so analyses feed the model this size.
        image_size=pair(embed.img_size) if embed.img_size is not None else None,
        residuals=[site for i in range(len(model.blocks))
                   for site in vit_block_residuals(f"blocks.{i}", f"block{i + 1}", model.num_prefix_tokens)],
        mlp_activations=[(f"block{i + 1}", f"blocks.{i}.mlp.act") for i in range(len(model.blocks))],
        stem=lambda m, x: m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x)))),
        head=lambda m, x: m.forward_head(m.norm(x)),
    )


@register_anatomy(MlpMixer)
def _mixer(model: nn.Module) -> Anatomy:
    stem = model.stem
    layers = [Layer("stem", "embed", "embed")]
    layers += [Layer(f"blocks.{i}", f"block{i + 1}") for i in range(len(model.blocks))]
    return Anatomy(
        family="mixer",
        layers=layers,
        grid=pair(stem.grid_size),
        prefix_tokens=0,
        patch_size=pair(stem.patch_size),
        image_size=pair(stem.img_size),
        residuals=[site for i in range(len(model.blocks)) for site in (
            ResidualSite(f"block{i + 1}.token_mixing", "token_mixing", (f"blocks.{i}.norm1", "input"),
                         f"blocks.{i}.mlp_tokens", "transposed"),
            ResidualSite(f"block{i + 1}.channel_mixing", "channel_mixing", (f"blocks.{i}.norm2", "input"),
                         f"blocks.{i}.mlp_channels", "tokens"))],
        mlp_activations=[(f"block{i + 1}", f"blocks.{i}.mlp_channels.act") for i in range(len(model.blocks))],
        stem=lambda m, x: m.stem(x),
        head=lambda m, x: m.forward_head(m.norm(x)),
    )


@register_anatomy(ResNet)
def resnet_anatomy(model: nn.Module) -> Anatomy:
    """ResNets: the stem, then every residual block, labelled stage.block (timm's and CIFAR ones)."""
    # The stem's last module: max-pool for ImageNet ResNets (an Identity for CIFAR stems), act1 else.
    stem = "maxpool" if hasattr(model, "maxpool") else "act1"
    layers = [Layer(stem, "stem", "stem")]
    residuals = []
    stage = 1
    while hasattr(model, f"layer{stage}"):
        for i, block in enumerate(getattr(model, f"layer{stage}")):
            layers.append(Layer(f"layer{stage}.{i}", f"{stage}.{i + 1}"))
            residuals.append(resnet_block_residual(f"layer{stage}.{i}", f"{stage}.{i + 1}", block))
        stage += 1
    return Anatomy(family="resnet", layers=layers, residuals=residuals, stem=_resnet_stem,
                   head=lambda m, x: m.forward_head(x))


def _resnet_stem(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = model.act1(model.bn1(model.conv1(images)))
    return model.maxpool(x) if hasattr(model, "maxpool") else x
