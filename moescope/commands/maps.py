"""``moescope maps``: expert activation maps (paper D / E, Figures 6 and 8) and the numbers measured on them."""
from __future__ import annotations

import argparse

from ..cli import emit
from ..demo import DEFAULT_CHECKPOINT
from ..errors import MoescopeError
from ..choices import BATCH_SIZE, REGION_SOURCES
from ..options import (
    add_checkpoint,
    add_evaluation_data,
    add_image_source,
    add_output,
    add_alignment_options,
    add_top_k,
    image_source,
    load_models,
    positive,
    probe_transform,
    split_names,
)

DEFAULT_IMAGES = 4
"""Images mapped when neither --data, --images nor --ids is given (bundled demo faces, evenly spaced)."""


def register(sub: argparse._SubParsersAction) -> None:
    from ..choices import MAP_KINDS as KINDS

    p = sub.add_parser(
        "maps",
        help="expert activation maps per face and expert (paper Figures 6 and 8), with region and concentration tables",
        description="Draw, per image and expert, where a MoE layer (or stage) sends its tokens, how much each expert "
        "contributes, or what a gradient attribution says; tabulate map mass per facial region and how concentrated "
        f"each map is. With no arguments: {DEFAULT_CHECKPOINT} on {DEFAULT_IMAGES} bundled demo faces. With --cases: "
        "probes of evaluation data identified correctly / wrongly at Rank-1 (Figure 8), compared with bootstrap intervals.",
    )
    add_checkpoint(p)
    p.add_argument("--compare", metavar="CKPT2", help="a second checkpoint: before and after side by side, one colour scale")
    add_image_source(p, "face images")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--images", type=int, metavar="N",
                      help=f"map N images, evenly spaced over the sorted files (default: all of --data, {DEFAULT_IMAGES} demo faces without it; "
                      "with --cases: N probes per case, default all)")
    pick.add_argument("--ids", action="append", metavar="IDS", help="images by file name, stem or identity folder, comma-separated")
    p.add_argument("--layers", action="append", metavar="NAMES", help="MoE layers, by name or prefix, comma-separated (e.g. layers.2); default all")
    p.add_argument("--by", choices=("stage", "layer"), default="stage", help="maps per stage (blocks averaged, default) or per layer")
    p.add_argument("--kind", choices=KINDS, default="routing",
                   help="routing: top-1 assignment; topk: membership; weight: normalised combine weight; prob: router probability; "
                   "output: norm of each expert's weighted output; gradcam: Grad-CAM per expert; input: Integrated Gradients (default routing)")
    p.add_argument("--cases", metavar="success,failure",
                   help="Figure 8: probes identified correctly / wrongly at Rank-1 on the evaluation data (--split, default the bundled split; "
                   "or --data DIR of identity folders)")
    p.add_argument("--group", metavar="NAME", help="layer or stage drawn in the figures (default: the first one mapped)")
    p.add_argument("--rows", type=int, default=4, metavar="N", help="images per figure (per case with --cases); default 4")
    p.add_argument("--region-source", choices=REGION_SOURCES, default="landmarks",
                   help="images without a detected face: skip (landmarks, default) or label from the aligned-face template")
    p.add_argument("--steps", type=int, default=32, metavar="N", help="Integrated Gradients steps for --kind input (default 32)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples over images for --cases intervals (default 1000)")
    add_alignment_options(p)
    add_top_k(p)
    add_evaluation_data(p, batch_size=BATCH_SIZE)  # map passes take no mirror images
    p.add_argument("--workers", type=int, help="landmark worker processes (default: automatic)")
    add_output(p)
    p.set_defaults(run=run)


