"""How alike two routings are, token by token, from the experts' indices only.

Two statistics over the same tokens routed twice (two checkpoints, or one model on a clean
and a perturbed image):

* :class:`RoutingAgreement` — per MoE layer, the share of tokens with the same rank-1 expert
  and with the same top-k set (order ignored);
* :func:`routing_set_distance` / :class:`RoutingChange` — per token ``1 - |A ∩ B| / |A ∪ B|``
  of the two top-k index sets (0: same experts, 1: disjoint), and whether the top-1 expert
  changed, averaged per layer.

Both use the ``topk`` indices (``[..., k]`` int arrays in rank order), never the combine
weights: raw-logit weights can be zero or negative, so they are not set memberships.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from ..trace import LayerRouting

__all__ = ["RoutingAgreement", "RoutingChange", "routing_set_distance", "top1_changed"]


class RoutingAgreement:
    """Streaming share of tokens routed alike by two models, per MoE layer.

    ``update(a, b)`` with both models' :class:`~moescope.trace.LayerRouting` of one batch;
    ``to_frame()``: ``layer, k, tokens, top1_agreement, topk_agreement`` (top-k compared as sets).
    """

    def __init__(self) -> None:
        self._counts: dict[str, np.ndarray] = {}  # layer -> [tokens, same top-1, same top-k set]
        self._k: dict[str, int] = {}

    def update(self, a: Mapping[str, "LayerRouting"], b: Mapping[str, "LayerRouting"]) -> None:
        for name, ra in a.items():
            rb = b[name]
            if ra.topk.shape != rb.topk.shape:
                raise ValueError(f"{name}: routing shapes differ, {ra.topk.shape} and {rb.topk.shape}")
            same_top1 = ra.topk[..., 0] == rb.topk[..., 0]
            same_set = (np.sort(ra.topk, axis=-1) == np.sort(rb.topk, axis=-1)).all(axis=-1)
            counts = self._counts.setdefault(name, np.zeros(3, dtype=np.int64))
            counts += (same_top1.size, int(same_top1.sum()), int(same_set.sum()))
            self._k[name] = ra.k

    def to_frame(self) -> pd.DataFrame:
        rows = [
            {"layer": name, "k": self._k[name], "tokens": int(c[0]), "top1_agreement": c[1] / c[0], "topk_agreement": c[2] / c[0]}
            for name, c in self._counts.items()
        ]
        return pd.DataFrame(rows, columns=["layer", "k", "tokens", "top1_agreement", "topk_agreement"])

    def overall(self) -> dict[str, float]:
        """Token-weighted agreement over all layers."""
        total = sum(self._counts.values()) if self._counts else np.zeros(3, dtype=np.int64)
        return {"top1": total[1] / total[0] if total[0] else float("nan"), "topk": total[2] / total[0] if total[0] else float("nan")}


def _membership(topk: np.ndarray, num_experts: int) -> np.ndarray:
    """``bool [..., E]``: which experts are in each token's index set (repeats count once)."""
    member = np.zeros((*topk.shape[:-1], num_experts), dtype=bool)
    np.put_along_axis(member, topk.astype(np.int64), True, axis=-1)
    return member


def routing_set_distance(a: np.ndarray, b: np.ndarray, num_experts: int | None = None) -> np.ndarray:
    """Per token ``1 - |A ∩ B| / |A ∪ B|`` of the top-k index sets ``a``, ``b`` (``[..., k]`` and
    ``[..., k']``, same leading shape); float64 ``[...]`` in [0, 1]."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape[:-1] != b.shape[:-1]:
        raise ValueError(f"routing shapes differ: {a.shape} and {b.shape}")
    if num_experts is None:
        num_experts = int(max(a.max(initial=-1), b.max(initial=-1))) + 1
    ma, mb = _membership(a, num_experts), _membership(b, num_experts)
    inter = (ma & mb).sum(-1)
    union = (ma | mb).sum(-1)
    return 1.0 - np.divide(inter, union, out=np.ones(inter.shape, dtype=np.float64), where=union > 0)


def top1_changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per token: is the rank-1 expert different (``bool [...]``)?"""
    return np.asarray(a)[..., 0] != np.asarray(b)[..., 0]


class RoutingChange:
    """Streaming routing change between a reference and a changed routing, per MoE layer.

    ``update(reference, changed)`` with the two routings (:class:`~moescope.trace.LayerRouting`
    per layer) of the same batch; ``to_frame()``: ``layer, tokens, set_distance`` (mean of
    :func:`routing_set_distance`) ``, top1_changed`` (share of tokens whose top-1 expert changed).
    """

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}  # layer -> [tokens, sum of distances, top-1 changes]

    def update(self, reference: Mapping[str, "LayerRouting"], changed: Mapping[str, "LayerRouting"]) -> None:
        for name, ra in reference.items():
            rb = changed[name]
            distance = routing_set_distance(ra.topk, rb.topk, max(ra.num_experts, rb.num_experts))
            sums = self._sums.setdefault(name, np.zeros(3, dtype=np.float64))
            sums += (distance.size, float(distance.sum()), float(top1_changed(ra.topk, rb.topk).sum()))

    def to_frame(self) -> pd.DataFrame:
        rows = [
            {"layer": name, "tokens": int(s[0]), "set_distance": s[1] / s[0], "top1_changed": s[2] / s[0]}
            for name, s in self._sums.items()
        ]
        return pd.DataFrame(rows, columns=["layer", "tokens", "set_distance", "top1_changed"])
