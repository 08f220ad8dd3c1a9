"""Load weights from a file made elsewhere (timm, a training script, another vitlab run) into a model.

Safetensors files hold tensors only and load as they are. Pickle checkpoints (``.pt``, ``.pth``,
``.bin``, ``.ckpt``) can run arbitrary code when unpickled, so they are refused unless the caller
says the source is trusted (``allow_pickle=True``, ``--trust-pickle`` on the command line); even
then a plain state dict is read with ``weights_only=True`` first.

Weights are matched by parameter name. The wrappers training scripts add are removed (a
``state_dict``/``model``/``module`` entry, DDP's ``module.`` and torch.compile's ``_orig_mod.``
prefixes), and the model family's own timm ``checkpoint_filter_fn`` adapts the rest (a ViT's
position embedding resampled to the model's grid, for example); a filter that fails on a file
warns, naming itself and the error, and the names are matched as they are. A classifier with
another number of classes is left at its initialisation and reported, as timm does when fine-tuning.
"""

from __future__ import annotations

import pickle
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import VitlabError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")
_WRAPPERS = ("state_dict", "model", "model_ema", "module", "net")
_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass
class LoadReport:
    """What :func:`load_weights_file` did."""

    path: Path
    loaded: int
    #: Keys of the file left out because the model's tensor has another shape (a new classifier).
    skipped: list[str] = field(default_factory=list)
    #: The file's shapes of the skipped tensors.
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __str__(self) -> str:
        extra = f"; kept the model's own {', '.join(self.skipped)} (other shape)" if self.skipped else ""
        return f"loaded {self.loaded} tensors from {self.path}{extra}"


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, refusing pickles unless ``allow_pickle``."""
    path = Path(path)
    if not path.is_file():
        raise VitlabError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise VitlabError(f"weights file '{path}' is not valid safetensors ({str(e).splitlines()[0]})") from None
    if not allow_pickle:
        raise VitlabError(f"'{path}' is a pickle checkpoint, which can run code when loaded; convert it to "
                          "safetensors, or pass --trust-pickle (allow_pickle=True) if you trust where it came from")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # objects beyond tensors and containers: the caller vouched for the file
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (zip, EOF and pickle errors all mean "not a checkpoint")
        raise VitlabError(f"'{path}' is not a readable PyTorch checkpoint ({type(e).__name__})") from None
    return _unwrap(obj, path)


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a training script's checkpoint dict."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise VitlabError(f"'{path}' holds no state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    own = set(model.state_dict())
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights_file(model: nn.Module, path: str | Path, allow_pickle: bool = False) -> LoadReport:
    """Load the weights in ``path`` into ``model`` by parameter name; one clear line when they do not fit.

    Example: a timm ``vit_tiny_patch16_224`` safetensors checkpoint into vitlab's
    ``vit_tiny_patch4_32``-shaped model of the same width loads every block; the position
    embedding is resampled, and a classifier of another size is kept as initialised.
    """
    path = Path(path)
    state = _strip_prefixes(read_state_dict(path, allow_pickle), model)
    family = sys.modules.get(type(model).__module__)
    adapt = getattr(family, "checkpoint_filter_fn", None)
    if adapt is not None:
        try:
            state = adapt(state, model)
        except Exception as e:  # noqa: BLE001  (a filter that does not understand the file: match names as they are)
            name = f"{getattr(adapt, '__module__', '?')}.{getattr(adapt, '__qualname__', repr(adapt))}"
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            warnings.warn(f"{name} could not adapt '{path}' ({type(e).__name__}{': ' + message if message else ''}); "
                          "matching parameter names as they are", stacklevel=2)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    fits = {k: v for k, v in state.items() if k not in skipped}
    missing = [k for k in own if k not in fits and k not in skipped]
    unexpected = [k for k in fits if k not in own]
    classifier = [k for k in skipped if own[k].ndim <= 2 and own[k].shape[0] == getattr(model, "num_classes", -1)]
    problems = [k for k in skipped if k not in classifier]
    if missing or unexpected or problems:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in
                           (("missing", missing), ("unexpected", unexpected), ("other shape", problems)) if keys)
        raise VitlabError(f"'{path}' does not fit {type(model).__name__} ({detail}); is it a checkpoint of this model?")
    model.load_state_dict({**own, **fits})
    return LoadReport(path, len(fits), classifier, {k: tuple(state[k].shape) for k in classifier})