def _cases(value: str | None) -> bool:
    if value is None:
        return False
    names = [v.strip() for v in value.split(",") if v.strip()]
    if sorted(names) != ["failure", "success"]:
        raise MoescopeError(f"--cases takes success,failure, got {value!r}")
    return True


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..runners.maps import analyse_maps, select_paths, _split_from_folder

    cases = _cases(args.cases)
    positive(args.batch_size, "--batch-size")
    positive(args.rows, "--rows")
    positive(args.steps, "--steps")
    if args.images is not None:
        positive(args.images, "--images")
    layers = split_names(args.layers)
    ids = split_names(args.ids, "--ids")
    specs = [args.checkpoint] + ([args.compare] if args.compare else [])
    if not cases and (args.split or args.pairs or args.bin or args.lowres is not None):
        raise MoescopeError("--split/--pairs/--bin/--lowres apply with --cases only")
    if cases and ids:
        raise MoescopeError("--ids does not apply with --cases (the cases pick the probes)")
    models = load_models(specs, args)
    size = models[0].img_size
    split, paths, data = None, None, ""
    if cases:
        from ..options import evaluation_data

        if args.pairs or args.bin:
            raise MoescopeError("--cases needs identities: a gallery/probe split (--split DIR) or --data DIR of identity folders")
        if args.data and args.split:
            raise MoescopeError("give the evaluation data once: --split DIR or --data DIR")
        if args.data:
            folder = Path(args.data)
            split = _split_from_folder(folder, size)
            data = args.data if (folder / "gallery").is_dir() else f"{args.data} (identity folders: first image of each identity the gallery, the others probes)"
        else:
            evaluation = evaluation_data(args, size)
            split, data = evaluation.split, evaluation.source
    else:
        paths, data = image_source(args)
        default = DEFAULT_IMAGES if not args.data and not ids else None
        paths = select_paths(paths, ids=ids, images=args.images if args.images is not None else default)
    result = analyse_maps(
        models, specs, paths, kind=args.kind, layers=layers, by=args.by, cases=cases, split=split,
        probe_transform=probe_transform(args), per_case=args.images if cases else None, region_source=args.region_source,
        align=args.align, save_aligned=args.save_aligned,
        batch_size=args.batch_size, flip=not args.no_flip, n_boot=args.bootstrap, seed=args.seed, rows=args.rows,
        ig_steps=args.steps, figure_group=args.group, workers=args.workers, progress=not args.json, data=data,
    )
    emit(result, args, render)
    return 0


def render(result) -> str:
    """The tables as a person reads them: region mass and concentration per group (and the case comparison)."""
    from pathlib import Path

    import pandas as pd

    s, st = result.summary, result.settings
    lines = [
        f"moescope maps: {s['images_analysed']} of {s['images_found']} images analysed "
        f"({s['images_no_face']} without a face: {s['no_face_handling']}; {s['images_unreadable']} unreadable); "
        f"checkpoint(s) {', '.join(st['labels'])}; by {st['by']}",
        f"map: {st['kind']} = {st['map']}",
        f"figures: maps upsampled {st['interpolation']}; {st['colour_scale']}",
    ]
    if "reference" in st:
        lines.append(f"score: {st['score']}; reference: {st['reference']}; cost: {st['cost']}")
    if st["cases"]:
        lines.append(f"cases: {st['case_rule']}: {s['images_success']} success, {s['images_failure']} failure "
                     f"(Rank-1 over all probes {s['rank1_all_probes']:.4f})")
    mass = result.tables["region_mass"]
    conc = result.tables["concentration"]
    for label in st["labels"]:
        part = mass[(mass["checkpoint"] == label) & (mass["case"] == "all")]
        for group, table in part.groupby("group", sort=False):
            wide = table.pivot(index="region", columns="expert", values="mass").reindex(table["region"].drop_duplicates())
            wide.columns = [f"Expert {e}" for e in wide.columns]
            lines += ["", f"{label} [{group}] map mass per facial region (mean map value per region token, area-normalised)",
                      wide.to_string(float_format=lambda v: f"{v:.4g}")]
        cpart = conc[conc["checkpoint"] == label]
        if not st["cases"]:
            for group, table in cpart.groupby("group", sort=False):
                title = f"{label} [{group}] concentration (entropy normalised: 1 = uniform; face share of the map mass)"
                if table["image"].nunique() <= 12:
                    shown = table[["image", "expert", "entropy_normalised", "face_share", "background_area"]].copy()
                    shown["image"] = [f"{Path(i).parent.name}/{Path(i).name}" for i in shown["image"]]
                    lines += ["", f"{title} per image", shown.to_string(index=False, float_format=lambda v: f"{v:.3f}")]
                else:
                    mean = table.groupby("expert")[["entropy_normalised", "face_share", "background_area"]].mean()
                    lines += ["", f"{title}, mean over {table['image'].nunique()} images", mean.to_string(float_format=lambda v: f"{v:.3f}")]
    if st["cases"]:
        cases = result.tables["cases"]
        for (label, group), table in cases.groupby(["checkpoint", "group"], sort=False):
            cells = table.assign(cell=[f"{m:.3f} [{a:.3f},{b:.3f}]" if pd.notna(a) else (f"{m:.3f}" if pd.notna(m) else "-")
                                       for m, a, b in zip(table["mean"], table["ci_low"], table["ci_high"])])
            wide = cells.pivot_table(index=["metric", "case"], columns="expert", values="cell", aggfunc="first", sort=False)
            wide.columns = [f"Expert {e}" for e in wide.columns]
            lines += ["", f"{label} [{group}] success vs failure: mean over images [95% bootstrap interval]", wide.to_string()]
    return "\n".join(lines)
