"""``moescope ablate``: drop, switch or randomise experts and measure face recognition (paper B.17 / B.7)."""
from __future__ import annotations

import argparse
import math

from ..cli import emit
from ..demo import DEFAULT_CHECKPOINT
from ..errors import MoescopeError
from ..options import (
    add_checkpoint,
    add_evaluation_data,
    add_output,
    add_top_k,
    check_evaluation_data,
    evaluation_data,
    load_models,
    probe_transform,
    split_names,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablate",
        help="expert interventions (drop / switch / random routing) vs accuracy (paper B.17/B.7)",
        description="Evaluate a checkpoint unmodified and under routing interventions, one table row each: "
        "identification Rank-1/5/10/20 (gallery/probe split) and/or verification accuracy (pairs), the effective k "
        "and the expert usage % under each intervention. Several interventions may be combined in one run. "
        f"With no CKPT and no data: {DEFAULT_CHECKPOINT} on the bundled demo split.",
    )
    add_checkpoint(p)
    p.add_argument("--drop", action="append", default=[], metavar="SPEC",
                   help="drop experts: a list (0,1), 'singles' (each expert) or 'pairs' (each pair); repeatable")
    p.add_argument("--switch", action="append", nargs="?", const="cyclic", metavar="PERM",
                   help="switch experts: token routed to e is processed by PERM[e] (e.g. 2,0,1); default cyclic shift e -> (e+1) %% N")
    p.add_argument("--random", action="store_true", help="random routing: each token's k experts drawn uniformly (seeded by --seed)")
    p.add_argument("--layers", action="append", metavar="NAMES", help="MoE layers to intervene on and count, by name or prefix, comma-separated (e.g. layers.2); default all")
    add_evaluation_data(p, aliases=True)
    add_top_k(p)
    add_output(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..interventions import plan_interventions
    from ..runners.ablate import ablate_experts

    if not (args.drop or args.switch or args.random):
        raise MoescopeError("give at least one intervention: --drop SPEC, --switch [PERM] or --random")
    check_evaluation_data(args)
    layers = split_names(args.layers)
    (model,) = load_models([args.checkpoint], args)
    interventions = plan_interventions(
        model, drop=args.drop, switch=[None if s == "cyclic" else s for s in args.switch or []],
        random=args.random, seed=args.seed, layers=layers,
    )
    data = evaluation_data(args, model.img_size)
    result = ablate_experts(
        model, data, interventions, layers=layers, batch_size=args.batch_size, flip=not args.no_flip,
        probe_transform=probe_transform(args), progress=not args.json, checkpoint=args.checkpoint,
        settings={"lowres": args.lowres, "seed": args.seed, "format": getattr(model, "checkpoint_format", "")},
    )
    emit(result, args, render)
    return 0


def _fmt(value: float, scale: float = 100.0, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value * scale:.{digits}f}"


def render(result) -> str:
    """The B.17 table as a person reads it: accuracies in %, change vs baseline, expert usage %."""
    table = result.tables["ablation"]
    s, settings = result.summary, result.settings
    metrics = [c for c in table.columns if c.startswith("Rank-") or c == "Verification accuracy"]
    experts = [c for c in table.columns if c.startswith("Expert ")]
    base = table.iloc[0]
    layers = settings["layers"] if isinstance(settings["layers"], str) else ", ".join(settings["layers"])
    header = ["intervention", "k", *[f"{m} (%)" for m in metrics], *[f"d {m}" for m in metrics[:1]], *[c.replace(" (%)", " %") for c in experts]]
    rows = []
    for _, row in table.iterrows():
        rows.append([
            row["intervention"], str(row["k"]),
            *[_fmt(row[m]) for m in metrics],
            *["" if row["kind"] == "baseline" else f"{(row[m] - base[m]) * 100:+.2f}" for m in metrics[:1]],
            *[_fmt(row[c], scale=1.0, digits=1) for c in experts],
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [
        f"moescope ablate: {result.checkpoints[0]} on {settings['data']} ({s['images']} images), "
        f"{s['moe_layers']} MoE layers ({layers}), {s['experts']} experts",
        "",
        line(header),
        *(line(r) for r in rows),
        "",
        "expert usage: share of token-expert assignments per expert over the chosen layers; d = change vs baseline (points)",
    ]
    return "\n".join(lines)
