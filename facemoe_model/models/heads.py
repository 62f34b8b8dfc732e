"""Embedding head shared by the backbones (the official ``feature_layer``)."""
from __future__ import annotations

from torch import nn


def feature_layer(in_features: int, embedding_dim: int = 512, dropout: float = 0.25) -> nn.Sequential:
    """``BatchNorm1d -> Dropout -> Linear -> BatchNorm1d`` on the flattened final tokens."""
    return nn.Sequential(
        nn.BatchNorm1d(in_features),
        nn.Dropout(dropout),
        nn.Linear(in_features, embedding_dim),
        nn.BatchNorm1d(embedding_dim),
    )
