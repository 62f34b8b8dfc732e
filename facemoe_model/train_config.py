"""The training configuration: every setting that determines an optimisation run, and its defaults.

Kept apart from :mod:`facemoe_model.train` so that reading the defaults (e.g. to declare
command-line options) imports neither torch nor timm.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the optimisation (a resumed run must use the same values).

    Attributes:
        model / model_args: ``create_model(model, **model_args)`` (ignored with ``init``: the
            checkpoint's architecture is used).
        head: margin head, ``cosface`` (default), ``arcface`` or ``adaface``.
        head_scale / head_margin: the head's ``s`` and ``m`` (None: the head's defaults, e.g.
            CosFace s=64, m=0.4).
        epochs / batch_size: passes over the data; images per step and process.
        lr / weight_decay: AdamW peak learning rate and weight decay (not on biases and norms).
        warmup_epochs / poly_power: linear warm-up length, then ``(1 - progress) ** poly_power``.
        aux_weight: lambda of the auxiliary loss (official 10).
        clip_grad: maximum gradient norm (0 disables clipping).
        lowres: ``(min, max)`` side of ``RandomLowResolution`` applied to every training
            image, or None for the images as they are.
        hflip: mirror each training image with probability 1/2.
        seed: the seed of every random choice.
    """

    model: str = "facemoe_swin_tiny"
    model_args: Mapping[str, Any] = field(default_factory=dict)
    head: str = "cosface"
    head_scale: float | None = None
    head_margin: float | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    poly_power: float = 2.0
    aux_weight: float = 10.0
    clip_grad: float = 5.0
    lowres: tuple[int, int] | None = None
    hflip: bool = True
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (stored in checkpoints read with ``weights_only=True``)."""
        values = dataclasses.asdict(self)
        values["model_args"] = dict(self.model_args)
        values["lowres"] = list(self.lowres) if self.lowres else None
        return values
