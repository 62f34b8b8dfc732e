"""Region routing (paper B.1 / B.2): which expert each facial region is routed to.

images -> faces (landmarks -> region fractions per token grid) -> forward with routing
capture -> :class:`~moescope.stats.regions.RegionRoutingCounts` -> tables. With two models,
both see the same images and region fractions, and a ``delta`` table compares them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import distributed
from ..choices import BATCH_SIZE
from ..errors import MoescopeError
from ..faces import PREFETCH_BATCHES, FaceStats, common_root, face_batches
from ..forward import Accumulator, forward_passes
from ..plotting import region_routing_heatmap
from ..results import AnalysisResult, atomic_path
from ..stats.regions import RegionRoutingCounts, compare_tables, paper_table
from ..stats.specialisation import PermutationNull, null_sample
from ..trace import compatible_layers, token_frame

__all__ = ["BASELINE_LABEL", "NULL_SHUFFLE", "analyse_regions", "checkpoint_labels", "init_baseline"]

BASELINE_LABEL = "init"
"""Label of the freshly initialised network of ``--baseline init``."""

NULL_SHUFFLE = (
    "within each image, the tokens' region fractions permuted across the image's tokens, once per token grid "
    "(the MoE layers on one grid see the same shuffle; experts, images and each image's region composition kept); "
    "p = (1 + #null >= observed) / (1 + resamples)"
)


def init_baseline(model: nn.Module, seed: int = 0) -> nn.Module:
    """A freshly initialised network of ``model``'s architecture (its ``model_config``, e.g. the
    same ``top_k``), weights drawn with ``seed`` (torch's global RNG is left as it was), in eval
    mode on ``model``'s device."""
    from facemoe_model import create_model
    from facemoe_model.inference import model_device

    config = dict(getattr(model, "model_config", None) or {})
    name = config.pop("name", None)
    if name is None:
        raise MoescopeError("--baseline init needs a model built from a named configuration (model_config)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = create_model(name, **config)
    fresh.checkpoint_path = f"{BASELINE_LABEL}:{name}:seed{seed}"
    return fresh.to(model_device(model)).eval()


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
    batch_size: int = BATCH_SIZE,
    n_boot: int = 1000,
    seed: int = 0,
    export_tokens: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    data: str = "",
    align: str = "auto",
    save_aligned: str | None = None,
    null: int = 200,
    null_images: int = 200,
    baseline: nn.Module | None = None,
) -> AnalysisResult:
    """Region routing tables (B.1/B.2) for one model, or two side by side (B.2 vs B.1).

    Every model sees the same images and region fractions; a second model adds the
    ``delta`` table (second - first, percentage points). Returns an ``AnalysisResult`` with
    tables ``region_routing`` (tidy), ``paper_<label>``, ``rank_routing``, ``specialisation``
    (and ``delta``), a heatmap figure, and the image counts in ``summary``.

    Specialisation per MoE layer and per group, each NMI with its permutation null
    (:class:`~moescope.stats.specialisation.PermutationNull`: ``null`` resamples, 0 = off, on at
    most ``null_images`` images drawn with ``seed``): table ``nmi``; tokens per layer and
    region: table ``region_tokens``; ``summary["face_token_share"]``. ``baseline`` (see
    :func:`init_baseline`) is analysed alongside on the same inputs, labelled ``init``.
    """
    labels = checkpoint_labels(specs)
    baseline_label = BASELINE_LABEL if BASELINE_LABEL not in labels else f"{BASELINE_LABEL}_baseline"
    if baseline is not None:
        models, specs = [*models, baseline], [*specs, baseline_label]
    all_labels = labels + ([baseline_label] if baseline is not None else [])
    first, num_experts, input_size = compatible_layers(models, all_labels, layers)
    names = list(first)
    counters = {label: RegionRoutingCounts(names, num_experts, count=count, by=by) for label in all_labels}
    null_key = _null_keys(paths)
    drawn = null_sample([null_key(str(p)) for p in paths], null_images, seed) if null > 0 else []
    nulls = {label: PermutationNull(names, num_experts, len(counters[label].regions), resamples=max(null, 0),
                                    images=drawn, seed=seed, count=count) for label in all_labels}
    token_frames = []
    stats = FaceStats()
    grids = [l.token_grid for l in first.values()]
    batches = face_batches(  # torchrun: this rank's contiguous share, cut at batch boundaries
        distributed.shard(paths, batch_size), grids, input_size, batch_size=batch_size, region_source=region_source,
        assign=assign, stats=stats, workers=workers, progress=progress and distributed.is_main(), align=align, save_aligned=save_aligned,
        save_root=common_root(paths) if save_aligned else None,
    )

    def tally(step) -> None:
        for label, model_pass in zip(all_labels, step.passes):
            counters[label].update(model_pass.routing, step.batch.fractions)
            if null > 0:
                nulls[label].update(model_pass.routing, step.batch.fractions, [null_key(i) for i in step.batch.ids])
            if export_tokens:
                token_frames.append(token_frame(model_pass.routing, step.batch.ids).assign(checkpoint=label))

    with Accumulator() as accumulator:  # counting runs beside the next forward pass, in batch order
        for step in forward_passes(models, batches, layers=names, prefetch=PREFETCH_BATCHES):
            accumulator.submit(lambda step=step: tally(step))
    for label in all_labels:  # torchrun: sum the ranks' counts, gather per-image vectors in image order
        distributed.reduce_region_counts(counters[label])
        if null > 0:
            distributed.reduce_null(nulls[label])
    distributed.reduce_stats(stats)
    if stats.analysed == 0:
        raise MoescopeError(
            f"no image could be analysed: {stats.found} found, {len(stats.no_face)} without a face, "
            f"{len(stats.rejected_images)} rejected by the quality gate, {len(stats.unreadable)} unreadable"
            + (" (try --region-source template)" if stats.no_face or stats.rejected_images else "")
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
        frame = pd.concat([f for part in distributed.gather(token_frames) for f in part], ignore_index=True)
        writer = frame.to_parquet if str(export_tokens).endswith(".parquet") else (lambda p: frame.to_csv(p, index=False))
        if distributed.is_main():
            atomic_path(Path(export_tokens), lambda tmp: writer(tmp))
    summary = {**stats.summary(region_source), "num_experts": num_experts, "moe_layers": len(names)}
    for label, spec_table in tables["specialisation"].groupby("checkpoint", sort=False):
        nmi = spec_table[(spec_table["metric"] == "nmi")]
        summary[f"nmi_{label}"] = {g: v for g, v in zip(nmi["group"], nmi["value"])}
    first = counters[all_labels[0]]
    tables["region_tokens"] = first.region_tokens()
    tables["nmi"] = pd.concat([_nmi_table(counters[l], nulls[l] if null > 0 else None, by).assign(checkpoint=l)
                               for l in all_labels], ignore_index=True)
    summary["face_token_share"] = first.face_token_share()
    for label in all_labels:
        summary[f"specialisation_{label}"] = _specialisation_summary(tables["nmi"], label)
    return AnalysisResult(
        command="regions",
        checkpoints=[getattr(m, "checkpoint_path", s) for m, s in zip(models, specs)],
        settings={
            "labels": labels, "specs": list(specs), "data": data, "count": count, "by": by, "assign": assign,
            "region_source": region_source, "layers": "all" if layers is None else list(layers),
            "bootstrap": n_boot, "seed": seed,
            "aggregation": "each (layer, token) routing decision counts once; tokens split across regions by area",
            "null": {"resamples": max(null, 0), "max_images": null_images, "shuffled": NULL_SHUFFLE},
            "baseline": None if baseline is None else {"kind": BASELINE_LABEL, "label": baseline_label, "seed": seed, "model": baseline.checkpoint_path},
        },
        tables=tables,
        summary=summary,
        warnings=stats.warnings() + _null_warnings(nulls if null > 0 else {}),
        figures={"region_routing_heatmap": lambda: region_routing_heatmap(papers)},
    )


def _null_keys(paths: Sequence[Path]) -> Callable[[str], str]:
    """The id that draws and seeds an image's permutations: its path under the folder holding all
    the images (:func:`~moescope.faces.common_root`), so the null is the same wherever that folder,
    or the bundled demo, lies (the same on every rank: the root is of all the paths)."""
    root = common_root(paths)

    def key(image_id: str) -> str:
        if root is None:
            return image_id
        try:
            return Path(image_id).relative_to(root).as_posix()
        except ValueError:
            return image_id

    return key


def _nmi_table(counts: RegionRoutingCounts, null: PermutationNull | None, by: str) -> pd.DataFrame:
    """Per MoE layer (``scope`` layer) and per group of ``by`` (unless ``by`` is layer): tokens,
    NMI, MI and the permutation null (``null_mean``, ``null_std``, ``p_value``, ``null_resamples``,
    ``null_images``, ``nmi_null_images``: the NMI of the images the null was drawn on, and
    ``null_z``: its distance from the null mean in null standard deviations, which still
    tells strengths apart when every p sits at its floor ``1 / (1 + resamples)``)."""
    layer_rows = counts.layer_specialisation().rename(columns={"layer": "group"}).assign(scope="layer")
    groups = {layer: [layer] for layer in counts.layers}
    frames = [layer_rows]
    if by != "layer":
        pooled = counts.specialisation()
        pooled = pooled[pooled["region"] == "(all)"].pivot(index="group", columns="metric", values="value").reindex(counts.groups)
        frames.append(pd.DataFrame({
            "group": counts.groups, "tokens": counts.counts.sum(axis=(1, 2)), "nmi": pooled["nmi"].to_numpy(),
            "mutual_information_bits": pooled["mutual_information_bits"].to_numpy(), "scope": by,
        }))
        groups.update(counts.group_layers())
    table = pd.concat(frames, ignore_index=True)
    columns = ["null_mean", "null_std", "p_value", "null_resamples", "null_images", "nmi_null_images"]
    if null is None:
        for column in columns:
            table[column] = np.nan
    else:
        drawn = null.table(groups).set_index("group")
        keys = table["group"]
        table["null_mean"] = drawn["null_mean"].reindex(keys).to_numpy()
        table["null_std"] = drawn["null_std"].reindex(keys).to_numpy()
        table["p_value"] = drawn["p_value"].reindex(keys).to_numpy()
        table["null_resamples"] = drawn["resamples"].reindex(keys).to_numpy()
        table["null_images"] = drawn["images"].reindex(keys).to_numpy()
        table["nmi_null_images"] = drawn["observed"].reindex(keys).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        table["null_z"] = (table["nmi_null_images"] - table["null_mean"]) / table["null_std"]
    return table[["scope", "group", "tokens", "nmi", "mutual_information_bits", *columns, "null_z"]]


def _specialisation_summary(nmi: pd.DataFrame, label: str) -> dict:
    """The per-layer view of one checkpoint: NMI, null mean and p per layer, most/least specialised layer, pooled groups."""
    rows = nmi[nmi["checkpoint"] == label]

    def entry(row) -> dict:
        return {"nmi": row["nmi"], "null_mean": row["null_mean"], "p_value": row["p_value"], "null_z": row["null_z"]}

    layers = rows[rows["scope"] == "layer"]
    finite = layers[np.isfinite(layers["nmi"].to_numpy(dtype=float))]
    return {
        "layers": {row["group"]: entry(row) for _, row in layers.iterrows()},
        "most_specialised": finite.loc[finite["nmi"].idxmax(), "group"] if len(finite) else None,
        "least_specialised": finite.loc[finite["nmi"].idxmin(), "group"] if len(finite) else None,
        "pooled": {row["group"]: entry(row) for _, row in rows[rows["scope"] != "layer"].iterrows()},
    }


def _null_warnings(nulls: dict[str, PermutationNull]) -> list[str]:
    for null in nulls.values():
        if null.seen > null.kept:
            return [f"the permutation null is drawn on {null.kept} of {null.seen} images (seeded subsample; --null-images)"]
    return []
