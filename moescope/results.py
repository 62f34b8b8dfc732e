"""Analysis results: tidy tables + summary, written atomically as CSV/Markdown/LaTeX/JSON.

Every analysis command returns an :class:`AnalysisResult`. Its ``to_json_dict`` is the
machine-readable contract of ``--json`` (see docs/analyses.md, "Machine-readable output").
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from facemoe_model.fileio import atomic_path, atomic_write

__all__ = ["AnalysisResult", "atomic_write", "atomic_path", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """Convert numpy/pandas/torch scalars and containers to plain JSON types (NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return [to_jsonable(r) for r in value.to_dict(orient="records")]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return to_jsonable(value.item())
    return value


@dataclass
class AnalysisResult:
    """The outcome of one analysis command.

    Attributes:
        command: the command name (``regions``, ``cka``, ``ablate`` ...).
        checkpoints: the checkpoints analysed (paths or ``demo:before``).
        settings: every option that determined the result (seed included).
        tables: tidy DataFrames by name; each is written as ``NAME.csv/.md/.tex``.
        summary: headline numbers (images analysed, images without a face, accuracy ...).
        warnings: human-readable caveats (dropped batches, skipped images ...).
        figures: matplotlib figures by file stem, or zero-argument callables that draw them
            (drawn only when needed: :meth:`figure`, :meth:`save`); written as ``STEM.png``.
    """

    command: str
    checkpoints: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def figure(self, stem: str):
        """The figure ``stem``, drawn now if it was given as a callable (and kept)."""
        fig = self.figures[stem]
        if callable(fig) and not hasattr(fig, "savefig"):
            fig = self.figures[stem] = fig()
        return fig

    def to_json_dict(self) -> dict[str, Any]:
        return to_jsonable(
            {
                "command": self.command,
                "checkpoints": list(self.checkpoints),
                "settings": self.settings,
                "tables": {name: df for name, df in self.tables.items()},
                "summary": self.summary,
                "warnings": list(self.warnings),
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_json_dict(), indent=indent, allow_nan=False)

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write every table as CSV, Markdown and LaTeX, ``result.json`` and figures as PNG."""
        out = Path(out_dir)
        written: list[Path] = []
        for name, df in self.tables.items():
            written.append(atomic_write(out / f"{name}.csv", df.to_csv(index=False)))
            written.append(atomic_write(out / f"{name}.md", df.to_markdown(index=False, floatfmt=".4g") + "\n"))
            written.append(atomic_write(out / f"{name}.tex", _to_latex(df)))
        written.append(atomic_write(out / "result.json", self.to_json() + "\n"))
        for stem in self.figures:
            fig = self.figure(stem)
            written.append(atomic_path(out / f"{stem}.png", lambda p, f=fig: f.savefig(p, dpi=150, bbox_inches="tight", format="png")))
        return written


def _to_latex(df: pd.DataFrame) -> str:
    fmt = {c: (lambda v: f"{v:.4g}") for c in df.columns if pd.api.types.is_float_dtype(df[c])}
    return df.to_latex(index=False, formatters=fmt, escape=True)
