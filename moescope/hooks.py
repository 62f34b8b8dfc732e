"""Forward hooks that are always removed: the base of every recorder (TransformerLens-style).

A :class:`HookSet` registers one forward hook per named module on ``__enter__`` and removes
them all on ``__exit__`` — also when the ``with`` block or the registration itself raises —
so the model is left exactly as it was. Subclasses say what a hook records
(:meth:`record`) into ``self._pending``, keyed by module name.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

__all__ = ["HookSet"]


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
