"""Named expert interventions and their planning (paper B.17 / B.7, ``moescope ablate``).

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
:func:`moescope.runners.ablate.ablate_experts` evaluates the unmodified baseline and every
intervention.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ContextManager, Iterable, Literal, Sequence

from torch import nn

from facemoe_model.moe import MoELayer, RoutingOverride, override_routing

from .errors import MoescopeError
from .trace import expert_count, select_layers

__all__ = [
    "BASELINE",
    "Intervention",
    "parse_experts",
    "drop_interventions",
    "switch_intervention",
    "random_intervention",
    "plan_interventions",
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
    chosen = select_layers(model, layers)
    num_experts = expert_count(chosen)
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
