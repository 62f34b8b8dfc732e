"""The result of a training run (``moescope train``): the per-epoch log and the final figures."""
from __future__ import annotations

from facemoe_model.train import TrainResult

from ..results import AnalysisResult

__all__ = ["training_result"]


def training_result(outcome: TrainResult, *, data: dict, init: str | None, val: str | None, val_lowres: int | None,
                    half: bool, seed: int) -> AnalysisResult:
    """An ``AnalysisResult`` of a finished run: table ``log`` (one row per epoch), the run's
    checkpoint, epochs, steps, time and validation figures in ``summary``."""
    meta = outcome.metadata
    summary = {key: meta[key] for key in ("epochs", "steps", "training_seconds", "world_size", "device")}
    summary["checkpoint"] = str(outcome.checkpoint)
    if "validation" in meta:
        summary["validation"] = {k: v for k, v in meta["validation"].items() if k not in ("data", "lowres")}
    return AnalysisResult(
        command="train",
        checkpoints=[str(outcome.checkpoint)] + ([str(init)] if init else []),
        settings={"command": meta["command"], "data": data, "train_config": meta["train_config"], "val": val,
                  "val_lowres": val_lowres, "half": half, "seed": seed},
        tables={"log": outcome.log},
        summary=summary,
    )
