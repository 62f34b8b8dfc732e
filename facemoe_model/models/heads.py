"""What the FaceMoE backbones share: the embedding head, weight init, and the forward path."""
from __future__ import annotations

from typing import Any, Callable

import torch
from timm.layers import trunc_normal_
from torch import nn

from ..moe import MoEConfig, total_aux_loss

__all__ = ["feature_layer", "init_linear", "MoEBackbone"]


def feature_layer(in_features: int, embedding_dim: int = 512, dropout: float = 0.25) -> nn.Sequential:
    """``BatchNorm1d -> Dropout -> Linear -> BatchNorm1d`` on the flattened final tokens."""
    return nn.Sequential(
        nn.BatchNorm1d(in_features),
        nn.Dropout(dropout),
        nn.Linear(in_features, embedding_dim),
        nn.BatchNorm1d(embedding_dim),
    )


def init_linear(module: nn.Module, normal: Callable[..., Any] = trunc_normal_) -> None:
    """Truncated-normal (std 0.02) weights and zero biases for a ``Linear`` (use with ``module.apply``).

    ``normal`` is the sampler: timm's ``trunc_normal_`` (Swin) or torch's (ViT, whose draws differ).
    Weights on the meta device (a model built to load a checkpoint into) are left as they are.
    """
    if isinstance(module, nn.Linear) and not module.weight.is_meta:
        normal(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MoEBackbone:
    """Mixin of the FaceMoE backbones: MoE settings, embedding head, ``forward`` and ``aux_loss``.

    A backbone calls :meth:`_setup_moe` with its MoE keyword arguments (the fields of
    :class:`~facemoe_model.moe.MoEConfig`) before building blocks, builds each block's MLP with
    ``self.moe_config.layer(...)``, and ends with :meth:`_setup_head`. It provides
    ``forward_features(x) -> [B, ..., C]`` tokens.
    """

    moe_config: MoEConfig
    feature_layer: nn.Sequential

    def _setup_moe(self, moe: dict[str, Any]) -> MoEConfig:
        self.moe_config = MoEConfig(**moe)
        return self.moe_config

    def _setup_head(self, channels: int, grid: tuple[int, int], embedding_dim: int, head_dropout: float) -> None:
        self.final_grid = tuple(grid)
        self.feature_layer = feature_layer(channels * grid[0] * grid[1], embedding_dim, head_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, embedding_dim]`` of normalised images ``[B, 3, img_size, img_size]``."""
        return self.feature_layer(self.forward_features(x).flatten(1))

    def aux_loss(self) -> torch.Tensor:
        """Sum of every MoE layer's auxiliary loss from the last forward pass."""
        return total_aux_loss(self)
