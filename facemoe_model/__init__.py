"""FaceMoE: a Mixture-of-Experts vision transformer for (low-resolution) face recognition.

``create_model(name, **overrides)`` builds a registered configuration; ``load_checkpoint``
loads official ``model.pt`` files and the package's own checkpoints alike. The package stands
alone: it never imports the ``moescope`` analysis toolkit built on it.
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

ONEDNN_CACHE_CAPACITY = 64
"""oneDNN primitive-cache entries (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, set here unless already
set; oneDNN reads it when torch creates its first CPU primitive, after this package is
imported). oneDNN keeps one compiled primitive per matmul shape, and each MoE expert gets a
different token count in every batch, so with the default 1,024 entries (about 0.35 MB each) a
long CPU run (analysis, evaluation, training) grows by some 400 MB before the cache is full; 64
keeps the model's fixed shapes cached and memory flat."""
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))

if TYPE_CHECKING:  # imported lazily (PEP 562) so that ``facemoe_model.errors`` costs no torch import
    from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
    from .models import create_model, list_models, model_defaults
    from .moe import MoEConfig, MoELayer, RouterOutput, RoutingOverride, moe_layers, override_routing, sample_keys, total_aux_loss

_LAZY = {
    **dict.fromkeys(("load_checkpoint", "read_checkpoint", "save_checkpoint"), ".checkpoint"),
    **dict.fromkeys(("create_model", "list_models", "model_defaults"), ".models"),
    **dict.fromkeys(("MoEConfig", "MoELayer", "RouterOutput", "RoutingOverride", "moe_layers", "override_routing",
                     "sample_keys", "total_aux_loss"), ".moe"),
}

__all__ = [
    "create_model",
    "list_models",
    "model_defaults",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "MoEConfig",
    "MoELayer",
    "RouterOutput",
    "RoutingOverride",
    "moe_layers",
    "override_routing",
    "sample_keys",
    "total_aux_loss",
]


def __getattr__(name: str):
    """The public names, imported on first use (the submodules pull in torch and timm)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
