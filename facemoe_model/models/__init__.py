"""FaceMoE backbones (Swin, ViT) and their registry of named configurations."""
from . import configs as _configs  # noqa: F401  (registers the named configurations)
from .registry import create_model, list_models, model_defaults, register_model
from .swin import FaceMoESwin
from .vit import FaceMoEViT

__all__ = ["create_model", "list_models", "register_model", "model_defaults", "FaceMoESwin", "FaceMoEViT"]
