"""Region routing tables (paper B.1 / B.2): which expert each facial region is routed to.

Input per batch: the routing of every MoE layer (:class:`~moescope.trace.LayerRouting`) and
each image's region fractions on each layer's token grid (:func:`moescope.regions.pool_to_grid`).
:class:`RegionRoutingCounts` streams the counts (group x region x expert, by rank, and
per-image totals for the bootstrap), so 10,000+ images need little memory. The tables:

* ``region_routing`` — tidy: group, region, expert, percent (rows sum to 100 per group and
  region), 95% bootstrap interval over images, token mass;
* ``paper_table`` — the paper's layout: one row per region, ``Expert i`` columns, dominant;
* ``specialisation`` — per group: normalised mutual information between region and expert
  ``I(R;E) / sqrt(H(R) H(E))`` and per-region entropy of the expert distribution (bits and
  normalised by ``log2 E``).

Groups (``by``): ``all`` pools every (layer, token) routing decision of all MoE layers —
each decision counts once, so layers with more tokens weigh more; ``stage`` pools the
layers of one stage (``layers.1``); ``layer`` keeps every MoE layer apart.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .regions import REGIONS
from .trace import LayerRouting, RoutingTrace, token_frame

__all__ = ["COUNT_MODES", "GROUPINGS", "RegionRoutingCounts", "analyse_regions", "layer_group", "specialisation_table", "paper_table", "compare_tables"]

COUNT_MODES = ("top1", "topk", "weighted")
GROUPINGS = ("all", "stage", "layer")
_STAGE = re.compile(r"^(.*?)\.blocks\.\d+(\..*)?$")


def layer_group(layer: str, by: str) -> str:
    """The group a MoE layer's counts pool into: ``all``, its stage (``layers.1``) or itself."""
    if by == "all":
        return "all"
    if by == "layer":
        return layer
    if by == "stage":
        m = _STAGE.match(layer)
        return m.group(1) if m and m.group(1) else "blocks"
    raise ValueError(f"unknown grouping {by!r}; use one of {', '.join(GROUPINGS)}")


