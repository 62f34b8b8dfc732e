"""Every figure moescope draws, each a :class:`matplotlib.figure.Figure`.

Figures are built on ``Figure`` directly — never through pyplot and never switching the
matplotlib backend — so nothing global is kept alive and a notebook's backend is left alone.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

__all__ = ["cka_by_depth", "region_routing_heatmap"]


def region_routing_heatmap(papers: Mapping[str, pd.DataFrame]) -> Figure:
    """One annotated heatmap (region x expert, %) per checkpoint and group of the paper tables."""
    import seaborn as sns

    panels = [(label, group, t) for label, p in papers.items() for group, t in p.groupby("group", sort=False)]
    fig = Figure(figsize=(4.2 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (label, group, table) in zip(axes[0], panels):
        cols = [c for c in table.columns if c.startswith("Expert ") and not c.endswith(("ci_low", "ci_high"))]
        data = table.set_index("Facial Region")[cols].astype(float)
        sns.heatmap(data, annot=True, fmt=".1f", vmin=0, vmax=100, cmap="viridis", cbar=False, ax=ax)
        ax.set_title(f"{label} [{group}]")
        ax.set_ylabel("")
    fig.tight_layout()
    return fig


def cka_by_depth(table: pd.DataFrame, labels: Sequence[str]) -> Figure:
    """Line plot of linear CKA per compared layer, in forward order."""
    fig = Figure(figsize=(max(5.0, 0.28 * len(table) + 2.0), 3.4))
    ax = fig.subplots()
    x = np.arange(len(table))
    ax.plot(x, table["cka"].to_numpy(), marker="o", markersize=3.5, linewidth=1.2)
    ax.set_xticks(x, table["layer"].tolist(), rotation=90, fontsize=7)
    ax.set_ylabel("linear CKA")
    ax.set_title(f"CKA by depth: {labels[0]} vs {labels[1]}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
