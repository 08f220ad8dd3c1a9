"""vitlab's model zoo.

Every model is registered in timm's registry, so ``timm.create_model(name)`` builds it as well
as :func:`create_model`. Importing this package registers them.

Every model speaks timm's protocol (timm's own classes, and vitlab's written to match them):
``forward_features``/``forward_head``, ``forward_intermediates`` and
``prune_intermediate_layers`` (so ``timm.create_model(name, features_only=True)`` works for the
vitlab families), ``group_matcher``, ``set_grad_checkpointing``, ``get_classifier``,
``reset_classifier``, and ``no_weight_decay`` where a model has parameters to exempt.

Names follow ``family_size_patchN_imgsize`` (``vit_nano_patch4_32``), or a paper's own scheme
where it has one (``cct_7_3x1_32``, ``cvt_13``, ``levit_128s``, with ``_32``
for a 32x32 adaptation); earlier names that did not (``dhvt_tiny_p4_32``) are timm deprecation
aliases (:func:`model_aliases`): they still build the same model, with a warning, so run
directories that store them load, but :func:`list_models` lists only the current names.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn as nn
from timm.models import get_deprecated_models, is_model, model_entrypoint

from ..anatomy import anatomy
from ..errors import UnknownOptionError, VitlabError, unknown_name_error
from . import cct, cvt, dhvt, early_exit, levit, mixer, qna, resnet, t2t, vit  # noqa: F401  (registers the models)

__all__ = ["check_model_name", "create_model", "list_models", "count_parameters", "is_vitlab_model", "model_aliases"]


def _is_own(name: str) -> bool:
    return is_model(name) and model_entrypoint(name).__module__.startswith("vitlab.")


def model_aliases() -> dict[str, str]:
    """vitlab's earlier model names and the current names they build, e.g. ``dhvt_tiny_p4_32``."""
    return {old: new for old, new in get_deprecated_models().items() if new and _is_own(new)}


def is_vitlab_model(name: str) -> bool:
    """True if ``name`` is one of vitlab's own registered models (not a stock timm model), or an earlier name of one."""
    return _is_own(model_aliases().get(name, name))


def list_models(pattern: str = "*", include_timm: bool = False) -> list[str]:
    """Current names of vitlab's registered models matching the shell-style ``pattern``, sorted.

    With ``include_timm``, stock timm models matching the pattern are listed too. Earlier names
    (:func:`model_aliases`) still build their models but are not listed, as timm does not list
    its deprecated names.
    """
    names = timm.list_models(pattern if any(c in pattern for c in "*?[") else f"*{pattern}*")
    return sorted(n for n in names if include_timm or _is_own(n))


def check_model_name(name: str) -> None:
    """Raise :class:`VitlabError` naming the closest registered models if ``name`` is unknown."""
    if not is_model(name):
        raise unknown_name_error("model", name, timm.list_models(), hint="(list them with `vitlab models`)")


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the model registered as ``name`` (vitlab's or timm's), with keyword overrides.

    Common overrides: ``num_classes``, ``img_size``, ``drop_path_rate``, ``pretrained`` (timm
    weights; needs the network unless they are cached). Raises :class:`VitlabError` with the
    closest valid names for an unknown model, and for an image size the patch size does not divide;
    an option the model does not take raises its subclass :class:`~vitlab.errors.UnknownOptionError`.
    """
    check_model_name(name)
    try:
        model = timm.create_model(name, **overrides)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            bad = str(e).split("unexpected keyword argument")[-1].strip(" '\"")
            raise UnknownOptionError(name, bad) from None
        if "got multiple values for keyword argument" in str(e):
            fixed = str(e).split("keyword argument")[-1].strip(" '\"")
            raise VitlabError(f"model '{name}' fixes '{fixed}' (it is part of the variant's definition); "
                              "pick another variant instead of overriding it") from None
        raise
    _check_patch_grid(name, model)
    _guard_input_size(name, model)
    return model


def _guard_input_size(name: str, model: nn.Module) -> None:
    """Make a wrong input size one clear error instead of an assertion deep inside the model.

    Models whose anatomy gives a fixed ``image_size`` (a position embedding or token grid sized
    at build time) get a forward pre-hook that checks every input against it; a model built with
    ``dynamic_img_size=True`` resamples its position embedding to any size and gets none.
    """
    if getattr(model, "dynamic_img_size", False):
        return
    try:
        size = anatomy(model).image_size
    except VitlabError:
        return  # a family vitlab does not describe: leave it to the model
    if size is None:
        return
    expected = tuple(size)

    def check(module: nn.Module, args: tuple) -> None:
        got = tuple(args[0].shape[-2:]) if args and torch.is_tensor(args[0]) else expected
        if got != expected:
            raise VitlabError(
                f"{name} takes {expected[0]}x{expected[1]} images, got {got[0]}x{got[1]}; resize the "
                f"images to {expected[0]}x{expected[1]} or build the model with img_size={got[0]}"
            )

    model.register_forward_pre_hook(check)


def _check_patch_grid(name: str, model: nn.Module) -> None:
    """Refuse an image size that the patch size does not divide (timm would silently crop it)."""
    embed = getattr(model, "patch_embed", None) or getattr(model, "stem", None)
    img_size, patch_size = getattr(embed, "img_size", None), getattr(embed, "patch_size", None)
    if img_size is None or patch_size is None:
        return
    for size, patch in zip(img_size, patch_size):
        if size % patch:
            ok = [s for s in range(max(patch, size - 2 * patch), size + 2 * patch + 1) if s % patch == 0]
            raise VitlabError(
                f"image size {tuple(img_size)} is not divisible by the patch size {patch} of '{name}'; "
                f"use a multiple of {patch}, e.g. {', '.join(map(str, ok[:3]))}"
            )


def count_parameters(name_or_model: str | nn.Module, **overrides: Any) -> int:
    """Number of parameters (frozen ones included, buffers excluded) of a model or model name.

    A name is built on PyTorch's meta device, so counting even ViT-L costs no memory or time.
    """
    if isinstance(name_or_model, str):
        with torch.device("meta"):
            model = create_model(name_or_model, **overrides)
    else:
        model = name_or_model
    return sum(p.numel() for p in model.parameters())