@dataclass
class RegionRoutingCounts:
    """Streaming region x expert routing counts.

    Args:
        layers: MoE layer names, in forward order.
        num_experts: experts per layer (all layers must agree).
        count: counting convention, ``top1`` | ``topk`` | ``weighted`` (ANALYSES.md).
        by: grouping of layers, ``all`` | ``stage`` | ``layer``.
    """

    layers: list[str]
    num_experts: int
    count: str = "top1"
    by: str = "all"
    regions: tuple[str, ...] = REGIONS
    counts: np.ndarray = field(init=False)
    rank_counts: np.ndarray | None = field(init=False, default=None)
    per_image: list[np.ndarray] = field(init=False, default_factory=list)
    images: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.count not in COUNT_MODES:
            raise ValueError(f"unknown counting convention {self.count!r}; use one of {', '.join(COUNT_MODES)}")
        self.groups = list(dict.fromkeys(layer_group(l, self.by) for l in self.layers))
        self._group_of = {l: self.groups.index(layer_group(l, self.by)) for l in self.layers}
        self.counts = np.zeros((len(self.groups), len(self.regions), self.num_experts))

    def update(self, routing: Mapping[str, LayerRouting], fractions: Mapping[tuple[int, int], np.ndarray]) -> None:
        """Add one batch.

        Args:
            routing: per layer, the batch's routing (``B`` images).
            fractions: per token grid ``(rows, cols)``, the images' region fractions
                ``[B, R, rows, cols]`` (each token's fractions sum to 1).
        """
        batch = np.zeros((0,))
        for layer, r in routing.items():
            if layer not in self._group_of:
                continue
            if r.num_experts != self.num_experts:
                raise ValueError(f"mismatched expert counts: {layer} has {r.num_experts} experts, expected {self.num_experts}")
            frac = fractions[r.grid].reshape(r.topk.shape[0], len(self.regions), -1)  # [B, R, N]
            if batch.size == 0:
                batch = np.zeros((frac.shape[0], len(self.groups), len(self.regions), self.num_experts))
                if self.rank_counts is None:
                    self.rank_counts = np.zeros((len(self.groups), len(self.regions), self.num_experts, r.k))
            g = self._group_of[layer]
            batch[:, g] += np.einsum("brn,bne->bre", frac, r.contributions(self.count))
            for rank in range(min(r.k, self.rank_counts.shape[-1])):
                onehot = np.zeros(r.probs.shape)
                np.put_along_axis(onehot, r.topk[..., rank : rank + 1], 1.0, axis=-1)
                self.rank_counts[g, :, :, rank] += np.einsum("brn,bne->re", frac, onehot)
        if batch.size:
            self.counts += batch.sum(0)
            self.per_image.append(batch.astype(np.float32))
            self.images += batch.shape[0]

    # -- tables ------------------------------------------------------------------------------
    def _percent(self, counts: np.ndarray) -> np.ndarray:
        total = counts.sum(-1, keepdims=True)
        return np.divide(100.0 * counts, total, out=np.full_like(counts, np.nan, dtype=float), where=total > 0)

    def bootstrap(self, n_boot: int = 1000, seed: int = 0, chunk: int = 200) -> tuple[np.ndarray, np.ndarray]:
        """95% percentile intervals of the percentages, resampling images with replacement."""
        per_image = np.concatenate(self.per_image) if self.per_image else np.zeros((0, *self.counts.shape))
        n = per_image.shape[0]
        if n < 2 or n_boot <= 0:
            nan = np.full(self.counts.shape, np.nan)
            return nan, nan
        rng = np.random.default_rng(seed)
        flat = per_image.reshape(n, -1).astype(np.float64)
        draws = []
        for start in range(0, n_boot, chunk):
            size = min(chunk, n_boot - start)
            weights = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)  # [size, n]
            draws.append(self._percent((weights @ flat).reshape(size, *self.counts.shape)))
        boot = np.concatenate(draws)
        return np.nanpercentile(boot, 2.5, axis=0), np.nanpercentile(boot, 97.5, axis=0)

    def table(self, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """Tidy routing frequencies: group, region, expert, percent, ci_low, ci_high, token_mass."""
        percent = self._percent(self.counts)
        low, high = self.bootstrap(n_boot, seed)
        rows = []
        for g, group in enumerate(self.groups):
            for r, region in enumerate(self.regions):
                mass = self.counts[g, r].sum()
                for e in range(self.num_experts):
                    rows.append(
                        {
                            "group": group,
                            "region": region,
                            "expert": e,
                            "percent": percent[g, r, e],
                            "ci_low": low[g, r, e],
                            "ci_high": high[g, r, e],
                            "token_mass": mass,
                        }
                    )
        return pd.DataFrame(rows)

    def rank_table(self) -> pd.DataFrame:
        """Share (%) of each region's tokens whose rank-``j`` expert is ``e`` (layer x region x expert x rank)."""
        if self.rank_counts is None:
            return pd.DataFrame(columns=["group", "region", "expert", "rank", "percent"])
        pct = self._percent(np.moveaxis(self.rank_counts, -1, -2))  # [G, R, k, E]
        rows = [
            {"group": group, "region": region, "expert": e, "rank": j + 1, "percent": pct[g, r, j, e]}
            for g, group in enumerate(self.groups)
            for r, region in enumerate(self.regions)
            for j in range(pct.shape[2])
            for e in range(self.num_experts)
        ]
        return pd.DataFrame(rows)


def paper_table(tidy: pd.DataFrame) -> pd.DataFrame:
    """The paper's layout, per group: region, ``Expert i`` (%) with its interval, dominant expert.

    Regions without any token keep NaN and no dominant expert.
    """
    tables = []
    for group, sub in tidy.groupby("group", sort=False):
        wide = sub.pivot(index="region", columns="expert", values="percent")
        wide = wide.reindex([r for r in sub["region"].drop_duplicates()])
        experts = list(wide.columns)
        out = pd.DataFrame({"group": group, "Facial Region": wide.index})
        for e in experts:
            out[f"Expert {e}"] = wide[e].to_numpy()
            for bound in ("ci_low", "ci_high"):
                out[f"Expert {e} {bound}"] = sub.pivot(index="region", columns="expert", values=bound).reindex(wide.index)[e].to_numpy()
        values = wide.to_numpy()
        out["Dominant Expert"] = [
            f"Expert {experts[int(np.nanargmax(row))]}" if np.isfinite(row).any() else "" for row in values
        ]
        tables.append(out)
    return pd.concat(tables, ignore_index=True)


def specialisation_table(counts: RegionRoutingCounts) -> pd.DataFrame:
    """Per group: NMI(region; expert) = I / sqrt(H(R) H(E)) and per-region expert entropy."""
    rows = []
    for g, group in enumerate(counts.groups):
        joint = counts.counts[g]
        total = joint.sum()
        if total <= 0:
            continue
        p = joint / total
        pr, pe = p.sum(1), p.sum(0)
        nz = p > 0
        mi = float((p[nz] * np.log2(p[nz] / np.outer(pr, pe)[nz])).sum())
        hr = float(-(pr[pr > 0] * np.log2(pr[pr > 0])).sum())
        he = float(-(pe[pe > 0] * np.log2(pe[pe > 0])).sum())
        nmi = mi / np.sqrt(hr * he) if hr > 0 and he > 0 else float("nan")
        rows.append({"group": group, "region": "(all)", "metric": "nmi", "value": nmi})
        rows.append({"group": group, "region": "(all)", "metric": "mutual_information_bits", "value": mi})
        for r, region in enumerate(counts.regions):
            row_total = joint[r].sum()
            if row_total <= 0:
                continue
            q = joint[r] / row_total
            h = float(-(q[q > 0] * np.log2(q[q > 0])).sum())
            rows.append({"group": group, "region": region, "metric": "entropy_bits", "value": h})
            rows.append({"group": group, "region": region, "metric": "entropy_normalised", "value": h / np.log2(counts.num_experts)})
    return pd.DataFrame(rows, columns=["group", "region", "metric", "value"])


def compare_tables(first: pd.DataFrame, second: pd.DataFrame, labels: tuple[str, str]) -> pd.DataFrame:
    """Both tidy tables side by side with the difference ``second - first`` in points."""
    keys = ["group", "region", "expert"]
    merged = first[keys + ["percent"]].merge(second[keys + ["percent"]], on=keys, suffixes=(f"_{labels[0]}", f"_{labels[1]}"))
    merged["delta"] = merged[f"percent_{labels[1]}"] - merged[f"percent_{labels[0]}"]
    return merged


def _labels(specs: Sequence[str]) -> list[str]:
    labels = []
    for spec in specs:
        base = spec.split(":", 1)[1] if spec.startswith("demo:") else Path(spec).stem
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", base) or "model"
        labels.append(label if label not in labels else f"{label}_{len(labels) + 1}")
    return labels


def _heatmap(papers: dict[str, pd.DataFrame]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    panels = [(label, group, t) for label, p in papers.items() for group, t in p.groupby("group", sort=False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (label, group, table) in zip(axes[0], panels):
        cols = [c for c in table.columns if c.startswith("Expert ") and not c.endswith(("ci_low", "ci_high"))]
        data = table.set_index("Facial Region")[cols].astype(float)
        sns.heatmap(data, annot=True, fmt=".1f", vmin=0, vmax=100, cmap="viridis", cbar=False, ax=ax)
        ax.set_title(f"{label} [{group}]")
        ax.set_ylabel("")
    fig.tight_layout()
    return fig


def analyse_regions(
    models: Sequence,
    specs: Sequence[str],
    paths: Sequence[Path],
    *,
    layers: Sequence[str] | None = None,
    by: str = "all",
    count: str = "top1",
    assign: str = "soft",
    region_source: str = "landmarks",
    batch_size: int = 64,
    n_boot: int = 1000,
    seed: int = 0,
    export_tokens: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    data: str = "",
):
    """Region routing tables (B.1/B.2) for one model, or two side by side (B.2 vs B.1).

    Every model sees the same images and region fractions; a second model adds the
    ``delta`` table (second - first, percentage points). Returns an ``AnalysisResult`` with
    tables ``region_routing`` (tidy), ``paper_<label>``, ``rank_routing``, ``specialisation``
    (and ``delta``), a heatmap figure, and the image counts in ``summary``.
    """
    import torch

    from facemoe_model.moe import select_moe_layers, uniform_num_experts

    from .errors import MoescopeError
    from .faces import FaceStats, face_batches
    from .results import AnalysisResult, atomic_path

    labels = _labels(specs)
    try:
        chosen = [select_moe_layers(m, layers) for m in models]
    except KeyError as exc:
        raise MoescopeError(str(exc.args[0])) from None
    names = list(chosen[0])
    try:
        num_experts = uniform_num_experts(chosen[0])
    except ValueError as exc:
        raise MoescopeError(str(exc)) from None
    for label, other in zip(labels[1:], chosen[1:]):
        if list(other) != names or any(layer.num_experts != num_experts for layer in other.values()):
            raise MoescopeError(f"--compare needs the same MoE layers and expert counts: {labels[0]} and {label} differ")
    sizes = {m.img_size for m in models}
    if len(sizes) != 1:
        raise MoescopeError(f"--compare needs the same input size, got {sorted(sizes)}")
    counters = {label: RegionRoutingCounts(names, num_experts, count=count, by=by) for label in labels}
    token_frames = []
    stats = FaceStats()
    for m in models:
        m.eval()
    grids = [l.token_grid for l in chosen[0].values()]
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        traces = [stack.enter_context(RoutingTrace(m, names)) for m in models]
        for batch in face_batches(
            paths, grids, sizes.pop(), batch_size=batch_size, region_source=region_source,
            assign=assign, stats=stats, workers=workers, progress=progress,
        ):
            for label, model, trace in zip(labels, models, traces):
                model(batch.images)
                routing = trace.pop()
                counters[label].update(routing, batch.fractions)
                if export_tokens:
                    token_frames.append(token_frame(routing, batch.ids).assign(checkpoint=label))
    if stats.analysed == 0:
        raise MoescopeError(
            f"no image could be analysed: {stats.found} found, {len(stats.no_face)} without a face, "
            f"{len(stats.unreadable)} unreadable (try --region-source template)"
        )
    tidy = {label: c.table(n_boot=n_boot, seed=seed) for label, c in counters.items()}
    tables: dict[str, pd.DataFrame] = {
        "region_routing": pd.concat([t.assign(checkpoint=l) for l, t in tidy.items()], ignore_index=True),
        "rank_routing": pd.concat([c.rank_table().assign(checkpoint=l) for l, c in counters.items()], ignore_index=True),
        "specialisation": pd.concat([specialisation_table(c).assign(checkpoint=l) for l, c in counters.items()], ignore_index=True),
    }
    papers = {label: paper_table(t) for label, t in tidy.items()}
    tables.update({f"paper_{label}": p for label, p in papers.items()})
    if len(labels) == 2:
        tables["delta"] = compare_tables(tidy[labels[0]], tidy[labels[1]], (labels[0], labels[1]))
    if export_tokens:
        frame = pd.concat(token_frames, ignore_index=True)
        writer = frame.to_parquet if str(export_tokens).endswith(".parquet") else (lambda p: frame.to_csv(p, index=False))
        atomic_path(Path(export_tokens), lambda tmp: writer(tmp))
    summary = {**stats.summary(region_source), "num_experts": num_experts, "moe_layers": len(names)}
    for label, spec_table in tables["specialisation"].groupby("checkpoint", sort=False):
        nmi = spec_table[(spec_table["metric"] == "nmi")]
        summary[f"nmi_{label}"] = {g: v for g, v in zip(nmi["group"], nmi["value"])}
    return AnalysisResult(
        command="regions",
        checkpoints=[getattr(m, "checkpoint_path", s) for m, s in zip(models, specs)],
        settings={
            "labels": labels, "specs": list(specs), "data": data, "count": count, "by": by, "assign": assign,
            "region_source": region_source, "layers": "all" if layers is None else list(layers),
            "bootstrap": n_boot, "seed": seed,
            "aggregation": "each (layer, token) routing decision counts once; tokens split across regions by area",
        },
        tables=tables,
        summary=summary,
        warnings=stats.warnings(),
        figures={"region_routing_heatmap": _heatmap(papers)},
    )
