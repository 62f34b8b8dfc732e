"""The report's sections: what each one shows and the command line that fills it.

Kept free of pandas and torch so that ``moescope --help`` can list the sections cheaply;
:mod:`moescope.runners.report` runs and collects them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["ReportInputs", "Analysis", "ANALYSES"]


@dataclass(frozen=True)
class ReportInputs:
    """What the report was asked for (the checkpoints and data of every section)."""

    before: str
    after: str | None = None
    data: str | None = None
    split: str | None = None
    full: bool = False

    @property
    def subject(self) -> str:
        """The checkpoint single-model analyses look at: AFTER when given, else BEFORE."""
        return self.after or self.before


@dataclass(frozen=True)
class Analysis:
    """One section of the report and the command that fills it.

    ``argv(inputs)`` is the command line (without ``moescope`` and ``--out``); ``light`` are
    options that make it cheaper for the default report (dropped with ``full``, and dropped one
    by one where the installed command has no such option); ``applies`` returns why the section
    does not apply, or None; ``matches`` tells a collected ``result.json`` of this section.
    """

    key: str
    command: str
    number: str
    title: str
    description: str
    argv: Callable[[ReportInputs], list[str]]
    light: tuple[tuple[str, ...], ...] = ()
    applies: Callable[[ReportInputs], str | None] = lambda inputs: None
    matches: Callable[[dict], bool] = lambda result: True
    light_note: str = ""


def _data(inputs: ReportInputs, option: str = "--data") -> list[str]:
    return [option, inputs.data] if inputs.data else []


def _split(inputs: ReportInputs) -> list[str]:
    return ["--split", inputs.split] if inputs.split else []


def _compare(inputs: ReportInputs) -> list[str]:
    return ["--compare", inputs.after] if inputs.after else []


def _needs_pair(inputs: ReportInputs) -> str | None:
    return None if inputs.after else "drift compares two checkpoints: give BEFORE and AFTER"


def _cases(result: dict) -> bool:
    return bool(result.get("settings", {}).get("cases"))


ANALYSES: tuple[Analysis, ...] = (
    Analysis(
        "regions", "regions", "B.1", "Expert routing by facial region (B.1 / B.2)",
        "How often each expert is chosen per facial region (rows sum to 100), for BEFORE and AFTER and their "
        "difference; 95% bootstrap intervals over images.",
        lambda i: [i.before, *_compare(i), *_data(i)], light=(("--bootstrap", "200"),),
        light_note="200 bootstrap resamples (command default 1000)",
    ),
    Analysis(
        "degrade", "degrade", "B.3", "Degradations and resolution (B.3 / B.10)",
        "Recognition, expert usage and routing change with degraded probes (gallery fixed): blur, JPEG, noise, "
        "resolution, region occlusion.",
        lambda i: [i.subject, *_split(i)],
        light=(("--blur", "2,5"), ("--jpeg", "50,10"), ("--noise", "10"), ("--resolution", "16,32,64"), ("--occlude", "eyes,nose,mouth"),
               ("--max-probes", "100")),
        light_note="11 settings on at most 100 probes: blur 2,5; JPEG 50,10; noise 10; resolution 16,32,64; occlusion of "
        "eyes, nose, mouth (command default: 21 settings on all probes)",
    ),
    Analysis(
        "ablate", "ablate", "B.7", "Expert interventions (B.17 / B.7)",
        "Recognition with each expert dropped, experts switched cyclically, and random routing, against the unmodified model.",
        lambda i: [i.subject, "--drop", "singles", "--switch", "--random", *_split(i)],
    ),
    Analysis(
        "bench", "bench", "B.11", "Inference cost (B.11)",
        "Latency, throughput and peak memory without and with routing capture, FLOPs per image of the sparse top-k "
        "dispatch vs a dense all-experts layer, and the router's share of a forward pass (random input images).",
        lambda i: [i.subject], light=(("--batch-sizes", "1,8"), ("--repeats", "3")),
        light_note="batch sizes 1 and 8, 3 timed blocks (command default 1,8,32 and 7)",
    ),
    Analysis(
        "cka", "cka", "B.12", "Representation drift: CKA, expert shift, routing agreement (B.12 / B.13 / B.14)",
        "Linear CKA between BEFORE and AFTER per layer, the five most changed layers, each expert's parameter shift "
        "and the share of tokens routed alike.",
        lambda i: [i.before, i.after or i.before, *_data(i)], applies=_needs_pair,
    ),
    Analysis(
        "attack", "attack", "B.16", "Routing stability under adversarial attacks (B.16)",
        "FGSM / PGD / MIM on the probes (gallery fixed): recognition, expert usage and routing change (1 - IoU of "
        "top-k sets) per setting, clean first.",
        lambda i: [i.subject, *_split(i)], light=(("--eps", "8/255"), ("--steps", "5")),
        light_note="FGSM, PGD and MIM at 8/255 only, 5 steps (command default: 2/255, 4/255, 8/255 and 10 steps)",
    ),
    Analysis(
        "maps", "maps", "D", "Expert activation maps before and after (Figure 6)",
        "Per face, one routing map per expert, BEFORE and AFTER side by side on a shared colour scale; map mass per "
        "facial region and spatial concentration.",
        lambda i: [i.before, *_compare(i), *_data(i)], matches=lambda r: not _cases(r),
    ),
    Analysis(
        "maps_cases", "maps", "E", "Success and failure cases (Figure 8)",
        "Maps of probes identified correctly and wrongly at Rank-1, and whether failure maps are more diffuse "
        "(entropy, face share) with bootstrap intervals.",
        lambda i: [i.subject, "--cases", "success,failure", *_split(i)], matches=_cases,
        light=(("--bootstrap", "200"),), light_note="200 bootstrap resamples (command default 1000)",
    ),
)
