"""Drift between two checkpoints of one architecture (paper B.12 / B.13 / B.14).

images -> forward of both models with routing and feature capture -> per batch, the two
models' features feed :class:`~moescope.stats.cka.StreamingCKA` (float64 minibatch unbiased
HSIC) and their routing :class:`~moescope.stats.agreement.RoutingAgreement`; nothing per
image is kept, so memory does not grow with the data. The parameters feed
:func:`~moescope.stats.shift.expert_shift`.

Tables of :func:`analyse_drift`:

* ``cka`` (B.12) — linear CKA per layer in forward order, with the HSIC sums behind it;
* ``lowest_cka`` (B.13) — the five layers with the lowest CKA;
* ``expert_shift`` (B.14, per MoE layer) — per expert, ``||after - before||_2`` over the
  expert's parameters and that norm as % of ``||before||_2``;
* ``expert_shift_total`` (B.14) — per expert index over all MoE layers (:data:`SHIFT_AGGREGATE_NOTE`);
* ``routing_agreement`` — per MoE layer, the share of tokens whose top-1 expert, and whose
  top-k set, is the same in both models.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

from torch import nn

from facemoe_model import moe_layers

from .. import distributed
from ..errors import CheckpointError, DataError, MoescopeError
from ..faces import FaceStats, alignment_preparation, common_root, image_batches
from ..features import drift_layers
from ..forward import forward_passes
from ..plotting import cka_by_depth
from ..results import AnalysisResult
from ..stats.agreement import RoutingAgreement
from ..stats.cka import MIN_BATCH, FeatureMode, StreamingCKA, plan_batches
from ..stats.shift import SHIFT_AGGREGATE_NOTE, ExpertParameters, lowest_cka
from ..stats.shift import expert_shift as _expert_shift

__all__ = ["PATCH_EMBED_NOTE", "SHIFT_AGGREGATE_NOTE", "analyse_drift", "check_same_architecture", "expert_parameters", "expert_shift"]

PATCH_EMBED_NOTE = (
    "output of the patch_embed module (projection + norm), before the absolute position embedding; "
    "that embedding adds the same vector to every image, which the unbiased (U-centred) HSIC ignores, "
    "so the CKA is the same with it"
)


def check_same_architecture(before: nn.Module, after: nn.Module, labels: Sequence[str] = ("BEFORE", "AFTER")) -> None:
    """Raise a one-line CheckpointError naming the first parameter (or setting) where the models differ."""
    a, b = labels
    prefix = f"{a} and {b} differ in architecture"
    sd_a, sd_b = before.state_dict(), after.state_dict()
    for key, value in sd_a.items():
        if key not in sd_b:
            raise CheckpointError(f"{prefix}: parameter {key!r} is in {a} but not in {b}")
        if sd_b[key].shape != value.shape:
            raise CheckpointError(f"{prefix}: parameter {key!r} has shape {list(value.shape)} in {a}, {list(sd_b[key].shape)} in {b}")
    extra = next((k for k in sd_b if k not in sd_a), None)
    if extra is not None:
        raise CheckpointError(f"{prefix}: parameter {extra!r} is in {b} but not in {a}")
    size_a, size_b = getattr(before, "img_size", None), getattr(after, "img_size", None)
    if size_a != size_b:
        raise CheckpointError(f"{prefix}: input size {size_a} in {a}, {size_b} in {b}")
    layers_b = moe_layers(after)
    for name, layer in moe_layers(before).items():
        if layers_b[name].k != layer.k:
            raise CheckpointError(f"{prefix}: MoE layer {name} routes to k={layer.k} experts in {a}, k={layers_b[name].k} in {b}")


def expert_parameters(model: nn.Module) -> ExpertParameters:
    """Per MoE layer, per expert, its parameters by name (the input of :func:`~moescope.stats.shift.expert_shift`)."""
    return {name: [dict(expert.named_parameters()) for expert in layer.experts] for name, layer in moe_layers(model).items()}


def expert_shift(before: nn.Module, after: nn.Module):
    """:func:`moescope.stats.shift.expert_shift` of two models' experts: ``(per_layer, per_expert)``."""
    return _expert_shift(expert_parameters(before), expert_parameters(after))


