"""Expert interventions and their effect on face recognition (paper B.17 / B.7, ``moescope ablate``).

An :class:`Intervention` is a named :class:`~facemoe_model.moe.RoutingOverride`, applied
only through :func:`~facemoe_model.moe.override_routing` (the model is restored exactly on
exit, also on exceptions):

* ``drop`` — the dropped experts can never be selected; when fewer than k experts remain,
  k shrinks to the experts left (``MoELayer.effective_k``);
* ``switch`` — a token routed to expert ``e`` is processed by ``permutation[e]``
  (default cyclic shift ``e -> (e + 1) % N``);
* ``random`` — each token's k experts are drawn uniformly at random (seeded).

:func:`plan_interventions` expands the command-line specs (``--drop 0,1``, ``--drop singles``,
``--drop pairs``, ``--switch [PERM]``, ``--random``) and validates them against the model;
:func:`ablate_experts` evaluates the unmodified baseline and every intervention with the
data's protocols (:func:`facemoe_model.protocols.evaluate`, as ``moescope eval``) and
measures expert usage under each one with :class:`ExpertUsage` (observed through
:class:`~moescope.trace.RoutingTrace`, never recomputed).
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import ContextManager, Iterable, Literal, Sequence

import pandas as pd
from torch import nn
from tqdm import tqdm

from facemoe_model.moe import MoELayer, RoutingOverride, override_routing, select_moe_layers, uniform_num_experts
from facemoe_model.protocols import Degradation, EvaluationData, evaluate

from .errors import MoescopeError
from .results import AnalysisResult
from .trace import ExpertUsage

__all__ = [
    "Intervention",
    "ExpertUsage",
    "parse_experts",
    "drop_interventions",
    "switch_intervention",
    "random_intervention",
    "plan_interventions",
    "ablate_experts",
]

Kind = Literal["drop", "switch", "random"]
BASELINE = "baseline"
"""Name of the unmodified model's row."""


@dataclass(frozen=True)
class Intervention:
    """A named routing intervention (``drop 0,1``, ``switch 1,2,0``, ``random seed 0``)."""

    name: str
    kind: Kind
    override: RoutingOverride

    def apply(self, model: nn.Module, layers: Iterable[str] | None = None) -> ContextManager[dict[str, MoELayer]]:
        """Context manager: the override on ``layers`` (names or prefixes; default all MoE layers)."""
        return override_routing(model, self.override, layers)


def _join(experts: Sequence[int]) -> str:
    return ",".join(map(str, experts))


def parse_experts(text: str, option: str) -> tuple[int, ...]:
    """``"0,2"`` -> ``(0, 2)``; a malformed list is a one-line :class:`MoescopeError` naming ``option``."""
    try:
        return tuple(int(field) for field in str(text).split(","))
    except ValueError:
        raise MoescopeError(f"{option} {text!r}: expected comma-separated expert indices such as 0,1") from None


def drop_interventions(spec: str, num_experts: int) -> list[Intervention]:
    """``singles`` (one row per expert), ``pairs`` (one per pair, C(N, 2)) or an expert list."""
    if spec == "singles":
        groups = [(e,) for e in range(num_experts)]
    elif spec == "pairs":
        groups = list(itertools.combinations(range(num_experts), 2))
    else:
        experts = parse_experts(spec, "--drop")
        if len(set(experts)) < len(experts):
            raise MoescopeError(f"--drop {spec!r}: an expert is listed twice")
        groups = [experts]
    return [Intervention(f"drop {_join(g)}", "drop", RoutingOverride(dropped=tuple(g))) for g in groups]


def switch_intervention(spec: str | None, num_experts: int) -> Intervention:
    """Switch experts by the permutation ``spec`` (``"1,2,0"``); None: cyclic shift ``e -> (e + 1) % N``."""
    perm = tuple((e + 1) % num_experts for e in range(num_experts)) if spec is None else parse_experts(spec, "--switch")
    return Intervention(f"switch {_join(perm)}", "switch", RoutingOverride(permutation=perm))


def random_intervention(seed: int) -> Intervention:
    """Top-k experts drawn uniformly at random per token, from a generator seeded with ``seed``."""
    return Intervention(f"random seed {seed}", "random", RoutingOverride(random_seed=int(seed)))


def _selected(model: nn.Module, layers: Sequence[str] | None) -> dict[str, MoELayer]:
    try:
        return select_moe_layers(model, layers)
    except KeyError as exc:
        raise MoescopeError(str(exc.args[0])) from None


def _num_experts(chosen: dict[str, MoELayer]) -> int:
    try:
        return uniform_num_experts(chosen)
    except ValueError as exc:
        raise MoescopeError(f"{exc}; choose layers with --layers") from None


