"""Margin-based face-recognition heads: CosFace, ArcFace, AdaFace.

Each head owns the class-centre weights ``[num_classes, embedding_dim]`` and maps
(embeddings, labels) to scaled logits for cross-entropy. ``margin_head(name, ...)`` builds
one by name.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CosFace", "ArcFace", "AdaFace", "margin_head", "MARGIN_HEADS"]


class _MarginHead(nn.Module):
    def __init__(self, embedding_dim: int, num_classes: int, s: float, m: float) -> None:
        super().__init__()
        self.s, self.m = s, m
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float())).clamp(-1 + 1e-7, 1 - 1e-7)

    def extra_repr(self) -> str:
        return f"classes={self.weight.shape[0]}, s={self.s}, m={self.m}"


class CosFace(_MarginHead):
    """CosFace / large-margin cosine loss: ``s * (cos(theta_y) - m)`` (default s=64, m=0.4)."""

    def __init__(self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.4) -> None:
        super().__init__(embedding_dim, num_classes, s, m)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(embeddings)
        return self.s * (cos - self.m * F.one_hot(labels, cos.shape[1]))


class ArcFace(_MarginHead):
    """ArcFace / additive angular margin: ``s * cos(theta_y + m)`` (default s=64, m=0.5)."""

    def __init__(self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__(embedding_dim, num_classes, s, m)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(embeddings)
        theta = cos.acos()
        target = (theta + self.m).clamp(max=math.pi).cos()
        onehot = F.one_hot(labels, cos.shape[1]).bool()
        return self.s * torch.where(onehot, target, cos)


class AdaFace(_MarginHead):
    """AdaFace: a margin that adapts to image quality, proxied by the feature norm.

    ``margin_scaler = clip((||f|| - mu) / (sigma / h), -1, 1)`` with batch-norm-like running
    statistics of the feature norm (momentum ``t_alpha``); angular margin ``-m * scaler`` and
    additive margin ``m + m * scaler`` (default m=0.4, h=0.333, s=64).
    """

    def __init__(self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01) -> None:
        super().__init__(embedding_dim, num_classes, s, m)
        self.h, self.t_alpha = h, t_alpha
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(embeddings)
        norms = embeddings.float().norm(dim=1).clamp(0.001, 100).detach()
        if self.training:
            with torch.no_grad():
                std = norms.std() if norms.numel() > 1 else norms.new_tensor(0.0)
                self.batch_mean.mul_(1 - self.t_alpha).add_(self.t_alpha * norms.mean())
                self.batch_std.mul_(1 - self.t_alpha).add_(self.t_alpha * std)
        scaler = ((norms - self.batch_mean) / (self.batch_std + 1e-3) * self.h).clamp(-1, 1).unsqueeze(1)
        onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        theta = cos.acos() + onehot * (-self.m * scaler)
        logits = theta.clamp(1e-3, math.pi - 1e-3).cos() - onehot * (self.m + self.m * scaler)
        return self.s * logits


MARGIN_HEADS: dict[str, type[_MarginHead]] = {"cosface": CosFace, "arcface": ArcFace, "adaface": AdaFace}


def margin_head(name: str, embedding_dim: int, num_classes: int, **kwargs: float) -> _MarginHead:
    """Build the margin head ``name`` (``cosface``, ``arcface`` or ``adaface``)."""
    try:
        cls = MARGIN_HEADS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown margin head {name!r}; choose from {', '.join(MARGIN_HEADS)}") from None
    return cls(embedding_dim, num_classes, **kwargs)
