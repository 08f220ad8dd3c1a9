"""Transfer: start a run from another run's trained weights (``vitlab finetune RUN --data NAME``).

The source run's weights are loaded by name. The classifier is always new (a new task needs a
new one; timm's convention). Two modes:

- ``full``: every weight trains.
- ``linear``: a linear probe. Only the classifier trains, and the rest is frozen in eval mode,
  so BatchNorm statistics and dropout do not change the features being probed.

``reinit_blocks = k`` re-initialises the top k blocks (the last k layers of the model's
anatomy) before training. This is the feature-reuse study of Matsoukas et al.: how much of the
transferred benefit lives in the upper layers. Re-initialised weights are the architecture's
own initialisation, taken from a fresh model built with the run's seed.
"""

from __future__ import annotations

import torch.nn as nn

from ..anatomy import anatomy
from ..errors import VitlabError
from ..weights import load_weights_file

MODES = ("full", "linear")


def classifier_path(model: nn.Module) -> str:
    """The module path of ``model``'s classifier (timm's ``get_classifier()``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            return name
    raise VitlabError(f"{type(model).__name__} has no classifier vitlab can find (get_classifier); "
                      "it cannot be fine-tuned")


def prepare_transfer(model: nn.Module, fresh: nn.Module, weights: str, reinit_blocks: int = 0) -> list[str]:
    """Load ``weights`` into ``model``, then reset its classifier and top ``reinit_blocks`` blocks
    to ``fresh``'s (a newly initialised model of the same architecture). Returns the reset module paths."""
    load_weights_file(model, weights)
    layers = [layer.name for layer in anatomy(model).layers]
    if not 0 <= reinit_blocks <= len(layers):
        raise VitlabError(f"--reinit-blocks {reinit_blocks}: {type(model).__name__} has {len(layers)} blocks "
                          f"({', '.join(layers)}); choose 0 to {len(layers)}")
    reset = [classifier_path(model)] + (layers[len(layers) - reinit_blocks:] if reinit_blocks else [])
    for path in reset:
        model.get_submodule(path).load_state_dict(fresh.get_submodule(path).state_dict())
    return reset


def freeze_for(model: nn.Module, mode: str) -> list[nn.Module]:
    """Freeze what ``mode`` does not train; returns the frozen top-level modules (keep them in eval mode)."""
    if mode not in MODES:
        raise VitlabError(f"unknown fine-tuning mode '{mode}'; choose one of {', '.join(MODES)}")
    if mode == "full":
        return []
    head = classifier_path(model)
    frozen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        # The outermost modules that neither are nor contain the classifier.
        if not name or name == head or head.startswith(name + "."):
            continue
        if any(name.startswith(outer + ".") for outer in frozen):
            continue
        module.requires_grad_(False)
        frozen[name] = module
    for param in model.parameters(recurse=False):  # e.g. a class token held by the model itself
        param.requires_grad_(False)
    return list(frozen.values())