def plan_interventions(
    model: nn.Module,
    *,
    drop: Sequence[str] = (),
    switch: Sequence[str | None] = (),
    random: bool = False,
    seed: int = 0,
    layers: Sequence[str] | None = None,
) -> list[Intervention]:
    """Expand the specs into interventions (order: drops, switches, random; repeats removed)
    and validate each against every chosen MoE layer, so bad input fails before any evaluation."""
    chosen = _selected(model, layers)
    num_experts = _num_experts(chosen)
    planned = [i for spec in drop for i in drop_interventions(spec, num_experts)]
    planned += [switch_intervention(spec, num_experts) for spec in switch]
    planned += [random_intervention(seed)] if random else []
    unique = list({i.name: i for i in planned}.values())
    for intervention in unique:
        for name, layer in chosen.items():
            try:
                intervention.override.validate(layer.num_experts, name)
            except ValueError as exc:
                raise MoescopeError(f"{intervention.name}: {exc}") from None
    return unique


def _headline(figures: dict[str, dict[str, float]]) -> dict[str, float]:
    """The B.17 columns of one evaluation: Rank-k and verification accuracy."""
    row = {k: v for k, v in figures.get("identification", {}).items() if k.startswith("Rank-")}
    if "verification" in figures:
        row["Verification accuracy"] = figures["verification"]["accuracy"]
        row["Verification accuracy std"] = figures["verification"]["accuracy_std"]
    return row


def ablate_experts(
    model: nn.Module,
    data: EvaluationData,
    interventions: Sequence[Intervention],
    *,
    layers: Sequence[str] | None = None,
    batch_size: int = 64,
    flip: bool = True,
    probe_transform: Degradation | None = None,
    progress: bool = True,
    checkpoint: str = "",
    settings: dict | None = None,
) -> AnalysisResult:
    """Evaluate the unmodified model and each intervention (on ``layers``; default all MoE layers).

    Returns an ``AnalysisResult`` with tables ``ablation`` (B.17 layout: one row per
    intervention after the baseline: effective k, Rank-1/5/10/20 and/or verification
    accuracy as fractions, expert usage % over the chosen layers), ``metrics`` (everything
    :func:`~facemoe_model.protocols.evaluate` returned, tidy) and ``expert_usage`` (per layer);
    the baseline figures in ``summary`` equal ``moescope eval``'s; a warning per intervention
    that shrinks k.
    """
    chosen = _selected(model, layers)
    num_experts = _num_experts(chosen)
    runs: list[Intervention | None] = [None, *interventions]
    rows, metrics, usage, warnings = [], [], [], []
    baseline: dict = {}
    for intervention in tqdm(runs, desc="interventions", unit="eval", disable=not progress):
        name = BASELINE if intervention is None else intervention.name
        scope = contextlib.nullcontext(chosen) if intervention is None else intervention.apply(model, layers)
        with scope as affected, ExpertUsage(model, layers) as counter:
            k = min(layer.effective_k for layer in affected.values())
            shrunk = sorted({layer.k for layer in affected.values() if layer.effective_k < layer.k})
            figures = evaluate(model, data, batch_size=batch_size, flip=flip, probe_transform=probe_transform)
        if shrunk:
            warnings.append(
                f"{name}: only {k} of {num_experts} experts left in the chosen layers, so k shrinks "
                f"from {shrunk[-1]} to {k} (every token is processed by all remaining experts)"
            )
        if intervention is None:
            baseline = figures
        share = counter.table()
        total = share[share["layer"] == "all"]["percent"].to_numpy()
        rows.append(
            {
                "intervention": name,
                "kind": BASELINE if intervention is None else intervention.kind,
                "k": k,
                **_headline(figures),
                **{f"Expert {e} (%)": float(p) for e, p in enumerate(total)},
            }
        )
        metrics += [{"intervention": name, "protocol": p, "metric": m, "value": v} for p, ms in figures.items() for m, v in ms.items()]
        usage.append(share.assign(intervention=name))
    sets = ([data.split.gallery, data.split.probe] if data.split else []) + ([data.pairs] if data.pairs else [])
    return AnalysisResult(
        command="ablate",
        checkpoints=[checkpoint or getattr(model, "checkpoint_path", "")],
        settings={
            "data": data.source,
            "layers": "all" if layers is None else list(layers),
            "interventions": [i.name for i in interventions],
            "batch_size": batch_size,
            "flip": flip,
            "probe_transform": repr(probe_transform) if probe_transform else None,
            "usage": "share (%) of token-expert assignments per expert over the chosen MoE layers and every "
            "forward pass of the evaluation (images and mirror images); grid tokens",
            **(settings or {}),
        },
        tables={
            "ablation": pd.DataFrame(rows),
            "metrics": pd.DataFrame(metrics),
            "expert_usage": pd.concat(usage, ignore_index=True)[["intervention", "layer", "expert", "assignments", "percent"]],
        },
        summary={"images": data.images, "experts": num_experts, "moe_layers": len(chosen), "interventions": len(interventions), **baseline},
        warnings=[w for w in (s.skip_summary for s in sets) if w] + warnings,
    )
