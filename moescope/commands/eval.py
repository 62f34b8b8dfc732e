"""``moescope eval``: face-recognition accuracy of a checkpoint (ANALYSES.md, "Evaluation protocols").

Verification (pairs: 10-fold accuracy, TAR@FAR) and closed-set identification (gallery/probe:
Rank-1/5/10/20, distractors allowed), with flip-fused L2-normalised embeddings. With no data
option the bundled demo split is used (held-out synthetic identities; its ``pairs.txt`` adds
verification); with no checkpoint, ``demo:after``.
"""
from __future__ import annotations

import argparse
import math

from ..cli import add_output_options, add_top_k_option, emit
from ..errors import MoescopeError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="verification and identification accuracy of a checkpoint",
        description="Evaluate a checkpoint: verification (10-fold accuracy, TAR@FAR) on pairs, closed-set "
        "identification (CMC Rank-1/5/10/20) on a gallery/probe split. Default: demo:after on the bundled demo split.",
    )
    p.add_argument("checkpoint", nargs="?", help="checkpoint path or demo:before/demo:after (default demo:after)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--split", metavar="DIR", help="gallery/, probe/ (optional distractors/) folders; a pairs.txt there adds verification")
    source.add_argument("--pairs", metavar="FILE", help="verification pairs: LFW pairs.txt or 'path1 path2 label' lines")
    source.add_argument("--bin", metavar="FILE", help="insightface verification .bin (lfw.bin, agedb_30.bin ...)")
    p.add_argument("--root", metavar="DIR", help="image root of --pairs (default: the pairs file's folder)")
    p.add_argument("--lowres", type=int, metavar="S", help="down-sample probes (second image of each pair) to S x S px and back; the gallery stays as is")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward pass (default 64)")
    p.add_argument("--no-flip", action="store_true", help="embed images alone instead of fusing them with their mirror image")
    add_top_k_option(p)
    add_output_options(p, seed=False)
    p.set_defaults(run=run)


def evaluation_result(checkpoint: str, data, figures: dict, settings: dict, warnings: list[str]):
    """The ``eval`` AnalysisResult: one table per protocol (one row each) and the figures as summary."""
    import pandas as pd

    from ..results import AnalysisResult

    return AnalysisResult(
        command="eval",
        checkpoints=[checkpoint],
        settings={"data": data.source, **settings},
        tables={protocol: pd.DataFrame([metrics]) for protocol, metrics in figures.items()},
        summary={"images": data.images, **figures},
        warnings=warnings,
    )


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def render(result) -> str:
    s, settings = result.summary, result.settings
    probes = f"probes down-sampled to {settings['lowres']}x{settings['lowres']} px" if settings["lowres"] else "images as they are"
    lines = [f"checkpoint: {result.checkpoints[0]}", f"data:       {settings['data']} ({probes})"]
    if "identification" in s:
        m = s["identification"]
        lines += ["", f"identification: {m['probes']} probes against {m['gallery']} gallery images ({m['distractors']} distractors)",
                  "  " + "  ".join(f"{k} {_fmt(v)}" for k, v in m.items() if k.startswith("Rank-"))]
    if "verification" in s:
        m = s["verification"]
        tar = "  ".join(f"{k} {_fmt(v)}" for k, v in m.items() if k.startswith("TAR@"))
        lines += ["", f"verification: {m['pairs']} pairs, 10 folds",
                  f"  accuracy {_fmt(m['accuracy'])} +- {_fmt(m['accuracy_std'])} (mean threshold {m['threshold']:.3f})", f"  {tar}"]
        if any(isinstance(v, float) and math.isnan(v) for v in m.values()):
            lines.append("  (n/a: too few impostor pairs to measure that false accept rate)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from facemoe_model.protocols import evaluate, load_protocols, lowres_probes

    from ..demo import demo_split_dir, load_model

    if args.batch_size < 1:
        raise MoescopeError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.root and not args.pairs:
        raise MoescopeError("--root applies to --pairs only")
    probe_transform = lowres_probes(args.lowres) if args.lowres is not None else None
    model = load_model(args.checkpoint, top_k=args.top_k)
    split = args.split if (args.split or args.pairs or args.bin) else demo_split_dir()
    data = load_protocols(split=split, pairs=args.pairs, root=args.root, bin_file=args.bin, size=model.img_size)
    figures = evaluate(model, data, batch_size=args.batch_size, flip=not args.no_flip, probe_transform=probe_transform)
    warnings = [summary for images in data.datasets if (summary := images.skip_summary)]
    settings = {"lowres": args.lowres, "batch_size": args.batch_size, "flip": not args.no_flip,
                "probe_transform": repr(probe_transform) if probe_transform else None}
    emit(evaluation_result(args.checkpoint or "demo:after", data, figures, settings, warnings), args, render)
    return 0
