"""Early exits with single-layer ViT branches (Bakhtiarnia et al., "Single-Layer Vision
Transformers for More Accurate Early Exits with Less Overhead", Neural Networks 2022).

:class:`EarlyExitModel` wraps any backbone vitlab's anatomy describes (ViT, Mixer, ResNet, ...)
and attaches an exit branch after chosen layers. No public code exists; this is vitlab's design.

**The branch** (:class:`SingleLayerViT`, "SL-ViT"): the intermediate output becomes tokens of
width ``branch_dim``, a class token and a learned position embedding are added, then one timm
``Block`` (pre-norm attention + MLP), a LayerNorm and a linear head on the class token.

* Token outputs (B, N, C) (ViT, Mixer, ...): a linear projection C -> ``branch_dim`` of every
  token, the backbone's own prefix tokens included (they already summarise the image).
* Feature maps (B, C, H, W) (CNNs): a patch embedding, a ``p x p`` convolution with stride ``p``
  and ``p = ceil(max(H, W) / branch_grid)``, so a branch sees at most ``branch_grid`` x
  ``branch_grid`` tokens (ResNet-20 at 32x32: 8x8 tokens after stage 1 (p=4) and stage 2 (p=2)).

Defaults keep the branches small: width 64, 4 heads, MLP ratio 2 (about 50k parameters each).

**Where the exits go** (``exits=None``): after every block of the anatomy whose output is a
token sequence, and after the last block of every stage (a run of blocks with the same output
shape) for feature maps; never after the last block, which the backbone's own head follows.
``exits`` may instead name backbone module paths (``"blocks.2"``, ``"layer1"``), anatomy labels
(``"block3"``, ``"1.3"``) or indices into the anatomy's layers; they are sorted by depth.

**Outputs.** In training mode ``forward`` returns a list: the logits of every exit, in depth
order, then the final head's logits (last). In eval mode it returns the final head's logits only
(the branches do not run), so evaluation and analysis code that expects a tensor works unchanged.
:meth:`EarlyExitModel.forward_exits` returns ``(exit_logits, final_logits)`` in either mode.

**Training** is the trainer's business. Two recipes: (1) joint training, the loss is the sum of
the cross-entropies of all outputs (``sum(ce(o, y) for o in model(x))``, accuracy from the last);
(2) the paper's recipe: train the backbone first, then :meth:`~EarlyExitModel.freeze_backbone`
and train only the branches; its "copycat" variant trains each branch on the final head's
predictions instead of the labels (``final_logits.detach()`` from ``forward_exits``).

**Inference with early exits** (each sample leaving at the first confident branch, and the
compute that saves) is an analysis of a trained model: :mod:`vitlab.analysis.early_exits`.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from functools import partial
from typing import Any, Callable, Sequence

import timm
import torch
import torch.nn as nn
from timm.layers import to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block

from ..anatomy import Anatomy, anatomy, register_anatomy
from ..errors import VitlabError
from .layers import default_cfg

__all__ = ["EarlyExitModel", "SingleLayerViT"]

# --- blocks ---------------------------------------------------------------------------------------


class SingleLayerViT(nn.Module):
    """An exit branch: tokens -> class token + position embedding -> one ViT block -> norm -> head.

    ``in_shape`` is the shape of one sample of the intermediate output: ``(N, C)`` for tokens,
    ``(C, H, W)`` for a feature map.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        dim: int = 64,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        max_grid: int = 8,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(in_shape) == 3:  # a CNN feature map: patchify to at most max_grid x max_grid tokens
            channels, height, width = in_shape
            patch = max(1, math.ceil(max(height, width) / max_grid))
            self.embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
            num_tokens = (height // patch) * (width // patch)
        elif len(in_shape) == 2:  # tokens: project each one to the branch width
            num_tokens, channels = in_shape
            self.embed = nn.Linear(channels, dim)
        else:
            raise VitlabError(f"an exit branch takes tokens (B, N, C) or maps (B, C, H, W), not {len(in_shape) + 1}-D")
        self.num_classes = num_classes
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens + 1, dim))
        self.block = Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear)

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised classifier for ``num_classes`` (0: none)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.norm.normalized_shape[0], num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exit logits (B, num_classes) from a batch of intermediate outputs: tokens (B, N, C) or maps (B, C, H, W)."""
        x = self.embed(x)
        if x.ndim == 4:
            x = x.flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.block(x))
        return self.head(self.head_drop(x[:, 0]))


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):  # timm's ViT initialisation
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


# --- model class ----------------------------------------------------------------------------------


class EarlyExitModel(nn.Module):
    """A backbone with single-layer-ViT exit branches after chosen layers (see the module docstring)."""

    def __init__(
        self,
        backbone: nn.Module,
        exits: Sequence[str | int] | None = None,
        branch_dim: int = 64,
        branch_heads: int = 4,
        branch_mlp_ratio: float = 2.0,
        branch_grid: int = 8,
        branch_drop_rate: float = 0.0,
        img_size: int | tuple[int, int] | None = None,
        in_chans: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        try:
            inner: Anatomy | None = anatomy(backbone)
        except VitlabError:
            inner = None  # explicit module paths still work; default exits need the anatomy
        self.img_size = self._resolve_img_size(inner, img_size)
        self.in_chans = in_chans or next((m.in_channels for m in backbone.modules() if hasattr(m, "in_channels")), 3)
        self.num_classes = backbone.num_classes
        self.num_features = self.head_hidden_size = backbone.num_features
        self.backbone_frozen = False
        # The backbone's feature taps (timm's features_only metadata), by their paths in this model.
        self.feature_info = [dict(info, module=f"backbone.{info['module']}")
                             for info in getattr(backbone, "feature_info", [])]

        candidates = [layer.name for layer in inner.layers] if inner is not None else []
        wanted = [self._resolve_exit(e, inner) for e in exits] if exits is not None else []
        shapes, order = self._dry_run(list(dict.fromkeys(candidates + wanted)))
        if exits is None:
            if inner is None:
                raise VitlabError(f"vitlab does not know the layers of {type(backbone).__name__}; name the exit "
                                  "layers with exits=[module paths]")
            wanted = _default_exits(inner, shapes)
        self.exit_names = sorted(dict.fromkeys(wanted), key=order.index)
        labels = {layer.name: layer.label for layer in inner.layers} if inner is not None else {}
        self.exit_labels = [labels.get(name, name) for name in self.exit_names]
        self.branches = nn.ModuleList(
            SingleLayerViT(shapes[name], self.num_classes, branch_dim, branch_heads, branch_mlp_ratio,
                           branch_grid, branch_drop_rate)
            for name in self.exit_names
        )

    # -- construction helpers
    def _resolve_img_size(self, inner: Anatomy | None, img_size: Any) -> tuple[int, int]:
        fixed = inner.image_size if inner is not None else None
        if fixed is not None:
            if img_size is not None and tuple(to_2tuple(img_size)) != tuple(fixed):
                raise VitlabError(f"the backbone takes {fixed[0]}x{fixed[1]} images, not img_size={img_size}")
            return tuple(fixed)
        if img_size is None:  # a CNN: the branches' position embeddings still fix the size
            cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
            if "input_size" not in cfg:
                raise VitlabError("give EarlyExitModel an img_size: the exit branches are sized for one input size")
            img_size = cfg["input_size"][-2:]
        return tuple(to_2tuple(img_size))

    def _resolve_exit(self, exit: str | int, inner: Anatomy | None) -> str:
        layers = inner.layers if inner is not None else []
        if isinstance(exit, int):
            if not -len(layers) <= exit < len(layers):
                raise VitlabError(f"exit index {exit} is out of range: the backbone has {len(layers)} layers")
            return layers[exit].name
        name = exit.removeprefix("backbone.")
        if name not in {layer.name for layer in layers}:  # an anatomy label such as "block3" or "1.3"
            name = {layer.label: layer.name for layer in layers}.get(name, name)
        try:
            self.backbone.get_submodule(name)
        except AttributeError:
            known = ", ".join(layer.name for layer in layers)
            raise VitlabError(f"the backbone has no layer '{exit}'; its layers: {known}") from None
        return name

    @torch.no_grad()
    def _dry_run(self, names: list[str]) -> tuple[dict[str, tuple[int, ...]], list[str]]:
        """Per-sample output shape of every named module and the order they run in (one image)."""
        shapes: dict[str, tuple[int, ...]] = {}
        order: list[str] = []

        def record(name: str) -> Callable:
            def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> None:
                if not torch.is_tensor(output):
                    raise VitlabError(f"layer '{name}' returns {type(output).__name__}, not a tensor; "
                                      "an exit needs a layer that returns one")
                if name in shapes:
                    raise VitlabError(f"layer '{name}' runs more than once per forward pass; it cannot be an exit")
                shapes[name] = tuple(output.shape[1:])
                order.append(name)
            return hook

        param = next(self.backbone.parameters(), torch.empty(0))
        handles = [self.backbone.get_submodule(n).register_forward_hook(record(n)) for n in names]
        was_training = self.backbone.training
        self.backbone.eval()  # no BatchNorm statistics updated by the dry run
        try:
            self.backbone(torch.zeros(1, self.in_chans, *self.img_size, device=param.device, dtype=param.dtype))
        finally:
            self.backbone.train(was_training)
            for h in handles:
                h.remove()
        missing = [n for n in names if n not in shapes]
        if missing:
            raise VitlabError(f"layers {missing} do not run in the backbone's forward pass; they cannot be exits")
        return shapes, order

    # -- the timm model interface (the final head is the backbone's)
    @property
    def num_exits(self) -> int:
        """How many exit branches the model has."""
        return len(self.branches)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The backbone's (final) classifier."""
        return self.backbone.get_classifier()

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        """A new classifier for ``num_classes`` in the backbone and in every exit branch."""
        self.backbone.reset_classifier(num_classes, *args, **kwargs)
        for branch in self.branches:
            branch.reset_classifier(num_classes)
        self.num_classes = num_classes

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The backbone's names (under ``backbone.``) and every branch's class token and position embedding."""
        inner = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{n}" for n in inner} | {f"branches.{i}.{n}" for i in range(self.num_exits)
                                                   for n in ("cls_token", "pos_embed")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The backbone's parameter groups under ``backbone.``; the branches join the last group, with the head."""

        def prefixed(pattern: str) -> str:
            # Anchor every alternative after "backbone." (re.match anchors them all at the start).
            return r"^backbone\.(?:" + re.sub(r"(^|\|)\^", r"\1", pattern) + ")"

        groups = {}
        for group, spec in self.backbone.group_matcher(coarse).items():
            if isinstance(spec, str):
                groups[group] = prefixed(spec)
            else:
                groups[group] = [(prefixed(pattern), suffix) for pattern, suffix in spec]
        return groups

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the backbone's blocks (the exit hooks still see every block's output)."""
        self.backbone.set_grad_checkpointing(enable)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's ``forward_features``."""
        return self.backbone.forward_features(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        **kwargs: Any,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The backbone's ``forward_intermediates`` (the branches do not run); ``kwargs`` such as
        ``return_prefix_tokens`` go to the backbone."""
        return self.backbone.forward_intermediates(x, indices=indices, norm=norm, stop_early=stop_early,
                                                   output_fmt=output_fmt, intermediates_only=intermediates_only,
                                                   **kwargs)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Prune the backbone (timm's rule) and drop the exit branches whose layer it no longer has."""
        take_indices = self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        keep = [i for i, name in enumerate(self.exit_names) if _has_submodule(self.backbone, name)]
        self.exit_names = [self.exit_names[i] for i in keep]
        self.exit_labels = [self.exit_labels[i] for i in keep]
        self.branches = nn.ModuleList(self.branches[i] for i in keep)
        self.num_classes = self.backbone.num_classes
        self.num_features = self.head_hidden_size = self.backbone.num_features
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The backbone's ``forward_head``."""
        return self.backbone.forward_head(x, pre_logits=pre_logits)

    def freeze_backbone(self, freeze: bool = True) -> None:
        """Train only the branches: backbone weights get no gradient and its BatchNorm/dropout stay in eval mode."""
        self.backbone_frozen = freeze
        self.backbone.requires_grad_(not freeze)
        self.train(self.training)

    def train(self, mode: bool = True) -> "EarlyExitModel":
        """Set training mode; a frozen backbone stays in eval mode."""
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    # -- forward passes
    def _run_backbone(self, x: torch.Tensor, on_exit: Callable[[int, torch.Tensor], None]) -> torch.Tensor:
        """The backbone's forward with ``on_exit(i, output)`` called after exit layer ``i``."""
        handles = [self.backbone.get_submodule(name).register_forward_hook(
            lambda module, inputs, output, i=i: on_exit(i, output)) for i, name in enumerate(self.exit_names)]
        try:
            return self.backbone(x)
        finally:
            for h in handles:
                h.remove()

    def forward_exits(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(exit_logits, final_logits)``: every branch's logits in depth order, and the final head's."""
        exit_logits: list[torch.Tensor | None] = [None] * self.num_exits
        # Under gradient checkpointing an exit layer runs inside a checkpointed segment whose backward
        # recomputes it without the hooks (gone by then): a branch run from the hook would be saved in
        # the segment but not recomputed with it. So the hook keeps a copy of the layer's output and the
        # branches run after the backbone (the copy also guards against later in-place ops).
        deferred = bool(getattr(self.backbone, "grad_checkpointing", False))
        outputs: list[torch.Tensor | None] = [None] * self.num_exits

        def run_branch(i: int, output: torch.Tensor) -> None:
            if deferred:
                outputs[i] = output.clone()
            else:
                exit_logits[i] = self.branches[i](output)

        final = self._run_backbone(x, run_branch)
        if deferred:
            exit_logits = [branch(output) for branch, output in zip(self.branches, outputs)]
        return exit_logits, final

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Training mode: ``[exit_1, ..., exit_n, final]`` logits; eval mode: the final logits only."""
        if not self.training:
            return self.backbone(x)
        exit_logits, final = self.forward_exits(x)
        return [*exit_logits, final]


def _default_exits(inner: Anatomy, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Every token block, and the last block of every feature-map stage; never the last block."""
    blocks = [layer.name for layer in inner.layers if layer.kind == "block"]
    exits = []
    for name, after in zip(blocks[:-1], blocks[1:]):
        if len(shapes[name]) != 3 or shapes[name] != shapes[after]:
            exits.append(name)
    return exits


# --- anatomy --------------------------------------------------------------------------------------


@register_anatomy(EarlyExitModel)
def _early_exit_anatomy(model: EarlyExitModel) -> Anatomy:
    """The backbone's layers and attention, under ``backbone.``; the branches are not analysed."""
    inner = anatomy(model.backbone)
    return replace(
        inner,
        family=f"early_exit_{inner.family}",
        layers=[replace(layer, name=f"backbone.{layer.name}") for layer in inner.layers],
        attention=[replace(site, name=f"backbone.{site.name}") for site in inner.attention],
        image_size=tuple(model.img_size),  # the branches' position embeddings fix it even for CNNs
        stem=(lambda m, x: inner.stem(m.backbone, x)) if inner.stem else None,
        head=(lambda m, x: inner.head(m.backbone, x)) if inner.head else None,
    )


# --- builder --------------------------------------------------------------------------------------

_EXIT_ARGS = ("exits", "branch_dim", "branch_heads", "branch_mlp_ratio", "branch_grid", "branch_drop_rate")


def _create_early_exit(variant: str, backbone: str, pretrained: bool = False, **kwargs: Any) -> EarlyExitModel:
    """Build ``backbone`` (a registered name) with the remaining kwargs, then wrap it with exits."""
    exit_args = {k: kwargs.pop(k) for k in _EXIT_ARGS if k in kwargs}

    def build(**backbone_args: Any) -> EarlyExitModel:
        net = timm.create_model(backbone, **backbone_args)
        return EarlyExitModel(net, img_size=backbone_args.get("img_size"), in_chans=backbone_args.get("in_chans"),
                              **exit_args)

    return build_model_with_cfg(build, variant, pretrained, **kwargs)


def _cfg(backbone_first_conv: str, backbone_classifier: str, **kwargs: Any) -> dict[str, Any]:
    # Fixed input size even for a CNN backbone: the branches' position embeddings are sized at build time.
    return default_cfg(first_conv=f"backbone.{backbone_first_conv}", classifier=f"backbone.{backbone_classifier}",
                       **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "early_exit_vit_nano_patch4_32": _cfg("patch_embed.proj", "head"),
        "early_exit_mixer_nano_patch4_32": _cfg("stem.proj", "head"),
        "early_exit_resnet20_cifar": _cfg("conv1", "fc", interpolation="bilinear"),
    }
)

# --- registered variants --------------------------------------------------------------------------


@register_model
def early_exit_vit_nano_patch4_32(pretrained: bool = False, **kwargs: Any) -> EarlyExitModel:
    """ViT-Nano/4 (6 blocks) with an SL-ViT exit after each of its first 5 blocks."""
    return _create_early_exit("early_exit_vit_nano_patch4_32", "vit_nano_patch4_32", pretrained, **kwargs)


@register_model
def early_exit_mixer_nano_patch4_32(pretrained: bool = False, **kwargs: Any) -> EarlyExitModel:
    """Mixer-Nano/4 (6 blocks) with an SL-ViT exit after each of its first 5 blocks."""
    return _create_early_exit("early_exit_mixer_nano_patch4_32", "mixer_nano_patch4_32", pretrained, **kwargs)


@register_model
def early_exit_resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> EarlyExitModel:
    """ResNet-20 with an SL-ViT exit after residual stages 1 and 2 (stage 3 ends in the final head)."""
    return _create_early_exit("early_exit_resnet20_cifar", "resnet20_cifar", pretrained, **kwargs)
