"""Per-image layer outputs captured by forward hooks (the representations CKA compares).

:class:`FeatureCapture` records, on every forward pass, the per-image feature vectors
(:func:`~moescope.stats.cka.layer_features`) of named modules; :func:`drift_layers` names
the modules a drift analysis compares: the patch embedding, every block, the final norm and
the embedding head, in forward order.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from facemoe_model.hooks import HookSet

from .errors import MoescopeError
from .stats.cka import FeatureMode, layer_features

__all__ = ["DRIFT_LAYER", "FeatureCapture", "drift_layers"]

DRIFT_LAYER = re.compile(r"^(patch_embed|norm|feature_layer|(.+\.)?blocks\.\d+)$")
"""Module names compared by CKA: the patch embedding, every block, the final norm, the head."""


def drift_layers(model: nn.Module) -> list[str]:
    """Names of the modules compared by CKA (:data:`DRIFT_LAYER`), in registration (forward) order."""
    names = [name for name, _ in model.named_modules() if DRIFT_LAYER.match(name)]
    if not names:
        raise MoescopeError(f"{type(model).__name__} has none of the layers CKA compares (patch_embed, blocks, norm, feature_layer)")
    return names


class FeatureCapture(HookSet):
    """Context manager: forward hooks on the named modules record each pass's per-image features.

    ``pop()`` after a forward pass gives ``{name: [B, D] features}`` (:func:`layer_features` of the
    module's output, copied). The features are detached from the autograd graph unless
    ``keep_graph`` is set (gradient analyses). Hooks are removed on exit, also on exceptions.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], mode: FeatureMode = "flatten", *, keep_graph: bool = False) -> None:
        super().__init__({name: model.get_submodule(name) for name in names})
        self.mode = mode
        self.keep_graph = keep_graph

    def record(self, name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._pending[name] = layer_features(output if self.keep_graph else output.detach(), self.mode).clone()

    def pop(self) -> dict[str, torch.Tensor]:
        """The last forward pass's features per module, in the order the modules were given."""
        missing = [n for n in self.modules if n not in self._pending]
        if missing:
            raise RuntimeError(f"no output recorded for {missing[0]}: run a forward pass first")
        out = {n: self._pending[n] for n in self.modules}
        self._pending = {}
        return out
