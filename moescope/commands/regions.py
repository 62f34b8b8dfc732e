"""``moescope regions``: the region x expert routing table (paper B.1 / B.2)."""
from __future__ import annotations

import argparse

from ..cli import emit
from ..demo import DEFAULT_CHECKPOINT
from ..errors import MoescopeError
from ..choices import ASSIGN_MODES, BATCH_SIZE, REGION_SOURCES
from ..options import add_alignment_options, add_checkpoint, add_image_source, add_output, add_top_k, image_source, load_models, positive, split_names
from ..choices import COUNT_MODES, GROUPINGS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "regions",
        help="which expert each facial region is routed to (paper B.1/B.2)",
        description="Route face images through a FaceMoE checkpoint and tabulate, per facial region, "
        "how often each expert is chosen (rows sum to 100). With no CKPT: the bundled demo checkpoint "
        f"({DEFAULT_CHECKPOINT}) on the bundled demo images.",
    )
    add_checkpoint(p)
    add_image_source(p, "face images")
    p.add_argument("--compare", metavar="CKPT2", help="a second checkpoint: both tables and their difference (CKPT2 - CKPT)")
    p.add_argument("--layers", action="append", metavar="NAMES", help="MoE layers to count, by name or prefix, comma-separated (e.g. layers.2); default all")
    p.add_argument("--by", choices=GROUPINGS, default="all", help="pool all MoE layers (default), per stage, or per layer")
    p.add_argument("--count", choices=COUNT_MODES, default="top1", help="counting convention (docs/analyses.md); default top1")
    p.add_argument("--assign", choices=ASSIGN_MODES, default="soft", help="token->region by area fractions (default) or majority label")
    p.add_argument("--region-source", choices=REGION_SOURCES, default="landmarks",
                   help="images without a detected face: skip (landmarks, default) or label from the aligned-face template")
    add_top_k(p)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, metavar="N", help=f"images per forward pass (default {BATCH_SIZE})")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples over images for 95%% intervals (0 = off)")
    p.add_argument("--null", type=int, default=200, metavar="N",
                   help="permutation null of every NMI: N resamples shuffling region fractions across tokens within each "
                   "image (seeded by --seed; 0 = off); default 200")
    p.add_argument("--null-images", type=int, default=200, metavar="M",
                   help="draw the null on at most M images (seeded subsample; default 200)")
    p.add_argument("--baseline", choices=["init"],
                   help="also analyse a freshly initialised network of the same architecture (weights seeded by --seed)")
    p.add_argument("--export-tokens", metavar="FILE", help="also write every token's routing to FILE (.parquet or .csv); memory grows with images")
    p.add_argument("--workers", type=int, help="landmark worker processes (default: automatic)")
    add_alignment_options(p)
    add_output(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..runners.regions import analyse_regions, init_baseline

    layers = split_names(args.layers)
    specs = [args.checkpoint] + ([args.compare] if args.compare else [])
    paths, data = image_source(args)  # before any model is loaded: a bad --data fails at once
    models = load_models(specs, args)
    positive(args.batch_size, "--batch-size")
    positive(args.null_images, "--null-images")
    if args.null < 0:
        raise MoescopeError(f"--null must be >= 0, got {args.null}")
    baseline = init_baseline(models[0], args.seed) if args.baseline == "init" else None
    result = analyse_regions(
        models, specs, paths, layers=layers, by=args.by, count=args.count, assign=args.assign,
        region_source=args.region_source, batch_size=args.batch_size, n_boot=args.bootstrap, seed=args.seed,
        export_tokens=args.export_tokens, workers=args.workers, progress=not args.json, data=data,
        align=args.align, save_aligned=args.save_aligned,
        null=args.null, null_images=args.null_images, baseline=baseline,
    )
    emit(result, args, render)
    return 0


def _p(value) -> str:
    return "  -" if value != value else (f"{value:.3f}" if value >= 0.001 else f"{value:.1e}")


def _specialisation_lines(result) -> list[str]:
    """The per-layer view: NMI of every MoE layer, its null and (with --baseline) the init network's."""
    import numpy as np

    nmi = result.tables.get("nmi")
    if nmi is None:
        return []
    s, null = result.summary, result.settings.get("null", {})
    checkpoints = list(dict.fromkeys(nmi["checkpoint"]))
    layers = nmi[nmi["scope"] == "layer"]
    lines = [
        f"face tokens: {100 * s['face_token_share']:.1f}% of the token mass (the rest is hair/background)",
        "",
        "specialisation per MoE layer: NMI(region; expert); null = region fractions shuffled across tokens within "
        + (f"each image ({null['resamples']} resamples): its mean, p and z (distance in null std)" if null.get("resamples") else "each image: off (--null 0)"),
    ]
    header = ["layer", "tokens"] + [f"{c} {h}" for c in checkpoints for h in ("NMI", "null", "p", "z")]
    rows = []
    for layer, sub in layers.groupby("group", sort=False):
        by = {row["checkpoint"]: row for _, row in sub.iterrows()}
        cells = [layer, f"{sub['tokens'].iloc[0]:.0f}"]
        for c in checkpoints:
            row = by[c]
            cells += [f"{row['nmi']:.3f}", "  -" if np.isnan(row["null_mean"]) else f"{row['null_mean']:.4f}", _p(row["p_value"]),
                      "  -" if not np.isfinite(row["null_z"]) else f"{row['null_z']:.0f}"]
        rows.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines += [fmt(header), *(fmt(r) for r in rows)]
    for c in checkpoints:
        view = s.get(f"specialisation_{c}", {})
        if view.get("most_specialised"):
            most, least = view["most_specialised"], view["least_specialised"]
            lines.append(f"{c}: most specialised {most} (NMI {view['layers'][most]['nmi']:.3f}), "
                         f"least {least} (NMI {view['layers'][least]['nmi']:.3f})")
    return lines


def render(result) -> str:
    """The per-layer specialisation view first, then one paper-layout table per checkpoint (and group)."""
    import pandas as pd

    s = result.summary
    lines = [
        f"moescope regions: {s['images_analysed']} of {s['images_found']} images analysed "
        f"({s['images_no_face']} without a face, {s.get('images_rejected', 0)} rejected by the quality gate: {s['no_face_handling']}; "
        f"{s['images_unreadable']} unreadable); align={s.get('alignment', 'auto')} ({s.get('images_aligned', 0)} aligned); "
        f"count={result.settings['count']}, assign={result.settings['assign']}, layers={result.settings['layers']}",
        *_specialisation_lines(result),
    ]
    nmi = result.tables.get("nmi")
    extra = [result.settings["baseline"]["label"]] if result.settings.get("baseline") else []
    for label in result.settings["labels"] + extra:
        for group, table in result.tables[f"paper_{label}"].groupby("group", sort=False):
            interval = "; 95% bootstrap interval over images" if result.settings.get("bootstrap") else "; no bootstrap intervals (--bootstrap 0)"
            lines += ["", f"{label} [{group}]  routing frequency (%) per facial region{interval}"]
            shown = table.drop(columns=["group"]).copy()
            if "Tokens" in shown:
                tokens = shown.pop("Tokens")
                shown.insert(1, "Tokens", [f"{t:.0f}" for t in tokens])
            for col in [c for c in shown.columns if c.startswith("Expert ") and not c.endswith(("ci_low", "ci_high"))]:
                lo, hi = shown.pop(f"{col} ci_low"), shown.pop(f"{col} ci_high")
                shown[col] = [
                    f"{v:5.1f}" + (f" [{a:4.1f},{b:5.1f}]" if pd.notna(a) else "") if pd.notna(v) else "  -"
                    for v, a, b in zip(shown[col], lo, hi)
                ]
            lines.append(shown.to_string(index=False))
        spec = result.tables["specialisation"]
        spec = spec[(spec["checkpoint"] == label) & (spec["metric"] == "nmi")]
        if nmi is not None and (nmi["scope"] != "layer").any():
            pooled = nmi[(nmi["checkpoint"] == label) & (nmi["scope"] != "layer")]
            lines.append("pooled specialisation: " + ", ".join(
                f"NMI(region; expert) [{r['group']}] = {r['nmi']:.3f}"
                + ("" if r["null_mean"] != r["null_mean"] else f" (null {r['null_mean']:.4f}, p {_p(r['p_value'])})")
                for _, r in pooled.iterrows()))
        else:
            lines.append("specialisation: " + ", ".join(f"NMI(region; expert) [{g}] = {v:.3f}" for g, v in zip(spec["group"], spec["value"])))
    if "delta" in result.tables:
        delta = result.tables["delta"]
        a, b = result.settings["labels"]
        for group, table in delta.groupby("group", sort=False):
            wide = table.pivot(index="region", columns="expert", values="delta")
            wide = wide.reindex([r for r in table["region"].drop_duplicates()])
            wide.columns = [f"Expert {e}" for e in wide.columns]
            lines += ["", f"difference {b} - {a} [{group}] (percentage points)", wide.round(1).to_string()]
    return "\n".join(lines)
