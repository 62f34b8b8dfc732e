"""Drift between two checkpoints of one architecture (paper B.12 / B.13 / B.14).

Both models see the same images, batch by batch. One forward pass per model and batch:
forward hooks (:class:`FeatureCapture`) record the outputs of ``patch_embed``, every block,
``norm`` and ``feature_layer`` (the model's own module names) and :class:`~moescope.trace.RoutingTrace`
records every MoE layer's routing. Per batch the two models' features feed
:class:`~moescope.cka.StreamingCKA` (float64 minibatch unbiased HSIC), and their routing feeds
:class:`RoutingAgreement`; nothing per image is kept, so memory does not grow with the data.

Tables of :func:`analyse_drift`:

* ``cka`` (B.12) — linear CKA per layer in forward order, with the HSIC sums behind it;
* ``lowest_cka`` (B.13) — the five layers with the lowest CKA;
* ``expert_shift`` (B.14, per MoE layer) — per expert, ``||after - before||_2`` over the
  expert's parameters and that norm as % of ``||before||_2``;
* ``expert_shift_total`` (B.14) — per expert index over all MoE layers: the square root of
  the summed squares (i.e. the L2 norm of all that expert's parameters together), as % of
  the before-norm aggregated the same way;
* ``routing_agreement`` — per MoE layer, the share of tokens whose top-1 expert, and whose
  top-k set, is the same in both models.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .cka import MIN_BATCH, FeatureMode, StreamingCKA, layer_features, plan_batches
from .errors import CheckpointError, DataError, MoescopeError
from .hooks import HookSet
from .trace import LayerRouting, RoutingTrace

__all__ = [
    "DRIFT_LAYER",
    "PATCH_EMBED_NOTE",
    "SHIFT_AGGREGATE_NOTE",
    "drift_layers",
    "FeatureCapture",
    "check_same_architecture",
    "RoutingAgreement",
    "expert_shift",
    "lowest_cka",
    "analyse_drift",
]

DRIFT_LAYER = re.compile(r"^(patch_embed|norm|feature_layer|(.+\.)?blocks\.\d+)$")
"""Module names compared by CKA: the patch embedding, every block, the final norm, the head."""

PATCH_EMBED_NOTE = (
    "output of the patch_embed module (projection + norm), before the absolute position embedding; "
    "that embedding adds the same vector to every image, which the unbiased (U-centred) HSIC ignores, "
    "so the CKA is the same with it"
)
SHIFT_AGGREGATE_NOTE = (
    "per expert index over all MoE layers: sqrt of the summed squared per-layer L2 shifts (the L2 norm of all "
    "the expert's parameters together); % relative to the before-norm aggregated the same way"
)


def drift_layers(model: nn.Module) -> list[str]:
    """Names of the modules compared by CKA (:data:`DRIFT_LAYER`), in registration (forward) order."""
    names = [name for name, _ in model.named_modules() if DRIFT_LAYER.match(name)]
    if not names:
        raise MoescopeError(f"{type(model).__name__} has none of the layers CKA compares (patch_embed, blocks, norm, feature_layer)")
    return names


class FeatureCapture(HookSet):
    """Context manager: forward hooks on the named modules record each pass's per-image features.

    ``pop()`` after a forward pass gives ``{name: [B, D] features}`` (:func:`~moescope.cka.layer_features`
    of the module's output, detached and copied). Hooks are removed on exit, also on exceptions.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], mode: FeatureMode = "flatten") -> None:
        super().__init__({name: model.get_submodule(name) for name in names})
        self.mode = mode

    def record(self, name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._pending[name] = layer_features(output.detach(), self.mode).clone()

    def pop(self) -> dict[str, torch.Tensor]:
        """The last forward pass's features per module, in the order the modules were given."""
        missing = [n for n in self.modules if n not in self._pending]
        if missing:
            raise RuntimeError(f"no output recorded for {missing[0]}: run a forward pass first")
        out = {n: self._pending[n] for n in self.modules}
        self._pending = {}
        return out


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
    from facemoe_model import moe_layers

    layers_b = moe_layers(after)
    for name, layer in moe_layers(before).items():
        if layers_b[name].k != layer.k:
            raise CheckpointError(f"{prefix}: MoE layer {name} routes to k={layer.k} experts in {a}, k={layers_b[name].k} in {b}")


class RoutingAgreement:
    """Streaming share of tokens routed alike by two models, per MoE layer.

    ``update(a, b)`` with both models' :class:`~moescope.trace.LayerRouting` of one batch;
    ``to_frame()``: ``layer, k, tokens, top1_agreement, topk_agreement`` (top-k compared as sets).
    """

    def __init__(self) -> None:
        self._counts: dict[str, np.ndarray] = {}  # layer -> [tokens, same top-1, same top-k set]
        self._k: dict[str, int] = {}

    def update(self, a: dict[str, LayerRouting], b: dict[str, LayerRouting]) -> None:
        for name, ra in a.items():
            rb = b[name]
            if ra.topk.shape != rb.topk.shape:
                raise ValueError(f"{name}: routing shapes differ, {ra.topk.shape} and {rb.topk.shape}")
            same_top1 = ra.topk[..., 0] == rb.topk[..., 0]
            same_set = (np.sort(ra.topk, axis=-1) == np.sort(rb.topk, axis=-1)).all(axis=-1)
            counts = self._counts.setdefault(name, np.zeros(3, dtype=np.int64))
            counts += (same_top1.size, int(same_top1.sum()), int(same_set.sum()))
            self._k[name] = ra.k

    def to_frame(self) -> pd.DataFrame:
        rows = [
            {"layer": name, "k": self._k[name], "tokens": int(c[0]), "top1_agreement": c[1] / c[0], "topk_agreement": c[2] / c[0]}
            for name, c in self._counts.items()
        ]
        return pd.DataFrame(rows, columns=["layer", "k", "tokens", "top1_agreement", "topk_agreement"])

    def overall(self) -> dict[str, float]:
        """Token-weighted agreement over all layers."""
        total = sum(self._counts.values()) if self._counts else np.zeros(3, dtype=np.int64)
        return {"top1": total[1] / total[0] if total[0] else float("nan"), "topk": total[2] / total[0] if total[0] else float("nan")}


@torch.no_grad()
def expert_shift(before: nn.Module, after: nn.Module) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-expert parameter shift (B.14), in float64.

    Returns ``(per_layer, per_expert)``: ``per_layer`` has ``layer, expert, params, l2_shift,
    before_norm, shift_pct`` for every MoE layer and expert; ``per_expert`` aggregates each
    expert index over the layers (:data:`SHIFT_AGGREGATE_NOTE`): ``expert, layers, params,
    l2_shift, before_norm, shift_pct``.
    """
    from facemoe_model import moe_layers

    layers_after = moe_layers(after)
    rows = []
    for name, layer in moe_layers(before).items():
        for e, expert in enumerate(layer.experts):
            params_after = dict(layers_after[name].experts[e].named_parameters())
            shift_sq = before_sq = 0.0
            count = 0
            for pname, p in expert.named_parameters():
                p0 = p.detach().to(torch.float64)
                shift_sq += float((params_after[pname].detach().to(torch.float64) - p0).square().sum())
                before_sq += float(p0.square().sum())
                count += p.numel()
            rows.append({"layer": name, "expert": e, "params": count, "l2_shift": shift_sq**0.5, "before_norm": before_sq**0.5})
    per_layer = pd.DataFrame(rows, columns=["layer", "expert", "params", "l2_shift", "before_norm"])
    per_layer["shift_pct"] = _percent(per_layer["l2_shift"], per_layer["before_norm"])
    squares = per_layer.assign(shift_sq=per_layer["l2_shift"] ** 2, before_sq=per_layer["before_norm"] ** 2)
    total = squares.groupby("expert", sort=True).agg(
        layers=("layer", "count"), params=("params", "sum"), shift_sq=("shift_sq", "sum"), before_sq=("before_sq", "sum")
    )
    per_expert = pd.DataFrame(
        {
            "expert": total.index.to_numpy(),
            "layers": total["layers"].to_numpy(),
            "params": total["params"].to_numpy(),
            "l2_shift": np.sqrt(total["shift_sq"].to_numpy()),
            "before_norm": np.sqrt(total["before_sq"].to_numpy()),
        }
    )
    per_expert["shift_pct"] = _percent(per_expert["l2_shift"], per_expert["before_norm"])
    return per_layer, per_expert


def _percent(part: pd.Series, whole: pd.Series) -> pd.Series:
    return (100.0 * part / whole).where(whole > 0)


def lowest_cka(table: pd.DataFrame, n: int = 5) -> pd.DataFrame:
    """The ``n`` layers with the lowest CKA (B.13), lowest first (layers without a CKA skipped)."""
    top = table.dropna(subset=["cka"]).nsmallest(n, "cka", keep="first")
    return pd.DataFrame({"rank": range(1, len(top) + 1), "layer": top["layer"].to_numpy(), "cka": top["cka"].to_numpy()})


@contextlib.contextmanager
def _eval_mode(models: Sequence[nn.Module]) -> Iterator[None]:
    """Put the models in eval mode for the block; their training flags are restored after."""
    flags = [[m.training for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, saved in zip(models, flags):
            for m, flag in zip(model.modules(), saved):
                m.training = flag


def _image_batches(
    paths: Sequence[Path], batches: Sequence[range], size: int, skipped: list[tuple[str, str]], dropped: list[int]
) -> Iterator[tuple[torch.Tensor, int]]:
    """Model-ready image batches with the number of files each consumed. Unreadable files are
    skipped (recorded in ``skipped``); a batch left with fewer than MIN_BATCH readable images is
    not yielded (its size goes to ``dropped``)."""
    from facemoe_model.data.datasets import preprocess

    from .landmarks import load_image

    for batch in batches:
        images = []
        for i in batch:
            try:
                images.append(preprocess(load_image(paths[i]), size))
            except DataError as exc:
                skipped.append((str(paths[i]), str(exc)))
        if len(images) >= MIN_BATCH:
            yield torch.stack(images), len(batch)
        elif images:
            dropped.append(len(images))


def _cka_figure(table: pd.DataFrame, labels: Sequence[str]):
    """Line plot of CKA by depth (a pyplot-free Figure: nothing global is kept alive)."""
    from matplotlib.figure import Figure

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
):
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

    Returns an ``AnalysisResult`` with tables ``cka``, ``lowest_cka``, ``expert_shift``,
    ``expert_shift_total``, ``routing_agreement`` and the figure ``cka_by_depth``.
    """
    from tqdm.auto import tqdm

    from facemoe_model import moe_layers

    from .results import AnalysisResult

    if features not in ("flatten", "mean"):
        raise MoescopeError(f"--features must be 'flatten' or 'mean', got {features!r}")
    labels = list(specs)
    check_same_architecture(before, after, labels)
    names = drift_layers(before)
    moe_names = list(moe_layers(before))
    batches, batch_note = plan_batches(len(paths), batch_size, last_batch)
    cka = StreamingCKA(features)
    agreement = RoutingAgreement()
    skipped: list[tuple[str, str]] = []
    dropped: list[int] = []
    analysed = 0
    models = (before, after)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_eval_mode(models))
        stack.enter_context(torch.inference_mode())
        captures = [stack.enter_context(FeatureCapture(m, names, features)) for m in models]
        traces = [stack.enter_context(RoutingTrace(m)) for m in models]
        bar = stack.enter_context(tqdm(total=len(paths), desc="cka", unit="img", disable=not progress))
        for images, files in _image_batches(paths, batches, before.img_size, skipped, dropped):
            outputs, routing = [], []
            for model, capture, trace in zip(models, captures, traces):
                model(images.to(next(model.parameters()).device))
                outputs.append(capture.pop())
                routing.append(trace.pop())
            for name in names:
                cka.update(name, outputs[0][name], outputs[1][name])
            agreement.update(*routing)
            analysed += len(images)
            bar.update(files)
    if analysed == 0:
        raise DataError(f"no batch of at least {MIN_BATCH} readable images among {len(paths)} files ({len(skipped)} unreadable)")

    table = cka.to_frame()
    table.insert(1, "depth", range(len(table)))
    shift_layer, shift_total = expert_shift(before, after)
    routing_table = agreement.to_frame()
    lowest = lowest_cka(table)
    warnings = [batch_note] if batch_note else []
    if skipped:
        warnings.append(f"skipped {len(skipped)} unreadable file(s), e.g. {skipped[0][0]}: {skipped[0][1]}")
    if dropped:
        warnings.append(f"dropped {sum(dropped)} image(s) in {len(dropped)} batch(es) left with fewer than {MIN_BATCH} readable images")
    if table["cka"].isna().any():
        warnings.append(f"CKA undefined (a side without variance across images) for {', '.join(table.loc[table['cka'].isna(), 'layer'])}")
    overall = agreement.overall()
    summary = {
        "images_found": len(paths),
        "images_analysed": analysed,
        "images_unreadable": len(skipped),
        "images_dropped": len(paths) - analysed - len(skipped),
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
        figures={"cka_by_depth": _cka_figure(table, labels)},
    )
