"""Face-recognition accuracy of one checkpoint (``moescope eval``).

evaluation data -> :func:`moescope.forward.evaluate_model` -> one table per protocol.
"""
from __future__ import annotations

import pandas as pd
from torch import nn

from facemoe_model.protocols import Degradation, EvaluationData

from ..forward import evaluate_model
from ..results import AnalysisResult

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(
    model: nn.Module,
    data: EvaluationData,
    *,
    checkpoint: str,
    batch_size: int = 64,
    flip: bool = True,
    probe_transform: Degradation | None = None,
    settings: dict | None = None,
) -> AnalysisResult:
    """Verification and/or identification of ``model`` on ``data``: one table per protocol
    (one row each), the figures as ``summary``, the data sets' skipped files as warnings."""
    figures = evaluate_model(model, data, batch_size=batch_size, flip=flip, probe_transform=probe_transform).figures
    return AnalysisResult(
        command="eval",
        checkpoints=[checkpoint],
        settings={
            "data": data.source,
            **(settings or {}),
            "batch_size": batch_size,
            "flip": flip,
            "probe_transform": repr(probe_transform) if probe_transform else None,
        },
        tables={protocol: pd.DataFrame([metrics]) for protocol, metrics in figures.items()},
        summary={"images": data.images, **figures},
        warnings=[summary for images in data.datasets if (summary := images.skip_summary)],
    )
