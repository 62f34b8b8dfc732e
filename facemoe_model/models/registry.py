"""Named model configurations, timm-style: ``create_model(name, **overrides)``.

A configuration is a builder class plus keyword defaults; the model remembers the full
keyword set it was built with (``model.model_config``) so a checkpoint can rebuild it.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "model_defaults"]

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], dict[str, Any], str]] = {}


def register_model(name: str, builder: Callable[..., nn.Module], description: str = "", **defaults: Any) -> None:
    """Register configuration ``name``: ``builder(**defaults)`` builds it."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = (builder, dict(defaults), description)


def list_models() -> dict[str, str]:
    """Registered configuration names with their one-line descriptions."""
    return {name: desc for name, (_, _, desc) in sorted(_REGISTRY.items())}


def model_defaults(name: str) -> dict[str, Any]:
    """The keyword defaults of configuration ``name``."""
    return dict(_lookup(name)[1])


def _lookup(name: str):
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build configuration ``name`` with ``overrides`` applied to its defaults.

    The returned model has ``model.model_config == {"name": name, **kwargs}``.
    """
    builder, defaults, _ = _lookup(name)
    kwargs = {**defaults, **overrides}
    model = builder(**kwargs)
    model.model_config = {"name": name, **kwargs}
    return model
