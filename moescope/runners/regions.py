"""Region routing (paper B.1 / B.2): which expert each facial region is routed to.

images -> faces (landmarks -> region fractions per token grid) -> forward with routing
capture -> :class:`~moescope.stats.regions.RegionRoutingCounts` -> tables. With two models,
both see the same images and region fractions, and a ``delta`` table compares them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..errors import MoescopeError
from ..faces import FaceStats, face_batches
from ..forward import forward_passes
from ..plotting import region_routing_heatmap
from ..results import AnalysisResult, atomic_path
from ..stats.regions import RegionRoutingCounts, compare_tables, paper_table
from ..trace import expert_count, select_layers, token_frame

__all__ = ["analyse_regions", "checkpoint_labels"]


def checkpoint_labels(specs: Sequence[str]) -> list[str]:
    """Short distinct labels of checkpoints (``demo:after`` -> ``after``, ``/x/model.pt`` -> ``model``)."""
    labels = []
    for spec in specs:
        base = spec.split(":", 1)[1] if spec.startswith("demo:") else Path(spec).stem
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", base) or "model"
        labels.append(label if label not in labels else f"{label}_{len(labels) + 1}")
    return labels


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
) -> AnalysisResult:
    """Region routing tables (B.1/B.2) for one model, or two side by side (B.2 vs B.1).

    Every model sees the same images and region fractions; a second model adds the
    ``delta`` table (second - first, percentage points). Returns an ``AnalysisResult`` with
    tables ``region_routing`` (tidy), ``paper_<label>``, ``rank_routing``, ``specialisation``
    (and ``delta``), a heatmap figure, and the image counts in ``summary``.
    """
    labels = checkpoint_labels(specs)
    chosen = [select_layers(m, layers) for m in models]
    names = list(chosen[0])
    num_experts = expert_count(chosen[0])
    for label, other in zip(labels[1:], chosen[1:]):
        if list(other) != names or any(layer.num_experts != num_experts for layer in other.values()):
            raise MoescopeError(f"--compare needs the same MoE layers and expert counts: {labels[0]} and {label} differ")
    sizes = {m.img_size for m in models}
    if len(sizes) != 1:
        raise MoescopeError(f"--compare needs the same input size, got {sorted(sizes)}")
    counters = {label: RegionRoutingCounts(names, num_experts, count=count, by=by) for label in labels}
    token_frames = []
    stats = FaceStats()
    grids = [l.token_grid for l in chosen[0].values()]
    batches = face_batches(
        paths, grids, sizes.pop(), batch_size=batch_size, region_source=region_source,
        assign=assign, stats=stats, workers=workers, progress=progress,
    )
    for step in forward_passes(models, batches, layers=names):
        for label, model_pass in zip(labels, step.passes):
            counters[label].update(model_pass.routing, step.batch.fractions)
            if export_tokens:
                token_frames.append(token_frame(model_pass.routing, step.batch.ids).assign(checkpoint=label))
    if stats.analysed == 0:
        raise MoescopeError(
            f"no image could be analysed: {stats.found} found, {len(stats.no_face)} without a face, "
            f"{len(stats.unreadable)} unreadable (try --region-source template)"
        )
    tidy = {label: c.table(n_boot=n_boot, seed=seed) for label, c in counters.items()}
    tables: dict[str, pd.DataFrame] = {
        "region_routing": pd.concat([t.assign(checkpoint=l) for l, t in tidy.items()], ignore_index=True),
        "rank_routing": pd.concat([c.rank_table().assign(checkpoint=l) for l, c in counters.items()], ignore_index=True),
        "specialisation": pd.concat([c.specialisation().assign(checkpoint=l) for l, c in counters.items()], ignore_index=True),
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
        figures={"region_routing_heatmap": lambda: region_routing_heatmap(papers)},
    )
