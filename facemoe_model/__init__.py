"""FaceMoE: a Mixture-of-Experts vision transformer for (low-resolution) face recognition.

``create_model(name, **overrides)`` builds a registered configuration; ``load_checkpoint``
loads official ``model.pt`` files and the package's own checkpoints alike. The package stands
alone: it never imports the ``moescope`` analysis toolkit built on it.
"""
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .models import create_model, list_models, model_defaults
from .moe import MoEConfig, MoELayer, RouterOutput, RoutingOverride, moe_layers, override_routing, sample_keys, total_aux_loss

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
