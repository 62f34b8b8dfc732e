"""How far each expert moved between two checkpoints (B.14), and the most changed layers (B.13).

:func:`expert_shift` works on parameter tensors only (per MoE layer, per expert, name ->
tensor; :func:`moescope.runners.drift.expert_parameters` takes them from a model), in float64.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

__all__ = ["SHIFT_AGGREGATE_NOTE", "ExpertParameters", "expert_shift", "lowest_cka"]

SHIFT_AGGREGATE_NOTE = (
    "per expert index over all MoE layers: sqrt of the summed squared per-layer L2 shifts (the L2 norm of all "
    "the expert's parameters together); % relative to the before-norm aggregated the same way"
)

ExpertParameters = Mapping[str, Sequence[Mapping[str, torch.Tensor]]]
"""Per MoE layer name, per expert index, that expert's parameters by name."""


@torch.no_grad()
def expert_shift(before: ExpertParameters, after: ExpertParameters) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-expert parameter shift (B.14), in float64.

    Returns ``(per_layer, per_expert)``: ``per_layer`` has ``layer, expert, params, l2_shift,
    before_norm, shift_pct`` for every MoE layer and expert of ``before``; ``per_expert``
    aggregates each expert index over the layers (:data:`SHIFT_AGGREGATE_NOTE`): ``expert,
    layers, params, l2_shift, before_norm, shift_pct``.
    """
    rows = []
    for name, experts in before.items():
        for e, params in enumerate(experts):
            params_after = after[name][e]
            shift_sq = before_sq = 0.0
            count = 0
            for pname, p in params.items():
                p0 = p.detach().to(torch.float64)
                shift_sq += float((params_after[pname].detach().to(torch.float64) - p0).square().sum())
                before_sq += float(p0.square().sum())
                count += p.numel()
            rows.append({"layer": name, "expert": e, "params": count, "l2_shift": shift_sq**0.5, "before_norm": before_sq**0.5})
    per_layer = pd.DataFrame(rows, columns=["layer", "expert", "params", "l2_shift", "before_norm"])
    per_layer["shift_pct"] = _percent(per_layer["l2_shift"], per_layer["before_norm"])
    squares = per_layer.assign(shift_sq=per_layer["l2_shift"] ** 2, before_sq=per_layer["before_norm"] ** 2)
    total = squares.groupby("expert", sort=True).agg(
        layers=("layer", "count"), params=("params", "sum"), shift_sq=("shift_sq", "sum"), before_sq=("before_sq", "sum")
    )
    per_expert = pd.DataFrame(
        {
            "expert": total.index.to_numpy(),
            "layers": total["layers"].to_numpy(),
            "params": total["params"].to_numpy(),
            "l2_shift": np.sqrt(total["shift_sq"].to_numpy()),
            "before_norm": np.sqrt(total["before_sq"].to_numpy()),
        }
    )
    per_expert["shift_pct"] = _percent(per_expert["l2_shift"], per_expert["before_norm"])
    return per_layer, per_expert


def _percent(part: pd.Series, whole: pd.Series) -> pd.Series:
    return (100.0 * part / whole).where(whole > 0)


def lowest_cka(table: pd.DataFrame, n: int = 5) -> pd.DataFrame:
    """The ``n`` layers with the lowest CKA (B.13), lowest first (layers without a CKA skipped)."""
    top = table.dropna(subset=["cka"]).nsmallest(n, "cka", keep="first")
    return pd.DataFrame({"rank": range(1, len(top) + 1), "layer": top["layer"].to_numpy(), "cka": top["cka"].to_numpy()})
