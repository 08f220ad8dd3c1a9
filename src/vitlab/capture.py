"""Capture: hook the layers an analysis asks for and stream their outputs to reducers.

Inside ``with Capture(model, ...)``, every forward pass hands each requested layer's output,
as it is produced, to ``on_layer(name, tensor)`` and each attention module's probabilities to
``on_attention(name, probs)``. The reducer decides what to keep (a Gram matrix for CKA, running
sums for distances), so memory is bounded by one batch, not by the data set. Attention
probabilities are materialised even in models built with fused attention: the context switches
the requested attention modules to their explicit path and restores them on exit, and every hook
is removed on exit, also when the body raises.
"""

from __future__ import annotations

from typing import Callable, KeysView, Sequence

import torch
import torch.nn as nn

from .anatomy import AttentionSite
from .errors import VitlabError

Reducer = Callable[[str, torch.Tensor], None]


def _first_tensor(output: torch.Tensor | tuple | list) -> torch.Tensor:
    # Some modules return tuples (e.g. (tokens, aux)); the representation comes first.
    while isinstance(output, (tuple, list)):
        output = output[0]
    return output


class Capture:
    """Context manager streaming layer outputs and attention probabilities of ``model``."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] = (),
        on_layer: Reducer | None = None,
        attention: Sequence[str | AttentionSite] = (),
        on_attention: Reducer | None = None,
    ) -> None:
        self.model = model
        self.layers = list(layers)
        # Plain names follow the attn_drop convention; sites may bring a recompute function.
        self.attention = [a if isinstance(a, AttentionSite) else AttentionSite(a, a, 0, (0, 0), (0, 0))
                          for a in attention]
        self.on_layer, self.on_attention = on_layer, on_attention
        self._handles: list = []
        self._fused: list[tuple[nn.Module, bool]] = []

    def _module(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise VitlabError(f"model {type(self.model).__name__} has no layer '{name}'") from None

    def __enter__(self) -> "Capture":
        try:
            for name in self.layers:
                self._handles.append(self._module(name).register_forward_hook(self._layer_hook(name)))
            for site in self.attention:
                name, module = site.name, self._module(site.name)
                if site.recompute is not None:
                    self._handles.append(module.register_forward_hook(self._recompute_hook(site)))
                    continue
                if not hasattr(module, "attn_drop"):
                    raise VitlabError(f"attention module '{name}' ({type(module).__name__}) does not expose its "
                                      "probabilities (no attn_drop); attention analyses cannot run on it")
                if hasattr(module, "fused_attn"):
                    self._fused.append((module, module.fused_attn))
                    module.fused_attn = False  # the explicit path computes softmax(q k^T) we can see
                self._handles.append(module.attn_drop.register_forward_hook(self._attention_hook(name)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for module, fused in self._fused:
            module.fused_attn = fused
        self._handles, self._fused = [], []

    def _layer_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor | tuple) -> None:
            if self.on_layer is not None:
                self.on_layer(name, _first_tensor(output).detach())

        return hook

    def _recompute_hook(self, site: AttentionSite):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor | tuple) -> None:
            if self.on_attention is not None:
                with torch.no_grad():
                    self.on_attention(site.name, site.recompute(module, inputs).detach())

        return hook

    def _attention_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            # The input of attn_drop: probabilities before attention dropout.
            if self.on_attention is not None:
                self.on_attention(name, inputs[0].detach())

        return hook


class Hooks:
    """Context manager for arbitrary hooks: ``(module path, "input" | "output", fn(tensor))``.

    ``fn`` receives the module's first input (a forward pre-hook) or its output, detached, as
    the forward pass produces it; every hook is removed on exit, also when the body raises.
    """

    def __init__(self, model: nn.Module, hooks: Sequence[tuple[str, str, Callable[[torch.Tensor], None]]]) -> None:
        self.model, self.hooks = model, list(hooks)
        self._handles: list = []

    def __enter__(self) -> "Hooks":
        try:
            for name, where, fn in self.hooks:
                try:
                    module = self.model.get_submodule(name) if name else self.model
                except AttributeError:
                    raise VitlabError(f"model {type(self.model).__name__} has no layer '{name}'") from None
                if where == "input":
                    handle = module.register_forward_pre_hook(lambda m, args, fn=fn: fn(_first_tensor(args).detach()))
                elif where == "output":
                    handle = module.register_forward_hook(lambda m, args, out, fn=fn: fn(_first_tensor(out).detach()))
                else:
                    raise VitlabError(f"a hook takes a module's 'input' or 'output', not {where!r}")
                self._handles.append(handle)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class Store:
    """The simplest reducer: keep every output, concatenated over batches (small data only)."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[torch.Tensor]] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        """Append one batch's output of layer ``name`` (moved to the CPU)."""
        self.outputs.setdefault(name, []).append(tensor.cpu())

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.cat(self.outputs[name])

    def keys(self) -> KeysView[str]:
        """The names of the layers stored so far."""
        return self.outputs.keys()
