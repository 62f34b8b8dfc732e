"""``moescope attack``: adversarial probes vs recognition and routing stability (paper B.16)."""
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
    positive,
    split_names,
)

DEFAULT_ATTACKS = "fgsm,pgd,mim"
DEFAULT_EPS = "2/255,4/255,8/255"
DEMO_PROBES = 100
"""Probes the no-data default run attacks (one per demo identity), to keep it short on a laptop."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attack",
        help="FGSM / PGD / MIM on the probes vs accuracy, expert usage and routing change (paper B.16)",
        description="Attack the probe images (gallery fixed) on the [0, 1] image, budgets in pixel units, and report one row "
        "per setting, clean first: Rank-1/5/20 and verification accuracy, expert usage %, routing change (1 - IoU of each "
        "token's top-k expert set, and the share of tokens whose top-1 expert changed) per layer and facial region, the "
        f"achieved perturbation and the attack loss before/after. With no CKPT and no data: {DEFAULT_CHECKPOINT} on the "
        f"bundled demo split, {DEFAULT_ATTACKS} at eps {DEFAULT_EPS} on {DEMO_PROBES} probes.",
    )
    add_checkpoint(p)
    p.add_argument("--attack", default=DEFAULT_ATTACKS, metavar="NAMES", help=f"comma-separated fgsm, pgd, mim (default {DEFAULT_ATTACKS})")
    p.add_argument("--eps", default=DEFAULT_EPS, metavar="LIST", help=f"budgets, comma-separated, fractions allowed (default {DEFAULT_EPS})")
    p.add_argument("--steps", type=int, default=10, metavar="N", help="PGD / MIM iterations (default 10)")
    p.add_argument("--alpha", default="2/255", metavar="A", help="PGD / MIM step size (default 2/255)")
    p.add_argument("--norm", choices=("Linf", "L2"), default="Linf", help="budget norm of PGD / MIM (FGSM is L-inf; default Linf)")
    p.add_argument("--decay", type=float, default=1.0, metavar="MU", help="MIM momentum factor (default 1.0)")
    p.add_argument("--loss", choices=("mate-away", "clean-away", "impostor-toward"),
                   help="attack objective (default mate-away with identities, else clean-away)")
    p.add_argument("--max-probes", type=int, metavar="N",
                   help=f"attack at most N probes, round-robin over identities (default all; {DEMO_PROBES} for the bundled demo)")
    p.add_argument("--layers", action="append", metavar="NAMES", help="MoE layers to observe, by name or prefix, comma-separated; default all")
    add_evaluation_data(p, aliases=True)
    add_top_k(p)
    add_output(p)
    p.set_defaults(run=run)


def _check_common(args: argparse.Namespace) -> None:
    check_evaluation_data(args)
    if args.lowres is not None:
        raise MoescopeError(f"--lowres does not apply to {args.command}; use moescope degrade --resolution S")
    if args.max_probes is not None:
        positive(args.max_probes, "--max-probes")


def run(args: argparse.Namespace) -> int:
    from ..attacks import AttackSetting, parse_eps
    from ..runners.stability import attack_stability

    _check_common(args)
    names = [n.strip() for n in args.attack.split(",") if n.strip()]
    (alpha,) = parse_eps(args.alpha) if "," not in args.alpha else (None,)
    if alpha is None or alpha <= 0:
        raise MoescopeError(f"--alpha: give one step size > 0, got {args.alpha!r}")
    eps = parse_eps(args.eps)
    settings = [AttackSetting(name, eps=e, alpha=alpha, steps=args.steps, norm="Linf" if name == "fgsm" else args.norm,
                              decay=args.decay) for name in names for e in eps]
    if not settings:
        raise MoescopeError("--attack: name at least one of fgsm, pgd, mim")
    demo = not (args.split or args.pairs or args.bin or getattr(args, "eval_data", None))  # --data DIR: the user's faces, all of them
    max_probes = args.max_probes if args.max_probes is not None else (DEMO_PROBES if demo else None)
    (model,) = load_models([args.checkpoint], args)
    data = evaluation_data(args, model.img_size)
    result = attack_stability(
        model, data, settings, loss=args.loss, layers=split_names(args.layers), batch_size=args.batch_size,
        flip=not args.no_flip, max_probes=max_probes, seed=args.seed, progress=not args.json, checkpoint=args.checkpoint,
        settings_extra={"format": getattr(model, "checkpoint_format", "")},
    )
    emit(result, args, render)
    return 0


# --- the tables as a person reads them (shared with ``moescope degrade``) ---------------------


def _fmt(value, scale: float = 1.0, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value * scale:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header), *(line(r) for r in rows)]


def render(result) -> str:
    """The stability table (accuracy %, routing change, usage %, attack columns), routing change
    per layer and per facial region."""
    table = result.tables["stability"]
    s, settings = result.summary, result.settings
    acc = [c for c in ("Rank-1", "Rank-5", "Rank-20", "Verification accuracy") if c in table.columns]
    experts = [c for c in table.columns if c.startswith("Expert ")]
    attack = "loss before" in table.columns
    header = ["setting", *[("Verif" if c.startswith("Verif") else c) + " %" for c in acc], "1-IoU", "top1 chg",
              *[c.replace("Expert ", "E").replace(" (%)", " %") for c in experts], "max dev"]
    if attack:
        header += ["Linf x255", "L2", "loss before -> after"]
    rows = []
    for _, r in table.iterrows():
        cells = [r["setting"], *[_fmt(r[c], 100) for c in acc], _fmt(r["routing change"], digits=3), _fmt(r["top-1 changed"], digits=3),
                 *[_fmt(r[c], digits=1) for c in experts], _fmt(r["max usage deviation (pts)"], digits=2)]
        if attack:
            cells += [_fmt(r["Linf max (x255)"], digits=2), _fmt(r["L2 mean"], digits=3),
                      "" if r["family"] == "clean" else f"{r['loss before']:.3f} -> {r['loss after']:.3f}"]
        rows.append(cells)
    lines = [
        f"moescope {result.command}: {result.checkpoints[0]} on {settings['data']} ({s['probes']} of {s['probes_total']} probes perturbed, "
        f"{s['gallery']} gallery images, {s['pairs']} pairs), {s['moe_layers']} MoE layers, {s['experts']} experts"
        + (f", loss {settings['loss']}" if settings.get("loss") else ""),
        "",
        *_table(header, rows),
    ]
    per_layer = result.tables["routing_change"].pivot_table(index="setting", columns="layer", values="set_distance", sort=False)
    per_layer = per_layer.reindex(index=table["setting"])
    layer_names = list(per_layer.columns)
    short = [f"L{i}" for i in range(len(layer_names))]
    lines += ["", "routing change (1 - IoU) per MoE layer: " + ", ".join(f"{a} = {b}" for a, b in zip(short, layer_names)), ""]
    lines += _table(["setting", *short], [[name, *[_fmt(v, digits=3) for v in vals]] for name, vals in zip(per_layer.index, per_layer.to_numpy())])
    regions = result.tables["region_change"]
    regions = regions[regions["layer"] == "all"].pivot_table(index="setting", columns="region", values="set_distance", sort=False)
    regions = regions.reindex(index=table["setting"])
    lines += ["", "routing change (1 - IoU) per facial region, all layers (tokens weighted by the region's share of their cell)", ""]
    lines += _table(["setting", *regions.columns], [[name, *[_fmt(v, digits=3) for v in vals]] for name, vals in zip(regions.index, regions.to_numpy())])
    lines += ["", "accuracies in %; 1-IoU: mean over grid tokens of 1 - |A n B| / |A u B| of the top-k expert index sets, clean vs "
              "perturbed; top1 chg: share of tokens whose rank-1 expert changed; E%: expert usage over all layers; max dev: largest "
              "|usage - clean usage| (points)" + ("; Linf: largest achieved L-inf (x255), L2: mean achieved L2" if attack else "")]
    lines += [f"note: {n}" for n in settings.get("notes", [])]
    lines.append(f"time: {s['seconds']:.1f} s")
    return "\n".join(lines)
