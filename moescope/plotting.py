"""Every figure moescope draws, each a :class:`matplotlib.figure.Figure`.

Figures are built on ``Figure`` directly — never through pyplot and never switching the
matplotlib backend — so nothing global is kept alive and a notebook's backend is left alone.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd


def Figure(*args, **kwargs):  # noqa: N802 - matplotlib.figure.Figure, imported only when a figure is drawn (fast start)
    from matplotlib.figure import Figure as _Figure

    return _Figure(*args, **kwargs)

__all__ = ["cka_by_depth", "region_routing_heatmap", "expert_maps_figure", "expert_cases_figure", "stability_sweep"]


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


# --- expert activation maps (moescope maps) ------------------------------------------------------
MAP_CMAP = "inferno"
MAP_ALPHA = 0.6


def _map_grid(fig, images, panels, row_labels, vmin, vmax, expert_names, panel_titles=True):
    """Rows of [image | panel 1 expert 0..E-1 | panel 2 ...] with each map over its image."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    labels = list(panels)
    experts = next(iter(panels.values())).shape[1]
    n = len(images)
    axes = fig.subplots(n, 1 + len(labels) * experts, squeeze=False)
    for r in range(n):
        grey = images[r].astype(np.float64).mean(-1)
        axes[r, 0].imshow(images[r])
        axes[r, 0].set_ylabel(row_labels[r], fontsize=6, rotation=0, ha="right", va="center")
        for p, label in enumerate(labels):
            for e in range(experts):
                ax = axes[r, 1 + p * experts + e]
                ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
                ax.imshow(panels[label][r, e], cmap=MAP_CMAP, vmin=vmin, vmax=vmax, alpha=MAP_ALPHA, interpolation="nearest")
                if r == 0:
                    name = expert_names[e] if expert_names else "attribution"
                    ax.set_title(f"{label}\n{name}" if panel_titles and len(labels) > 1 else name, fontsize=7)
    axes[0, 0].set_title("input", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    mappable = ScalarMappable(Normalize(vmin, vmax), cmap=MAP_CMAP)
    fig.colorbar(mappable, ax=axes[:, 1:].ravel().tolist(), fraction=0.02, pad=0.01).ax.tick_params(labelsize=6)
    return axes


def expert_maps_figure(
    images: np.ndarray,
    panels: Mapping[str, np.ndarray],
    *,
    row_labels: Sequence[str],
    vmin: float,
    vmax: float,
    title: str = "",
    expert_names: Sequence[str] | None = None,
) -> Figure:
    """Figure 6 layout: one row per image, one column per expert (per checkpoint in ``panels``,
    e.g. before and after side by side), each map (``[B, E, H, W]`` at the image size) drawn
    over the grey image with one colour scale ``vmin..vmax`` for the whole figure."""
    experts = next(iter(panels.values())).shape[1]
    cols = 1 + len(panels) * experts
    fig = Figure(figsize=(1.25 * cols + 0.8, 1.25 * len(images) + 0.6), layout="constrained")
    _map_grid(fig, images, panels, row_labels, vmin, vmax, expert_names)
    if title:
        fig.suptitle(title, fontsize=8)
    return fig


def expert_cases_figure(
    sections: Mapping[str, tuple[np.ndarray, np.ndarray, Sequence[str]]],
    *,
    vmin: float,
    vmax: float,
    title: str = "",
    expert_names: Sequence[str] | None = None,
) -> Figure:
    """Figure 8 layout: success and failure cases side by side, each ``(images, maps [B, E, H, W],
    row labels)`` as in :func:`expert_maps_figure`, one colour scale for the whole figure."""
    rows = max(len(images) for images, _, _ in sections.values())
    experts = next(iter(sections.values()))[1].shape[1]
    fig = Figure(figsize=(len(sections) * (1.25 * (1 + experts) + 0.8), 1.25 * rows + 0.8), layout="constrained")
    subfigs = fig.subfigures(1, len(sections), squeeze=False)[0]
    for sub, (case, (images, maps, labels)) in zip(subfigs, sections.items()):
        _map_grid(sub, images, {case: maps}, labels, vmin, vmax, expert_names, panel_titles=False)
        sub.suptitle(f"{case} ({len(images)} shown)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    return fig


def stability_sweep(table: pd.DataFrame, title: str = "") -> Figure:
    """Accuracy, routing change and expert usage against each perturbation's parameter
    (``moescope attack`` / ``degrade``): one column per parameter (eps, blur sigma, ...), one
    line per family (attack); the clean row as dashed lines."""
    clean = table[table["family"] == "clean"].iloc[0]
    swept = table[table["family"] != "clean"]
    params = list(dict.fromkeys(swept["parameter"]))
    experts = [c for c in table.columns if c.startswith("Expert ")]
    accuracy = [c for c in ("Rank-1", "Verification accuracy") if c in table.columns]
    fig = Figure(figsize=(3.4 * max(len(params), 1), 7.6))
    axes = fig.subplots(3, max(len(params), 1), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for col, param in enumerate(params):
        part = swept[swept["parameter"] == param]
        numeric = pd.to_numeric(part["value"], errors="coerce").notna().all()
        labels = list(dict.fromkeys(part["value"])) if not numeric else None
        for f, (family, rows) in enumerate(part.groupby("family", sort=False)):
            x = rows["value"].astype(float).to_numpy() if numeric else np.array([labels.index(v) for v in rows["value"]])
            tag = f"{family} " if part["family"].nunique() > 1 else ""
            for i, metric in enumerate(accuracy):
                axes[0, col].plot(x, 100 * rows[metric].to_numpy(), marker="o", ms=3, ls=styles[f % 4], color=f"C{i}",
                                  label=f"{tag}{metric}")
            axes[1, col].plot(x, rows["routing change"].to_numpy(), marker="o", ms=3, ls=styles[f % 4], color="C3",
                              label=f"{tag}1 - IoU")
            axes[1, col].plot(x, rows["top-1 changed"].to_numpy(), marker="s", ms=3, ls=styles[f % 4], color="C4",
                              label=f"{tag}top-1 changed")
            for e, c in enumerate(experts):
                axes[2, col].plot(x, rows[c].to_numpy(), marker="o", ms=3, ls=styles[f % 4], color=f"C{e}",
                                  label=f"{tag}{c.replace(' (%)', '')}")
        for i, metric in enumerate(accuracy):
            axes[0, col].axhline(100 * clean[metric], color=f"C{i}", lw=0.8, ls=(0, (2, 2)))
        for e, c in enumerate(experts):
            axes[2, col].axhline(clean[c], color=f"C{e}", lw=0.8, ls=(0, (2, 2)))
        if labels is not None:
            for ax in axes[:, col]:
                ax.set_xticks(range(len(labels)), [str(v) for v in labels], rotation=30, fontsize=7)
        axes[2, col].set_xlabel(param)
        axes[0, 0].set_ylabel("accuracy (%)")
        axes[1, 0].set_ylabel("routing change")
        axes[2, 0].set_ylabel("expert usage (%)")
        axes[1, col].set_ylim(bottom=0)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    if title:
        fig.suptitle(f"{title} (dashed: clean)", fontsize=8)
    fig.tight_layout()
    return fig
