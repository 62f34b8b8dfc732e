"""Linear CKA between two representations with the minibatch unbiased HSIC estimator (B.12).

For a batch of ``n >= 4`` images with per-image features X [n, p] and Y [n, q] (Nguyen et al.
2021, after Song et al. 2012)::

    K~ = X X' and L~ = Y Y' with zeroed diagonals
    HSIC1(K, L) = [tr(K~L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))
    CKA = sum_b HSIC1(K_b, L_b) / sqrt(sum_b HSIC1(K_b, K_b) * sum_b HSIC1(L_b, L_b))

Only the three float64 sums are kept per layer, so memory does not grow with the number of
images, and Gram matrices are n x n, so features may be wide (tokens x channels).
A batch of fewer than 4 images cannot be used: :func:`plan_batches` decides up front whether
a short last batch is folded into the previous one or dropped, and says which.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch

from ..errors import DataError, MoescopeError

__all__ = ["MIN_BATCH", "FeatureMode", "layer_features", "zero_diagonal_gram", "hsic1", "plan_batches", "StreamingCKA"]

MIN_BATCH = 4
"""Smallest batch the unbiased HSIC estimator is defined for (it divides by n(n-3))."""

FeatureMode = Literal["flatten", "mean"]


def layer_features(t: torch.Tensor, mode: FeatureMode = "flatten") -> torch.Tensor:
    """Per-image feature vectors [B, D] from a layer output.

    Accepts tokens [B, N, C], a channels-last grid [B, H, W, C] or vectors [B, D] (returned as
    they are). ``flatten`` concatenates all tokens (D = N*C); ``mean`` averages over tokens (D = C).
    """
    if t.ndim == 2:
        return t
    if t.ndim not in (3, 4):
        raise ValueError(f"layer output must be [B, D], [B, N, C] or [B, H, W, C], got shape {tuple(t.shape)}")
    if mode == "flatten":
        return t.reshape(t.shape[0], -1)
    if mode == "mean":
        return t.mean(dim=tuple(range(1, t.ndim - 1)))
    raise ValueError(f"feature mode must be 'flatten' or 'mean', got {mode!r}")


def zero_diagonal_gram(features: torch.Tensor) -> torch.Tensor:
    """Linear-kernel Gram matrix ``X X'`` [n, n] in float64 with its diagonal set to zero."""
    x = features.to(torch.float64)
    return (x @ x.T).fill_diagonal_(0.0)


def hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimate of one batch from zero-diagonal Gram matrices ``k``, ``l`` [n, n] (0-d tensor)."""
    n = k.shape[0]
    if n < MIN_BATCH:
        raise ValueError(f"unbiased HSIC needs n >= {MIN_BATCH}, got {n}")
    trace_kl = (k * l).sum()  # tr(K~L~) as both are symmetric
    cross = k.sum(dim=0) @ l.sum(dim=0)  # 1'K~L~1 = (K~1)'(L~1)
    return (trace_kl + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def plan_batches(n_images: int, batch_size: int, short_last: Literal["fold", "drop"] = "fold") -> tuple[list[range], str | None]:
    """Consecutive image-index batches of ``batch_size`` that all hold at least ``MIN_BATCH`` images.

    A last batch of 1-3 images is folded into the previous batch (``short_last='fold'``, no image
    lost) or dropped (``'drop'``, batches keep their size). Returns the batches (usable as a
    DataLoader ``batch_sampler``) and a one-line note of what was done, or None.
    """
    if batch_size < MIN_BATCH:
        raise MoescopeError(f"CKA batch size must be at least {MIN_BATCH}, got {batch_size}")
    if n_images < MIN_BATCH:
        raise DataError(f"CKA needs at least {MIN_BATCH} images, got {n_images}")
    if short_last not in ("fold", "drop"):
        raise ValueError(f"short_last must be 'fold' or 'drop', got {short_last!r}")
    batches = [range(start, min(start + batch_size, n_images)) for start in range(0, n_images, batch_size)]
    short = len(batches[-1])
    if short >= MIN_BATCH:
        return batches, None
    if short_last == "fold":
        batches[-2:] = [range(batches[-2].start, n_images)]
        return batches, f"the last {short} images were folded into the previous batch ({len(batches[-1])} images): CKA batches need at least {MIN_BATCH}"
    batches.pop()
    return batches, f"the last {short} of {n_images} images were dropped: CKA batches need at least {MIN_BATCH}"


@dataclass
class _LayerSums:
    hsic: torch.Tensor  # float64 [3]: sums of HSIC1(K,L), HSIC1(K,K), HSIC1(L,L)
    images: int = 0
    batches: int = 0


class StreamingCKA:
    """Linear CKA per layer, accumulated over batches of the same images seen by two models.

    ``update(name, x, y)`` with the two models' outputs of layer ``name`` for the same batch;
    ``compute()`` gives the CKA of every layer (NaN when a side has no variance, i.e. a
    non-positive self-HSIC sum).
    """

    def __init__(self, mode: FeatureMode = "flatten") -> None:
        self.mode = mode
        self._layers: dict[str, _LayerSums] = {}

    def update(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch of layer ``name``: ``x`` and ``y`` [n, ...] hold the same ``n >= 4`` images."""
        n = x.shape[0]
        if y.shape[0] != n:
            raise ValueError(f"layer {name}: both sides need the same images, got {n} and {y.shape[0]}")
        if n < MIN_BATCH:
            raise MoescopeError(f"CKA layer {name}: a batch of {n} images is too small, the unbiased HSIC needs {MIN_BATCH} (see plan_batches)")
        k = zero_diagonal_gram(layer_features(x, self.mode))
        l = zero_diagonal_gram(layer_features(y, self.mode))
        batch = torch.stack([hsic1(k, l), hsic1(k, k), hsic1(l, l)])
        sums = self._layers.get(name)
        if sums is None:
            sums = self._layers[name] = _LayerSums(torch.zeros(3, dtype=torch.float64, device=batch.device))
        sums.hsic += batch
        sums.images += n
        sums.batches += 1

    def compute(self) -> dict[str, float]:
        """CKA per layer, in the order layers were first updated."""
        return {name: _cka(*sums.hsic.tolist()) for name, sums in self._layers.items()}

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: ``layer, cka, hsic_xy, hsic_xx, hsic_yy, images, batches``."""
        rows = []
        for name, sums in self._layers.items():
            xy, xx, yy = sums.hsic.tolist()
            rows.append({"layer": name, "cka": _cka(xy, xx, yy), "hsic_xy": xy, "hsic_xx": xx, "hsic_yy": yy, "images": sums.images, "batches": sums.batches})
        return pd.DataFrame(rows, columns=["layer", "cka", "hsic_xy", "hsic_xx", "hsic_yy", "images", "batches"])


def _cka(hsic_xy: float, hsic_xx: float, hsic_yy: float) -> float:
    denominator = hsic_xx * hsic_yy
    return hsic_xy / denominator**0.5 if denominator > 0 else float("nan")
