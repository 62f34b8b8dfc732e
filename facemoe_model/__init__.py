"""FaceMoE: a Mixture-of-Experts vision transformer for (low-resolution) face recognition.

``create_model(name, **overrides)`` builds a registered configuration; ``load_checkpoint``
loads official ``model.pt`` files and moescope checkpoints alike.
"""
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .models import create_model, list_models, model_defaults
from .moe import MoELayer, RouterOutput, RoutingOverride, moe_layers, override_routing, total_aux_loss

__all__ = [
    "create_model",
    "list_models",
    "model_defaults",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "MoELayer",
    "RouterOutput",
    "RoutingOverride",
    "moe_layers",
    "override_routing",
    "total_aux_loss",
]
