"""Region x expert routing counts (paper B.1 / B.2) and their tables.

Input per batch: the routing of every MoE layer (:class:`~moescope.trace.LayerRouting`) and
each image's region fractions on each layer's token grid (:func:`moescope.regions.pool_to_grid`).
:class:`RegionRoutingCounts` streams the counts (group x region x expert, by rank, and
per-image totals for the bootstrap), so 10,000+ images need little memory. The tables:

* :meth:`RegionRoutingCounts.table` — tidy: group, region, expert, percent (rows sum to 100 per
  group and region), 95% bootstrap interval over images, token mass;
* :func:`paper_table` — the paper's layout: one row per region, ``Expert i`` columns, dominant;
* :meth:`RegionRoutingCounts.specialisation` — NMI and per-region entropy
  (:mod:`moescope.stats.specialisation`); :meth:`~RegionRoutingCounts.layer_specialisation` —
  NMI of every MoE layer apart (expert ``e`` of one layer is not expert ``e`` of another, so
  pooled tables mix unrelated experts); :meth:`~RegionRoutingCounts.region_tokens` — tokens
  per layer and region;
* :func:`compare_tables` — two tidy tables side by side with their difference.

Groups (``by``): ``all`` pools every (layer, token) routing decision of all MoE layers —
each decision counts once, so layers with more tokens weigh more; ``stage`` pools the
layers of one stage (``layers.1``); ``layer`` keeps every MoE layer apart. Counting
conventions (``count``): see docs/analyses.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

import numpy as np
import pandas as pd

from facemoe_model.geometry import REGIONS
from facemoe_model.rows import RowBuffer

from .specialisation import mutual_information, specialisation_table

if TYPE_CHECKING:
    from ..trace import LayerRouting

__all__ = ["COUNT_MODES", "GROUPINGS", "RegionRoutingCounts", "layer_group", "paper_table", "compare_tables"]

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


def _percent(counts: np.ndarray) -> np.ndarray:
    total = counts.sum(-1, keepdims=True)
    return np.divide(100.0 * counts, total, out=np.full_like(counts, np.nan, dtype=float), where=total > 0)


@dataclass
class RegionRoutingCounts:
    """Streaming region x expert routing counts.

    Args:
        layers: MoE layer names, in forward order.
        num_experts: experts per layer (all layers must agree).
        count: counting convention, ``top1`` | ``topk`` | ``weighted`` (docs/analyses.md).
        by: grouping of layers, ``all`` | ``stage`` | ``layer``.
    """

    layers: list[str]
    num_experts: int
    count: str = "top1"
    by: str = "all"
    regions: tuple[str, ...] = REGIONS
    counts: np.ndarray = field(init=False)
    rank_counts: np.ndarray | None = field(init=False, default=None)
    per_image: RowBuffer = field(init=False, default_factory=RowBuffer)
    """``[images, G, R, E]`` float32: each image's counts, for the bootstrap."""
    images: int = field(init=False, default=0)
    layer_counts: np.ndarray = field(init=False)
    """``[L, R, E]``: the counts of every MoE layer apart (whatever ``by``), for the per-layer view."""

    def __post_init__(self) -> None:
        if self.count not in COUNT_MODES:
            raise ValueError(f"unknown counting convention {self.count!r}; use one of {', '.join(COUNT_MODES)}")
        self.groups = list(dict.fromkeys(layer_group(l, self.by) for l in self.layers))
        self._group_of = {l: self.groups.index(layer_group(l, self.by)) for l in self.layers}
        self.counts = np.zeros((len(self.groups), len(self.regions), self.num_experts))
        self.layer_counts = np.zeros((len(self.layers), len(self.regions), self.num_experts))
        self._layer_index = {l: i for i, l in enumerate(self.layers)}

    def update(self, routing: Mapping[str, "LayerRouting"], fractions: Mapping[tuple[int, int], np.ndarray]) -> None:
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
            joint = frac @ r.contributions(self.count)  # [B, R, N] @ [B, N, E]
            batch[:, g] += joint
            self.layer_counts[self._layer_index[layer]] += joint.sum(0)
            tokens = frac.transpose(1, 0, 2).reshape(len(self.regions), -1)  # [R, B * N]
            identity = np.eye(self.num_experts)
            for rank in range(min(r.k, self.rank_counts.shape[-1])):
                self.rank_counts[g, :, :, rank] += tokens @ identity[r.topk[..., rank].reshape(-1)]
        if batch.size:
            self.counts += batch.sum(0)
            self.per_image.append(batch.astype(np.float32))
            self.images += batch.shape[0]

    # -- tables ------------------------------------------------------------------------------
    def bootstrap(self, n_boot: int = 1000, seed: int = 0, chunk: int = 200) -> tuple[np.ndarray, np.ndarray]:
        """95% percentile intervals of the percentages, resampling images with replacement."""
        per_image = self.per_image.array if len(self.per_image) else np.zeros((0, *self.counts.shape))
        n = per_image.shape[0]
        if n < 2 or n_boot <= 0:
            nan = np.full(self.counts.shape, np.nan)
            return nan, nan
        rng = np.random.default_rng(seed)
        flat = per_image.reshape(n, -1).astype(np.float64)
        chunk = max(1, min(chunk, 500_000 // n))  # resampling weights [chunk, n]: a few MB however many images
        draws = []
        for start in range(0, n_boot, chunk):
            size = min(chunk, n_boot - start)
            weights = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)  # [size, n]
            draws.append(_percent((weights @ flat).reshape(size, *self.counts.shape)))
        boot = np.concatenate(draws)
        return np.nanpercentile(boot, 2.5, axis=0), np.nanpercentile(boot, 97.5, axis=0)

    def table(self, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """Tidy routing frequencies: group, region, expert, percent, ci_low, ci_high, token_mass."""
        percent = _percent(self.counts)
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
        pct = _percent(np.moveaxis(self.rank_counts, -1, -2))  # [G, R, k, E]
        rows = [
            {"group": group, "region": region, "expert": e, "rank": j + 1, "percent": pct[g, r, j, e]}
            for g, group in enumerate(self.groups)
            for r, region in enumerate(self.regions)
            for j in range(pct.shape[2])
            for e in range(self.num_experts)
        ]
        return pd.DataFrame(rows)

    def region_tokens(self) -> pd.DataFrame:
        """Tokens per MoE layer and region: ``layer, region, tokens`` (token mass: a token split
        across regions counts by area) and ``percent`` of the layer's tokens."""
        tokens = self.layer_counts.sum(-1)  # every token contributes 1 under each counting convention
        share = _percent(tokens)
        return pd.DataFrame(
            [{"layer": layer, "region": region, "tokens": tokens[l, r], "percent": share[l, r]}
             for l, layer in enumerate(self.layers) for r, region in enumerate(self.regions)],
            columns=["layer", "region", "tokens", "percent"],
        )

    def face_token_share(self) -> float:
        """Share of all layers' token mass that is not ``hair_background`` (NaN without tokens)."""
        tokens = self.layer_counts.sum(axis=(0, 2))
        total = tokens.sum()
        face = total - (tokens[self.regions.index("hair_background")] if "hair_background" in self.regions else 0.0)
        return float(face / total) if total > 0 else float("nan")

    def layer_specialisation(self) -> pd.DataFrame:
        """Per MoE layer: ``layer, tokens, nmi, mutual_information_bits`` (layers without tokens: NaN)."""
        rows = []
        for l, layer in enumerate(self.layers):
            joint = self.layer_counts[l]
            mi, nmi = mutual_information(joint) if joint.sum() > 0 else (float("nan"), float("nan"))
            rows.append({"layer": layer, "tokens": float(joint.sum()), "nmi": nmi, "mutual_information_bits": mi})
        return pd.DataFrame(rows, columns=["layer", "tokens", "nmi", "mutual_information_bits"])

    def group_layers(self) -> dict[str, list[str]]:
        """The MoE layers pooled into each group."""
        return {group: [l for l in self.layers if self.groups[self._group_of[l]] == group] for group in self.groups}

    def specialisation(self) -> pd.DataFrame:
        """Per group: NMI(region; expert) and per-region expert entropy (:func:`~moescope.stats.specialisation.specialisation_table`)."""
        return specialisation_table(self.counts, self.groups, self.regions)


def paper_table(tidy: pd.DataFrame) -> pd.DataFrame:
    """The paper's layout, per group: region, ``Expert i`` (%) with its interval, dominant expert
    and ``Tokens`` (the region's token mass in the group: how much evidence the row has).

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
        if "token_mass" in sub:
            out["Tokens"] = sub.groupby("region", sort=False)["token_mass"].first().reindex(wide.index).to_numpy()
        tables.append(out)
    return pd.concat(tables, ignore_index=True)


def compare_tables(first: pd.DataFrame, second: pd.DataFrame, labels: tuple[str, str]) -> pd.DataFrame:
    """Both tidy tables side by side with the difference ``second - first`` in points."""
    keys = ["group", "region", "expert"]
    merged = first[keys + ["percent"]].merge(second[keys + ["percent"]], on=keys, suffixes=(f"_{labels[0]}", f"_{labels[1]}"))
    merged["delta"] = merged[f"percent_{labels[1]}"] - merged[f"percent_{labels[0]}"]
    return merged
