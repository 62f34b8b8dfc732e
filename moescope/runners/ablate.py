"""Expert interventions and their effect on face recognition (paper B.17 / B.7, ``moescope ablate``).

evaluation data -> for the unmodified model and each :class:`~moescope.interventions.Intervention`
(applied through ``override_routing``, restored exactly afterwards): the protocols' figures and
the expert usage observed while they ran (:func:`moescope.forward.evaluate_model`) -> the B.17
table (:func:`moescope.stats.usage.usage_table` for the usage shares).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import pandas as pd
from torch import nn
from tqdm import tqdm

from facemoe_model.protocols import Degradation, EvaluationData

from ..choices import EVAL_BATCH_SIZE
from ..distributed import is_main
from ..forward import evaluate_model
from ..interventions import BASELINE, Intervention
from ..results import AnalysisResult
from ..stats.usage import usage_table
from ..trace import expert_count, select_layers

__all__ = ["ablate_experts", "headline"]


def headline(figures: dict[str, dict[str, float]]) -> dict[str, float]:
    """The B.17 columns of one evaluation: Rank-k and verification accuracy."""
    row = {k: v for k, v in figures.get("identification", {}).items() if k.startswith("Rank-")}
    if "verification" in figures:
        row["Verification accuracy"] = figures["verification"]["accuracy"]
        row["Verification accuracy std"] = figures["verification"]["accuracy_std"]
    return row


def ablate_experts(
    model: nn.Module,
    data: EvaluationData,
    interventions: Sequence[Intervention],
    *,
    layers: Sequence[str] | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    flip: bool = True,
    probe_transform: Degradation | None = None,
    progress: bool = True,
    checkpoint: str = "",
    settings: dict | None = None,
) -> AnalysisResult:
    """Evaluate the unmodified model and each intervention (on ``layers``; default all MoE layers).

    Returns an ``AnalysisResult`` with tables ``ablation`` (B.17 layout: one row per
    intervention after the baseline: effective k, Rank-1/5/10/20 and/or verification
    accuracy as fractions, expert usage % over the chosen layers), ``metrics`` (everything
    :func:`~facemoe_model.protocols.evaluate` returned, tidy) and ``expert_usage`` (per layer);
    the baseline figures in ``summary`` equal ``moescope eval``'s; a warning per intervention
    that shrinks k.
    """
    chosen = select_layers(model, layers)
    num_experts = expert_count(chosen)
    runs: list[Intervention | None] = [None, *interventions]
    rows, metrics, usage, warnings = [], [], [], []
    baseline: dict = {}
    for intervention in tqdm(runs, desc="interventions", unit="eval", disable=not (progress and is_main())):
        name = BASELINE if intervention is None else intervention.name
        scope = contextlib.nullcontext(chosen) if intervention is None else intervention.apply(model, layers)
        with scope as affected:
            k = min(layer.effective_k for layer in affected.values())
            shrunk = sorted({layer.k for layer in affected.values() if layer.effective_k < layer.k})
            run = evaluate_model(model, data, batch_size=batch_size, flip=flip, probe_transform=probe_transform,
                                 count_usage=True, layers=layers)
        if shrunk:
            warnings.append(
                f"{name}: only {k} of {num_experts} experts left in the chosen layers, so k shrinks "
                f"from {shrunk[-1]} to {k} (every token is processed by all remaining experts)"
            )
        figures = run.figures
        if intervention is None:
            baseline = figures
        share = usage_table(run.usage)
        total = share[share["layer"] == "all"]["percent"].to_numpy()
        rows.append(
            {
                "intervention": name,
                "kind": BASELINE if intervention is None else intervention.kind,
                "k": k,
                **headline(figures),
                **{f"Expert {e} (%)": float(p) for e, p in enumerate(total)},
            }
        )
        metrics += [{"intervention": name, "protocol": p, "metric": m, "value": v} for p, ms in figures.items() for m, v in ms.items()]
        usage.append(share.assign(intervention=name))
    sets = ([data.split.gallery, data.split.probe] if data.split else []) + ([data.pairs] if data.pairs else [])
    return AnalysisResult(
        command="ablate",
        checkpoints=[checkpoint or getattr(model, "checkpoint_path", "")],
        settings={
            "data": data.source,
            "layers": "all" if layers is None else list(layers),
            "interventions": [i.name for i in interventions],
            "batch_size": batch_size,
            "flip": flip,
            "probe_transform": repr(probe_transform) if probe_transform else None,
            "usage": "share (%) of token-expert assignments per expert over the chosen MoE layers and every "
            "forward pass of the evaluation (images and mirror images); grid tokens",
            **(settings or {}),
            **({"protocol": {k: v for k, v in data.protocol.items() if k not in ("images", "pairs")}} if data.protocol else {}),
        },
        tables={
            "ablation": pd.DataFrame(rows),
            "metrics": pd.DataFrame(metrics),
            "expert_usage": pd.concat(usage, ignore_index=True)[["intervention", "layer", "expert", "assignments", "percent"]],
        },
        summary={"images": data.images, "experts": num_experts, "moe_layers": len(chosen), "interventions": len(interventions), **baseline,
                 **({"alignment": data.preparation["alignment"]} if data.preparation and "alignment" in data.preparation else {})},
        warnings=[w for w in (s.skip_summary for s in sets) if w] + list(data.notes) + warnings,
    )
