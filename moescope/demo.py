"""The bundled demo: two small trained FaceMoE checkpoints and held-out face images.

``before`` is trained on high-resolution synthetic identities, ``after`` is ``before``
fine-tuned on their low-resolution versions. Checkpoint arguments of every command accept a
path or ``demo:before`` / ``demo:after``; with no checkpoint the commands use ``demo:after``
(B.1 is the fine-tuned model).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import CheckpointError, DataError

__all__ = [
    "DEMO_CHECKPOINTS",
    "DEFAULT_CHECKPOINT",
    "DEFAULT_PAIR",
    "DEMO_IMAGES",
    "demo_dir",
    "resolve_checkpoint",
    "demo_images_dir",
    "demo_split_dir",
    "load_model",
]

DEMO_CHECKPOINTS = ("before", "after")
DEFAULT_CHECKPOINT = "demo:after"
"""The checkpoint a command analyses when given none (B.1 is the fine-tuned model)."""
DEFAULT_PAIR = ("demo:before", DEFAULT_CHECKPOINT)
"""The two checkpoints a comparison (``cka``) uses when given none."""
DEMO_IMAGES = "demo:images"
"""How the bundled demo images are named in results (``settings["data"]``)."""


def demo_dir() -> Path:
    """Folder of the bundled demo assets inside the installed package."""
    return Path(str(resources.files("facemoe_model") / "assets" / "demo"))


def resolve_checkpoint(spec: str | Path | None) -> Path:
    """Turn ``None`` / ``demo:NAME`` / a path into a checkpoint path (existence checked later)."""
    spec = DEFAULT_CHECKPOINT if spec is None else str(spec)
    if spec.startswith("demo:"):
        name = spec.split(":", 1)[1]
        if name not in DEMO_CHECKPOINTS:
            raise CheckpointError(f"unknown demo checkpoint {spec!r}; choose demo:before or demo:after")
        path = demo_dir() / f"{name}.pt"
        if not path.exists():
            raise CheckpointError(f"bundled demo checkpoint {path} is missing from this installation")
        return path
    return Path(spec)


def demo_images_dir() -> Path:
    """Bundled demo face images (held-out synthetic identities, one folder per identity)."""
    path = demo_dir() / "images"
    if not path.is_dir():
        raise DataError(f"bundled demo images {path} are missing from this installation")
    return path


def demo_split_dir() -> Path:
    """Bundled gallery/probe evaluation split of held-out identities."""
    path = demo_dir() / "split"
    if not path.is_dir():
        raise DataError(f"bundled demo evaluation split {path} is missing from this installation")
    return path


def load_model(spec: str | Path | None, **overrides):
    """Load a checkpoint given as a path or ``demo:NAME`` (see :func:`resolve_checkpoint`)."""
    from facemoe_model import load_checkpoint

    return load_checkpoint(resolve_checkpoint(spec), **overrides)
