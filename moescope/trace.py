"""Routing capture: forward hooks on every MoE layer record what the layer computed.

:class:`RoutingTrace` attaches one hook to each MoE layer's ``hook_routing`` point (the
layer passes its :class:`~facemoe_model.moe.RouterOutput` through it), so nothing is
recomputed. It is a context manager: hooks are removed on exit, also on exceptions, and the
model is left exactly as it was. After each forward pass ``trace.pop()`` hands out the
batch's :class:`LayerRouting` per layer — per image, per token: rank-ordered top-k experts,
combine weights, router probabilities and the token's (row, col) on the layer's grid.

    with RoutingTrace(model) as trace:
        for images in batches:
            model(images)
            for name, routing in trace.pop().items():
                ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from facemoe_model.hooks import HookSet
from facemoe_model.moe import MoELayer, RouterOutput, select_moe_layers, uniform_num_experts

from .errors import MoescopeError

__all__ = ["LayerRouting", "RoutingTrace", "token_frame", "select_layers", "expert_count", "compatible_layers"]


@dataclass(frozen=True)
class LayerRouting:
    """One MoE layer's routing for one batch, per image and grid token (prefix tokens dropped).

    Attributes:
        topk: ``[B, N, k]`` experts that processed each token, in the router's rank order.
        weights: ``[B, N, k]`` their combine weights.
        probs: ``[B, N, E]`` router probabilities (softmax of the logits).
        logits: ``[B, N, E]`` router logits.
        grid: ``(rows, cols)`` with ``rows * cols == N``; token ``n`` sits at ``divmod(n, cols)``.
        weighting: the layer's combine-weight mode (``logits`` = raw-logit weights).
    """

    topk: np.ndarray
    weights: np.ndarray
    probs: np.ndarray
    logits: np.ndarray
    grid: tuple[int, int]
    weighting: str

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def k(self) -> int:
        return self.topk.shape[-1]

    def contributions(self, count: str = "top1") -> np.ndarray:
        """Per-token expert contributions ``[B, N, E]`` under a counting convention.

        ``top1``: 1 for the rank-1 expert; ``topk``: 1/k for each of the k experts;
        ``weighted``: the normalised combine weights ``|w| / sum |w|`` (docs/analyses.md).
        """
        B, N, k = self.topk.shape
        out = np.zeros((B, N, self.num_experts), dtype=np.float64)
        if count == "top1":
            np.put_along_axis(out, self.topk[..., :1], 1.0, axis=-1)
        elif count == "topk":
            np.put_along_axis(out, self.topk, 1.0 / k, axis=-1)
        elif count == "weighted":
            w = np.abs(self.weights.astype(np.float64))
            total = w.sum(-1, keepdims=True)
            w = np.divide(w, total, out=np.full_like(w, 1.0 / k), where=total > 0)
            np.put_along_axis(out, self.topk, w, axis=-1)
        else:
            raise ValueError(f"unknown counting convention {count!r}; use top1, topk or weighted")
        return out

    @classmethod
    def from_router_output(cls, r: RouterOutput) -> "LayerRouting":
        B, T = r.batch_size, r.tokens_per_image
        if r.grid is None:
            raise ValueError("MoE layer has no token grid; set MoELayer.token_grid")
        start = r.num_prefix_tokens
        n_grid = r.grid[0] * r.grid[1]
        if T - start != n_grid:
            raise ValueError(f"layer grid {r.grid} does not match its {T - start} tokens")

        def per_image(t: torch.Tensor) -> np.ndarray:
            return t.detach().reshape(B, T, -1)[:, start:].cpu().numpy()

        return cls(
            topk=per_image(r.topk_indices).astype(np.int64),
            weights=per_image(r.combine_weights.float()),
            probs=per_image(r.probs),
            logits=per_image(r.logits.float()),
            grid=tuple(r.grid),
            weighting=r.weighting,
        )


def select_layers(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, MoELayer]:
    """The MoE layers named (or prefixed) by ``layers`` (default all); an unknown name is a one-line MoescopeError."""
    try:
        return select_moe_layers(model, layers)
    except KeyError as exc:
        raise MoescopeError(str(exc.args[0])) from None


def expert_count(layers: Mapping[str, MoELayer]) -> int:
    """The experts per layer the chosen layers share; layers that differ are a one-line MoescopeError."""
    try:
        return uniform_num_experts(layers)
    except ValueError as exc:
        raise MoescopeError(f"{exc}; choose layers with --layers") from None


def compatible_layers(models: Sequence[nn.Module], labels: Sequence[str], layers: Iterable[str] | None = None
                      ) -> tuple[dict[str, MoELayer], int, int]:
    """The chosen MoE layers of ``models[0]``, their shared expert count and the shared input size;
    models compared side by side (``--compare``, ``--baseline``) must agree on all three (one-line
    MoescopeError naming the first that differs, by its label)."""
    chosen = [select_layers(m, layers) for m in models]
    names = list(chosen[0])
    num_experts = expert_count(chosen[0])
    for label, other in zip(labels[1:], chosen[1:]):
        if list(other) != names or any(layer.num_experts != num_experts for layer in other.values()):
            raise MoescopeError(f"--compare needs the same MoE layers and expert counts: {labels[0]} and {label} differ")
    sizes = {m.img_size for m in models}
    if len(sizes) != 1:
        raise MoescopeError(f"--compare needs the same input size, got {sorted(sizes)}")
    return chosen[0], num_experts, sizes.pop()


class RoutingTrace(HookSet):
    """Context manager that records the routing of MoE layers on every forward pass.

    Args:
        model: any module containing :class:`~facemoe_model.moe.MoELayer` s.
        layers: layer names or prefixes to record (default all).
    """

    def __init__(self, model: nn.Module, layers: Iterable[str] | None = None) -> None:
        self.layers = select_moe_layers(model, layers)
        super().__init__({name: layer.hook_routing for name, layer in self.layers.items()})

    def pop_raw(self) -> dict[str, RouterOutput]:
        """The layers' :class:`RouterOutput` of the last forward pass (tensors as computed)."""
        out, self._pending = self._pending, {}
        return out

    def pop(self) -> dict[str, LayerRouting]:
        """The last forward pass's routing per layer, per image and token (numpy, on CPU)."""
        return {name: LayerRouting.from_router_output(r) for name, r in self.pop_raw().items()}


def token_frame(routing: dict[str, LayerRouting], image_ids: list[str]) -> pd.DataFrame:
    """Per-token export (opt-in): one row per image x layer x token with row/col, the k
    experts and weights in rank order, and the router probabilities."""
    frames = []
    for layer, r in routing.items():
        B, N, k = r.topk.shape
        rows, cols = np.divmod(np.arange(N), r.grid[1])
        data = {
            "image": np.repeat(np.asarray(image_ids, dtype=object), N),
            "layer": layer,
            "token": np.tile(np.arange(N), B),
            "row": np.tile(rows, B),
            "col": np.tile(cols, B),
        }
        for rank in range(k):
            data[f"expert_rank{rank + 1}"] = r.topk[..., rank].reshape(-1)
            data[f"weight_rank{rank + 1}"] = r.weights[..., rank].reshape(-1)
        for e in range(r.num_experts):
            data[f"prob_expert{e}"] = r.probs[..., e].reshape(-1)
        frames.append(pd.DataFrame(data))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
