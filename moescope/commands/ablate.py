"""``moescope ablate``: drop, switch or randomise experts and measure face recognition (paper B.17 / B.7)."""
from __future__ import annotations

import argparse
import math

from ..cli import add_output_options, add_top_k_option, emit, split_names
from ..errors import MoescopeError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablate",
        help="expert interventions (drop / switch / random routing) vs accuracy (paper B.17/B.7)",
        description="Evaluate a checkpoint unmodified and under routing interventions, one table row each: "
        "identification Rank-1/5/10/20 (gallery/probe split) and/or verification accuracy (pairs), the effective k "
        "and the expert usage % under each intervention. Several interventions may be combined in one run. "
        "With no CKPT and no data: demo:after on the bundled demo split.",
    )
    p.add_argument("checkpoint", nargs="?", help="checkpoint (.pt, official or moescope) or demo:before/demo:after; default demo:after")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="DIR", help="gallery/probe split folder (as eval --split; a pairs.txt there adds verification)")
    source.add_argument("--protocol", metavar="FILE", help="verification pairs list: LFW pairs.txt or 'path1 path2 label' lines")
    p.add_argument("--root", metavar="DIR", help="image root of --protocol (default: the pairs file's folder)")
    p.add_argument("--drop", action="append", default=[], metavar="SPEC",
                   help="drop experts: a list (0,1), 'singles' (each expert) or 'pairs' (each pair); repeatable")
    p.add_argument("--switch", action="append", nargs="?", const="cyclic", metavar="PERM",
                   help="switch experts: token routed to e is processed by PERM[e] (e.g. 2,0,1); default cyclic shift e -> (e+1) %% N")
    p.add_argument("--random", action="store_true", help="random routing: each token's k experts drawn uniformly (seeded by --seed)")
    p.add_argument("--layers", action="append", metavar="NAMES", help="MoE layers to intervene on and count, by name or prefix, comma-separated (e.g. layers.2); default all")
    p.add_argument("--lowres", type=int, metavar="S", help="down-sample probes (second image of each pair) to S x S px and back, as eval --lowres")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward pass (default 64)")
    p.add_argument("--no-flip", action="store_true", help="embed images alone instead of fusing them with their mirror image")
    add_top_k_option(p)
    add_output_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from facemoe_model.protocols import load_protocols, lowres_probes

    from ..demo import demo_split_dir, load_model
    from ..interventions import ablate_experts, plan_interventions

    if not (args.drop or args.switch or args.random):
        raise MoescopeError("give at least one intervention: --drop SPEC, --switch [PERM] or --random")
    if args.batch_size < 1:
        raise MoescopeError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.root and not args.protocol:
        raise MoescopeError("--root applies to --protocol only")
    layers = split_names(args.layers)
    model = load_model(args.checkpoint, top_k=args.top_k)
    interventions = plan_interventions(
        model, drop=args.drop, switch=[None if s == "cyclic" else s for s in args.switch or []],
        random=args.random, seed=args.seed, layers=layers,
    )
    split = args.data if (args.data or args.protocol) else demo_split_dir()
    data = load_protocols(split=split, pairs=args.protocol, root=args.root, size=model.img_size)
    result = ablate_experts(
        model, data, interventions, layers=layers, batch_size=args.batch_size, flip=not args.no_flip,
        probe_transform=lowres_probes(args.lowres) if args.lowres is not None else None,
        progress=not args.json, checkpoint=args.checkpoint or "demo:after",
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
