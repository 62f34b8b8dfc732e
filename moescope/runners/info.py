"""What a checkpoint holds (``moescope info``) and which models are registered (``moescope models``)."""
from __future__ import annotations

import pandas as pd
from torch import nn

from facemoe_model import list_models, moe_layers

from ..results import AnalysisResult

__all__ = ["describe", "registered_models"]


def describe(model: nn.Module) -> AnalysisResult:
    """The checkpoint summary: format, configuration, parameters, one row per MoE layer."""
    rows = []
    for name, layer in moe_layers(model).items():
        grid = layer.token_grid
        rows.append(
            {
                "layer": name,
                "grid": f"{grid[0]}x{grid[1]}" if grid else "",
                "experts": layer.num_experts,
                "k": layer.k,
                "weighting": layer.weighting,
                "params": sum(p.numel() for p in layer.parameters()),
            }
        )
    config = dict(model.model_config)
    return AnalysisResult(
        command="info",
        checkpoints=[getattr(model, "checkpoint_path", "")],
        settings={"format": getattr(model, "checkpoint_format", ""), "config": config},
        tables={"moe_layers": pd.DataFrame(rows)},
        summary={
            "model": config["name"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "moe_layers": len(rows),
            "metadata": getattr(model, "checkpoint_metadata", {}),
        },
    )


def registered_models() -> AnalysisResult:
    """The registered FaceMoE configurations: one row per name with its description."""
    models = list_models()
    return AnalysisResult(
        command="models",
        tables={"models": pd.DataFrame({"name": list(models), "description": list(models.values())}, columns=["name", "description"])},
        summary={"models": len(models)},
    )
