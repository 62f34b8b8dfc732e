"""``moescope regions``: the region x expert routing table (paper B.1 / B.2)."""
from __future__ import annotations

import argparse

from ..cli import emit
from ..demo import DEFAULT_CHECKPOINT
from ..faces import ASSIGN_MODES, REGION_SOURCES
from ..options import add_checkpoint, add_image_source, add_output, add_top_k, image_source, load_models, positive, split_names
from ..stats.regions import COUNT_MODES, GROUPINGS


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
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward pass (default 64)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples over images for 95%% intervals (0 = off)")
    p.add_argument("--export-tokens", metavar="FILE", help="also write every token's routing to FILE (.parquet or .csv); memory grows with images")
    p.add_argument("--workers", type=int, help="landmark worker processes (default: automatic)")
    add_output(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..runners.regions import analyse_regions

    layers = split_names(args.layers)
    specs = [args.checkpoint] + ([args.compare] if args.compare else [])
    models = load_models(specs, args)
    paths, data = image_source(args)
    positive(args.batch_size, "--batch-size")
    result = analyse_regions(
        models, specs, paths, layers=layers, by=args.by, count=args.count, assign=args.assign,
        region_source=args.region_source, batch_size=args.batch_size, n_boot=args.bootstrap, seed=args.seed,
        export_tokens=args.export_tokens, workers=args.workers, progress=not args.json, data=data,
    )
    emit(result, args, render)
    return 0


def render(result) -> str:
    """The tables as a person reads them: one paper-layout table per checkpoint (and group)."""
    import pandas as pd

    s = result.summary
    lines = [
        f"moescope regions: {s['images_analysed']} of {s['images_found']} images analysed "
        f"({s['images_no_face']} without a face: {s['no_face_handling']}; {s['images_unreadable']} unreadable); "
        f"count={result.settings['count']}, assign={result.settings['assign']}, layers={result.settings['layers']}",
    ]
    for label in result.settings["labels"]:
        for group, table in result.tables[f"paper_{label}"].groupby("group", sort=False):
            lines += ["", f"{label} [{group}]  routing frequency (%) per facial region; 95% bootstrap interval over images"]
            shown = table.drop(columns=["group"]).copy()
            for col in [c for c in shown.columns if c.startswith("Expert ") and not c.endswith(("ci_low", "ci_high"))]:
                lo, hi = shown.pop(f"{col} ci_low"), shown.pop(f"{col} ci_high")
                shown[col] = [
                    f"{v:5.1f}" + (f" [{a:4.1f},{b:5.1f}]" if pd.notna(a) else "") if pd.notna(v) else "  -"
                    for v, a, b in zip(shown[col], lo, hi)
                ]
            lines.append(shown.to_string(index=False))
        spec = result.tables["specialisation"]
        spec = spec[(spec["checkpoint"] == label) & (spec["metric"] == "nmi")]
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