def analyse_drift(
    before: nn.Module,
    after: nn.Module,
    specs: Sequence[str],
    paths: Sequence[Path],
    *,
    features: FeatureMode = "flatten",
    batch_size: int = 16,
    last_batch: str = "fold",
    progress: bool = True,
    data: str = "",
    align: str = "none",
    save_aligned: str | None = None,
) -> AnalysisResult:
    """Representational and parameter drift from ``before`` to ``after`` (B.12 / B.13 / B.14).

    Args:
        before / after: two models of the same architecture (refused otherwise, naming the first
            differing parameter).
        specs: how the two checkpoints were given (labels in the output).
        paths: image files; both models see the same images in the same batches.
        features: per-image features, the layer's tokens ``flatten`` ed or ``mean``-pooled.
        batch_size: images per batch (>= 4, the unbiased HSIC's minimum).
        last_batch: a last batch of 1-3 images is ``fold`` ed into the previous one or ``drop`` ped.
        progress: show a progress bar.
        data: how the images were given (recorded in the settings).
        align / save_aligned: face alignment of :func:`moescope.faces.alignment_preparation`
            (images without an accepted face are skipped and counted; ``none``, the default
            here, runs no detection; ``moescope cka`` passes ``--align``, default ``auto``).

    Returns an ``AnalysisResult`` with tables ``cka``, ``lowest_cka``, ``expert_shift``,
    ``expert_shift_total``, ``routing_agreement`` and the figure ``cka_by_depth``.
    """
    from tqdm.auto import tqdm

    if features not in ("flatten", "mean"):
        raise MoescopeError(f"--features must be 'flatten' or 'mean', got {features!r}")
    labels = list(specs)
    check_same_architecture(before, after, labels)
    names = drift_layers(before)
    moe_names = list(moe_layers(before))
    groups, batch_note = plan_batches(len(paths), batch_size, last_batch)
    mine, groups = distributed.shard_groups(paths, groups)  # torchrun: this rank's whole batches
    progress = progress and distributed.is_main()
    cka = StreamingCKA(features)
    agreement = RoutingAgreement()
    stats = FaceStats()
    models = (before, after)
    prepare = alignment_preparation(before.img_size, align=align, stats=stats, workers=None, progress=progress,
                                    save_aligned=save_aligned, save_root=common_root(paths) if save_aligned else None)
    batches = image_batches(mine, before.img_size, groups, min_images=MIN_BATCH, prepare=prepare, stats=stats)
    with tqdm(total=len(mine), desc="cka", unit="img", disable=not progress) as bar, contextlib.closing(
        forward_passes(models, batches, features=names, feature_mode=features, prefetch=2)
    ) as steps:
        for step in steps:
            a, b = step.passes
            for name in names:
                cka.update(name, a.features[name], b.features[name])
            agreement.update(a.routing, b.routing)
            bar.update(step.batch.files)
    distributed.reduce_cka(cka)
    distributed.reduce_agreement(agreement)
    distributed.reduce_stats(stats)
    if stats.analysed == 0:
        raise DataError(f"no batch of at least {MIN_BATCH} readable images among {len(paths)} files ({len(stats.unreadable)} unreadable"
                        + (f", {len(stats.no_face)} without a face, {len(stats.rejected_images)} rejected by the quality gate; --align none keeps them"
                           if stats.no_face or stats.rejected_images else "") + ")")

    table = cka.to_frame()
    table.insert(1, "depth", range(len(table)))
    shift_layer, shift_total = expert_shift(before, after)
    routing_table = agreement.to_frame()
    lowest = lowest_cka(table)
    warnings = [batch_note] if batch_note else []
    warnings += stats.warnings()
    if stats.dropped:
        warnings.append(f"dropped {sum(stats.dropped)} image(s) in {len(stats.dropped)} batch(es) left with fewer than {MIN_BATCH} readable images")
    if table["cka"].isna().any():
        warnings.append(f"CKA undefined (a side without variance across images) for {', '.join(table.loc[table['cka'].isna(), 'layer'])}")
    overall = agreement.overall()
    summary = {
        "images_found": len(paths),
        "images_analysed": stats.analysed,
        "images_unreadable": len(stats.unreadable),
        "images_dropped": len(paths) - stats.analysed - len(stats.unreadable) - len(stats.no_face) - len(stats.rejected_images),
        "images_no_face": len(stats.no_face),
        **stats.alignment_summary(),
        "batches": int(table["batches"].iloc[0]),
        "layers": len(table),
        "moe_layers": len(moe_names),
        "mean_cka": float(table["cka"].mean()),
        "lowest_cka_layer": lowest["layer"].iloc[0] if len(lowest) else None,
        "lowest_cka": float(lowest["cka"].iloc[0]) if len(lowest) else None,
        "expert_shift_pct": {int(e): float(p) for e, p in zip(shift_total["expert"], shift_total["shift_pct"])},
        "routing_top1_agreement": overall["top1"],
        "routing_topk_agreement": overall["topk"],
    }
    return AnalysisResult(
        command="cka",
        checkpoints=[getattr(m, "checkpoint_path", s) for m, s in zip(models, specs)],
        settings={
            "specs": labels,
            "data": data,
            "features": features,
            "batch_size": batch_size,
            "last_batch": last_batch,
            "last_batch_note": batch_note or "no short last batch",
            "estimator": "linear CKA from minibatch unbiased HSIC (Nguyen et al. 2021), float64 sums over batches",
            "patch_embed": PATCH_EMBED_NOTE,
            "shift_aggregate": SHIFT_AGGREGATE_NOTE,
            "routing_agreement": "share of tokens with the same rank-1 expert / the same top-k set (order ignored), per MoE layer; overall = token-weighted over layers",
        },
        tables={
            "cka": table,
            "lowest_cka": lowest,
            "expert_shift": shift_layer,
            "expert_shift_total": shift_total,
            "routing_agreement": routing_table,
        },
        summary=summary,
        warnings=warnings,
        figures={"cka_by_depth": lambda: cka_by_depth(table, labels)},
    )
