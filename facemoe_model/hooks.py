"""Forward hooks that are always removed, and the expert-usage counter built on them.

A :class:`HookSet` registers one forward hook per named module on ``__enter__`` and removes
them all on ``__exit__`` — also when the ``with`` block or the registration itself raises —
so the model is left exactly as it was. Subclasses say what a hook records
(:meth:`HookSet.record`), by default into ``self._pending`` keyed by module name.

:class:`ExpertUsage` is the one counter of token-expert assignments (training logs and
analyses alike): it observes each MoE layer's ``hook_routing`` point and never recomputes
routing.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .moe import RouterOutput, select_moe_layers

__all__ = ["HookSet", "ExpertUsage"]


class HookSet:
    """Context manager owning forward hooks on ``modules`` (name -> module)."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self._handles: list = []
        self._pending: dict[str, Any] = {}

    def record(self, name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        """Store what the hook on ``name`` observed (default: the module's output)."""
        self._pending[name] = output

    def __enter__(self):
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            self.record(name, module, inputs, output)

        return hook


class ExpertUsage(HookSet):
    """Counts token-expert assignments per MoE layer and expert while the model runs (a context manager).

    Every expert a grid token was processed by (``RouterOutput.topk_indices``, after any
    override) is one assignment; prefix tokens (a class token) are left out. Counting happens
    on the device the model runs on (no host synchronisation per forward pass); ``counts``
    copies to numpy when read. Counts survive leaving the ``with`` block; :meth:`reset` zeroes
    them.

    Args:
        model: any module containing MoE layers.
        layers: layer names or name prefixes to observe (default all).
        training_only: count only forward passes in training mode (e.g. not validation).
    """

    def __init__(self, model: nn.Module, layers: Iterable[str] | None = None, *, training_only: bool = False) -> None:
        self.layers = select_moe_layers(model, layers)
        super().__init__({name: layer.hook_routing for name, layer in self.layers.items()})
        self.training_only = training_only
        self._counts: dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Zero every count."""
        self._counts = {name: torch.zeros(layer.num_experts, dtype=torch.int64) for name, layer in self.layers.items()}

    def record(self, name: str, module: nn.Module, inputs: tuple, output: RouterOutput) -> None:
        if self.training_only and not module.training:
            return
        indices = output.topk_indices
        if output.num_prefix_tokens:
            indices = indices.reshape(output.batch_size, output.tokens_per_image, -1)[:, output.num_prefix_tokens :]
        counts = self._counts[name]
        added = torch.bincount(indices.reshape(-1), minlength=len(counts))
        self._counts[name] = counts.to(added.device) + added

    @property
    def count_tensors(self) -> dict[str, torch.Tensor]:
        """The counts as int64 tensors on the device they were counted on (e.g. to all-reduce)."""
        return dict(self._counts)

    @property
    def counts(self) -> dict[str, np.ndarray]:
        """Assignments ``[num_experts]`` (int64) per layer name."""
        return {name: c.cpu().numpy() for name, c in self._counts.items()}

    @property
    def total(self) -> np.ndarray:
        """Assignments per expert summed over all observed layers (they must share the expert count)."""
        return np.sum(list(self.counts.values()), axis=0)

    def shares(self) -> dict[str, np.ndarray]:
        """Each layer's assignments as fractions summing to 1 (NaN for a layer that saw no token)."""
        out = {}
        for name, c in self.counts.items():
            total = c.sum()
            out[name] = c / total if total else np.full(len(c), np.nan)
        return out
